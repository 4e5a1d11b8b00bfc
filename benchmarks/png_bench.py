"""What writing a result PNG costs: encode time and file size per zlib level and strategy.

Workers encode every image between sampling and the job's answer (``echo4o.pnginfo.png_bytes``), so this is
serving time with the GPU idle. Three kinds of picture, because zlib's results depend on them:

- ``photo``: a synthetic photo-like image (smooth gradients, blurred shapes, a little sensor noise);
- ``noise``: uniform noise, what the tiny random-weight model produces (no setting shrinks it);
- any ``--image PATH`` given (resized to ``--size``), e.g. a real render.

Rows: Pillow's encoder with zlib's ``default`` strategy at levels 0/1/6 and with its run-length strategy
(``rle``, level 1); then ``png_bytes`` (``echo4o.png_encoder``: row filters chosen with numpy, run-length
deflate in strips), on one thread (``ours-1t``) and on the process's pool (``ours``, up to 4 threads). Best of
``--repeats``.

    .venv/bin/python benchmarks/png_bench.py --size 1024 --json png.json
"""

from __future__ import annotations

import argparse
import io
import json
import time
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from echo4o import png_encoder
from echo4o.pnginfo import png_bytes
from echo4o.settings import get_settings

#: Pillow's encoder: zlib's default strategy at levels 0, 1 and 6 (Pillow's default), and its run-length strategy
#: (what ``png_bytes`` used before ``echo4o.png_encoder``).
CASES = [("default", 0, zlib.Z_DEFAULT_STRATEGY), ("default", 1, zlib.Z_DEFAULT_STRATEGY),
         ("default", 6, zlib.Z_DEFAULT_STRATEGY), ("rle", 1, zlib.Z_RLE)]


def photo_like(size: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    base = np.stack([200 * x + 30, 120 + 80 * np.sin(3 * y), 180 * (1 - x * y)], axis=-1)
    img = Image.fromarray(base.clip(0, 255).astype(np.uint8))
    shapes = Image.new("RGB", (size, size))
    for _ in range(40):  # coloured discs, blurred into soft shapes
        cx, cy, r = rng.integers(0, size, 2).tolist() + [int(rng.integers(size // 40, size // 6))]
        disc = Image.new("L", (size, size))
        disc.paste(255, (cx - r, cy - r, cx + r, cy + r))
        shapes.paste(tuple(int(c) for c in rng.integers(0, 256, 3)), mask=disc)
    img = Image.blend(img, shapes.filter(ImageFilter.GaussianBlur(size / 100)), 0.5)
    noisy = np.asarray(img).astype(np.int16) + rng.normal(0, 2, (size, size, 3)).astype(np.int16)
    return Image.fromarray(noisy.clip(0, 255).astype(np.uint8))


def encode(image: Image.Image, level: int, strategy: int) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=level, compress_type=strategy)
    return buf.getvalue()


def best_ms(fn, repeats: int) -> float:  # noqa: ANN001
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--image", type=Path, action="append", default=[], help="also measure this picture")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()

    rng = np.random.default_rng(1)
    pictures = {"photo": photo_like(args.size),
                "noise": Image.fromarray(rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8))}
    for path in args.image:
        with Image.open(path) as img:
            # the pixels only: a photo's ICC profile would send png_bytes to Pillow's encoder, a render has none
            pictures[path.name] = Image.fromarray(np.asarray(img.convert("RGB").resize((args.size, args.size))))

    figures: dict[str, dict[str, dict[str, float]]] = {}
    print(f"{'picture':<14} {'strategy':<8} {'level':>5} {'ms':>8} {'kB':>8}")
    for name, image in pictures.items():
        figures[name] = {}
        for label, level, strategy in CASES:
            size_kb = len(encode(image, level, strategy)) / 1000
            ms = best_ms(lambda: encode(image, level, strategy), args.repeats)  # noqa: B023 - called at once
            figures[name][f"{label}_{level}"] = {"ms": round(ms, 1), "kb": round(size_kb, 1)}
            print(f"{name:<14} {label:<8} {level:>5} {ms:>8.1f} {size_kb:>8.1f}")
        level = get_settings().png_compress_level
        for label, threads in (("ours-1t", 1), ("ours", None)):
            data = png_encoder.encode(image, level=level, threads=threads)
            assert data == png_bytes(image)  # what the workers write
            ms = best_ms(lambda: png_encoder.encode(image, level=level, threads=threads), args.repeats)  # noqa: B023
            figures[name][label] = {"ms": round(ms, 1), "kb": round(len(data) / 1000, 1)}
            print(f"{name:<14} {label:<8} {level:>5} {ms:>8.1f} {len(data) / 1000:>8.1f}")
    if args.json:
        args.json.write_text(json.dumps({"size": args.size, "pillow": Image.__version__,
                                         "threads": png_encoder.default_threads(), "figures": figures}, indent=2))


if __name__ == "__main__":
    main()
