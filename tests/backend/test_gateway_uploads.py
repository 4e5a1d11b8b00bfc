"""Reference-image checks (backend/uploads.py) on real files made with Pillow."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import pytest
from PIL import Image

from backend.errors import ApiError
from backend.uploads import check_image, decode_base64_image, save_references, sniff_format

MB = 1024 * 1024


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def check(data: bytes, *, max_bytes: int = 4 * MB, max_pixels: int = 4_000_000):
    return check_image(data, param="images.1", max_bytes=max_bytes, max_pixels=max_pixels)


def refused(data: bytes, **kw) -> ApiError:
    with pytest.raises(ApiError) as info:
        check(data, **kw)
    err = info.value
    assert err.param == "images.1" and err.message.startswith("images.1: ")
    return err


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_each_accepted_format_is_recognised_by_content(fmt: str) -> None:
    data = encode(Image.new("RGB", (40, 24), (10, 200, 30)), fmt)
    checked = check(data)
    assert checked.source_format == fmt
    assert checked.image.size == (40, 24) and checked.image.mode == "RGB"
    assert sniff_format(data) == fmt


def test_other_formats_are_refused_whatever_they_are_called() -> None:
    gif = encode(Image.new("RGB", (32, 32)), "GIF")
    err = refused(gif)
    assert (err.status, err.code) == (415, "unsupported_image_type")
    assert refused(b"%PDF-1.7 not an image").status == 415


def test_byte_cap_is_checked_first() -> None:
    data = encode(Image.new("RGB", (64, 64)), "PNG")
    err = refused(data, max_bytes=len(data) - 1)
    assert (err.status, err.code) == (413, "image_too_large")
    assert "ECHO4O_MAX_UPLOAD_BYTES" in err.message


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but carries (almost) no pixel data."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00")) + chunk(b"IEND", b"")


def test_pixel_count_is_refused_before_decoding() -> None:
    # 100k x 100k would need 30 GB decoded; the header alone is enough to refuse it
    err = refused(_png_header_only(100_000, 100_000))
    assert (err.status, err.code) == (413, "image_too_large")
    assert "10000000000 pixels" in err.message and "ECHO4O_MAX_IMAGE_PIXELS" in err.message


def test_pixel_cap_follows_the_setting() -> None:
    data = encode(Image.new("RGB", (100, 100)), "PNG")
    assert check(data, max_pixels=10_000).image.size == (100, 100)
    assert refused(data, max_pixels=9_999).status == 413


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_truncated_files_are_refused(fmt: str) -> None:
    noisy = Image.effect_noise((128, 128), 64).convert("RGB")
    data = encode(noisy, fmt)
    err = refused(data[: len(data) // 2])
    assert (err.status, err.code) == (422, "invalid_image")
    assert "truncated or corrupt" in err.message


def test_tiny_and_empty_files_are_refused() -> None:
    assert refused(b"").status == 422
    assert "too small" in refused(encode(Image.new("RGB", (8, 64)), "PNG")).message


def test_alpha_goes_over_white_and_exif_orientation_is_applied() -> None:
    rgba = Image.new("RGBA", (32, 16), (255, 0, 0, 0))
    assert check(encode(rgba, "PNG")).image.getpixel((0, 0)) == (255, 255, 255)

    img = Image.new("RGB", (48, 16), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    rotated = check(encode(img, "JPEG", exif=exif.tobytes()))
    assert rotated.image.size == (16, 48)


def test_base64_with_or_without_data_url_prefix() -> None:
    data = encode(Image.new("RGB", (32, 32)), "PNG")
    text = base64.b64encode(data).decode()
    assert decode_base64_image(text, param="images.0", max_bytes=MB) == data
    assert decode_base64_image("data:image/png;base64," + text, param="images.0", max_bytes=MB) == data
    with pytest.raises(ApiError) as info:
        decode_base64_image("not base64 !!", param="images.0", max_bytes=MB)
    assert (info.value.param, info.value.code) == ("images.0", "invalid_base64")
    with pytest.raises(ApiError) as info:
        decode_base64_image(text, param="images.0", max_bytes=len(data) // 2)
    assert info.value.status == 413


def test_saved_as_png_under_the_job_id(tmp_path) -> None:
    checked = [check(encode(Image.new("RGB", (32, 32), c), "JPEG")) for c in ("red", "blue")]
    paths = save_references(checked, data_dir=tmp_path, job_id="abc123")
    assert paths == ["uploads/abc123/0.png", "uploads/abc123/1.png"]
    with Image.open(tmp_path / paths[1]) as img:
        assert img.format == "PNG" and img.size == (32, 32)
    assert sorted(p.name for p in (tmp_path / "uploads" / "abc123").iterdir()) == ["0.png", "1.png"]
