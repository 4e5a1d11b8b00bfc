"""echo4o/heap.py: the long-lived objects of a serving process frozen out of the collector's full passes, and the
gateway's ASGI wrapper that freezes once the app has started (the live processes: test_heap_live.py)."""

from __future__ import annotations

import gc
import logging
from collections.abc import Iterator

import pytest

from backend.serving import FreezeHeapWhenStarted
from echo4o import heap
from echo4o.heap import freeze_long_lived, refreeze, release_frozen


@pytest.fixture
def unfrozen(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The test's process is left as it was: nothing frozen, and not a process that freezes."""
    assert gc.get_freeze_count() == 0, "something in this test process froze its objects"
    monkeypatch.setattr(heap, "_freezes", False)
    try:
        yield
    finally:
        gc.unfreeze()


def _collected(objects: list) -> list[bool]:
    """For each of ``objects``, whether it is in one of the collector's generations (a frozen one is in none)."""
    ids = {id(o) for o in gc.get_objects()}
    return [id(o) in ids for o in objects]


def test_freeze_takes_the_live_objects_and_refreeze_those_made_since(unfrozen: None,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="echo4o.heap")
    alive = [[i] for i in range(100)]  # lists: tracked by the collector
    assert all(_collected(alive))
    frozen = freeze_long_lived("test")
    [record] = [r for r in caplog.records if r.getMessage() == "long-lived objects frozen out of garbage collection"]
    assert record.role == "test" and record.objects == frozen
    # frozen objects that die leave the count (another test's thread may free some meanwhile), none join it
    assert frozen >= gc.get_freeze_count() > 1000  # the interpreter's own objects at least
    assert not any(_collected(alive))
    made_since = [[i] for i in range(5000)]
    assert all(_collected(made_since))
    refreeze("test")
    assert not any(_collected(made_since))
    release_frozen()
    assert gc.get_freeze_count() == 0 and all(_collected(alive + made_since))


def test_refreeze_leaves_a_process_that_never_froze_as_it_is(unfrozen: None) -> None:
    refreeze("test")
    assert gc.get_freeze_count() == 0


def test_refreeze_freezes_again_after_a_release_left_nothing_frozen(unfrozen: None) -> None:
    """A worker that drops a model version releases everything frozen (worker/models_cache.py); the version it
    loads next is frozen again, with the rest of what is alive."""
    freeze_long_lived("test")
    release_frozen()
    assert gc.get_freeze_count() == 0
    refreeze("test")
    assert gc.get_freeze_count() > 1000


def test_a_frozen_cycle_is_collected_once_released(unfrozen: None) -> None:
    import weakref

    class Node:
        pass

    a, b = Node(), Node()
    a.other, b.other = b, a  # a reference cycle: only the collector frees it
    gone = weakref.ref(a)
    freeze_long_lived("test")
    del a, b
    gc.collect()
    assert gone() is not None  # frozen: no collection walks it
    release_frozen()
    gc.collect()
    assert gone() is None


async def _lifespan(app, *, fail: bool = False) -> list[str]:  # noqa: ANN001 - an ASGI app
    sent: list[str] = []
    incoming = iter([{"type": "lifespan.startup"}])

    async def receive() -> dict:
        return next(incoming)

    async def send(message: dict) -> None:
        sent.append(message["type"])

    await app({"type": "lifespan"}, receive, send)
    return sent


def _app(*, fail: bool):  # noqa: ANN202
    async def app(scope, receive, send) -> None:  # noqa: ANN001
        await receive()
        await send({"type": "lifespan.startup.failed" if fail else "lifespan.startup.complete"})

    return app


@pytest.mark.anyio
async def test_the_gateway_wrapper_freezes_once_startup_is_complete(unfrozen: None) -> None:
    assert await _lifespan(FreezeHeapWhenStarted(_app(fail=False))) == ["lifespan.startup.complete"]
    assert gc.get_freeze_count() > 1000


@pytest.mark.anyio
async def test_the_gateway_wrapper_freezes_nothing_when_startup_fails(unfrozen: None) -> None:
    assert await _lifespan(FreezeHeapWhenStarted(_app(fail=True))) == ["lifespan.startup.failed"]
    assert gc.get_freeze_count() == 0
