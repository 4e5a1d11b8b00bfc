"""What the routes do, apart from HTTP plumbing: submit a job, show it, wait for it, stream its events,
read its images. Routes (``backend/api/routes``) call these; SQL goes through :mod:`echo4o.db.crud`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import io
import json
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import anyio
from PIL import Image
from pydantic import ValidationError
from sqlalchemy.orm import Session
from starlette.datastructures import FormData, UploadFile
from starlette.requests import Request
from starlette.responses import Response

from backend import uploads
from backend.auth import Principal, check_owner, check_submit_limits
from backend.errors import ApiError, from_pydantic, invalid, not_found
from backend.metrics import Metrics
from backend.schemas import JobCreated, JobError, JobPublic, JobResult, Progress, ResultImage
from echo4o.db import crud, get_sessionmaker
from echo4o.db.models import TERMINAL_STATUSES, Job, new_id
from echo4o.jobs import GenerateJob, MultirefJob
from echo4o.logging import get_logger
from echo4o.settings import Settings
from worker import queue

log = get_logger(__name__)

POLL_S = 0.1  # how often ?wait and the event stream re-read the job row
IMAGE_FORMATS = {"png": ("PNG", "image/png"), "webp": ("WEBP", "image/webp"), "jpeg": ("JPEG", "image/jpeg")}

T = TypeVar("T")


# --- reading rows off the event loop -------------------------------------------------------------------------
async def in_session(settings: Settings, fn: Callable[[Session], T]) -> T:
    """Run ``fn(session)`` in a worker thread with a short-lived session (for async routes)."""

    def run() -> T:
        session = get_sessionmaker(settings.database_url)()
        try:
            return fn(session)
        finally:
            session.close()

    return await anyio.to_thread.run_sync(run)


# --- presenting jobs -----------------------------------------------------------------------------------------
def base_url(settings: Settings, request_base: str) -> str:
    return (settings.public_url or request_base).rstrip("/")


def image_url(base: str, job_id: str, index: int) -> str:
    return f"{base}/jobs/{job_id}/images/{index}"


def public_job(session: Session, job: Job, base: str) -> JobPublic:
    result = None
    if job.result and job.status == "succeeded":
        result = JobResult(
            images=[ResultImage(index=i, url=image_url(base, job.id, i)) for i in range(len(job.result["images"]))],
            seed=job.result.get("seed"),
            timings=job.result.get("timings") or {},
        )
    error = None
    if job.status == "failed" or job.error_code:
        error = JobError(code=job.error_code, message=job.error_message)
    position = crud.queue_position(session=session, job_id=job.id) if job.status == "queued" else None
    return JobPublic(
        id=job.id,
        kind=job.kind,  # type: ignore[arg-type]
        status=job.status,  # type: ignore[arg-type]
        params=job.params,
        model_version=job.model_version,
        progress=Progress(stage=job.progress_stage, step=job.progress_step, total=job.progress_total),
        queue_position=None if position is None else position + 1,
        result=result,
        error=error,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        worker=job.worker,
    )


def created(job: Job, base: str) -> JobCreated:
    return JobCreated(
        id=job.id, status=job.status, status_url=f"{base}/jobs/{job.id}",  # type: ignore[arg-type]
        events_url=f"{base}/jobs/{job.id}/events",
    )


def load_job(session: Session, principal: Principal, job_id: str) -> Job:
    """The job, or 404 when it does not exist / 403 when it belongs to another key."""
    job = crud.get_job(session=session, job_id=job_id)
    if job is None:
        raise not_found("job", job_id, param="job_id")
    check_owner(principal, job)
    return job


# --- submitting ----------------------------------------------------------------------------------------------
def served_versions(session: Session, settings: Settings) -> list[str]:
    """Model versions a job may name: the configured one and any a ready worker reports."""
    versions = [settings.model_version]
    for w in crud.list_ready_workers(session=session):
        if w.model_version and w.model_version not in versions:
            versions.append(w.model_version)
    return versions


def resolve_model_version(session: Session, settings: Settings, requested: str | None, *, param: str) -> str:
    if not requested:
        return settings.model_version
    versions = served_versions(session, settings)
    if requested not in versions:
        raise invalid(param, f"{param}: model {requested!r} is not served here; served: {', '.join(versions)} "
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


@dataclass
class RawImage:
    """One image as received, before checks: ``param`` names it in errors (``images.0``)."""

    param: str
    data: bytes


def checked_images(settings: Settings, raw: list[RawImage], *, param: str) -> list[uploads.CheckedImage]:
    if not raw:
        raise invalid(param, f"{param}: at least one reference image is required")
    if len(raw) > settings.max_references:
        raise invalid(param, f"{param}: {len(raw)} images sent; at most {settings.max_references} are allowed "
                             "(ECHO4O_MAX_REFERENCES)")
    return [
        uploads.check_image(r.data, param=r.param, max_bytes=settings.max_upload_bytes,
                            max_pixels=settings.max_image_pixels)
        for r in raw
    ]


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
    raw_images: list[RawImage],
    *,
    images_param: str = "images",
    model_param: str = "model_version",
) -> Job:
    """Validate fields and images, store the images under the new job's id, submit it."""
    if len(raw_images) > settings.max_references:
        checked_images(settings, raw_images, param=images_param)  # raises, naming the count
    payload = validate_multiref_fields(fields, max(1, len(raw_images)))
    images = checked_images(settings, raw_images, param=images_param)
    job_id = new_id()
    refs = uploads.save_references(images, data_dir=settings.data_dir, job_id=job_id)
    try:
        payload = payload.model_copy(update={"references": refs})
        return submit_job(session, settings, metrics, principal, payload, job_id=job_id, model_param=model_param)
    except BaseException:
        if crud.get_job(session=session, job_id=job_id) is None:
            uploads.discard_references(data_dir=settings.data_dir, job_id=job_id)
        raise


