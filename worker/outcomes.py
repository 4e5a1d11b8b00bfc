"""How a job handler starts and ends a job, written once for the image, fine-tuning and benchmark handlers: the
preamble every handler starts with (:func:`open_job`: the row, the terminal and cancel checks, the payload check),
the claim (:func:`claim_job`, which gives the run its :class:`Claim`, the fence of every write it makes), the
failed row, and the device memory a failed run gives back.

Torch-free at import time.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from echo4o.db import crud, session_scope
from echo4o.db.models import Job
from echo4o.jobs import describe_validation_error, parse_job
from echo4o.logging import get_logger
from echo4o.settings import get_settings

log = get_logger(__name__)


@dataclass(frozen=True)
class Claim:
    """One attempt at a job: the row's ``attempts`` and ``worker`` when this run claimed it. Every write of the run
    passes them (:meth:`fence`), so once the job is requeued (its worker was found dead, or stopped) and claimed
    again, this run can no longer write its progress, result or failure."""

    job_id: str
    worker: str
    attempt: int
    #: Seconds the job waited between its submission and this claim (the row's ``started_at - created_at``).
    queue_wait_s: float = 0.0

    def fence(self) -> dict[str, Any]:
        return {"attempt": self.attempt, "worker": self.worker}


@dataclass(frozen=True)
class Opened:
    """What :func:`open_job` found: ``outcome`` set means the handler returns it at once; else the row (detached)
    and its validated payload."""

    outcome: str | None
    job: Job | None = None
    payload: Any = None


def read_job(job_id: str) -> Job | None:
    """The job's row, detached; None (logged: its message is dropped) when it does not exist."""
    with session_scope(get_settings().database_url) as s:
        row = crud.get_job(session=s, job_id=job_id)
        if row is not None:
            s.expunge(row)
    if row is None:
        log.error("job not found; message dropped", extra={"job_id": job_id})
    return row


def open_job(job_id: str, *, cancel: Callable[[str], str] | None = None, row: Job | None = None) -> Opened:
    """The preamble of every handler: the job's row (none: ``missing``), a finished job left as it is (a duplicate
    delivery), a job with a cancel request cancelled (by ``cancel`` when given: a benchmark also cancels its image
    jobs), stored params re-validated (bad: the job fails as ``invalid_params``). ``row``: the row as the caller
    has just read it (:func:`worker.tasks.execute_job`), not read again."""
    row = row if row is not None else read_job(job_id)
    if row is None:
        return Opened("missing")
    if row.is_terminal:
        log.info("job already finished; duplicate delivery skipped", extra={"job_id": job_id, "status": row.status})
        return Opened(row.status)
    if row.cancel_requested:
        if cancel is not None:
            return Opened(cancel(job_id))
        with session_scope(get_settings().database_url) as s:
            crud.mark_cancelled(session=s, job_id=job_id)
        log.info("job cancelled before it started", extra={"job_id": job_id})
        return Opened("cancelled")
    payload, problem = payload_problem(row.kind, row.params)
    if problem is not None:
        return Opened(fail_job(job_id, "invalid_params", problem))
    return Opened(None, row, payload)


def claim_job(job_id: str, runtime: Any, *, cancel: Callable[[str], str] | None = None) -> Claim | str:
    """Claim the job for this worker (``runtime``: :class:`worker.runtime.WorkerRuntime`); returns the run's
    :class:`Claim`, or the job's status when it cannot be claimed: finished, cancelled (a queued job with a cancel
    request is cancelled here, by ``cancel`` when given), or running on a worker that is alive (a late or duplicate
    delivery, dropped). The runtime keeps the claim while the job runs (see ``WorkerRuntime.claim``)."""
    with session_scope(get_settings().database_url) as s:
        claimed = crud.mark_running(session=s, job_id=job_id, worker=runtime.worker_id, gpu=runtime.gpu_name,
                                    stale_after_s=runtime.dead_after_s)
        if claimed is not None:
            claim = Claim(job_id, runtime.worker_id, claimed.attempts,
                          max(0.0, (claimed.started_at - claimed.created_at).total_seconds()))
            runtime.claim = claim
            return claim
        row = crud.get_job(session=s, job_id=job_id)
        if row is None:
            return "missing"
        if row.status == "queued" and row.cancel_requested:
            if cancel is not None:
                return cancel(job_id)
            crud.mark_cancelled(session=s, job_id=job_id)
            return "cancelled"
        if row.status == "running":
            log.info("job runs on a live worker; duplicate delivery dropped",
                     extra={"job_id": job_id, "running_on": row.worker, "attempts": row.attempts})
        return row.status


def fail_job(job_id: str, code: str, message: str, claim: Claim | None = None) -> str:
    """Mark the job failed with ``code`` and ``message`` (the worker takes the next job); returns ``"failed"``. With
    ``claim``, only while that attempt holds the job (else the failure is dropped and the row's status returned)."""
    with session_scope(get_settings().database_url) as s:
        stored = crud.mark_failed(session=s, job_id=job_id, code=code, message=message,
                                  **(claim.fence() if claim else {}))
        if not stored and claim is not None:
            row = crud.get_job(session=s, job_id=job_id)
            log.warning("job failure not stored: the job is no longer this attempt's",
                        extra={"job_id": job_id, "attempt": claim.attempt, "code": code})
            return row.status if row is not None else "missing"
    log.warning("job failed", extra={"job_id": job_id, "code": code, "error": message})
    return "failed"


def fail_crashed(job_id: str, exc: BaseException, claim: Claim | None = None) -> str:
    """Fail the job of a handler that raised ``exc`` (a bug: handlers end their jobs themselves) as
    ``worker_error``, so that no client waits forever; fenced by ``claim`` when the run made one."""
    return fail_job(job_id, "worker_error",
                    f"the worker hit an unexpected error running this job ({type(exc).__name__}: {exc}); "
                    "submit it again, and report the worker's log if it recurs", claim)


def payload_problem(kind: str, params: dict[str, Any]) -> tuple[Any, str | None]:
    """``(payload, None)`` for valid stored params, or ``(None, message)`` naming each bad field (the worker's
    re-validation of what the gateway accepted)."""
    try:
        return parse_job(kind, params), None
    except ValidationError as exc:
        return None, describe_validation_error(exc)
    except ValueError as exc:
        return None, str(exc)


def job_version(payload: Any, row_version: str | None, runtime: Any) -> str:
    """The model version a job runs on: its payload's, else its row's, else the worker's default."""
    return payload.model_version or row_version or runtime.model_version


def free_device_memory() -> None:
    """Give the CUDA cache back after a run that failed or ended (objects that refer to each other are collected
    first); nothing on the CPU."""
    try:
        import torch

        if torch.cuda.is_available():
            gc.collect()
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001 - best effort
        pass
