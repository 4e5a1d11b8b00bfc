"""Fault injection for the chaos suite: a Redis server the test owns, a client that keeps submitting through
the HTTP API while processes die, the kill of a busy worker, and the final audit of every accepted job.

What counts as what:

* **accepted**: ``POST /generate`` answered 2xx with a job id. Only accepted jobs are owed a result. A request
  refused with 503 ``broker_unavailable`` (Redis down) or left without an answer (the gateway killed under
  it, connection refused while it restarts) is not accepted; the client submits it again, as a real client
  would, and the figures count it.
* **hit**: a job whose row is still ``queued`` or ``running`` on a worker right after that worker was SIGKILLed
  (read once it is dead, so the set is exact). A hit job must end with ``attempts >= 2``.
* **lost**: an accepted job that is not ``succeeded`` when every job has ended or the deadline has passed.
* **duplicate**: an accepted job that more than one run finished (two ``job succeeded`` log events, or a
  finished run whose result the attempt fence refused because the job had been requeued meanwhile), or whose
  results folder holds anything but its one ``0.png``.
* **requeue delay**: from a kill to the ``requeued a job whose worker is gone`` event of a job it hit (a live
  worker's heartbeat sweep, or the embedded worker's start), read from the JSON logs.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa

from echo4o.jobs import MIN_SIDE, TERMINAL_STATUSES
from tests.support import figures
from tests.support.stack import Stack
from tests.support.worker_proc import POLL_S, WorkerProcess

#: The shortest job there is: one image at the smallest size, two schedule points (one denoising step).
TINY_JOB: dict[str, int] = {"height": MIN_SIDE, "width": MIN_SIDE, "num_steps": 2}
#: Log events of a run that finished sampling and tried to store its result (worker/tasks.py).
FINISHED_RUN_EVENTS = ("job succeeded", "result not stored: the job is no longer this attempt's")
#: Log event of a dead worker's job put back in the queue (worker/runtime.py).
REQUEUED_EVENT = "requeued a job whose worker is gone"


# --- figures ----------------------------------------------------------------------------------------------
@dataclass
class ChaosFigures:
    """What one chaos run did and found; printed at the end of the pytest run (tests/support/figures.py)."""

    variant: str
    submitted: int = 0  # accepted jobs
    refused: int = 0  # 503 broker_unavailable answers, submitted again
    unanswered: int = 0  # tries refused or dropped while the gateway restarted (retried every 0.1 s)
    kills: int = 0
    kills_mid_job: int = 0  # kills that left a job running on the dead worker
    redis_restarts: int = 0
    gateway_restarts: int = 0
    lost: int = 0
    duplicates: int = 0
    max_attempts: int = 0
    reruns_without_kill: int = 0  # jobs with attempts >= 2 that no kill hit (a requeue of a live worker's job)
    max_requeue_s: float = 0.0  # longest delay from a kill to the requeue of a job it hit
    #: Rows of submissions the client never heard of (no answer, or refused), by status.
    unanswered_rows: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0
    #: "+SECONDS what happened" lines, from the start of the run.
    timeline: list[str] = field(default_factory=list)
    _t0: float = field(default_factory=time.monotonic)

    def note(self, what: str) -> None:
        self.timeline.append(f"+{time.monotonic() - self._t0:6.1f}s {what}")

    def finish(self) -> None:
        self.wall_s = time.monotonic() - self._t0
        self.note("audit done")

    def line(self) -> str:
        return (f"{self.variant}: submitted={self.submitted} kills={self.kills} (mid-job {self.kills_mid_job}) "
                f"redis_restarts={self.redis_restarts} gateway_restarts={self.gateway_restarts} "
                f"lost={self.lost} duplicates={self.duplicates} max_attempts={self.max_attempts} "
                f"max_requeue={self.max_requeue_s:.1f}s "
                f"reruns_without_kill={self.reruns_without_kill} refused_503={self.refused} "
                f"unanswered_tries={self.unanswered} rows_not_accepted={self.unanswered_rows or 0} "
                f"wall={self.wall_s:.1f}s")


    def lines(self) -> list[str]:
        return [self.line(), *(f"    {event}" for event in self.timeline)]

    def report(self) -> None:
        """Print these figures at the end of the pytest run, as they stand then (also when the test failed)."""
        figures.report_later("chaos figures", self.lines)


# --- submitting -------------------------------------------------------------------------------------------
@dataclass
class Submitter:
    """Submits ``total`` tiny jobs through ``POST /generate`` on a thread, submitting again what was not
    accepted. The test releases them in chunks (:meth:`allow`), so that jobs are arriving and running at every
    fault however fast the workers are."""

    stack: Stack
    total: int
    allowed: int = 0
    accepted: list[str] = field(default_factory=list)
    refused: int = 0
    unanswered: int = 0
    unexpected: list[str] = field(default_factory=list)  # any other answer: a bug (4xx or 5xx) to report
    error: BaseException | None = None
    _thread: threading.Thread | None = None
    _stop: threading.Event = field(default_factory=threading.Event)

    def allow(self, n: int) -> None:
        """Let the first ``n`` jobs (at most ``total``) be submitted."""
        self.allowed = min(max(n, self.allowed), self.total)

    def feed(self, records: Records, more: int = 2) -> None:
        """Allow ``more`` jobs when all those allowed were accepted and have ended (a fault waits for a running
        job; the jobs released for it ran out first)."""
        if len(self.accepted) >= self.allowed and records.unfinished(self.accepted) == 0:
            self.allow(self.allowed + more)

    def start(self) -> Submitter:
        self._thread = threading.Thread(target=self._run, name="chaos-submitter", daemon=True)
        self._thread.start()
        return self

    def done(self) -> bool:
        return self._thread is not None and not self._thread.is_alive()

    def join(self, timeout_s: float) -> None:
        assert self._thread is not None
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            self._stop.set()
            raise AssertionError(f"submitter still running after {timeout_s} s ({len(self.accepted)} accepted)")
        if self.error is not None:
            raise AssertionError(f"submitter failed: {self.error!r}") from self.error

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        try:
            with self.stack.client(timeout=30.0) as c:
                for i in range(self.total):
                    while not self._stop.is_set() and i >= self.allowed:
                        time.sleep(POLL_S)
                    if self._stop.is_set():
                        return
                    self.accepted.append(self._submit_one(c, i))
        except BaseException as exc:  # noqa: BLE001 - handed to the test through join()
            self.error = exc

    def _submit_one(self, c: httpx.Client, i: int) -> str:
        body = {"prompt": f"chaos job {i}", "seed": i, **TINY_JOB}
        while not self._stop.is_set():
            try:
                r = c.post("/generate", json=body)
            except httpx.TransportError:  # gateway killed under the request, or not listening yet
                self.unanswered += 1
                time.sleep(POLL_S * 2)
                continue
            if r.status_code in (200, 202):
                return r.json()["id"]
            code = _error_code(r)
            if r.status_code == 503 and code == "broker_unavailable":
                self.refused += 1
                time.sleep(POLL_S * 2)
                continue
            self.unexpected.append(f"job {i}: {r.status_code} {r.text[:300]}")
            if len(self.unexpected) > 20:
                raise RuntimeError("more than 20 unexpected answers to POST /generate:\n" + "\n".join(self.unexpected))
            time.sleep(POLL_S * 2)
        raise RuntimeError("stopped")


def _error_code(r: httpx.Response) -> str | None:
    try:
        return r.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None


# --- reading the records ----------------------------------------------------------------------------------
class Records:
    """Reads job rows of one database (the test's own; nothing else writes to it)."""

    def __init__(self, database_url: str) -> None:
        self.engine = sa.create_engine(database_url, pool_pre_ping=True)
        meta = sa.MetaData()
        self.jobs = sa.Table("jobs", meta, autoload_with=self.engine)

    def close(self) -> None:
        self.engine.dispose()

    def worker_statuses(self, worker_ids: Iterable[str]) -> dict[str, str]:
        """{worker id: status} of those workers' rows."""
        workers = sa.table("workers", sa.column("id"), sa.column("status"))
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(workers.c.id, workers.c.status).where(
                workers.c.id.in_(list(worker_ids)))).all()
        return {w: status for w, status in rows}

    def finished_count(self) -> int:
        with self.engine.connect() as conn:
            return conn.scalar(sa.select(sa.func.count()).select_from(self.jobs)
                               .where(self.jobs.c.status.in_(TERMINAL_STATUSES))) or 0

    def unfinished(self, ids: Iterable[str]) -> int:
        ids = list(ids)
        if not ids:
            return 0
        with self.engine.connect() as conn:
            return conn.scalar(sa.select(sa.func.count()).select_from(self.jobs)
                               .where(self.jobs.c.status.not_in(TERMINAL_STATUSES), self.jobs.c.id.in_(ids))) or 0

    def running_on(self, worker_ids: Iterable[str]) -> dict[str, str]:
        """{worker id: job id} of the jobs ``running`` on those workers."""
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(self.jobs.c.worker, self.jobs.c.id).where(
                self.jobs.c.status == "running", self.jobs.c.worker.in_(list(worker_ids)))).all()
        return {w: j for w, j in rows}

    def unfinished_on(self, worker_id: str) -> list[str]:
        """Jobs still queued or running whose last claim was ``worker_id`` (read after that worker died)."""
        with self.engine.connect() as conn:
            return list(conn.scalars(sa.select(self.jobs.c.id).where(
                self.jobs.c.worker == worker_id, self.jobs.c.status.not_in(TERMINAL_STATUSES))).all())

    def statuses_except(self, ids: Iterable[str]) -> dict[str, int]:
        """{status: count} of the jobs not in ``ids``."""
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(self.jobs.c.status, sa.func.count()).where(
                self.jobs.c.id.not_in(list(ids))).group_by(self.jobs.c.status)).all()
        return {status: n for status, n in rows}

    def rows(self, ids: Iterable[str]) -> dict[str, Any]:
        with self.engine.connect() as conn:
            return {r.id: r for r in conn.execute(sa.select(self.jobs).where(self.jobs.c.id.in_(list(ids)))).all()}


