"""``GET /jobs/{id}/images/{n}``: a result image, PNG with its generation parameters, or WebP / JPEG."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query
from fastapi.responses import FileResponse, Response

from backend.api.deps import CurrentKey, SessionDep, SettingsDep
from backend.api.routes.jobs import JobId
from backend.schemas import error_responses
from backend.services.images import IMAGE_FORMATS, encode_image, result_path
from backend.services.views import load_job

router = APIRouter(prefix="/jobs", tags=["jobs"])

#: A stored PNG up to this size is answered from one read; a larger one is streamed (``FileResponse``).
READ_WHOLE_MAX_BYTES = 16 * 1024 * 1024


@router.get(
    "/{job_id}/images/{n}",
    response_class=Response,
    responses={200: {"content": {"image/png": {}, "image/webp": {}, "image/jpeg": {}},
                     "description": "The image; the PNG's text chunks carry every generation parameter."},
               **error_responses(401, 403, 404, 409, 422)},
)
def get_image(
    job_id: JobId,
    n: Annotated[int, Path(ge=0, le=1000, description="Image index, 0-based.")],
    session: SessionDep,
    settings: SettingsDep,
    principal: CurrentKey,
    format: Annotated[Literal["png", "webp", "jpeg"], Query(description="Convert from the stored PNG.")] = "png",  # noqa: A002
) -> Response:
    job = load_job(session, principal, job_id)
    path = result_path(settings, job, n)
    media_type = IMAGE_FORMATS[format][1]
    filename = f"{job.id}-{n}.{format}"
    headers = {"Content-Disposition": f'inline; filename="{filename}"'}
    if format != "png":
        return Response(encode_image(path, format), media_type=media_type, headers=headers)
    if path.stat().st_size > READ_WHOLE_MAX_BYTES:
        return FileResponse(path, media_type=media_type, filename=filename, content_disposition_type="inline")
    # one read on this route's thread: FileResponse reads 64 KiB chunks, each on another thread hop
    return Response(path.read_bytes(), media_type=media_type, headers=headers)
