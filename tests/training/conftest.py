"""Fixtures of the training tests: the tiny model written once per session, small training configs."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker.engine.tiny import write_tiny_model
from worker.training.trainer import TrainConfig


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny-model"))


def small_config(base: Path, data: Path, out: Path, **overrides) -> TrainConfig:
    """A config for 32x32 images and the tiny model: one sample per pack, no dropout, fixed draws."""
    values = dict(base_model=str(base), data=str(data), output_dir=str(out), total_steps=4, lr=2e-3, warmup_steps=0,
                  ema_decay=0.0, expected_tokens=1, max_tokens=400, max_tokens_per_sample=400, vae_max_size=32,
                  vae_min_size=32, vit_max_size=28, vit_min_size=28, save_every=1000, resample_noise=False,
                  text_dropout=0.0, vit_dropout=0.0, vae_dropout=0.0, gradient_checkpointing=False)
    values.update(overrides)
    return TrainConfig(**values)
