"""echo4o.png_encoder: any PNG reader decodes what it writes to the same pixels, the zlib stream built from strips
checks out (CRCs, Adler-32), the bytes do not depend on the threads, and what it cannot write goes to Pillow."""

from __future__ import annotations

import io
import multiprocessing as mp
import struct
import zlib

import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from echo4o import png_encoder
from echo4o.pnginfo import params_from_png, png_bytes

CHANNELS = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}


def chunks_of(data: bytes) -> list[tuple[bytes, bytes]]:
    """The (type, data) chunks of a PNG file, each CRC checked."""
    assert data[:8] == png_encoder.SIGNATURE
    pos, chunks = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert crc == zlib.crc32(kind + body), kind
        chunks.append((kind, body))
        pos += 12 + length
    return chunks


def filtered_rows(image: Image.Image) -> np.ndarray:
    """The filtered rows of ``image`` as encoded (each with its filter byte first), inflated by zlib itself."""
    data = png_encoder.encode(image)
    raw = zlib.decompress(b"".join(body for kind, body in chunks_of(data) if kind == b"IDAT"))
    return np.frombuffer(raw, np.uint8).reshape(image.height, -1)


def random_image(mode: str, width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    shape = (height, width) if CHANNELS[mode] == 1 else (height, width, CHANNELS[mode])
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)


def decoded(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return img.copy()


@pytest.mark.parametrize("mode", sorted(CHANNELS))
@pytest.mark.parametrize("size", [(1, 1), (7, 3), (448, 448), (3, 40_000)])
@pytest.mark.parametrize("level", [0, 1, 9])
def test_pillow_decodes_the_same_pixels(mode: str, size: tuple[int, int], level: int) -> None:
    image = random_image(mode, *size)
    back = decoded(png_encoder.encode(image, level=level))
    assert back.mode == mode and back.size == image.size
    assert back.tobytes() == image.tobytes()


def test_the_strips_join_into_one_zlib_stream_with_the_right_checksum() -> None:
    """Several strips (one IDAT each): zlib's own inflate of the joined IDATs checks the combined Adler-32."""
    image = random_image("RGB", 1000, 1000)
    chunks = chunks_of(png_encoder.encode(image))
    idats = [body for kind, body in chunks if kind == b"IDAT"]
    row_bytes = 1000 * 3 + 1
    rows_per_strip = png_encoder.STRIP_BYTES // row_bytes
    assert len(idats) == -(-1000 // rows_per_strip) > 1
    raw = zlib.decompress(b"".join(idats))  # raises on a wrong Adler-32
    assert len(raw) == 1000 * row_bytes
    assert [kind for kind, _ in chunks][:2] == [b"IHDR", b"IDAT"] and chunks[-1] == (b"IEND", b"")


def test_each_row_takes_the_filter_that_zeroes_it() -> None:
    """Identical rows: Up leaves zeros (after the first row, which has no row above and takes Sub on a horizontal
    ramp); constant rows of different values: Sub leaves zeros after the first pixel."""
    ramp = np.tile(np.arange(0, 250, 2, dtype=np.uint8)[None, :, None], (50, 1, 3))  # each row the same ramp
    filters = filtered_rows(Image.fromarray(ramp))[:, 0]
    assert filters[0] == png_encoder.SUB and (filters[1:] == png_encoder.UP).all()

    bands = np.repeat(np.arange(5, 255, 5, dtype=np.uint8)[:, None, None], 125, axis=1).repeat(3, axis=2)
    rows = filtered_rows(Image.fromarray(bands))
    assert (rows[:, 0] == png_encoder.SUB).all() and not rows[:, 4:].any()


def test_the_bytes_do_not_depend_on_the_threads() -> None:
    image = random_image("RGB", 700, 900, seed=3)
    assert png_encoder.encode(image, threads=1) == png_encoder.encode(image)
    assert png_encoder.encode(image, threads=1) == png_encoder.encode(image, threads=4)


def test_chunks_go_before_the_image_data_and_params_read_back() -> None:
    info = PngInfo()
    info.add_text("prompt", "a cat")
    data = png_encoder.encode(random_image("RGB", 16, 16), [c[:2] for c in info.chunks])
    assert [kind for kind, _ in chunks_of(data)] == [b"IHDR", b"tEXt", b"IDAT", b"IEND"]
    params = {"prompt": "ein Kätzchen 🐱", "seed": 7, "num_steps": 3}
    assert params_from_png(png_bytes(random_image("RGB", 16, 16), params)) == params


@pytest.mark.parametrize("image", [
    Image.new("P", (8, 8)),
    Image.new("I;16", (8, 8)),
    Image.new("1", (8, 8)),
], ids=lambda img: img.mode)
def test_what_it_does_not_write_goes_to_pillow(image: Image.Image) -> None:
    assert png_encoder.encode(image) is None
    back = decoded(png_bytes(image, {"seed": 1}))
    assert back.mode == image.mode and back.tobytes() == image.tobytes()
    assert params_from_png(png_bytes(image, {"seed": 1})) == {"seed": 1}


def test_an_icc_profile_or_transparency_is_kept_by_pillows_encoder() -> None:
    image = random_image("RGB", 8, 8)
    image.info["icc_profile"] = b"not really a profile"
    assert not png_encoder.supports(image)
    assert decoded(png_bytes(image)).info["icc_profile"] == b"not really a profile"
    grey = random_image("L", 8, 8)
    grey.info["transparency"] = 0
    assert decoded(png_bytes(grey)).info["transparency"] == 0


def _encode_in_child(queue) -> None:  # noqa: ANN001 - mp.Queue
    image = random_image("RGB", 600, 600, seed=5)
    queue.put(png_encoder.encode(image))


@pytest.mark.skipif("fork" not in mp.get_all_start_methods(), reason="needs fork")
def test_a_forked_child_encodes_with_a_pool_of_its_own() -> None:
    """The parent's pool has no threads in a forked child (a Celery prefork worker): the child makes its own
    instead of waiting forever on the copy."""
    image = random_image("RGB", 600, 600, seed=5)
    expected = png_encoder.encode(image)  # the parent's pool exists now
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_encode_in_child, args=(queue,))
    child.start()
    try:
        assert queue.get(timeout=120) == expected  # a hang here is the failure
    finally:
        child.join()
