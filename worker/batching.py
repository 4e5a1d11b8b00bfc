"""Cross-request batching: a worker that starts an image job samples queued jobs of the same shape with it.

The job whose message this worker took (the *lead*) looks in the database for other ``queued`` image jobs (a
bounded query, in delivery order) of the same model version and the same
:func:`~worker.engine.pipeline.batch_key` (height, width, steps, timestep shift), of the lead's priority or above
(a batch never slows a job down for jobs it outranks: they wait for their own batch), and claims up to
``batch_max_size - 1`` of them with the claim a solo run makes (:func:`worker.outcomes.claim_job`, fenced by
attempt). Then one :meth:`~worker.engine.pipeline.Echo4oPipeline.generate_batch` samples them all, one packed
forward per step. Each job keeps its own prompt, seed, guidance, progress reporter, cancel, timeout, result and
failure handling: the functions of the solo run (``worker.tasks``) write them, and a job that is cancelled or fails
leaves the others running. Each result carries ``batch: {id, size}``.

Waiting: a lead that finds no compatible queued job starts at once. One that finds some but fewer than the batch
can take polls for more for at most ``batch_wait_ms`` (claiming each as it comes), then starts. It starts at once
too when a queued job that cannot join outranks it (a higher priority): that job runs next, and never waits for a
batch it is not part of.

A companion's own message, when it reaches any worker later, finds the job running on a live worker or finished
and is dropped (``crud.mark_running`` never takes a job that runs on a live worker); if this worker dies, the
dead-worker sweep requeues every running job of it, companions included.

Torch-free at import time.
"""

from __future__ import annotations

import time
import uuid
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

from echo4o.db import crud, session_scope
from echo4o.jobs import IMAGE_KINDS
from echo4o.logging import get_logger
from echo4o.settings import get_settings
from worker.outcomes import Claim, claim_job, job_version, payload_problem
from worker.progress import ProgressReporter

log = get_logger(__name__)

#: How often a lead that waits for more companions looks again.
POLL_S = 0.01
#: Candidates read per look, per place left in the batch (incompatible jobs may come first).
CANDIDATES_PER_PLACE = 4


@dataclass
class Member:
    """One job of a batch: its claim, validated payload, pipeline arguments and timings so far."""

    claim: Claim
    payload: Any
    kwargs: dict[str, Any] | None
    parent_id: str | None
    t_received: float
    priority: int


def _key(payload: Any) -> tuple[dict[str, Any], tuple]:
    """The pipeline arguments of ``payload`` (multiref: its references opened) and their batch key; ``ValueError``
    when either cannot be made (the job then runs, and fails, alone)."""
    from worker.engine.pipeline import batch_key

    kwargs = payload.to_pipeline_kwargs()
    return kwargs, batch_key(**kwargs)


def gather_companions(job: Any, payload: Any, version: str, claim: Claim, runtime: Any) -> list[Member]:
    """Claim the queued jobs that can be sampled with ``job`` (claimed by ``claim``, model ``version``); ``[]`` when
    batching is off (``batch_max_size`` 1) or none is compatible. ``runtime.claim`` stays the lead's."""
    settings = get_settings()
    places = settings.batch_max_size - 1
    if places <= 0:
        return []
    try:
        _, key = _key(payload)
    except ValueError:
        return []
    companions: list[Member] = []
    seen = {job.id}
    deadline = time.monotonic() + settings.batch_wait_ms / 1000
    try:
        while True:
            outranked = _claim_compatible(key, version, runtime, seen, places, companions, job.priority)
            if outranked or not companions or len(companions) >= places or time.monotonic() >= deadline:
                break
            time.sleep(POLL_S)
    finally:
        runtime.claim = claim  # claim_job sets it for each companion; the runtime requeues the lead on shutdown
    return companions


def _claim_compatible(key: tuple, version: str, runtime: Any, seen: set[str], places: int,
                      companions: list[Member], lead_priority: int) -> bool:
    """Claim the compatible queued jobs not ``seen`` yet, of ``lead_priority`` or above, into ``companions``; True
    when one that cannot join has a priority above ``lead_priority`` (the batch must not keep it waiting)."""
    db = get_settings().database_url
    with session_scope(db) as s:
        rows = crud.queued_jobs_of_kinds(session=s, kinds=IMAGE_KINDS, exclude=seen,
                                         limit=CANDIDATES_PER_PLACE * places, above=lead_priority - 1)
        candidates = [(r.id, r.kind, r.params, r.model_version, r.parent_id, r.priority) for r in rows]
    outranked = False
    for job_id, kind, params, row_version, parent_id, priority in candidates:
        if len(companions) >= places:
            break
        seen.add(job_id)  # looked at once: an incompatible job is not parsed again
        fits = _fits(kind, params, row_version, key, version, runtime)
        if fits is None:
            outranked = outranked or priority > lead_priority
            continue
        payload, kwargs = fits
        t_received = time.perf_counter()
        claim = claim_job(job_id, runtime)
        if not isinstance(claim, Claim):
            continue  # taken by another worker meanwhile, or cancelled
        companions.append(Member(claim, payload, kwargs, parent_id, t_received, priority))
    return outranked


