"""Step caching (worker/engine/step_cache.py): off is exact; on, the first and last steps and guidance changes
always run, other steps reuse the last velocity while the input moved less than the threshold."""

from __future__ import annotations

import pytest
import torch

from echo4o.settings import get_settings
from worker.engine import Echo4oPipeline
from worker.engine.step_cache import StepCache, check_threshold, relative_l1

FAST = {"height": 32, "width": 48, "num_steps": 8, "output_type": "latent"}


@pytest.fixture(scope="module")
def pipe(tiny_model):
    return Echo4oPipeline.from_pretrained(tiny_model, device="cpu", attention="sdpa", step_cache=0)


def test_the_accumulated_change_decides():
    cache = StepCache(threshold=0.25, total=6)
    base = torch.ones(4)
    guidance = ("text", 4.0)
    assert cache.should_compute(0, base, guidance)  # the first step always runs
    cache.store([torch.zeros(4)])
    assert not cache.should_compute(1, base * 1.1, guidance)  # 0.1 accumulated
    assert not cache.should_compute(2, base * 1.1 * 1.1, guidance)  # 0.2
    assert cache.should_compute(3, base * 1.1 * 1.1 * 1.1, guidance)  # 0.3 >= 0.25: runs, restarts from 0
    assert cache.accumulated == 0.0
    assert cache.should_compute(4, base * 1.331, ("none", 1.0))  # the guidance changed: runs
    assert cache.should_compute(5, base * 1.331, ("none", 1.0))  # the last step always runs
    assert cache.computed == 4
    assert relative_l1(torch.tensor([2.0, 2.0]), torch.tensor([1.0, 1.0])) == pytest.approx(1.0)


@pytest.mark.parametrize("value", [-0.1, float("nan"), "lots", True])
def test_a_bad_threshold_is_a_value_error_naming_it(pipe, value):
    with pytest.raises(ValueError, match="step_cache"):
        check_threshold(value)
    with pytest.raises(ValueError, match="step_cache"):
        pipe("a cat", step_cache=value, **FAST)


def test_off_is_exact_and_computes_every_step(pipe):
    plain = pipe("a cat", seed=3, **FAST)
    off = pipe("a cat", seed=3, step_cache=0, **FAST)
    assert torch.equal(plain.images[0], off.images[0])
    assert plain.timings["steps_computed"] == off.timings["steps_computed"] == 7
    assert plain.params["step_cache"] is None


def test_a_huge_threshold_runs_only_the_steps_that_must_run(pipe):
    # 10 schedule points, cfg interval [0.5, 1]: guidance switches off at step 8 of 9 (t = 0.46), so the first
    # step, that one and the last run; every other step reuses the velocity
    kwargs = {**FAST, "num_steps": 10, "cfg_interval": (0.5, 1.0)}
    plain = pipe("a cat", seed=3, **kwargs)
    cached = pipe("a cat", seed=3, step_cache=1e9, **kwargs)
    assert cached.timings["steps_computed"] == 3 and cached.params["step_cache"] == 1e9
    assert not torch.equal(plain.images[0], cached.images[0])
    assert torch.isfinite(cached.images[0]).all()
    whole = pipe("a cat", seed=3, step_cache=1e9, **{**kwargs, "cfg_interval": (0.0, 1.0)})
    assert whole.timings["steps_computed"] == 2  # first and last


def test_a_small_threshold_skips_some_steps_and_stays_close(pipe):
    plain = pipe("a cat", seed=4, num_steps=20, **{k: v for k, v in FAST.items() if k != "num_steps"})
    cached = pipe("a cat", seed=4, num_steps=20, step_cache=0.05, **{k: v for k, v in FAST.items()
                                                                       if k != "num_steps"})
    assert 3 <= cached.timings["steps_computed"] < 19
    gap = (plain.images[0] - cached.images[0]).abs().max() / plain.images[0].abs().max()
    assert gap < 0.5


def test_requests_of_a_batch_cache_each_on_their_own(pipe):
    requests = [{"prompt": "a cat", "seed": 1, "step_cache": 0.05, **FAST},
                {"prompt": "a dog", "seed": 2, **FAST},
                {"prompt": "a cow", "seed": 3, "step_cache": 1e9, "num_images": 2, **FAST}]
    batch = pipe.generate_batch(requests)
    for request, got in zip(requests, batch, strict=True):
        alone = pipe(**request)
        assert got.timings["steps_computed"] == alone.timings["steps_computed"]
        for a, b in zip(alone.images, got.images, strict=True):
            assert (a - b).abs().max() < 1e-5
    # 8 schedule points: guidance stays on up to the last step (t = 0.33 is its first unguided one)
    assert batch[1].timings["steps_computed"] == 7 and batch[2].timings["steps_computed"] == 2


def test_the_setting_is_the_default_threshold(tiny_model, monkeypatch):
    monkeypatch.setenv("ECHO4O_STEP_CACHE_THRESHOLD", "1e9")
    get_settings.cache_clear()
    try:
        cached = Echo4oPipeline.from_pretrained(tiny_model, device="cpu")
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()
    assert cached.step_cache_threshold == 1e9
    out = cached("a cat", seed=3, **FAST)
    assert out.timings["steps_computed"] == 2
    assert cached("a cat", seed=3, step_cache=0, **FAST).timings["steps_computed"] == 7  # 0: off for this call
