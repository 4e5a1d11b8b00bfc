"""OpenAI-compatible images API: a synchronous facade over the job API.

``POST /v1/images/generations`` (JSON) queues a generate job, ``POST /v1/images/edits`` (multipart, one or more
``image``/``image[]`` parts) a multi-reference job; both wait for the job (up to ECHO4O_WAIT_MAX_S) and answer
OpenAI's ``{"created", "data": [{"b64_json"} | {"url"}]}``. Our job fields (``num_steps``, ``seed``,
``cfg_text_scale``, ...) may be added to either request (the client's ``extra_body``).
"""

from __future__ import annotations

import base64
from typing import Any

from fastapi import APIRouter, Request
from pydantic import ValidationError
from sqlalchemy.orm import Session

from backend.api.deps import CurrentKey, MetricsDep, SettingsDep
from backend.errors import ApiError, from_pydantic, invalid
from backend.schemas import ImageData, ImagesGenerationRequest, ImagesResponse, error_responses
from backend.services.blocking import in_session, run_sync
from backend.services.images import IMAGE_FORMATS, encode_image, result_path
from backend.services.jobs import submit_job, submit_multiref
from backend.services.views import base_url, image_url
from backend.services.waiting import wait_for_end
from backend.uploads import RawImage, read_form
from echo4o.db.models import Job
from echo4o.jobs import MAX_NUM_IMAGES, GenerateJob
from echo4o.settings import Settings

router = APIRouter(prefix="/v1/images", tags=["openai"])

# OpenAI fields that change nothing here; accepted so stock clients work.
IGNORED_FIELDS = {"quality", "style", "user", "background", "moderation", "safety_identifier", "input_fidelity",
                  "output_compression", "partial_images"}
# Failures caused by the request itself (the engine refused a value) rather than by the service.
CLIENT_ERROR_CODES = {"invalid_params", "invalid_payload", "invalid_input", "invalid_value", "bad_request"}


def parse_size(size: Any) -> dict[str, int]:
    """``"WIDTHxHEIGHT"`` -> height/width fields; ``auto``/None -> the mode's default."""
    if size is None or size == "auto":
        return {}
    if not isinstance(size, str):
        raise invalid("size", "size: expected a string WIDTHxHEIGHT, e.g. 512x512")
    w, sep, h = size.lower().partition("x")
    if not sep or not w.isdigit() or not h.isdigit():
        raise invalid("size", f"size: expected WIDTHxHEIGHT (e.g. 512x512) or auto, got {size!r}")
    return {"width": int(w), "height": int(h)}


def job_fields(fields: dict[str, Any], *, kind: str) -> dict[str, Any]:
    """Map OpenAI request fields to our job's fields; unknown fields go on to the job model (which refuses)."""
    out = {k: v for k, v in fields.items() if k not in IGNORED_FIELDS and v is not None}
    out.pop("response_format", None)
    output_format = out.pop("output_format", "png")
    if output_format not in IMAGE_FORMATS:
        raise invalid("output_format", f"output_format: png, webp or jpeg, got {output_format!r}")
    if str(out.pop("stream", "false")).lower() not in ("false", "0"):
        raise invalid("stream", "stream: streaming is not supported; use the job API's /jobs/{id}/events")
    if "n" in out:
        out["num_images"] = out.pop("n")
    model = out.pop("model", None)
    if model:
        out["model_version"] = model
    size = parse_size(out.pop("size", None))
    if size and ("height" in out or "width" in out):
        raise invalid("size", "size: give size or height/width, not both")
    out.update(size)
    if kind == "multiref":
        if "mask" in out:
            raise invalid("mask", "mask: masks are not supported; describe the edit in the prompt")
    return out


def images_response(request: Request, settings: Settings, job: Job, response_format: str,
                    output_format: str) -> ImagesResponse:
    if job.status == "failed":
        status = 422 if (job.error_code or "") in CLIENT_ERROR_CODES else 500
        raise ApiError(status, f"job {job.id} failed: {job.error_message}", code=job.error_code or "job_failed",
                       type="invalid_request_error" if status == 422 else "api_error")
    if job.status == "cancelled":
        raise ApiError(409, f"job {job.id} was cancelled", code="cancelled")
    base = base_url(settings, str(request.base_url))
    data = []
    for i in range(len(job.result["images"])):
        if response_format == "url":
            suffix = "" if output_format == "png" else f"?format={output_format}"
            data.append(ImageData(url=image_url(base, job.id, i) + suffix))
        else:
            path = result_path(settings, job, i)
            raw = path.read_bytes() if output_format == "png" else encode_image(path, output_format)
            data.append(ImageData(b64_json=base64.b64encode(raw).decode("ascii")))
    return ImagesResponse(created=int(job.created_at.timestamp()), data=data)