# --- reading request bodies ---------------------------------------------------------------------------------
def _form_value(value: str) -> Any:
    """Form fields arrive as text; lists (cfg_interval) may come as JSON or comma-separated."""
    text = value.strip()
    if text.startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return value
    if "," in text and all(_is_number(p) for p in text.split(",")):
        return [p.strip() for p in text.split(",")]
    return value


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


async def read_form(form: FormData, *, file_fields: tuple[str, ...], max_bytes: int) -> tuple[dict[str, Any],
                                                                                               list[RawImage]]:
    """Split a multipart form into plain fields (blank ones dropped) and image files, in order.

    Files are read up to ``max_bytes + 1`` bytes so an oversized one is refused without reading it all.
    """
    fields: dict[str, Any] = {}
    files: list[RawImage] = []
    for key, value in form.multi_items():
        base = key.split("[", 1)[0] if "[" in key else key
        if base in file_fields:
            if not isinstance(value, UploadFile):
                raise invalid(f"{base}.{len(files)}", f"{base}.{len(files)}: expected a file upload, got a text field")
            data = await value.read(max_bytes + 1)
            files.append(RawImage(param=f"{base}.{len(files)}", data=data))
            continue
        if isinstance(value, UploadFile):
            raise invalid(key, f"{key}: unexpected file; only {', '.join(file_fields)} take files")
        if value == "":
            continue
        if key in fields:
            raise invalid(key, f"{key}: given more than once")
        fields[key] = _form_value(value)
    return fields, files


def images_from_json(values: Any, *, param: str, max_bytes: int) -> list[RawImage]:
    if not isinstance(values, list):
        raise invalid(param, f"{param}: expected a list of base64-encoded images")
    return [
        RawImage(param=f"{param}.{i}", data=uploads.decode_base64_image(v, param=f"{param}.{i}", max_bytes=max_bytes))
        for i, v in enumerate(values)
    ]


async def run_sync(fn: Callable[..., T], *args: Any) -> T:
    """Blocking work (SQL, the broker, image decoding) off the event loop."""
    return await anyio.to_thread.run_sync(functools.partial(fn, *args))


async def created_or_finished(
    request: Request, response: Response, settings: Settings, job: Job, timeout_s: float
) -> JobCreated | JobPublic:
    """202 with the job's links, or, when ``?wait`` was given and the job ended in time, 200 with the job."""
    base = base_url(settings, str(request.base_url))
    if timeout_s > 0:
        ended = await wait_for_end(settings, job.id, timeout_s)
        if ended is not None:
            response.status_code = 200
            return await in_session(settings, lambda s: public_job(s, ended, base))
    return created(job, base)


