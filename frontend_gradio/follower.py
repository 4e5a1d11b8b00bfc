"""The job follower: submits a job, follows its event stream, and says what the result column should show.

No Gradio here: :meth:`JobFollower.follow` yields :class:`JobUpdate`\\ s, each naming what changed (status
line, live preview, gallery, files, parameters used, seed) and leaving the rest :data:`KEEP`; the page
(``frontend_gradio.app``) turns them into component updates. :class:`RunningJobs` remembers the job each
(browser session, tab) waits on, so that the tab's Cancel button reaches it.
"""

from __future__ import annotations

import base64
import io
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from PIL import Image

from echo4o.logging import get_logger
from frontend_gradio import views
from frontend_gradio.client import ApiError, GatewayClient
from frontend_gradio.results import ResultCache

log = get_logger(__name__)


class _Keep:
    """The type of :data:`KEEP`."""

    _instance: _Keep | None = None

    def __new__(cls) -> _Keep:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "KEEP"


#: A field of a :class:`JobUpdate` that leaves its component as it is.
KEEP = _Keep()
#: Status-box states after which the follower yields nothing more.
FINAL_STATES = ("done", "failed", "cancelled", "error")


@dataclass(frozen=True)
class JobUpdate:
    """What the result column shows now. ``state`` and ``text`` make the status box (``views.status_html``);
    every other field is :data:`KEEP` unless this update changes it.

    ``preview``: the latest step preview, or ``None`` to clear (and hide) it. ``files``: local PNG paths,
    or ``None`` to clear (and hide) the download box. ``seed``: the seed the job used (for "reuse last").
    ``warning``: a sentence to show as a toast as well.
    """

    state: str
    text: str
    job_id: str | None = None
    step: int | None = None
    total: int | None = None
    preview: Image.Image | None | _Keep = KEEP
    gallery: list[tuple[str, str]] | _Keep = KEEP
    files: list[str] | None | _Keep = KEEP
    params: dict[str, Any] | None | _Keep = KEEP
    seed: int | None | _Keep = KEEP
    warning: str | None = None

    def __post_init__(self) -> None:
        if self.state not in views.STATES:
            raise ValueError(f"state must be one of {views.STATES}, got {self.state!r}")

    @property
    def final(self) -> bool:
        """Whether this is the last update of the job."""
        return self.state in FINAL_STATES

    def status_html(self) -> str:
        return views.status_html(self.state, self.text, job_id=self.job_id, step=self.step, total=self.total)


def decode_preview(data: Any) -> Image.Image | None:
    """The RGB image of a progress event's ``preview`` (base64 PNG/JPEG, optionally a data URL); ``None``
    when there is none or it cannot be decoded (a broken preview is dropped, the job goes on)."""
    if not data:
        return None
    try:
        raw = base64.b64decode(str(data).split(",", 1)[-1])
        return Image.open(io.BytesIO(raw)).convert("RGB")
    except Exception:  # noqa: BLE001 - see the docstring
        log.warning("undecodable preview dropped")
        return None


@dataclass
class Running:
    """The job a (session, tab) waits on: its id once submitted, the key it was submitted with, and whether
    Cancel was pressed (before the id was known, the follower cancels as soon as it is)."""

    job_id: str | None = None
    key: str | None = None
    cancel: bool = False


