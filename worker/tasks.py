"""Celery tasks, kept thin: load the job row, re-validate its payload, call the pipeline, store the images
atomically, report progress (through :class:`worker.progress.ProgressReporter`). The job row is the source of
truth; the task's own return value is only the final status. No exception escapes a job that failed on its
own (bad payload, engine ``ValueError``, a crash inside the engine): the job is marked failed with the reason
and the worker takes the next one.

Each queue's task runs the job with the handler of its kind, :data:`JOB_HANDLERS`: the image kinds
(``echo4o.jobs.IMAGE_KINDS``) run the pipeline, ``benchmark`` and ``finetune`` their own handlers; a kind with
none fails as ``not_supported``, naming the kind and its queue.

Torch-free at import time (the engine is imported by :mod:`worker.runtime` when the worker starts).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from celery import shared_task

from echo4o.db import crud, session_scope
from echo4o.db.models import Job
from echo4o.jobs import IMAGE_KINDS, JOB_KINDS, QUEUE_OF_KIND
from echo4o.logging import get_logger
from echo4o.settings import get_settings
from worker.batching import gather_companions, run_batch
from worker.celery_app import TASK_IMAGE, TASK_TRAIN
from worker.evaluation.job import execute_benchmark_job, image_job_succeeded
from worker.outcomes import (
    Claim,
    claim_job,
    fail_crashed,
    fail_job,
    free_device_memory,
    job_version,
    open_job,
    read_job,
)
from worker.preemption import Preemption
from worker.progress import ProgressReporter
from worker.training.job import execute_finetune_job

log = get_logger(__name__)


class JobCancelled(Exception):
    """Raised from the step callback when the job's cancel was requested."""


class JobTimedOut(Exception):
    """Raised from the step callback when the job ran longer than ``job_timeout_s``."""


class JobHandler(Protocol):
    """Runs one job whose row exists; returns its final status."""

    def __call__(self, job_id: str, *, redelivered: bool = False, row: Job | None = None) -> str: ...


@shared_task(name=TASK_IMAGE, bind=True, acks_late=True, reject_on_worker_lost=True)
def run_image_job(self: Any, job_id: str) -> str:
    """The task of queue ``gpu``: runs the job with the handler of its kind; returns its final status."""
    return execute_job(job_id, redelivered=_redelivered(self))


@shared_task(name=TASK_TRAIN, bind=True, acks_late=True, reject_on_worker_lost=True)
def run_train_job(self: Any, job_id: str) -> str:
    """The task of queue ``train``: runs the job with the handler of its kind; returns its final status."""
    return execute_job(job_id, redelivered=_redelivered(self))


def _redelivered(task: Any) -> bool:
    return bool((task.request.delivery_info or {}).get("redelivered"))


def execute_job(job_id: str, *, redelivered: bool = False) -> str:
    """Run job ``job_id`` with the handler of its kind (:data:`JOB_HANDLERS`); returns its final status, or
    ``"missing"`` when it has no row. A handler that raises (a bug: handlers end their jobs themselves) fails the
    job as ``worker_error``, fenced by the run's claim when it made one. Callable without Celery."""
    from worker.runtime import current_runtime

    job = read_job(job_id)
    if job is None:
        return "missing"
    handler = JOB_HANDLERS.get(job.kind) or _not_supported(job.kind)
    try:
        return handler(job_id, redelivered=redelivered, row=job)  # the handler does not read the row again
    except Exception as exc:  # a bug: the job fails with it (no client waits forever), the worker goes on
        log.exception("job handler crashed", extra={"job_id": job_id, "kind": job.kind})
        runtime = current_runtime()
        claim = runtime.claim if runtime is not None else None
        return fail_crashed(job_id, exc, claim if claim is not None and claim.job_id == job_id else None)
    finally:
        runtime = current_runtime()
        if runtime is not None:
            runtime.claim = None  # the job's run is over here (a SIGTERM past its grace has nothing to requeue)