def _fits(kind: str, params: Any, row_version: str | None, key: tuple, version: str,
          runtime: Any) -> tuple[Any, dict[str, Any]] | None:
    """A queued job's payload and pipeline arguments when it can join a batch of ``key`` on model ``version``."""
    payload, problem = payload_problem(kind, params)
    if problem is not None or job_version(payload, row_version, runtime) != version:
        return None
    try:
        kwargs, their_key = _key(payload)
    except ValueError:
        return None
    return (payload, kwargs) if their_key == key else None


def run_batch(job: Any, claim: Claim, payload: Any, companions: list[Member], runtime: Any, t_received: float,
              version: str, *, preemptible: bool = True) -> str:
    """Sample the lead job (row ``job``, ``claim``, ``payload``) and its ``companions`` in one
    :meth:`~worker.engine.pipeline.Echo4oPipeline.generate_batch` on model ``version``; each job ends as it would
    alone (written by the solo run's functions), its result with ``batch: {id, size}``. ``preemptible``: a queued
    job above every member's priority may pause the batch (worker/preemption.py). Returns the lead's status."""
    from worker import tasks
    from worker.evaluation.job import image_job_succeeded
    from worker.preemption import Preemption

    settings = get_settings()
    members = [Member(claim, payload, None, job.parent_id, t_received, job.priority), *companions]
    preemption = Preemption.of_run(runtime, version, max(m.priority for m in members), claim, preemptible)
    batch = {"id": uuid.uuid4().hex[:12], "size": len(members)}
    deadline = time.monotonic() + settings.job_timeout_s
    statuses: dict[str, str] = {}
    live: list[tuple[Member, ProgressReporter, dict[str, Any]]] = []
    requests: list[dict[str, Any]] = []
    log.info("batch started", extra={"batch_id": batch["id"], "batch_size": batch["size"],
                                     "job_ids": ",".join(m.claim.job_id for m in members)})
    with ExitStack() as stack:  # leaving it closes every reporter (each writes its job's last step)
        for m in members:
            job_id = m.claim.job_id
            try:
                kwargs = m.kwargs if m.kwargs is not None else m.payload.to_pipeline_kwargs()
            except Exception as exc:  # noqa: BLE001 - an unreadable reference: this job alone
                statuses[job_id] = tasks.sampling_failed(m.claim, exc, 0)
                continue
            log.info("job started", extra={"job_id": job_id, "attempt": m.claim.attempt, "batch_id": batch["id"],
                                           "batch_size": batch["size"], "queue_wait_s": round(m.claim.queue_wait_s, 3)})
            look = preemption.look if preemption is not None and not live else None  # one member looks
            reporter = stack.enter_context(ProgressReporter(settings.database_url, job_id, claim=m.claim, look=look))
            tasks.start_sampling(reporter)  # a job cancelled meanwhile leaves the batch at its first step
            last: dict[str, Any] = {"step": 0, "total": None}
            if preemption is not None:
                preemption.follow(reporter, last)
            requests.append({**kwargs, "callback": tasks.step_callback(job_id, reporter, deadline, last, preemption),
                             "preview_every": settings.preview_every})
            live.append((m, reporter, last))
        t0 = time.perf_counter()
        outs: list[Any] = []
        if requests:
            try:
                outs = runtime.pipeline.generate_batch(requests)
            except Exception as exc:  # noqa: BLE001 - the batch as a whole failed: each of its jobs fails with it
                outs = [exc] * len(requests)
        sampling_s = time.perf_counter() - t0 - tasks.paused_s(preemption)
        for (_, reporter, last), out in zip(live, outs, strict=True):
            if not isinstance(out, BaseException):  # written with the last step as the reporter closes
                reporter.report(last["step"], last["total"], stage="encoding")
    for (m, reporter, last), out in zip(live, outs, strict=True):
        if not isinstance(out, BaseException) and reporter.cancelled.is_set():  # cancelled with the last step
            out = tasks.JobCancelled(m.claim.job_id)
        if isinstance(out, BaseException):
            status = tasks.sampling_failed(m.claim, out, last["step"])
        else:
            status = tasks.store_result(m.claim, m.payload, out, runtime, sampling_s,
                                        m.t_received, {"batch": batch, **tasks.pauses(preemption)})
        if status == "succeeded" and m.parent_id is not None:
            image_job_succeeded(m.parent_id)
        statuses[m.claim.job_id] = status
    log.info("batch finished", extra={"batch_id": batch["id"], "batch_size": batch["size"],
                                      "sampling_s": round(sampling_s, 4)})
    return statuses[claim.job_id]
