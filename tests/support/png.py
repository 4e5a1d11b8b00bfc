"""Comparing PNGs the way a failing test should report them: which parameters differ, how many pixels and by how
much, and only then the bytes. pytest's own diff of two multi-kilobyte ``bytes`` takes minutes (difflib) and
says nothing useful."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from echo4o.pnginfo import params_from_png


def png_difference(a: Path, b: Path) -> str | None:
    """None when ``a`` and ``b`` hold the same bytes, else one line saying what differs."""
    if a.read_bytes() == b.read_bytes():
        return None
    params_a, params_b = params_from_png(a), params_from_png(b)
    changed = {k: (params_a.get(k), params_b.get(k)) for k in params_a.keys() | params_b.keys()
               if params_a.get(k) != params_b.get(k)}
    if changed:
        return f"{a.name} and {b.name} record different parameters: {changed}"
    with Image.open(a) as img_a, Image.open(b) as img_b:
        if img_a.size != img_b.size or img_a.mode != img_b.mode:
            return f"{a.name} is {img_a.mode} {img_a.size}, {b.name} is {img_b.mode} {img_b.size}"
        pixels_a, pixels_b = np.asarray(img_a).astype(int), np.asarray(img_b).astype(int)
    diff = np.abs(pixels_a - pixels_b)
    if diff.any():
        return (f"{a.name} and {b.name}: same parameters, {int((diff > 0).any(axis=-1).sum())} of "
                f"{diff.shape[0] * diff.shape[1]} pixels differ, by at most {int(diff.max())} levels")
    return f"{a.name} and {b.name}: same parameters and pixels, different encoding ({a.stat().st_size} vs " \
           f"{b.stat().st_size} bytes)"