# --- faults -----------------------------------------------------------------------------------------------
def wait_until(condition: Callable[[], Any], *, what: str, timeout_s: float, check: Callable[[], None] = lambda: None,
               diagnose: Callable[[], str] = lambda: "") -> Any:
    """Poll ``condition`` until it returns something truthy (returned); ``check`` may raise to stop early."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        check()
        if time.monotonic() > deadline:
            raise AssertionError(f"still waiting for {what} after {timeout_s:.0f} s\n{diagnose()}")
        time.sleep(POLL_S * 2)


def wait_workers_ready(stack: Stack, n: int, *, timeout_s: float) -> None:
    """Wait until ``n`` of the stack's live workers say ``ready`` or ``busy`` (model loaded, consuming)."""
    wait_until(lambda: sum(w.status() in ("ready", "busy") for w in stack.workers if w.alive()) >= n,
               what=f"{n} workers ready", timeout_s=timeout_s, check=stack.check_alive, diagnose=stack.logs)


def wait_embedded_ready(stack: Stack, records: Records, *, timeout_s: float) -> None:
    """Wait until the gateway's worker child says ``ready`` or ``busy``."""
    import socket

    host = socket.gethostname()

    def ready() -> bool:
        statuses = records.worker_statuses([f"{host}:{pid}" for pid in stack.gateway_children()])
        return any(status in ("ready", "busy") for status in statuses.values())

    wait_until(ready, what="the embedded worker to be ready", timeout_s=timeout_s, check=stack.check_alive,
               diagnose=stack.logs)


