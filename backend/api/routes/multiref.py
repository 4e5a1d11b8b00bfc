"""``POST /multiref``: multi-reference jobs, the references sent as multipart files or base64 JSON."""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from backend.api.deps import CurrentKey, MetricsDep, SettingsDep
from backend.api.routes.generate import WaitQuery
from backend.errors import invalid
from backend.schemas import JobCreated, JobPublic, error_responses
from backend.services.blocking import in_session
from backend.services.jobs import submit_multiref
from backend.services.waiting import check_wait, created_or_finished
from backend.uploads import RawImage, images_from_json, read_form
from echo4o.jobs import MultirefJob

router = APIRouter(tags=["jobs"])


def _request_schemas() -> dict[str, Any]:
    """OpenAPI request bodies: the job's fields (minus the stored `references`) plus `images`."""
    schema = MultirefJob.model_json_schema()
    props = {k: v for k, v in schema["properties"].items() if k != "references"}
    required = [k for k in schema.get("required", []) if k != "references"]
    defs = schema.get("$defs")

    def body(images: dict[str, Any]) -> dict[str, Any]:
        out = {"type": "object", "properties": {**props, "images": images},
               "required": [*required, "images"], "additionalProperties": False}
        if defs:
            out["$defs"] = defs
        return out

    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": body({"type": "array", "minItems": 1,
                                    "items": {"type": "string", "format": "binary"},
                                    "description": "Reference images (PNG, JPEG or WebP), in order."}),
                },
                "application/json": {
                    "schema": body({"type": "array", "minItems": 1, "items": {"type": "string"},
                                    "description": "Reference images as base64 (data: URLs allowed), in order."}),
                },
            },
        }
    }


@router.post(
    "/multiref",
    status_code=202,
    response_model=JobCreated | JobPublic,
    responses={200: {"model": JobPublic, "description": "Finished within ?wait"},
               **error_responses(401, 413, 415, 422, 429)},
    openapi_extra=_request_schemas(),
)
async def multiref(
    request: Request, response: Response, settings: SettingsDep, principal: CurrentKey, metrics: MetricsDep,
    wait: WaitQuery = None,
) -> JobCreated | JobPublic:
    """Queue a multi-reference job: 1..ECHO4O_MAX_REFERENCES images and an instruction (`prompt`).

    Without `height`/`width` the output takes the size of the last reference."""
    timeout = check_wait(settings, wait)
    fields, raw = await read_multiref_body(request, settings.max_upload_bytes, settings.max_references)
    job = await in_session(
        settings, lambda s: submit_multiref(s, settings, metrics, principal, fields, raw)
    )
    return await created_or_finished(request, response, settings, job, timeout)


async def read_multiref_body(
    request: Request, max_bytes: int, max_files: int
) -> tuple[dict[str, Any], list[RawImage]]:
    content_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if content_type in ("multipart/form-data", "application/x-www-form-urlencoded"):
        try:
            form = await request.form(max_files=max_files + 8, max_fields=200)
        except StarletteHTTPException as exc:  # malformed multipart, too many parts
            status = exc.status_code if exc.status_code in (408, 413) else 422  # bad form: 422 like any bad field
            raise invalid("images", f"images: {exc.detail}", status=status) from None
        return await read_form(form, file_fields=("images",), max_bytes=max_bytes)
    if content_type == "application/json":
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise invalid(None, f"the body is not valid JSON ({exc})", code="invalid_json") from None
        if not isinstance(body, dict):
            raise invalid(None, "the JSON body must be an object", code="invalid_json")
        if "images" not in body:
            raise invalid("images", "images: field required (a list of base64-encoded images)")
        raw_images = body.pop("images")
        # a lone base64 string is one image; anything else must be a list
        raw_images = [raw_images] if isinstance(raw_images, str) else raw_images
        images = images_from_json(raw_images, param="images", max_bytes=max_bytes)
        return body, images
    raise invalid(None, f"Content-Type must be multipart/form-data or application/json, got {content_type!r}",
                  code="unsupported_media_type", status=415)
