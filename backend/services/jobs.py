"""Submitting a job: resolve its model version, check the key's limits, write the queued row, enqueue it.

A multi-reference job's images are checked and stored under the new job's id before its row is written;
they are removed again when the submit fails before the row exists.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

from pydantic import ValidationError
from sqlalchemy.orm import Session

from backend import uploads
from backend.auth import Principal, check_submit_limits
from backend.errors import ApiError, from_pydantic, invalid
from backend.metrics import Metrics
from backend.services import webhooks
from echo4o import queue, versions
from echo4o.db import crud
from echo4o.db.models import Job, new_id
from echo4o.jobs import GenerateJob, MultirefJob
from echo4o.logging import get_logger
from echo4o.settings import Settings

log = get_logger(__name__)


def served_versions(session: Session, settings: Settings) -> list[str]:
    """Model versions a job may name: the configured one, then the registered ones (``<name>/<version>``, see
    :mod:`echo4o.versions`); every image worker loads a registered version on demand. A version only some worker
    was started with (another ``ECHO4O_MODEL``) is not one: a worker configured otherwise could take the job."""
    return versions.known_versions(session, settings)


def resolve_model_version(session: Session, settings: Settings, requested: str | None, *, param: str) -> str:
    """The version a job runs on: ``requested`` when it is served here (422 naming ``param`` otherwise), the
    current one (the promoted version, else the configured one) when none was asked for."""
    if not requested:
        return versions.current_version(session, settings)
    known = served_versions(session, settings)
    if requested not in known:
        raise invalid(param, f"{param}: model {requested!r} is not served here; served: {', '.join(known)} "
                             "(GET /models)", code="unknown_model")
    return requested


_SQLITE_SUBMIT_LOCK = threading.Lock()


def _submit_lock(settings: Settings) -> contextlib.AbstractContextManager[object]:
    """SQLite has one writer at a time and makes waiting writers sleep and retry; queueing this process's
    submissions on a lock instead keeps latency flat under load (and makes the limit check and the insert
    atomic within the process). PostgreSQL needs no lock."""
    if settings.database_url.startswith("sqlite"):
        return _SQLITE_SUBMIT_LOCK
    return contextlib.nullcontext()


def submit_job(
    session: Session,
    settings: Settings,
    metrics: Metrics,
    principal: Principal,
    payload: GenerateJob | MultirefJob,
    *,
    job_id: str | None = None,
    model_param: str = "model_version",
) -> Job:
    """Check limits, write the queued row, enqueue it. A broker that does not answer fails the job (503)."""
    model_version = resolve_model_version(session, settings, payload.model_version, param=model_param)
    webhook_url = webhooks.check_url(settings, payload.webhook_url)  # webhooks: 422 before any row exists
    with _submit_lock(settings):
        check_submit_limits(session, settings, principal)
        job = crud.create_job(
            session=session,
            kind=payload.kind,
            params=payload.model_dump(mode="json"),
            model_version=model_version,
            owner=principal.owner,
            priority=payload.priority,
            job_id=job_id,
        )
    if webhook_url:  # webhooks: the delivery row, written before the job can run (let alone end)
        webhooks.register(session, settings, job.id, job.owner, webhook_url)
    try:
        queue.submit(job.id, job.kind, job.priority)
    except queue.BrokerUnavailable as exc:
        crud.mark_failed(session=session, job_id=job.id, code="broker_unavailable", message=str(exc))
        log.error("enqueue failed", extra={"job_id": job.id, "error": str(exc)})
        raise ApiError(503, str(exc), code="broker_unavailable") from None
    metrics.jobs_submitted.labels(kind=job.kind).inc()
    log.info("job submitted", extra={"job_id": job.id, "kind": job.kind, "owner": job.owner,
                                     "priority": job.priority})
    return job


def validate_multiref_fields(fields: dict[str, Any], n_images: int) -> MultirefJob:
    """Validate the non-image fields with the job model (placeholder references, replaced once stored)."""
    if "references" in fields:
        raise invalid("references", "references: not accepted from clients; send the images themselves "
                                    "(`images` files or base64 strings)")
    try:
        return MultirefJob.model_validate({**fields, "references": [f"pending/{i}.png" for i in range(n_images)]})
    except ValidationError as exc:
        raise from_pydantic(exc) from None


def submit_multiref(
    session: Session,
    settings: Settings,
    metrics: Metrics,
    principal: Principal,
    fields: dict[str, Any],
    raw_images: list[uploads.RawImage],
    *,
    images_param: str = "images",
    model_param: str = "model_version",
) -> Job:
    """Validate fields and images, store the images under the new job's id, submit it."""
    if len(raw_images) > settings.max_references:
        uploads.checked_images(settings, raw_images, param=images_param)  # raises, naming the count
    payload = validate_multiref_fields(fields, max(1, len(raw_images)))
    images = uploads.checked_images(settings, raw_images, param=images_param)
    job_id = new_id()
    refs = uploads.save_references(images, data_dir=settings.data_dir, job_id=job_id)
    try:
        payload = payload.model_copy(update={"references": refs})
        return submit_job(session, settings, metrics, principal, payload, job_id=job_id, model_param=model_param)
    except BaseException:
        if crud.get_job(session=session, job_id=job_id) is None:
            uploads.discard_references(data_dir=settings.data_dir, job_id=job_id)
        raise
