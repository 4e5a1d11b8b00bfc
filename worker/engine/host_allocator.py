"""On the CPU, let glibc's allocator keep freed memory for the next step instead of returning it to the system.

A sampling step on the CPU allocates and frees the same large activations every time. glibc maps each large
block (above its mmap threshold) freshly and unmaps it on free, and gives the top of its heap back once more
than its trim threshold is free, so every call touches hundreds of megabytes of new pages: 112-127 thousand
minor page faults per 448 px, 30-step tiny-model job, each a kernel entry and a zeroed page. With the mmap
threshold at 32 MiB and trimming off, the blocks are reused: no faults, and the call 15-19 % faster
(docs/performance.md, "Host allocator"). The cost: the process keeps its peak memory (what a worker needs for its
next job anyway).

Process-wide, set once, by :func:`keep_freed_memory` (called when a pipeline is loaded on the CPU); a process
whose environment sets ``MALLOC_MMAP_THRESHOLD_`` or ``MALLOC_TRIM_THRESHOLD_`` keeps its own choice, and a
system without glibc's ``mallopt`` (musl, macOS) is left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading

from echo4o.logging import get_logger

log = get_logger(__name__)

#: mallopt parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: Blocks above this are still mapped on their own; 32 MiB is the largest value glibc's own dynamic threshold reaches.
MMAP_THRESHOLD = 32 << 20
#: Free memory at the top of the heap kept (the largest value mallopt takes): in effect, never trimmed.
TRIM_THRESHOLD = 2**31 - 1
#: Environment variables by which glibc reads the same settings at start; either set means the user chose.
ENV_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")

_lock = threading.Lock()
_state: bool | None = None


def keep_freed_memory() -> bool:
    """Set glibc's thresholds (once per process); whether they are set by this call or an earlier one."""
    global _state
    with _lock:
        if _state is None:
            _state = _apply()
        return _state


def _apply() -> bool:
    chosen = [name for name in ENV_SETTINGS if name in os.environ]
    if chosen:
        log.info("host allocator left as the environment sets it", extra={"env": ",".join(chosen)})
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        log.info("host allocator left alone: no mallopt in this C library", extra={"libc": name})
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    log.info("host allocator keeps freed memory" if ok else "host allocator: mallopt refused the thresholds",
             extra={"mmap_threshold": MMAP_THRESHOLD, "trim_threshold": TRIM_THRESHOLD})
    return ok