def _not_supported(kind: str) -> JobHandler:
    """A handler that fails jobs of ``kind`` as ``not_supported``, naming the kind and its queue."""
    where = f" on queue {QUEUE_OF_KIND[kind]}" if kind in QUEUE_OF_KIND else ""

    def fail_unsupported(job_id: str, *, redelivered: bool = False, row: Job | None = None) -> str:
        return fail_job(
            job_id, "not_supported", f"{kind} jobs are not supported yet: no worker version{where} runs them (planned)"
        )

    return fail_unsupported


def execute_image_job(job_id: str, *, redelivered: bool = False, row: Job | None = None) -> str:
    """The handler of the image kinds (``IMAGE_KINDS``): claim the job, load its model version, run the pipeline,
    store the images; returns the final status. Every write after the claim is fenced by it
    (:class:`worker.outcomes.Claim`). Callable without Celery (benchmarks, tests)."""
    from worker.runtime import get_runtime

    t_received = time.perf_counter()
    opened = open_job(job_id, row=row)
    if opened.outcome is not None:
        return opened.outcome
    job, payload = opened.job, opened.payload
    runtime = get_runtime()
    claim = claim_job(job_id, runtime)
    if not isinstance(claim, Claim):
        return claim  # finished, cancelled, or running on a live worker
    version = job_version(payload, job.model_version, runtime)
    try:  # between jobs: load the job's version unless it is resident (worker/models_cache.py)
        runtime.use(version)
    except Exception as exc:  # noqa: BLE001 - unregistered, missing or unloadable: this job fails, not the worker
        log.warning("model version unavailable", extra={"job_id": job_id, "model_version": version,
                                                         "error": str(exc)})
        return fail_job(job_id, "model_unavailable",
                        f"model_version {version!r} cannot be served by this worker: {exc}", claim)
    log.info(
        "job started",
        extra={"job_id": job_id, "kind": job.kind, "attempt": claim.attempt, "redelivered": redelivered,
               "queue_wait_s": round(claim.queue_wait_s, 3)},
    )
    runtime.set_status("busy", now=False)  # written by the heartbeat's thread, off the job's path
    try:
        return run_claimed(job, payload, claim, version, runtime, t_received)
    finally:
        runtime.set_status("ready", now=False)


def run_claimed(job: Job, payload: Any, claim: Claim, version: str, runtime: Any, t_received: float, *,
                preemptible: bool = True) -> str:
    """Sample claimed image job ``job`` on resident model ``version``, with the queued jobs of its shape
    (worker/batching.py), and store the results; returns its final status. ``preemptible``: a queued job of a
    higher priority may pause it (worker/preemption.py); not so for a run that is itself preempting one."""
    companions = gather_companions(job, payload, version, claim, runtime)  # worker/batching.py; [] when off
    if companions:
        return run_batch(job, claim, payload, companions, runtime, t_received, version, preemptible=preemptible)
    preemption = Preemption.of_run(runtime, version, job.priority, claim, preemptible)
    status = _run(claim, payload, runtime, t_received, preemption)
    if status == "succeeded" and job.parent_id is not None:
        image_job_succeeded(job.parent_id)  # a benchmark run's count of images made, live
    return status


#: The handler of each job kind: image kinds run the pipeline, benchmark and finetune runs their own handlers
#: (set below); a kind with none fails as ``not_supported``.
JOB_HANDLERS: dict[str, JobHandler] = {
    kind: execute_image_job if kind in IMAGE_KINDS else _not_supported(kind) for kind in JOB_KINDS
}
JOB_HANDLERS["benchmark"] = execute_benchmark_job  # phased: never holds a worker while its images wait
JOB_HANDLERS["finetune"] = execute_finetune_job  # worker/training/job.py: train, publish, register