def kill_busy_worker(stack: Stack, records: Records, *, timeout_s: float,
                     feed: Callable[[], None] = lambda: None) -> dict[str, float]:
    """SIGKILL a worker of ``stack`` that is running a job while another one is ready (a worker dies among live
    ones, whose heartbeat sweep requeues its job); returns the jobs the kill left unfinished on it (read once it
    is dead), each with the kill's epoch time. ``feed`` is called while no worker qualifies (to send more jobs)."""

    def busy() -> WorkerProcess | None:
        live = {w.worker_id: w for w in stack.workers if w.alive()}
        running = records.running_on(live)
        for worker_id in running:
            if any(w.status() in ("ready", "busy") for other, w in live.items() if other != worker_id):
                return live[worker_id]
        feed()
        return None

    victim = wait_until(busy, what="a worker running a job", timeout_s=timeout_s, diagnose=stack.logs)
    killed_at = time.time()
    stack.kill_worker(victim)
    return dict.fromkeys(records.unfinished_on(victim.worker_id), killed_at)


def kill_embedded_worker(stack: Stack, records: Records, *, timeout_s: float,
                         feed: Callable[[], None] = lambda: None) -> dict[str, float]:
    """SIGKILL the gateway's embedded worker child once it runs a job, and wait until the gateway has started
    another; returns the jobs the kill left unfinished on the dead one, each with the kill's epoch time. ``feed``
    is called while it runs none (to send more jobs)."""
    import socket

    host = socket.gethostname()

    def busy() -> int | None:
        children = {f"{host}:{pid}": pid for pid in stack.gateway_children()}
        running = records.running_on(children)
        pid = next((children[w] for w in running), None)
        if pid is None:
            feed()
        return pid

    pid = wait_until(busy, what="the embedded worker running a job", timeout_s=timeout_s, check=stack.check_alive,
                     diagnose=stack.logs)
    killed_at = time.time()
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: pid not in stack.gateway_children(), what=f"worker {pid} to die", timeout_s=30)
    hit = dict.fromkeys(records.unfinished_on(f"{host}:{pid}"), killed_at)
    wait_until(lambda: [c for c in stack.gateway_children() if c != pid], what="the gateway to start a new worker",
               timeout_s=timeout_s, check=stack.check_alive, diagnose=stack.logs)
    return hit


