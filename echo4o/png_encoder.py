"""A PNG encoder for results: each row's filter chosen with numpy, the rows deflated in strips on threads.

Pillow's PNG encoder spends most of its time choosing each row's filter (it tries all five, in C, one row at a
time) and deflates on one thread; at 1024 px that is 70-120 ms of a job's serving time while the accelerator
waits (``benchmarks/png_bench.py``). Here:

* Rows are filtered whole-image at a time with numpy: None, Sub, Up and Average, and each row keeps the one
  with the smallest sum of absolute (signed) bytes, libpng's heuristic. Paeth is left out: it costs more to
  compute with numpy than the rest together and saves a few percent of the file on some pictures only.
* The filtered rows are cut into strips of a fixed size (``STRIP_BYTES``, so the file does not depend on the
  machine's core count); each strip is deflated on its own with zlib's run-length strategy and a full flush,
  which ends it on a byte boundary with no reference to earlier strips, so the strips' outputs joined in order
  are one valid zlib stream (as pigz does). Strips run on a small thread pool (zlib-ng and numpy release the
  GIL), each strip becoming one IDAT chunk.

The output is deterministic (the same image and chunks, the same bytes) and any PNG reader decodes it.
Supported: 8-bit L, LA, RGB and RGBA images; :func:`encode` returns None for anything else (the caller falls back
to Pillow's encoder).
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image
from zlib_ng import zlib_ng

SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: PNG colour type and bytes per pixel of each supported mode.
COLOR_TYPES = {"L": (0, 1), "LA": (4, 2), "RGB": (2, 3), "RGBA": (6, 4)}
#: Raw (filtered) bytes per strip: about 0.25 MiB, so a 1024 px RGB image is 13 strips and a 448 px one 3.
STRIP_BYTES = 1 << 18
#: Threads of the encoding pool (at most): the worker's accelerator is idle while it encodes.
MAX_THREADS = 4
#: zlib's header for a 32 KiB window (CMF 0x78) and the "fastest" level flag (FLG 0x01; a multiple of 31).
ZLIB_HEADER = b"\x78\x01"

# PNG filter types (a row's first byte).
NONE, SUB, UP, AVERAGE = 0, 1, 2, 3

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _executor() -> ThreadPoolExecutor:
    """The process's encoding pool, made on first use."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=default_threads(), thread_name_prefix="echo4o-png")
        return _pool


def _forget_the_pool() -> None:
    """In a forked child (a prefork worker), whose copy of the pool has no threads and whose lock may be held by a
    thread that did not come along: start afresh."""
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_the_pool)


def default_threads() -> int:
    """Threads an encoding uses: the machine's cores, at most :data:`MAX_THREADS`."""
    return max(1, min(MAX_THREADS, os.cpu_count() or 1))


def supports(image: Image.Image) -> bool:
    """Whether :func:`encode` writes ``image`` as Pillow would: an 8-bit mode, no palette, transparency or ICC
    profile to carry over."""
    return image.mode in COLOR_TYPES and not {"transparency", "icc_profile"} & image.info.keys()


