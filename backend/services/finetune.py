"""Submitting a fine-tuning job: resolve its base version and its output version, then queue it on ``train``.

The stored params name both versions, so the job row says where the run starts from and where its version
goes: ``base_version`` (default: the current version, the promoted one or the configured model) and
``output_name`` / ``output_version`` (default: the base's name and ``ft-<date>-<job id prefix>``).
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from backend import errors
from backend.auth import Principal, check_submit_limits
from backend.metrics import Metrics
from backend.services.jobs import _submit_lock
from echo4o import queue, versions
from echo4o.db import crud
from echo4o.db.models import Job, new_id
from echo4o.jobs import FinetuneJob
from echo4o.logging import get_logger
from echo4o.settings import Settings

log = get_logger(__name__)


def resolve_finetune(session: Session, settings: Settings, payload: FinetuneJob, job_id: str) -> FinetuneJob:
    """``payload`` with its base and output versions filled in: 422 naming ``base_version`` when the base is not
    a known version, ``output_version`` when the output exists already (registered or as a folder)."""
    base = payload.base_version or versions.current_version(session, settings)
    try:
        versions.resolve_path(session, settings, base)
    except versions.UnknownVersion as exc:
        raise errors.invalid("base_version", f"base_version: {exc} (GET /admin/models)", code="unknown_model") from None
    name, version = payload.output_ref(job_id, base)
    ref = versions.make_ref(name, version)
    folder = settings.weights_dir / name / version
    if versions.get_version(session, ref) is not None or folder.exists():
        raise errors.invalid("output_version", f"output_version: model version {ref!r} exists already ({folder}); "
                                               "choose another output_version", code="version_exists")
    return payload.model_copy(update={"base_version": base, "output_name": name, "output_version": version})


def submit_finetune(session: Session, settings: Settings, metrics: Metrics, principal: Principal,
                    payload: FinetuneJob) -> Job:
    """Resolve the versions, check the key's limits, write the queued row, enqueue it on ``train`` (503 when
    the broker does not answer)."""
    job_id = new_id()
    payload = resolve_finetune(session, settings, payload, job_id)
    with _submit_lock(settings):
        check_submit_limits(session, settings, principal)
        job = crud.create_job(session=session, kind=payload.kind, params=payload.model_dump(mode="json"),
                              model_version=payload.base_version, owner=principal.owner, priority=payload.priority,
                              job_id=job_id)
    try:
        queue.submit(job.id, job.kind, job.priority)
    except queue.BrokerUnavailable as exc:
        crud.mark_failed(session=session, job_id=job.id, code="broker_unavailable", message=str(exc))
        raise errors.ApiError(503, str(exc), code="broker_unavailable") from None
    metrics.jobs_submitted.labels(kind=job.kind).inc()
    log.info("finetune job submitted", extra={"job_id": job.id, "owner": job.owner, "dataset": payload.dataset,
                                              "base": payload.base_version})
    return job
