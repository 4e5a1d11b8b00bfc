"""Progress of one running job, written to its row from a background thread so that sampling never waits on
the database.

The step callback (running between two sampling steps) only hands the newest step to a
:class:`ProgressReporter` and checks its :attr:`~ProgressReporter.cancelled` flag; every database statement
(the progress write, which also reads ``cancel_requested``, and the idle cancel poll) runs on the reporter's
own thread. ``tests/worker/test_progress_reporter.py`` checks that with an engine event listener.

Torch-free.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy.orm import Session

from echo4o.db import crud, session_scope
from echo4o.logging import get_logger
from echo4o.settings import get_settings

log = get_logger(__name__)

#: While no step comes (a long prefill or step), check for a cancel this often.
CANCEL_POLL_S = 0.5


class ProgressReporter:
    """Writes one running job's progress from a background thread.

    :meth:`report` only records the newest ``(step, total, preview)`` and wakes the thread. The thread
    writes at once, but at most once per ``min_interval_s`` (default: ``ECHO4O_PROGRESS_INTERVAL_S``): steps
    that come faster than that, or faster than the database takes writes, are coalesced (the newest step
    wins; a preview is kept until a newer one replaces it). The event stream still shows every step number:
    it reports each step between two rows it reads. Each write also reads ``cancel_requested`` (one
    statement); when set, :attr:`cancelled` is set and the step callback stops the job at its next step.
    While no step comes, the thread checks for a cancel every ``poll_s`` seconds. :meth:`close` flushes the
    last report and joins the thread; the caller then writes the final state itself. A failed write is
    logged and the next one retries: progress is advisory, the job goes on.
    """

    def __init__(
        self,
        database_url: str,
        job_id: str,
        *,
        min_interval_s: float | None = None,
        poll_s: float = CANCEL_POLL_S,
        claim: Any = None,
        look: Callable[[Session], None] | None = None,
    ) -> None:
        self.database_url = database_url
        self.job_id = job_id
        #: worker.outcomes.Claim: writes only while its attempt holds the job; :attr:`cancelled` is set once it does
        #: not (the job was requeued: this run stops as for a cancel).
        self.fence = claim.fence() if claim is not None else {}
        self.min_interval_s = get_settings().progress_interval_s if min_interval_s is None else min_interval_s
        self.poll_s = poll_s
        #: Called on this thread, in the session of each progress write and cancel poll (a run's
        #: :meth:`worker.preemption.Preemption.look`): its exceptions are logged, never the job's.
        self.look = look
        self.cancelled = threading.Event()
        #: Progress writes that reached the database (failed ones are not counted).
        self.writes = 0
        self._cond = threading.Condition()
        self._pending: tuple[int, int | None, bytes | None, str, dict | None] | None = None
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name=f"echo4o-progress-{job_id}", daemon=True)
        self._thread.start()

    @property
    def thread_ident(self) -> int | None:
        """The ident of the thread that runs every database statement of this reporter."""
        return self._thread.ident

    def report(self, step: int, total: int | None, preview: bytes | None = None, *, stage: str = "sampling",
               detail: dict | None = None) -> None:
        """Record the newest progress; returns at once (never touches the database). ``stage`` names the phase
        (``sampling`` for images; a training run or benchmark names its own), ``detail`` is JSON shown beside the
        step (a training run's loss and lr, a benchmark's counts)."""
        with self._cond:
            if self._pending is not None:  # not yet written: keep them until newer ones replace them
                preview = self._pending[2] if preview is None else preview
                detail = self._pending[4] if detail is None else detail
            self._pending = (step, total, preview, stage, detail)
            self._cond.notify()

    def close(self) -> None:
        """Write what is still pending, then stop the thread (waits for it)."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join()

    def __enter__(self) -> ProgressReporter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _loop(self) -> None:
        last_write = float("-inf")
        while True:
            with self._cond:
                idle_until = time.monotonic() + self.poll_s
                while not self._closing:
                    now = time.monotonic()
                    if self._pending is not None:
                        delay = last_write + self.min_interval_s - now
                    else:
                        delay = idle_until - now
                    if delay <= 0:
                        break
                    self._cond.wait(delay)
                pending, self._pending = self._pending, None
                closing = self._closing
            if pending is not None:
                self._write(pending)
                if pending[0] > 0:  # a stage's start (step 0) does not hold back the first step's write
                    last_write = time.monotonic()
            elif closing:
                return
            else:
                self._poll_cancel()

    def _write(self, pending: tuple[int, int | None, bytes | None, str, dict | None]) -> None:
        step, total, preview, stage, detail = pending
        try:
            with session_scope(self.database_url) as s:
                cancel = crud.update_progress(session=s, job_id=self.job_id, step=step, total=total, preview=preview,
                                              stage=stage, detail=detail, **self.fence)
                self.writes += 1
                self._look(s)
        except Exception as exc:  # noqa: BLE001 - a missed progress write is retried by the next one
            log.warning("progress write failed", extra={"job_id": self.job_id, "step": step, "error": str(exc)})
            return
        if cancel:
            self.cancelled.set()

    def _look(self, session: Session) -> None:
        if self.look is None:
            return
        try:
            self.look(session)
        except Exception as exc:  # noqa: BLE001 - the next write or poll looks again
            session.rollback()
            log.warning("look at the queue failed", extra={"job_id": self.job_id, "error": str(exc)})

    def _poll_cancel(self) -> None:
        try:
            with session_scope(self.database_url) as s:
                job = crud.get_job(session=s, job_id=self.job_id)
                cancel = job is not None and job.cancel_requested
                if self.fence and not crud.holds_job(session=s, job_id=self.job_id, **self.fence):
                    cancel = True
                self._look(s)
        except Exception as exc:  # noqa: BLE001 - the next poll retries
            log.warning("cancel check failed", extra={"job_id": self.job_id, "error": str(exc)})
            return
        if cancel:
            self.cancelled.set()
