"""Priority preemption: a worker that samples jobs pauses between two steps for a queued image job of a higher
priority, runs it, and then goes on where it stopped.

Without it, a user's job submitted while a worker samples a batch of a benchmark run's images (queued below users'
default priority) waits for that whole batch: on a GPU, tens of seconds. With it, the job starts within one step
and ``preempt_after_s``.

Looking: the run's first :class:`~worker.progress.ProgressReporter` calls :meth:`Preemption.look` on its own
thread, in the session of each progress write and cancel poll, so sampling never waits on the database. A look
reads the queued image jobs whose priority is above every job of the run (``crud.queued_jobs_of_kinds``, the
index on status and priority) and keeps those of the run's model version: a job of another version would need the
weights swapped mid-run, so it waits for the run to end. A job must have been seen queued for ``preempt_after_s``
first: an idle worker takes a job within milliseconds, so one still queued that long has no other worker to run it.

Running: the step callback (:func:`worker.tasks.step_callback`, on the sampling thread, between two steps) calls
:meth:`Preemption.run_waiting`, which runs the job as the worker runs any image job (open, claim, companions of its
shape, sample, store: :func:`worker.tasks.run_claimed`), and any other that became due meanwhile, then returns
and the sampling goes on. Meanwhile the paused jobs show stage ``paused`` (``detail.preempted_by``), their timeout
clock stops, and their results list the pauses (``paused: [{job_id, s}]``) with the pauses left out of their
``sampling_s``. The pipeline's state of the paused call is its own (latents, caches, generators), so its images
are those of an uninterrupted run.

One level: a preempting run is not itself preempted, so at most two runs' memory is held at once (turn
``preemption`` off where a second one does not fit). A worker shutting down preempts no more. If the worker dies
or is stopped meanwhile, the sweep (or the shutdown) requeues every running job of it, the paused ones included.

Torch-free at import time.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy.orm import Session

from echo4o.db import crud
from echo4o.jobs import IMAGE_KINDS, PAUSED_STAGE
from echo4o.logging import get_logger
from echo4o.settings import get_settings
from worker.outcomes import Claim, claim_job, fail_crashed, job_version, open_job, payload_problem

log = get_logger(__name__)

#: Queued jobs read per look (the highest priorities first).
LOOK_LIMIT = 8


class Preemption:
    """The preemption of one run (a job, or a batch): ``priority`` its jobs' highest, ``version`` its model version,
    ``claim`` the claim the runtime holds for it (given back after each preempting job)."""

    def __init__(self, runtime: Any, version: str, priority: int, claim: Claim, *, after_s: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.runtime = runtime
        self.version = version
        self.priority = priority
        self.claim = claim
        self.after_s = get_settings().preempt_after_s if after_s is None else after_s
        self.clock = clock
        #: Set by a look that found a job due; the step callback then calls :meth:`run_waiting`.
        self.wanted = threading.Event()
        #: Seconds the run was paused so far, and each pause: ``{"job_id", "s"}``.
        self.paused_s = 0.0
        self.pauses: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._due: str | None = None
        self._first_seen: dict[str, float] = {}
        #: Whether each queued job looked at can run on this run's weights (a queued job's params do not change:
        #: each is parsed once, not at every look).
        self._eligible: dict[str, bool] = {}
        self._followed: list[tuple[Any, dict[str, Any]]] = []

    @classmethod
    def of_run(cls, runtime: Any, version: str, priority: int, claim: Claim,
               preemptible: bool = True) -> Preemption | None:
        """The preemption of a new run; None when the run is not ``preemptible`` (it preempts one itself) or
        ``preemption`` is off."""
        return cls(runtime, version, priority, claim) if preemptible and get_settings().preemption else None

    def follow(self, reporter: Any, last: dict[str, Any]) -> None:
        """Show ``reporter``'s job as paused while a preempting job runs (``last``: its step and total so far)."""
        self._followed.append((reporter, last))

    # ------------------------------------------------------------------ the reporter's thread
    def look(self, session: Session) -> None:
        """Read the queued jobs that outrank the run; mark the first one seen queued for ``after_s`` as due."""
        if self.wanted.is_set() or self.runtime.shutting_down:
            return
        rows = crud.queued_jobs_of_kinds(session=session, kinds=IMAGE_KINDS, exclude=set(), limit=LOOK_LIMIT,
                                         above=self.priority)
        now = self.clock()
        seen: dict[str, float] = {}
        due = None
        for row in rows:
            if not self._can_run(row):
                continue  # fails on its own when its turn comes / needs other weights: waits for the run's end
            seen[row.id] = first = self._first_seen.get(row.id, now)
            if due is None and now - first >= self.after_s:
                due = row.id
        with self._lock:
            self._first_seen = seen
            if due is not None:
                self._due = due
                self.wanted.set()

    def _can_run(self, row: Any) -> bool:
        """Whether queued job ``row`` has valid params and this run's model version."""
        eligible = self._eligible.get(row.id)
        if eligible is None:
            payload, problem = payload_problem(row.kind, row.params)
            eligible = self._eligible[row.id] = (
                problem is None and job_version(payload, row.model_version, self.runtime) == self.version)
        return eligible

    # ------------------------------------------------------------------ the sampling thread
    def run_waiting(self) -> None:
        """Run every job found due, one after another, then return to the paused run (from its step callback)."""
        while self.wanted.is_set():
            with self._lock:
                job_id, self._due = self._due, None
                self.wanted.clear()
            if job_id is None:
                return
            t0 = self.clock()
            self._show(PAUSED_STAGE, {"preempted_by": job_id})
            try:
                status = run_preempting(job_id, self.runtime, self.version, paused=self.claim.job_id)
            finally:
                self.runtime.claim = self.claim  # the run's own again (the shutdown requeues what it holds)
                self._show("sampling", {})  # the pause's detail replaced: the row says sampling, nothing more
            spent = self.clock() - t0
            self.paused_s += spent
            self.pauses.append({"job_id": job_id, "s": round(spent, 4)})
            log.info("run resumed after a preempting job",
                     extra={"job_id": self.claim.job_id, "preempted_by": job_id, "status": status,
                            "paused_s": round(spent, 4)})

    def _show(self, stage: str, detail: dict[str, Any]) -> None:
        for reporter, last in self._followed:
            reporter.report(last["step"], last["total"], stage=stage, detail=detail)


def run_preempting(job_id: str, runtime: Any, version: str, *, paused: str) -> str:
    """Run queued job ``job_id`` inside the paused run of job ``paused`` on model ``version`` (resident); returns
    its final status. Its failure of any kind is its own: a bug fails it as ``worker_error``, and the paused run
    goes on."""
    from worker import tasks

    t_received = time.perf_counter()
    claim = None
    try:
        opened = open_job(job_id)
        if opened.outcome is not None:
            return opened.outcome
        job, payload = opened.job, opened.payload  # of this run's version: the look read it
        claim = claim_job(job_id, runtime)
        if not isinstance(claim, Claim):
            return claim  # taken by another worker meanwhile, cancelled or finished
        log.info("job started", extra={"job_id": job_id, "kind": job.kind, "attempt": claim.attempt,
                                       "preempting": paused,
                                       "queue_wait_s": round(claim.queue_wait_s, 3)})
        return tasks.run_claimed(job, payload, claim, version, runtime, t_received, preemptible=False)
    except Exception as exc:  # noqa: BLE001 - a bug: this job fails, the paused run goes on
        log.exception("preempting job crashed", extra={"job_id": job_id})
        return fail_crashed(job_id, exc, claim if isinstance(claim, Claim) else None)