def _run(claim: Claim, payload: Any, runtime: Any, t_received: float, preemption: Preemption | None) -> str:
    settings = get_settings()
    job_id = claim.job_id
    deadline = time.monotonic() + settings.job_timeout_s

    last: dict[str, Any] = {"step": 0, "total": None}
    try:
        kwargs = payload.to_pipeline_kwargs()  # multiref opens its references under settings.data_dir
        with ProgressReporter(settings.database_url, job_id, claim=claim,
                              look=preemption.look if preemption else None) as reporter:  # writes the last step on exit
            if preemption is not None:
                preemption.follow(reporter, last)
            start_sampling(reporter)
            t0 = time.perf_counter()
            on_step = step_callback(job_id, reporter, deadline, last, preemption)
            out = runtime.pipeline(**kwargs, callback=on_step, preview_every=settings.preview_every)
            sampling_s = time.perf_counter() - t0 - paused_s(preemption)
            reporter.report(last["step"], last["total"], stage="encoding")  # one write with the last step, at exit
        if reporter.cancelled.is_set():  # the cancel arrived with the last step's write
            raise JobCancelled(job_id)
    except Exception as exc:  # noqa: BLE001 - one job's crash must not take the worker down
        return sampling_failed(claim, exc, last["step"])
    return store_result(claim, payload, out, runtime, sampling_s, t_received, pauses(preemption))


def paused_s(preemption: Preemption | None) -> float:
    """Seconds a run spent paused for preempting jobs (0 without preemption)."""
    return preemption.paused_s if preemption is not None else 0.0


def pauses(preemption: Preemption | None) -> dict[str, Any]:
    """What a paused run's results say of its pauses: ``{"paused": [{job_id, s}, ...]}``, or nothing."""
    return {"paused": preemption.pauses} if preemption is not None and preemption.pauses else {}


def start_sampling(reporter: ProgressReporter) -> None:
    """Put the job in its ``sampling`` stage: the reporter's thread writes it while the pipeline starts, off the
    job's path. A cancel requested meanwhile comes back with that write and stops the run at its first step."""
    reporter.report(0, None, stage="sampling")


def sampling_failed(claim: Claim, exc: BaseException, step: int) -> str:
    """The end of a run whose sampling raised ``exc`` (at ``step``): cancelled, timed out, invalid or an engine
    error; returns the job's status."""
    settings = get_settings()
    if isinstance(exc, JobCancelled):
        return _stopped(claim, step)
    if isinstance(exc, JobTimedOut):
        return fail_job(claim.job_id, "timeout", f"the job ran longer than job_timeout_s={settings.job_timeout_s} s",
                        claim)
    if isinstance(exc, ValueError):
        return fail_job(claim.job_id, "invalid_params", str(exc), claim)
    log.error("engine error", extra={"job_id": claim.job_id}, exc_info=exc)
    free_device_memory()
    return fail_job(claim.job_id, "engine_error", f"{type(exc).__name__}: {exc}", claim)


def store_result(claim: Claim, payload: Any, out: Any, runtime: Any, sampling_s: float, t_received: float,
                 extra: dict[str, Any] | None = None) -> str:
    """Write the images of a finished sampling (``out``) and the job's result (plus ``extra``, e.g. its batch);
    returns the job's status."""
    settings = get_settings()
    db = settings.database_url
    job_id = claim.job_id
    try:  # the job's row says `encoding` already: the sampling's reporter wrote it with the last step
        t1 = time.perf_counter()
        params = dict(out.params)
        params.setdefault("model_version", runtime.active_version)
        paths = write_images(job_id, out.images, params, settings.data_dir)
        encoding_s = time.perf_counter() - t1
    except Exception as exc:  # noqa: BLE001 - disk full, permissions: fail the job, keep serving
        log.exception("could not store images", extra={"job_id": job_id})
        return fail_job(job_id, "storage_error", f"could not write the images under {settings.data_dir}: {exc}",
                        claim)

    timings = {
        "queue_wait_s": round(claim.queue_wait_s, 4),
        "sampling_s": round(sampling_s, 4),
        "encoding_s": round(encoding_s, 4),
        "total_s": round(time.perf_counter() - t_received, 4),
    }
    result = {"images": paths, "seed": int(params.get("seed", payload.seed)), "timings": timings, **(extra or {})}
    with session_scope(db) as s:
        if not crud.mark_succeeded(session=s, job_id=job_id, result=result, **claim.fence()):
            row = crud.get_job(session=s, job_id=job_id)  # the attempt lost the job: its row is another's now
            log.warning("result not stored: the job is no longer this attempt's",
                        extra={"job_id": job_id, "attempt": claim.attempt, "status": row and row.status})
            return row.status if row is not None else "missing"
    log.info("job succeeded", extra={"job_id": job_id, "attempt": claim.attempt, **timings, "images": len(paths)})
    return "succeeded"


