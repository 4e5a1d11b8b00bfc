"""A job as its client sees it: the public view of a row (``JobPublic``), the submit answer (``JobCreated``),
the URLs in them, and the owner check that guards every read."""

from __future__ import annotations

from sqlalchemy.orm import Session

from backend.auth import Principal, check_owner
from backend.errors import not_found
from backend.schemas import JobCreated, JobError, JobPublic, JobResult, Progress, ResultImage, WebhookStatus
from echo4o.db import crud
from echo4o.db import webhooks as webhook_records
from echo4o.db.models import Job
from echo4o.settings import Settings


def base_url(settings: Settings, request_base: str) -> str:
    """The URL prefix of links in answers: ``ECHO4O_PUBLIC_URL`` when set, else the request's own base."""
    return (settings.public_url or request_base).rstrip("/")


def image_url(base: str, job_id: str, index: int) -> str:
    """Where image ``index`` of a succeeded job is served (``GET /jobs/{id}/images/{n}``)."""
    return f"{base}/jobs/{job_id}/images/{index}"


def public_job(session: Session | None, job: Job, base: str, *, webhook: bool = True) -> JobPublic:
    """The row as ``JobPublic``: image URLs once it succeeded, the error once it failed, the 1-based queue
    position while it is queued, its webhook's delivery. ``webhook=False``: the job is known to have asked for no
    webhook (its submit had no ``webhook_url``), so none is read; then ``session`` is only needed while it is
    queued."""
    result = None
    if job.result and job.status == "succeeded":
        rest = {k: v for k, v in job.result.items() if k not in ("images", "seed", "timings")}
        result = JobResult(
            images=[ResultImage(index=i, url=image_url(base, job.id, i))
                    for i in range(len(job.result.get("images") or []))],
            seed=job.result.get("seed"),
            timings=job.result.get("timings") or {},
            details=rest or None,
        )
    error = None
    if job.status == "failed" or job.error_code:
        error = JobError(code=job.error_code, message=job.error_message)
    position = None
    if job.status == "queued":
        if session is None:
            raise ValueError(f"job {job.id!r} is queued: its queue position needs a session")
        position = crud.queue_position(session=session, job_id=job.id)
    if webhook and session is None:
        raise ValueError(f"job {job.id!r}: its webhook delivery needs a session (webhook=False when it has none)")
    return JobPublic(
        id=job.id,
        kind=job.kind,  # type: ignore[arg-type]
        status=job.status,  # type: ignore[arg-type]
        params=job.params,
        model_version=job.model_version,
        progress=Progress(stage=job.progress_stage, step=job.progress_step, total=job.progress_total,
                          detail=job.progress_detail or None),  # {}: a detail cleared (a pause that ended)
        queue_position=None if position is None else position + 1,
        result=result,
        error=error,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        worker=job.worker,
        attempts=job.attempts or 0,
        webhook=webhook_status(session, job.id) if webhook and session is not None else None,
    )


def webhook_status(session: Session, job_id: str) -> WebhookStatus | None:
    """The job's webhook delivery as its owner sees it (None: the job asked for none)."""
    row = webhook_records.get_delivery(session=session, job_id=job_id)
    if row is None:
        return None
    return WebhookStatus(url=row.url, state=row.state, attempts=row.attempts,  # type: ignore[arg-type]
                         last_status=row.last_status, last_error=row.last_error, delivered_at=row.delivered_at)


def created(job: Job, base: str) -> JobCreated:
    """The 202 answer to a submit: the job's id, status and where to follow it."""
    return JobCreated(
        id=job.id, status=job.status, status_url=f"{base}/jobs/{job.id}",  # type: ignore[arg-type]
        events_url=f"{base}/jobs/{job.id}/events",
    )


def load_job(session: Session, principal: Principal, job_id: str) -> Job:
    """The job, or 404 when it does not exist or belongs to another key (another key's job is not there for
    this one: the answer is the same as for an id never used, so ids cannot be probed)."""
    job = crud.get_job(session=session, job_id=job_id)
    if job is None:
        raise not_found("job", job_id, param="job_id")
    check_owner(principal, job)
    return job