# --- waiting -------------------------------------------------------------------------------------------------
def check_wait(settings: Settings, wait: float | None) -> float:
    if wait is None:
        return 0.0
    if wait > settings.wait_max_s:
        raise invalid("wait", f"wait: at most {settings.wait_max_s:g} seconds (ECHO4O_WAIT_MAX_S), got {wait:g}")
    return wait


async def wait_for_end(settings: Settings, job_id: str, timeout_s: float) -> Job | None:
    """Poll the row until the job has ended or ``timeout_s`` passed; the ended job, or None."""
    deadline = time.monotonic() + timeout_s
    while True:
        job = await in_session(settings, lambda s: crud.get_job(session=s, job_id=job_id))
        if job is not None and job.status in TERMINAL_STATUSES:
            return job
        if time.monotonic() >= deadline:
            return None
        await asyncio.sleep(min(POLL_S, max(0.0, deadline - time.monotonic())))


# --- events --------------------------------------------------------------------------------------------------
async def job_events(settings: Settings, job_id: str, base: str) -> AsyncIterator[dict[str, str]]:
    """Server-Sent Events for one job, read from its row every POLL_S.

    ``queued`` when the queue position changes; ``progress`` once for every step (when several steps ended
    between two reads, each is reported, the preview going with the newest); then ``done`` (the job),
    ``failed`` or ``cancelled``, and the stream ends.
    """
    last_position: int | None = -1
    last_step = 0
    last_preview: bytes | None = None
    while True:
        def read(s: Session) -> tuple[Job | None, int | None, JobPublic | None]:
            job = crud.get_job(session=s, job_id=job_id)
            if job is None:
                return None, None, None
            pos = crud.queue_position(session=s, job_id=job_id) if job.status == "queued" else None
            view = public_job(s, job, base) if job.status in TERMINAL_STATUSES else None
            return job, pos, view

        job, position, view = await in_session(settings, read)
        if job is None:
            yield {"event": "failed", "data": json.dumps({"code": "not_found", "message": "the job was deleted"})}
            return
        if job.status == "queued" and position != last_position:
            last_position = position
            yield {"event": "queued", "data": json.dumps({"position": (position or 0) + 1})}
        step, total = job.progress_step or 0, job.progress_total
        if job.status in ("running", "succeeded") and total and step > last_step:
            for s in range(last_step + 1, step + 1):
                data: dict[str, Any] = {"step": s, "total": total}
                if s == step and job.preview and job.preview != last_preview:
                    data["preview"] = base64.b64encode(job.preview).decode("ascii")
                    last_preview = job.preview
                yield {"event": "progress", "data": json.dumps(data)}
            last_step = step
        if job.status == "succeeded":
            assert view is not None
            yield {"event": "done", "data": view.model_dump_json()}
            return
        if job.status == "failed":
            yield {"event": "failed", "data": json.dumps({"code": job.error_code, "message": job.error_message})}
            return
        if job.status == "cancelled":
            yield {"event": "cancelled", "data": json.dumps({"id": job.id})}
            return
        await asyncio.sleep(POLL_S)


# --- images --------------------------------------------------------------------------------------------------
def result_path(settings: Settings, job: Job, index: int) -> Path:
    if job.status != "succeeded" or not job.result:
        raise ApiError(409, f"job {job.id!r} is {job.status}; images exist once it has succeeded",
                       code="job_not_finished", param="job_id")
    images = job.result.get("images") or []
    if not 0 <= index < len(images):
        raise not_found("image", str(index), param="n")
    path = (settings.data_dir / images[index]).resolve()
    if settings.data_dir not in path.parents or not path.is_file():
        raise ApiError(404, f"image {index} of job {job.id!r} is no longer on disk", code="not_found", param="n")
    return path


def encode_image(path: Path, fmt: str) -> bytes:
    """The stored PNG in another format (webp, jpeg); generation parameters go along as an XMP/comment."""
    pil_format, _ = IMAGE_FORMATS[fmt]
    with Image.open(path) as img:
        params = img.info.get("echo4o.params")
        rgb = img.convert("RGB")
    out = io.BytesIO()
    if pil_format == "JPEG":
        rgb.save(out, format="JPEG", quality=92, comment=(params or "").encode("utf-8"))
    else:
        rgb.save(out, format="WEBP", quality=92, method=4)
    return out.getvalue()
