from __future__ import annotations

from PIL import Image

from worker.engine.config import BagelConfig
from worker.training.data import Sample, SkipCounts
from worker.training.packing import ImageRules, PackingConfig, TokenCounter, pack


def _sample(n: int, name: str) -> Sample:
    return Sample(target=Image.new("RGB", (16, 16)), text="", source=name)


def test_token_count_by_hand(tiny_model):
    config = BagelConfig.from_dir(tiny_model)
    counter = TokenCounter(config, ImageRules(vae_max=64, vae_min=32, vit_max=56, vit_min=28), lambda s: s.split())
    ref = Image.new("RGB", (64, 32))
    sample = Sample(target=Image.new("RGB", (32, 32)), text="a b c", references=[ref])
    # text 3 + 2; ref VAE 64x32 -> 4x2 tokens + 2; ViT of the 64x32 image by the ViT rule -> 56x28 -> 4x2 + 2;
    # target 32x32 -> 2x2 + 2
    assert counter(sample) == 5 + 10 + 10 + 6


def test_packs_fill_to_the_expected_budget_and_buffer_what_does_not_fit():
    sizes = {"a": 4, "b": 4, "c": 5, "d": 1, "e": 3}
    samples = [_sample(n, k) for k, n in sizes.items()]
    cfg = PackingConfig(expected_tokens=8, max_tokens=10, max_tokens_per_sample=6, prefer_buffer_before=2,
                        max_buffer=2)
    packs = list(pack(samples, lambda s: sizes[s.source], cfg))
    # a+b reach 8 -> emitted; c (5) starts the next, d (1) -> 6, e (3) -> 9 >= 8 -> emitted
    assert [[s.source for s in p] for p in packs] == [["a", "b"], ["c", "d", "e"]]


def test_a_sample_over_budget_waits_in_the_buffer_and_too_long_ones_are_counted():
    sizes = {"a": 6, "b": 5, "c": 7, "d": 2}
    samples = [_sample(n, k) for k, n in sizes.items()]
    counts = SkipCounts()
    cfg = PackingConfig(expected_tokens=8, max_tokens=10, max_tokens_per_sample=6, prefer_buffer_before=0,
                        max_buffer=4)
    packs = list(pack(samples, lambda s: sizes[s.source], cfg, counts))
    # a=6; b would make 11 > 10 -> buffered; c too long -> skipped; d -> 8 -> emitted; the buffer (b) is last
    assert [[s.source for s in p] for p in packs] == [["a", "d"], ["b"]]
    assert counts.reasons["too_long"] == 1