def encode(image: Image.Image, chunks: Iterable[tuple[bytes, bytes]] = (), *, level: int = 1,
           threads: int | None = None) -> bytes | None:
    """The PNG file of ``image`` with the ancillary ``chunks`` (``(type, data)``, e.g. a ``PngInfo``'s text
    chunks) before its image data; ``level`` 0 stores the rows uncompressed (no filters), 1-9 are zlib's levels
    under the run-length strategy; ``threads``: 1 encodes on the calling thread, otherwise the process's pool
    (:func:`default_threads`) is used. The bytes do not depend on the threads. None when ``image`` is not
    :func:`supports`-ed."""
    if not supports(image):
        return None
    color_type, bpp = COLOR_TYPES[image.mode]
    width, height = image.size
    rows = np.asarray(image, dtype=np.uint8).reshape(height, width * bpp)
    per_strip = max(1, STRIP_BYTES // (width * bpp + 1))
    bounds = [(start, min(height, start + per_strip)) for start in range(0, height, per_strip)]

    def strip(i: int) -> tuple[bytes, int]:
        start, stop = bounds[i]
        filtered = _filter(rows, start, stop, bpp) if level > 0 else _unfiltered(rows, start, stop)
        deflate = zlib_ng.compressobj(level, zlib_ng.DEFLATED, -15, 8, zlib_ng.Z_RLE)
        last = i == len(bounds) - 1
        body = deflate.compress(filtered) + deflate.flush(zlib_ng.Z_FINISH if last else zlib_ng.Z_FULL_FLUSH)
        return body, zlib_ng.adler32(filtered)

    if len(bounds) > 1 and (threads or default_threads()) > 1:
        parts = list(_executor().map(strip, range(len(bounds))))
    else:
        parts = [strip(i) for i in range(len(bounds))]

    out = [SIGNATURE, _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0))]
    out += [_chunk(kind, data) for kind, data in chunks]
    checksum = _adler32_of_strips([adler for _, adler in parts], bounds, width * bpp + 1)
    for i, (body, _) in enumerate(parts):
        data = (ZLIB_HEADER if i == 0 else b"") + body
        if i == len(parts) - 1:
            data += struct.pack(">I", checksum)
        out.append(_chunk(b"IDAT", data))
    out.append(_chunk(b"IEND", b""))
    return b"".join(out)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib_ng.crc32(data, zlib_ng.crc32(kind)))


def _unfiltered(rows: np.ndarray, start: int, stop: int) -> np.ndarray:
    out = np.empty((stop - start, rows.shape[1] + 1), dtype=np.uint8)
    out[:, 0] = NONE
    out[:, 1:] = rows[start:stop]
    return out


def _filter(rows: np.ndarray, start: int, stop: int, bpp: int) -> np.ndarray:
    """Rows ``start:stop`` filtered, each with the filter byte it chose in front (uint8 arithmetic wraps modulo
    256, as PNG's filters do)."""
    cur = rows[start:stop]
    above = rows[start - 1:stop - 1] if start > 0 else np.vstack([np.zeros_like(rows[:1]), rows[:stop - 1]])
    left = np.zeros_like(cur)
    left[:, bpp:] = cur[:, :-bpp]
    candidates = (
        cur,
        cur - left,
        cur - above,
        cur - ((left >> 1) + (above >> 1) + (left & above & 1)),  # floor((left + above) / 2) without overflow
    )
    # libpng's heuristic: the smallest sum of the bytes read as signed (abs(-128) stays -128 in int8, whose
    # unsigned view is the right 128)
    costs = np.stack([np.abs(c.view(np.int8)).view(np.uint8).sum(axis=1, dtype=np.uint32) for c in candidates])
    choice = costs.argmin(axis=0)
    out = np.empty((stop - start, rows.shape[1] + 1), dtype=np.uint8)
    out[:, 0] = choice
    for kind, filtered in enumerate(candidates):
        picked = choice == kind
        if picked.any():
            out[picked, 1:] = filtered[picked]
    return out


_ADLER_MOD = 65521


def _adler32_of_strips(adlers: Sequence[int], bounds: Sequence[tuple[int, int]], row_bytes: int) -> int:
    """The Adler-32 of the strips' data joined, from each strip's own (zlib's ``adler32_combine``, which Python's
    zlib module does not expose)."""
    total = adlers[0]
    for adler, (start, stop) in zip(adlers[1:], bounds[1:], strict=True):
        length = (stop - start) * row_bytes
        rem = length % _ADLER_MOD
        a1, b1 = total & 0xFFFF, total >> 16
        a2, b2 = adler & 0xFFFF, adler >> 16
        a = (a1 + a2 - 1) % _ADLER_MOD
        b = (b1 + b2 + rem * a1 - rem) % _ADLER_MOD
        total = (b << 16) | a
    return total
