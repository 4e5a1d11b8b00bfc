"""Reference images from clients: read from the request body, checked by content, bounded, then stored as PNG.

Bodies come as multipart forms (:func:`read_form`, files plus text fields) or JSON with base64 strings
(:func:`images_from_json`); either way each image becomes a :class:`RawImage` named for errors (``images.1``).

Order of checks, cheapest first, so a hostile file costs little: byte size (before reading it all),
magic bytes (PNG, JPEG or WebP, whatever the file is called), pixel count from the header (before any pixel is
decoded: decompression bombs), a full decode (truncated or corrupt files fail here). Accepted images are
normalised to RGB (alpha over white, EXIF orientation applied, CMYK converted, 16-bit scaled to 8) and written to
``<data_dir>/uploads/<job_id>/<n>.png`` atomically.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps, UnidentifiedImageError
from starlette.datastructures import FormData, UploadFile

from backend.errors import ApiError, invalid
from echo4o.files import write_atomic
from echo4o.jobs import MIN_SIDE  # smaller references carry no usable content and trip the engine's resizing
from echo4o.settings import Settings

_FORMATS = ("PNG", "JPEG", "WEBP")
_DATA_URL = re.compile(r"^data:image/[a-zA-Z0-9.+-]+;base64,", re.ASCII)
_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")


@dataclass
class RawImage:
    """One image as received, before checks: ``param`` names it in errors (``images.0``)."""

    param: str
    data: bytes


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
    except Image.DecompressionBombError as exc:  # Pillow's own guard, hit while reading the header
        declared = _BOMB_PIXELS.search(str(exc))
        size = f"its header declares {declared.group(1)} pixels" if declared else "its header declares too many pixels"
        raise _too_large(param, f"refused before decoding: {size}, more than the {max_pixels}-pixel limit "
                                "(ECHO4O_MAX_IMAGE_PIXELS); downscale it first") from None
    except UnidentifiedImageError:  # a header Pillow cannot read (a 0x0 PNG, a damaged first chunk)
        raise ApiError(422, f"{param}: the {fmt} header is invalid (a 0x0 image, or a damaged file); send a "
                            f"complete {fmt} of at least {MIN_SIDE}x{MIN_SIDE} px", code="invalid_image",
                       param=param) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ApiError(
            422, f"{param}: the {fmt} file is truncated or corrupt ({exc}); send the complete file",
            code="invalid_image", param=param,
        ) from None
    return CheckedImage(image=rgb, source_format=fmt)


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img.copy()
    if img.mode == "I" or img.mode.startswith("I;16"):  # 16-bit grayscale PNG: scale to 8 bits, not clip
        img = img.convert("I").point(lambda v: v * (1 / 256)).convert("L")
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
        buf = io.BytesIO()
        checked.image.save(buf, format="PNG")
        target = write_atomic(folder / f"{n}.png", buf.getvalue())  # on the disk before the job is recorded
        paths.append(target.relative_to(data_dir).as_posix())
    return paths


def discard_references(*, data_dir: Path, job_id: str) -> None:
    shutil.rmtree(upload_dir(data_dir, job_id), ignore_errors=True)


def checked_images(settings: Settings, raw: list[RawImage], *, param: str) -> list[CheckedImage]:
    """Check the count (1..``ECHO4O_MAX_REFERENCES``, 422 naming ``param``), then each image in order."""
    if not raw:
        raise invalid(param, f"{param}: at least one reference image is required")
    if len(raw) > settings.max_references:
        raise invalid(param, f"{param}: {len(raw)} images sent; at most {settings.max_references} are allowed "
                             "(ECHO4O_MAX_REFERENCES)")
    return [
        check_image(r.data, param=r.param, max_bytes=settings.max_upload_bytes, max_pixels=settings.max_image_pixels)
        for r in raw
    ]


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
    """The images of a JSON body: a list of base64 strings (422 naming ``param`` for anything else)."""
    if not isinstance(values, list):
        raise invalid(param, f"{param}: expected a list of base64-encoded images")
    return [
        RawImage(param=f"{param}.{i}", data=decode_base64_image(v, param=f"{param}.{i}", max_bytes=max_bytes))
        for i, v in enumerate(values)
    ]
