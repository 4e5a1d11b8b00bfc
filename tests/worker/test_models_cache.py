"""The resident-model LRU (worker/models_cache.py) on real tiny checkpoints loaded with from_pretrained."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker.engine import Echo4oPipeline
from worker.engine.tiny import write_tiny_model
from worker.models_cache import ResidentModels, checkpoint_bytes, pipeline_bytes


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("versions")
    return {f"tiny/v{i}": str(write_tiny_model(root / "tiny" / f"v{i}", seed=i)) for i in (1, 2, 3)}


class Loader:
    """Loads with from_pretrained on the CPU and remembers which paths it loaded, in order."""

    def __init__(self) -> None:
        self.loaded: list[str] = []

    def __call__(self, path: str) -> Echo4oPipeline:
        self.loaded.append(Path(path).name)
        return Echo4oPipeline.from_pretrained(path, device="cpu", dtype="float32")


def test_count_budget_keeps_the_most_recently_used(models: dict[str, str]) -> None:
    loader = Loader()
    cache = ResidentModels(loader, max_models=2)
    v1 = cache.get("tiny/v1", models["tiny/v1"])
    assert cache.get("tiny/v1", models["tiny/v1"]) is v1  # resident: not loaded again
    cache.get("tiny/v2", models["tiny/v2"])
    assert cache.get("tiny/v1", models["tiny/v1"]) is v1  # v1 is now the most recent, v2 the least
    cache.get("tiny/v3", models["tiny/v3"])
    assert cache.resident == ["tiny/v1", "tiny/v3"]
    assert loader.loaded == ["v1", "v2", "v3"]
    cache.get("tiny/v2", models["tiny/v2"])  # evicted, so loaded again
    assert loader.loaded == ["v1", "v2", "v3", "v2"] and cache.resident == ["tiny/v3", "tiny/v2"]


def test_byte_budget_evicts_before_loading(models: dict[str, str]) -> None:
    one = pipeline_bytes(Echo4oPipeline.from_pretrained(models["tiny/v1"], device="cpu", dtype="float32"))
    assert one > 0 and checkpoint_bytes(models["tiny/v1"]) > one // 2
    loader = Loader()
    cache = ResidentModels(loader, max_models=10, max_bytes=int(one * 1.5))  # room for one, not two
    cache.get("tiny/v1", models["tiny/v1"])
    cache.get("tiny/v2", models["tiny/v2"])
    assert cache.resident == ["tiny/v2"] and cache.resident_bytes == one
    # two resident plus the third's checkpoint size (the estimate before it loads) fit: nothing is evicted
    roomy = ResidentModels(Loader(), max_models=10, max_bytes=2 * one + checkpoint_bytes(models["tiny/v3"]))
    for ref in ("tiny/v1", "tiny/v2", "tiny/v3"):
        roomy.get(ref, models[ref])
    assert roomy.resident == ["tiny/v1", "tiny/v2", "tiny/v3"] and roomy.resident_bytes == 3 * one


def test_a_version_over_the_budget_still_runs_alone(models: dict[str, str]) -> None:
    cache = ResidentModels(Loader(), max_models=3, max_bytes=1)
    cache.get("tiny/v1", models["tiny/v1"])
    pipe = cache.get("tiny/v2", models["tiny/v2"])
    assert cache.resident == ["tiny/v2"]
    assert pipe("x", height=16, width=16, num_steps=2, seed=0).images[0].size == (16, 16)


def test_a_missing_folder_evicts_nothing(models: dict[str, str], tmp_path: Path) -> None:
    loader = Loader()
    cache = ResidentModels(loader, max_models=1)
    cache.get("tiny/v1", models["tiny/v1"])
    with pytest.raises(FileNotFoundError, match="'tiny/gone': its folder .* does not exist"):
        cache.get("tiny/gone", str(tmp_path / "gone"))
    assert cache.resident == ["tiny/v1"] and loader.loaded == ["v1"]


def test_bad_limits_are_refused() -> None:
    with pytest.raises(ValueError, match="max_models must be >= 1"):
        ResidentModels(Loader(), max_models=0)
    with pytest.raises(ValueError, match="max_bytes must be >= 0"):
        ResidentModels(Loader(), max_models=1, max_bytes=-1)


def test_an_evicted_version_is_freed_in_a_worker_that_froze_its_heap(models: dict[str, str],
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A serving worker freezes what it loaded (echo4o/heap.py). A pipeline in a reference cycle (here it refers
    to itself, as a hook holding its module would) is freed only by the collector; eviction must let it go."""
    import gc
    import weakref

    from echo4o import heap
    from echo4o.heap import freeze_long_lived

    monkeypatch.setattr(heap, "_freezes", False)  # this test's process stays one that does not freeze

    def load(path: str) -> Echo4oPipeline:
        pipeline = Echo4oPipeline.from_pretrained(path, device="cpu", dtype="float32")
        pipeline.itself = pipeline  # type: ignore[attr-defined] - the cycle
        return pipeline

    assert gc.get_freeze_count() == 0, "something in this test process froze its objects"
    cache = ResidentModels(load, max_models=1)
    try:
        v1 = weakref.ref(cache.get("tiny/v1", models["tiny/v1"]))
        freeze_long_lived("worker")
        cache.get("tiny/v2", models["tiny/v2"])  # evicts v1
        assert cache.resident == ["tiny/v2"]
        assert v1() is None, "the evicted version is still alive: frozen objects were not released"
    finally:
        gc.unfreeze()