# --- the audit --------------------------------------------------------------------------------------------
def log_events(data_dir: Path, events: Iterable[str]) -> dict[str, list[float]]:
    """Per job id, the times (epoch seconds) of the log ``events`` about it, from every JSON log line of every
    process of the stack (the workers' logs, and the gateway's, where the embedded worker writes)."""
    wanted = set(events)
    found: dict[str, list[float]] = {}
    for log in data_dir.glob("*.log"):
        for line in log.read_text(errors="replace").splitlines():
            if not line.startswith("{"):
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("event") in wanted and rec.get("job_id"):
                ts = datetime.strptime(rec["ts"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()
                found.setdefault(rec["job_id"], []).append(ts)
    return found


def audit(stack: Stack, records: Records, accepted: list[str], hit: Mapping[str, float],
          figures: ChaosFigures) -> list[str]:
    """Check every accepted job (``hit``: the jobs a kill hit, with the kill's epoch time); fills ``figures`` and
    returns one line per problem found (empty: all good)."""
    from PIL import Image

    problems: list[str] = []
    if len(set(accepted)) != len(accepted):
        problems.append(f"the gateway gave the same id to two submissions: {Counter(accepted).most_common(3)}")
    rows = records.rows(accepted)
    runs = {job_id: len(times) for job_id, times in log_events(stack.data_dir, FINISHED_RUN_EVENTS).items()}
    requeued = log_events(stack.data_dir, [REQUEUED_EVENT])
    duplicates: set[str] = set()
    lost: set[str] = set()
    for job_id in accepted:
        row = rows.get(job_id)
        if row is None:
            lost.add(job_id)
            problems.append(f"{job_id}: accepted but has no row")
            continue
        if row.status != "succeeded":
            lost.add(job_id)
            problems.append(f"{job_id}: ended {row.status} ({row.error_code}: {row.error_message}), attempts "
                            f"{row.attempts}, worker {row.worker}")
            continue
        if runs.get(job_id, 0) > 1:
            duplicates.add(job_id)
            problems.append(f"{job_id}: {runs[job_id]} runs finished and tried to store a result")
        if job_id in hit:
            if row.attempts < 2:
                problems.append(f"{job_id}: its worker was killed mid-job but it records attempts={row.attempts}")
            after = [t - hit[job_id] for t in requeued.get(job_id, []) if t >= hit[job_id]]
            if after:
                figures.max_requeue_s = max(figures.max_requeue_s, min(after))
        folder = stack.data_dir / "results" / job_id
        files = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        if files != ["0.png"]:
            duplicates.add(job_id)
            problems.append(f"{job_id}: results folder holds {files}, expected exactly ['0.png']")
            continue
        images = (row.result or {}).get("images")
        if images != [f"results/{job_id}/0.png"]:
            problems.append(f"{job_id}: result lists {images}")
        try:
            with Image.open(folder / "0.png") as img:
                img.load()
                if img.size != (TINY_JOB["width"], TINY_JOB["height"]):
                    problems.append(f"{job_id}: image is {img.size}")
        except Exception as exc:  # noqa: BLE001 - any unreadable image is the finding
            problems.append(f"{job_id}: 0.png does not open: {exc!r}")
    figures.submitted = len(accepted)
    figures.unanswered_rows = records.statuses_except(accepted)
    figures.lost = len(lost)
    figures.duplicates = len(duplicates)
    figures.max_attempts = max((r.attempts for r in rows.values()), default=0)
    figures.reruns_without_kill = sum(1 for j, r in rows.items() if r.attempts >= 2 and j not in hit)
    return problems


def wait_all_finished(stack: Stack, records: Records, accepted: list[str], *, timeout_s: float,
                      check: Callable[[], None] = lambda: None) -> None:
    """Poll until every accepted job has ended (``check`` may fail it early); the failure lists the unfinished
    ones and the logs."""

    def diagnose() -> str:
        rows = records.rows(accepted)
        stuck = [f"{j}: {r.status} attempts={r.attempts} worker={r.worker} stage={r.progress_stage}"
                 for j, r in rows.items() if r.status not in TERMINAL_STATUSES]
        return f"{len(stuck)} unfinished:\n" + "\n".join(stuck[:30]) + "\n" + stack.logs(40)

    wait_until(lambda: records.unfinished(accepted) == 0, what=f"all {len(accepted)} accepted jobs to end",
               timeout_s=timeout_s, check=check, diagnose=diagnose)
