"""Generation parameters in PNG text chunks (torch-free, Pillow only).

Every PNG the worker or the CLI writes carries:

- ``echo4o.params``: JSON of all parameters (``out.params`` of the pipeline), compressed (zTXt / iTXt);
- one chunk per field, named after it (``prompt``, ``seed``, ``num_steps``, ...), strings as they are and
  everything else as JSON, so that any PNG viewer shows them;
- ``Software``: ``echo4o <version>``.

``params_from_png`` reads them back (``echo4o generate --from PNG`` re-runs them; the UI and tests read
them): the JSON chunk when present, else the per-field chunks. Only PNGs are read back (the gateway's JPEG
conversion keeps the JSON as its comment; its WebP carries no parameters).
"""

from __future__ import annotations

import io
import json
import zlib
from pathlib import Path
from typing import IO, Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from echo4o import __version__, png_encoder
from echo4o.files import write_atomic
from echo4o.settings import get_settings

PARAMS_KEY = "echo4o.params"
_RESERVED_KEYS = {PARAMS_KEY, "Software"}


def _json_default(value: Any) -> Any:
    if isinstance(value, tuple | set | frozenset):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def _keyword(name: str) -> str | None:
    """A valid PNG keyword (1-79 Latin-1 printable characters, no leading/trailing/double spaces) or None."""
    key = " ".join(str(name).split())[:79]
    try:
        key.encode("latin-1")
    except UnicodeEncodeError:
        return None
    return key or None


def params_to_pnginfo(params: dict[str, Any]) -> PngInfo:
    """Text chunks for ``params`` (see the module doc), ready for ``image.save(f, "PNG", pnginfo=...)``."""
    info = PngInfo()
    info.add_text("Software", f"echo4o {__version__}")
    info.add_text(PARAMS_KEY, json.dumps(params, default=_json_default, ensure_ascii=False), zip=True)
    for name, value in params.items():
        key = _keyword(name)
        if key is None or key in _RESERVED_KEYS:
            continue
        text = value if isinstance(value, str) else json.dumps(value, default=_json_default, ensure_ascii=False)
        info.add_text(key, text)  # Pillow switches to UTF-8 iTXt when the text is not Latin-1
    return info


def png_bytes(image: Image.Image, params: dict[str, Any] | None = None, *, compress_level: int | None = None) -> bytes:
    """The PNG encoding of ``image``, with ``params`` (if any) in its text chunks (deterministic for the same
    input). ``compress_level``: zlib's, default ``ECHO4O_PNG_COMPRESS_LEVEL``; 0 stores the rows uncompressed.

    Compressed with zlib's run-length strategy (``Z_RLE``): after PNG's row filters most of a picture is runs
    of small differences, so it gives files about the size of Pillow's default (level 6) at level-1 speed or
    better; the level then hardly matters. 8-bit images are written by :mod:`echo4o.png_encoder` (filters
    chosen with numpy, strips deflated on threads: several times faster than Pillow's encoder,
    ``benchmarks/png_bench.py``), others by Pillow."""
    if compress_level is None:
        compress_level = get_settings().png_compress_level
    info = params_to_pnginfo(params) if params is not None else None
    encoded = png_encoder.encode(image, [chunk[:2] for chunk in info.chunks] if info else (), level=compress_level)
    if encoded is not None:
        return encoded
    buf = io.BytesIO()  # a mode the fast encoder does not write (palette, 16-bit, transparency, ICC profile)
    image.save(buf, format="PNG", pnginfo=info, compress_level=compress_level, compress_type=zlib.Z_RLE)
    return buf.getvalue()


def write_png(image: Image.Image, path: str | Path, params: dict[str, Any], *,
              compress_level: int | None = None) -> Path:
    """Write ``image`` with ``params`` to ``path`` atomically (:func:`echo4o.files.write_atomic`)."""
    return write_atomic(path, png_bytes(image, params, compress_level=compress_level))


def params_from_png(source: str | Path | bytes | IO[bytes] | Image.Image) -> dict[str, Any]:
    """The parameters stored by :func:`params_to_pnginfo` in a PNG (a path, bytes, a file or an open image).

    Raises ``ValueError`` when the file is not a PNG or carries no echo4o parameters.
    """
    if isinstance(source, Image.Image):
        return _params_from_image(source, "the image")
    if isinstance(source, bytes | bytearray):
        source = io.BytesIO(source)
    where = str(source) if isinstance(source, str | Path) else "the data"
    try:
        with Image.open(source) as img:
            return _params_from_image(img, where)
    except (OSError, SyntaxError) as exc:  # PIL raises UnidentifiedImageError (an OSError) for non-images
        raise ValueError(f"cannot read {where} as an image ({exc})") from exc


def _params_from_image(img: Image.Image, where: str) -> dict[str, Any]:
    if img.format not in (None, "PNG"):
        raise ValueError(f"{where} is a {img.format}, not a PNG: generation parameters are only kept in PNGs")
    text: dict[str, str] = dict(getattr(img, "text", {}) or {})
    if PARAMS_KEY in text:
        try:
            params = json.loads(text[PARAMS_KEY])
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: the {PARAMS_KEY} chunk is not valid JSON ({exc})") from exc
        if not isinstance(params, dict):
            raise ValueError(f"{where}: the {PARAMS_KEY} chunk is not a JSON object")
        return params
    fields = {k: v for k, v in text.items() if k not in _RESERVED_KEYS}
    if not fields or "Software" not in text or not text["Software"].startswith("echo4o"):
        raise ValueError(f"{where} carries no echo4o generation parameters (no {PARAMS_KEY} text chunk)")
    out: dict[str, Any] = {}
    for key, value in fields.items():
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out
