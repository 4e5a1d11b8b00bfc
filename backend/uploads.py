"""Reference images from clients: checked by content, bounded, then stored as PNG.

Order of checks, cheapest first, so a hostile file costs little: byte size (before reading it all),
magic bytes (PNG, JPEG or WebP, whatever the file is called), pixel count from the header (before any pixel is
decoded: decompression bombs), a full decode (truncated or corrupt files fail here). Accepted images are
normalised to RGB (alpha over white, EXIF orientation applied) and written to
``<data_dir>/uploads/<job_id>/<n>.png`` atomically.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from backend.errors import ApiError

MIN_SIDE = 16  # smaller references carry no usable content and trip the engine's resizing

_FORMATS = ("PNG", "JPEG", "WEBP")
_DATA_URL = re.compile(r"^data:image/[a-zA-Z0-9.+-]+;base64,", re.ASCII)


@dataclass(frozen=True)
class CheckedImage:
    """One accepted reference, decoded and normalised to RGB."""

    image: Image.Image
    source_format: str  # PNG, JPEG or WEBP, from the content


def sniff_format(data: bytes) -> str | None:
    """The image format from the file's first bytes, or None when it is none of PNG, JPEG, WebP."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def _too_large(param: str, what: str) -> ApiError:
    return ApiError(413, f"{param}: {what}", code="image_too_large", param=param)


def check_image(data: bytes, *, param: str, max_bytes: int, max_pixels: int) -> CheckedImage:
    """Validate one uploaded image; raise :class:`ApiError` naming ``param`` when it is refused."""
    if len(data) > max_bytes:
        raise _too_large(param, f"file is {len(data)} bytes, more than the {max_bytes}-byte limit "
                                "(ECHO4O_MAX_UPLOAD_BYTES); send a smaller or more compressed image")
    if not data:
        raise ApiError(422, f"{param}: the file is empty", code="invalid_image", param=param)
    fmt = sniff_format(data)
    if fmt is None:
        raise ApiError(
            415,
            f"{param}: not a PNG, JPEG or WebP image (checked by content, not by name or content type)",
            code="unsupported_image_type",
            param=param,
        )
    try:
        with Image.open(io.BytesIO(data), formats=[fmt]) as probe:  # reads the header only
            width, height = probe.size
            if width * height > max_pixels:
                raise _too_large(param, f"{width}x{height} is {width * height} pixels, more than the "
                                        f"{max_pixels}-pixel limit (ECHO4O_MAX_IMAGE_PIXELS); downscale it first")
            if min(width, height) < MIN_SIDE:
                raise ApiError(422, f"{param}: {width}x{height} is too small; each side needs at least {MIN_SIDE} px",
                               code="invalid_image", param=param)
            probe.verify()  # chunk structure and checksums, without keeping pixels
        with Image.open(io.BytesIO(data), formats=[fmt]) as img:
            img.load()  # a truncated file raises here
            rgb = _to_rgb(ImageOps.exif_transpose(img))
    except ApiError:
        raise
    except Image.DecompressionBombError as exc:
        raise _too_large(param, f"refused before decoding: {exc} The limit here is {max_pixels} pixels "
                                "(ECHO4O_MAX_IMAGE_PIXELS); downscale it first") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ApiError(
            422, f"{param}: the {fmt} file is truncated or corrupt ({exc}); send the complete file",
            code="invalid_image", param=param,
        ) from None
    return CheckedImage(image=rgb, source_format=fmt)


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img.copy()
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return img.convert("RGB")


def decode_base64_image(value: str, *, param: str, max_bytes: int) -> bytes:
    """Bytes of a base64 string (a ``data:image/...;base64,`` prefix is allowed), size-capped before decoding."""
    if not isinstance(value, str):
        raise ApiError(422, f"{param}: expected a base64 string", code="invalid_image", param=param)
    text = _DATA_URL.sub("", value.strip(), count=1)
    if len(text) * 3 // 4 > max_bytes + 3:
        raise _too_large(param, f"decodes to more than the {max_bytes}-byte limit (ECHO4O_MAX_UPLOAD_BYTES)")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(422, f"{param}: not valid base64", code="invalid_base64", param=param) from None


def upload_dir(data_dir: Path, job_id: str) -> Path:
    return data_dir / "uploads" / job_id


def save_references(images: list[CheckedImage], *, data_dir: Path, job_id: str) -> list[str]:
    """Write each image as ``uploads/<job_id>/<n>.png``; returns the paths relative to the data dir."""
    folder = upload_dir(data_dir, job_id)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for n, checked in enumerate(images):
        target = folder / f"{n}.png"
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{n}.", suffix=".png.tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                checked.image.save(fh, format="PNG")
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        paths.append(target.relative_to(data_dir).as_posix())
    return paths


def discard_references(*, data_dir: Path, job_id: str) -> None:
    shutil.rmtree(upload_dir(data_dir, job_id), ignore_errors=True)