class RunningJobs:
    """The job each (session, tab) is waiting on, so that its Cancel button can reach it. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: dict[tuple[str, str], Running] = {}

    def start(self, session: str, tab: str, key: str | None) -> Running:
        entry = Running(key=key)
        with self._lock:
            self._jobs[(session, tab)] = entry
        return entry

    def finish(self, session: str, tab: str, entry: Running) -> None:
        with self._lock:
            if self._jobs.get((session, tab)) is entry:
                del self._jobs[(session, tab)]

    def request_cancel(self, session: str, tab: str) -> Running | None:
        with self._lock:
            entry = self._jobs.get((session, tab))
            if entry:
                entry.cancel = True
            return entry


class JobFollower:
    """Submits jobs through ``client`` and follows them until they end; results land in ``results``."""

    def __init__(self, client: GatewayClient, results: ResultCache) -> None:
        self.client = client
        self.results = results
        self.running = RunningJobs()

    def follow(self, session: str, tab: str, key: str | None,
               submit: Callable[[], dict[str, Any]]) -> Iterator[JobUpdate]:
        """Call ``submit`` (which returns the gateway's ``{id, events_url, ...}`` answer), then yield an
        update per event of the job, ending with a final one (``done``, ``failed``, ``cancelled``, or
        ``error`` when the gateway refuses or cannot be reached)."""
        entry = self.running.start(session, tab, key)
        try:
            yield JobUpdate("submitting", "Sending the request…", preview=None, gallery=[], files=None, params=None)
            try:
                job = submit()
            except ApiError as err:
                yield JobUpdate("error", err.readable(), warning=err.readable())
                return
            job_id = entry.job_id = job["id"]
            log.info("job submitted", extra={"job_id": job_id, "tab": tab, "session": session[:8]})
            if entry.cancel:  # Cancel was pressed while the request was on its way
                self.client.cancel(job_id, key=key)
            started = time.monotonic()
            yield JobUpdate("queued", "Queued", job_id=job_id)
            for event in self.client.events(job, key=key):
                update = self._update_of(event.name, event.data, job_id, key, started)
                if update is not None:
                    yield update
                    if update.final:
                        return
        except ApiError as err:
            yield JobUpdate("error", err.readable(), warning=err.readable())
        finally:
            self.running.finish(session, tab, entry)

    def _update_of(self, name: str, data: dict[str, Any], job_id: str, key: str | None,
                   started: float) -> JobUpdate | None:
        if name == "queued":
            pos = data.get("position")
            return JobUpdate("queued", "Queued" if pos is None else f"Queued: position {pos}", job_id=job_id)
        if name == "progress":
            step, total = data.get("step") or 0, data.get("total") or 0
            preview = decode_preview(data.get("preview"))
            return JobUpdate("running", f"Step {step} / {total}" if total else "Running", job_id=job_id,
                             step=step, total=total, preview=KEEP if preview is None else preview)
        if name == "done":
            done = data if data.get("id") else self.client.get_job(job_id, key=key)
            paths = self.results.download(done, key)
            seed = (done.get("result") or {}).get("seed")
            took = time.monotonic() - started
            return JobUpdate(
                "done", f"Done in {took:.1f} s · {len(paths)} image(s) · seed {seed}", job_id=job_id,
                preview=None, gallery=[(str(p), f"seed {seed} · #{i}") for i, p in enumerate(paths)],
                files=[str(p) for p in paths], params={**(done.get("params") or {}), "seed": seed}, seed=seed)
        if name == "failed":
            msg = data.get("message") or "the job failed"
            code = data.get("code")
            text = f"Generation failed: {msg}" + (f" ({code})" if code else "")
            return JobUpdate("failed", text, job_id=job_id, warning=text)
        if name == "cancelled":
            return JobUpdate("cancelled", "Cancelled", job_id=job_id, preview=None)
        return None  # an event this UI does not know: nothing to show

    def cancel(self, session: str, tab: str) -> JobUpdate | None:
        """Cancel the job (session, tab) waits on. ``None`` when nothing runs there; raises :class:`ApiError`
        when the gateway refuses. A running job stops at its next step (the follower then yields
        ``cancelled``); until then the update says so."""
        entry = self.running.request_cancel(session, tab)
        if entry is None:
            return None
        if entry.job_id is None:
            return JobUpdate("submitting", "Cancelling as soon as the job is created…")
        job = self.client.cancel(entry.job_id, key=entry.key)
        if job.get("status") == "cancelled":
            return JobUpdate("cancelled", "Cancelled", job_id=entry.job_id)
        return JobUpdate("running", "Cancelling: the job stops at its next step…", job_id=entry.job_id)