def _stopped(claim: Claim, step: int) -> str:
    """The run stopped at a step because its cancel was requested, or because the attempt no longer holds the job
    (its worker was taken for dead and the job requeued): cancelled in the first case, left alone in the second."""
    with session_scope(get_settings().database_url) as s:
        if crud.mark_cancelled(session=s, job_id=claim.job_id, **claim.fence()):
            log.info("job cancelled while running", extra={"job_id": claim.job_id, "step": step})
            return "cancelled"
        row = crud.get_job(session=s, job_id=claim.job_id)
    log.warning("job run stopped: the job is no longer this attempt's (requeued)",
                extra={"job_id": claim.job_id, "attempt": claim.attempt, "step": step, "status": row and row.status})
    return row.status if row is not None else "missing"


def step_callback(
    job_id: str, reporter: ProgressReporter, deadline: float, last: dict[str, Any],
    preemption: Preemption | None = None,
) -> Callable[..., None]:
    """The pipeline's step callback. It runs between two sampling steps, so it makes no database call of its
    own: it records the step in ``last``, hands it (with a PNG of the preview, if any) to ``reporter``, whose
    thread writes it, and stops the job when the reporter saw a cancel request or ``deadline`` (moved by the
    time spent paused) has passed. When ``preemption`` found a queued job of a higher priority, it runs that job
    first (worker/preemption.py) and then returns to the sampling."""

    def on_step(step: int, total: int, preview: Any = None) -> None:
        last.update(step=step, total=total)
        png = None
        if preview is not None:
            from worker.runtime import preview_png

            png = preview_png(preview)
        reporter.report(step, total, png)
        if preemption is not None and preemption.wanted.is_set():
            preemption.run_waiting()
        if reporter.cancelled.is_set():
            raise JobCancelled(job_id)
        if time.monotonic() > deadline + paused_s(preemption):
            raise JobTimedOut(job_id)

    return on_step


def write_images(job_id: str, images: list[Any], params: dict[str, Any], data_dir: Path) -> list[str]:
    """Write ``<data_dir>/results/<job_id>/<n>.png`` atomically (temp file + rename) with the generation
    parameters in the PNG text chunks; returns the paths relative to ``data_dir``. A rerun of the same job
    overwrites the same files, so a redelivered job is harmless, and removes the temp files of an attempt killed
    mid-write; the row's result is written once, by the attempt that holds the job (``crud.mark_succeeded`` with
    the claim's fence)."""
    from echo4o.files import remove_partial_writes
    from echo4o.pnginfo import write_png

    folder = data_dir / "results" / job_id
    # an attempt killed while writing leaves its temp file: this attempt holds the job now (the earlier one's
    # worker is gone), so what it left is removed
    remove_partial_writes(folder)
    rel: list[str] = []
    for n, image in enumerate(images):
        write_png(image, folder / f"{n}.png", {**params, "image_index": n})
        rel.append(f"results/{job_id}/{n}.png")
    return rel
