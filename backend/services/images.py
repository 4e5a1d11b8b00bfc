"""Result images: where a succeeded job's image lies on disk, and the stored PNG re-encoded as WebP or JPEG."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image

from backend.errors import ApiError, not_found
from echo4o.db.models import Job
from echo4o.settings import Settings

#: ``?format=`` value -> (PIL format, media type).
IMAGE_FORMATS = {"png": ("PNG", "image/png"), "webp": ("WEBP", "image/webp"), "jpeg": ("JPEG", "image/jpeg")}


def result_path(settings: Settings, job: Job, index: int) -> Path:
    """The file of image ``index`` of ``job``: 409 until the job has succeeded, 404 naming ``n`` for an index it
    does not have or a file no longer on disk."""
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
    """The stored PNG in another format (webp, jpeg); for JPEG the generation parameters go along as its
    comment (WebP carries none)."""
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
