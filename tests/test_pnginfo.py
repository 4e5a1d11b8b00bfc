"""Generation parameters round-trip through PNG text chunks."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from echo4o.pnginfo import PARAMS_KEY, params_from_png, params_to_pnginfo, png_bytes, write_png

PARAMS = {
    "prompt": "一只在床上睡觉的小熊猫, a red panda sleeping on a bed",
    "seed": 42,
    "num_steps": 50,
    "height": 1024,
    "width": 768,
    "cfg_text_scale": 4.0,
    "cfg_img_scale": 1.0,
    "cfg_interval": [0.4, 1.0],
    "timestep_shift": 3.0,
    "cfg_renorm_type": "global",
    "cfg_renorm_min": 0.0,
    "references": None,
    "attention": "sdpa",
}


def image() -> Image.Image:
    return Image.new("RGB", (8, 4), (200, 30, 60))


def test_round_trip_through_a_file(tmp_path: Path):
    path = write_png(image(), tmp_path / "sub" / "0.png", PARAMS)
    assert path.exists() and not list(path.parent.glob(".*.tmp"))
    assert params_from_png(path) == PARAMS
    assert params_from_png(str(path)) == PARAMS
    assert params_from_png(path.read_bytes()) == PARAMS
    with Image.open(path) as img:
        assert params_from_png(img) == PARAMS
        assert img.getpixel((0, 0)) == (200, 30, 60)


def test_one_chunk_per_field_readable_by_any_viewer():
    with Image.open(io.BytesIO(png_bytes(image(), PARAMS))) as img:
        text = img.text
    assert text["prompt"] == PARAMS["prompt"]  # strings as they are (UTF-8 iTXt for non-Latin-1)
    assert text["seed"] == "42"
    assert text["cfg_interval"] == "[0.4, 1.0]"
    assert text["references"] == "null"
    assert text["Software"].startswith("echo4o ")
    assert PARAMS_KEY in text


def test_tuples_and_paths_become_json():
    params = {"cfg_interval": (0.0, 1.0), "ref": Path("uploads/a.png")}
    data = png_bytes(image(), params)
    assert params_from_png(data) == {"cfg_interval": [0.0, 1.0], "ref": "uploads/a.png"}


def test_same_input_same_bytes():
    assert png_bytes(image(), PARAMS) == png_bytes(image(), PARAMS)
    assert png_bytes(image(), PARAMS) != png_bytes(image(), {**PARAMS, "seed": 43})


def test_per_field_chunks_are_the_fallback():
    info = params_to_pnginfo(PARAMS)
    info.chunks = [c for c in info.chunks if not c[1].startswith(PARAMS_KEY.encode())]
    buf = io.BytesIO()
    image().save(buf, format="PNG", pnginfo=info)
    assert params_from_png(buf.getvalue()) == PARAMS


def test_png_without_params_and_non_png_are_clear_errors(tmp_path: Path):
    plain = tmp_path / "plain.png"
    image().save(plain)
    with pytest.raises(ValueError, match="no echo4o generation parameters"):
        params_from_png(plain)
    jpeg = tmp_path / "x.jpg"
    image().save(jpeg)
    with pytest.raises(ValueError, match="not a PNG"):
        params_from_png(jpeg)
    with pytest.raises(ValueError, match="cannot read"):
        params_from_png(b"not an image")


def test_module_is_torch_free():
    code = "import sys, echo4o.pnginfo; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_the_compression_level_comes_from_the_setting_and_keeps_pixels_and_params(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from echo4o.settings import get_settings

    gradient = Image.linear_gradient("L").convert("RGB")  # 256x256, compressible
    sizes = {level: len(png_bytes(gradient, PARAMS, compress_level=level)) for level in (0, 1, 9)}
    assert sizes[0] > 50 * sizes[1] and sizes[1] == sizes[9]  # 0 stores; run-length: the level hardly matters
    monkeypatch.setenv("ECHO4O_PNG_COMPRESS_LEVEL", "0")
    get_settings.cache_clear()  # the autouse settings fixture clears it again afterwards
    assert png_bytes(gradient, PARAMS) == png_bytes(gradient, PARAMS, compress_level=0)
    path = write_png(gradient, tmp_path / "0.png", PARAMS)
    assert path.stat().st_size == sizes[0]
    with Image.open(path) as img:
        assert params_from_png(img) == PARAMS
        assert img.tobytes() == gradient.tobytes()


def test_run_length_compression_beats_pillows_level_1_on_a_noisy_gradient() -> None:
    """What a render looks like to zlib after PNG's row filters: runs of small differences. zlib's run-length
    strategy stores it smaller than Pillow's own level-1 encoding (``benchmarks/png_bench.py`` times both)."""
    rng = np.random.default_rng(0)
    gradient = np.asarray(Image.linear_gradient("L").convert("RGB")).astype(int)
    picture = Image.fromarray((gradient + rng.integers(-2, 3, gradient.shape)).clip(0, 255).astype(np.uint8))
    pillow_level_1 = io.BytesIO()
    picture.save(pillow_level_1, format="PNG", compress_level=1)
    ours = png_bytes(picture, compress_level=1)
    assert len(ours) < 0.9 * len(pillow_level_1.getvalue())
    with Image.open(io.BytesIO(ours)) as img:
        assert img.tobytes() == picture.tobytes()
