from __future__ import annotations

import math

import torch

from worker.training.objective import (
    attention_mask,
    noised,
    sample_timestep,
    shift_timestep,
    velocity_target,
)


def test_shift_by_hand():
    t = torch.tensor([0.0, 0.5, 1.0])
    assert torch.allclose(shift_timestep(t, 3.0), torch.tensor([0.0, 1.5 / 2.0, 1.0]))
    assert torch.equal(shift_timestep(t, 1.0), t)


def test_timestep_is_the_shifted_sigmoid_of_one_normal_draw():
    n = torch.randn((), generator=torch.Generator().manual_seed(5)).item()
    s = 1 / (1 + math.exp(-n))
    expected = 2.0 * s / (1 + s)
    assert math.isclose(sample_timestep(torch.Generator().manual_seed(5), 2.0).item(), expected, rel_tol=1e-6)


def test_noising_and_velocity_by_hand():
    x0, eps = torch.tensor([[1.0, -2.0]]), torch.tensor([[3.0, 0.0]])
    assert torch.allclose(noised(x0, eps, torch.tensor([0.25])), torch.tensor([[1.5, -1.5]]))
    assert torch.equal(velocity_target(x0, eps), torch.tensor([[2.0, 2.0]]))


def test_attention_mask_rules_by_hand():
    # image (2, full), text (2, causal), noised target (2): the target sees all; nothing sees the target
    m = attention_mask([2, 2, 2], ["full", "causal", "noise"]).int().tolist()
    assert m == [
        [1, 1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1, 1],
    ]
    # a segment after a noised one does not see it
    m = attention_mask([1, 2, 1], ["causal", "noise", "causal"]).int().tolist()
    assert m[3] == [1, 0, 0, 1]
