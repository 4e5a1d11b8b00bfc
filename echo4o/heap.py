"""Long-lived objects kept out of the cyclic garbage collector's full passes (``gc.freeze``).

A gateway holds about 140 thousand objects once its app is built, a worker many more once its model is loaded.
Python's full (generation 2) collection walks all of them each time it runs: 80-140 ms in a gateway on a 2-core
machine, 30-290 ms in a worker. In a gateway under load one ran every second or so, a pause in the middle of
whatever requests were in flight: a p99 of ``POST /generate`` ten times its median. A worker's came while it
loaded; one that came later would stop a denoising step. Objects that exist once a process is ready live as long
as it does, so :func:`freeze_long_lived` collects once and moves them to the permanent generation, which no
collection walks; what the process makes afterwards is collected as before. Reference counting still frees a
frozen object as soon as nothing refers to it; only frozen objects in a reference cycle stay until
:func:`release_frozen` (a worker that drops a model version calls it before collecting).
"""

from __future__ import annotations

import gc
import time

from echo4o.logging import get_logger

log = get_logger(__name__)

#: Whether this process froze its long-lived objects (a serving process): :func:`refreeze` freezes again in one
#: that did, also after :func:`release_frozen` left nothing frozen.
_freezes = False


def freeze_long_lived(role: str) -> int:
    """Collect once, then freeze every object alive now (``role``: the process's, for the log); returns how many
    objects are frozen in all. Never raises: it is a speed-up, not something a process may die of."""
    global _freezes
    _freezes = True
    t0 = time.perf_counter()
    try:
        gc.collect()
        gc.freeze()
    except Exception as exc:  # noqa: BLE001 - the collector as it was is still correct
        log.warning("long-lived objects not frozen", extra={"role": role, "error": str(exc)})
        return gc.get_freeze_count()
    frozen = gc.get_freeze_count()
    log.info("long-lived objects frozen out of garbage collection",
             extra={"role": role, "objects": frozen, "collect_s": round(time.perf_counter() - t0, 3)})
    return frozen


def refreeze(role: str) -> None:
    """In a process that froze its long-lived objects, freeze those made since (a model version it loaded), also
    when a release (a dropped version) left nothing frozen; nothing in one that never froze (a test's process)."""
    if _freezes:
        freeze_long_lived(role)


def release_frozen() -> None:
    """Make frozen objects collectable again (before a collection that must free some of them, like a dropped
    model); the next :func:`freeze_long_lived` or :func:`refreeze` freezes what is still alive."""
    gc.unfreeze()