async def wait_synchronously(settings: Settings, job: Job) -> Job:
    ended = await wait_for_end(settings, job.id, settings.wait_max_s)
    if ended is None:
        raise ApiError(504, f"job {job.id} did not finish within {settings.wait_max_s:g} s (ECHO4O_WAIT_MAX_S); "
                            f"follow it at /jobs/{job.id}", code="timeout", type="api_error")
    return ended


@router.post("/generations", response_model=ImagesResponse, responses=error_responses(401, 415, 422, 429, 504))
async def generations(body: ImagesGenerationRequest, request: Request, settings: SettingsDep,
                      principal: CurrentKey, metrics: MetricsDep) -> ImagesResponse:
    """Text to image, OpenAI style (`size` is WIDTHxHEIGHT, each side within the limits of GET /parameters)."""
    fields = job_fields(body.model_dump(exclude_unset=True), kind="generate")
    try:
        payload = GenerateJob.model_validate(fields)
    except ValidationError as exc:
        raise _renamed(from_pydantic(exc), size_given=body.size not in (None, "auto")) from None
    job = await in_session(
        settings, lambda s: submit_job(s, settings, metrics, principal, payload, model_param="model")
    )
    ended = await wait_synchronously(settings, job)
    output_format = body.model_dump().get("output_format") or "png"
    return await run_sync(images_response, request, settings, ended, body.response_format, output_format)


@router.post(
    "/edits",
    response_model=ImagesResponse,
    responses=error_responses(401, 413, 415, 422, 429, 504),
    openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object",
        "required": ["image", "prompt"],
        "properties": {
            "image": {"type": "array", "items": {"type": "string", "format": "binary"}, "minItems": 1,
                      "description": "Reference images (`image` or `image[]` parts), in order."},
            "prompt": {"type": "string", "minLength": 1},
            "n": {"type": "integer", "minimum": 1, "maximum": MAX_NUM_IMAGES},
            "size": {"type": "string", "description": "WIDTHxHEIGHT or auto"},
            "response_format": {"type": "string", "enum": ["b64_json", "url"]},
            "model": {"type": "string"},
        },
    }}}}},
)
async def edits(request: Request, settings: SettingsDep, principal: CurrentKey,
                metrics: MetricsDep) -> ImagesResponse:
    """Multi-reference generation, OpenAI style: every `image[]` part is one reference."""
    content_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if content_type != "multipart/form-data":
        raise invalid(None, f"Content-Type must be multipart/form-data, got {content_type!r}",
                      code="unsupported_media_type", status=415)
    form_fields, raw = await read_edit_form(request, settings)
    response_format = form_fields.pop("response_format", "b64_json")
    if response_format not in ("b64_json", "url"):
        raise invalid("response_format", f"response_format: b64_json or url, got {response_format!r}")
    output_format = form_fields.get("output_format") or "png"
    fields = job_fields(form_fields, kind="multiref")

    def submit(session: Session) -> Job:
        try:
            return submit_multiref(session, settings, metrics, principal, fields, raw, images_param="image",
                                           model_param="model")
        except ApiError as err:
            raise _renamed(err, size_given=form_fields.get("size") not in (None, "auto")) from None

    job = await in_session(settings, submit)
    ended = await wait_synchronously(settings, job)
    return await run_sync(images_response, request, settings, ended, response_format, output_format)


async def read_edit_form(request: Request, settings: Settings) -> tuple[dict[str, Any], list[RawImage]]:
    """The edit form: `image`/`image[]` files, the rest plain fields."""
    try:
        form = await request.form(max_files=settings.max_references + 8, max_fields=200)
    except Exception as exc:  # noqa: BLE001 - starlette's multipart errors carry their own reason
        detail = getattr(exc, "detail", str(exc))
        status = getattr(exc, "status_code", 400)  # a malformed form, too many parts: 422 like any bad field
        raise invalid("image", f"image: {detail}", status=status if status in (408, 413) else 422) from None
    return await read_form(form, file_fields=("image",), max_bytes=settings.max_upload_bytes)


def _renamed(err: ApiError, *, size_given: bool) -> ApiError:
    """Name fields as the OpenAI request does (num_images -> n, model_version -> model, height/width -> size)."""
    names = {"num_images": "n", "model_version": "model"}
    if size_given:
        names.update(height="size", width="size")
    if err.param in names:
        err.message = err.message.replace(err.param, names[err.param], 1)
        err.param = names[err.param]
    return err
