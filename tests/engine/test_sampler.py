"""Sampler math against values computed by hand (the arithmetic is written in the comments)."""

from __future__ import annotations

import math

import pytest
import torch

from echo4o.jobs import RENORM_TYPES
from worker.engine.sampler import cfg_combine, in_cfg_interval, needed_branches, step_sizes, timesteps


def close(a: torch.Tensor, expected: list) -> bool:
    return torch.allclose(a, torch.tensor(expected, dtype=a.dtype), atol=1e-6, rtol=0)


# --- schedule ----------------------------------------------------------------------------------------------


def test_timesteps_unshifted_is_linspace():
    assert close(timesteps(5, 1.0), [1.0, 0.75, 0.5, 0.25, 0.0])


def test_timesteps_shift_3():
    # s t / (1 + (s-1) t) with s = 3: 0.75 -> 2.25/2.5 = 0.9; 0.5 -> 1.5/2 = 0.75; 0.25 -> 0.75/1.5 = 0.5
    t = timesteps(5, 3.0)
    assert t.dtype == torch.float32
    assert close(t, [1.0, 0.9, 0.75, 0.5, 0.0])


def test_timesteps_shift_half_bends_the_other_way():
    # s = 0.5: 0.5 -> 0.25 / (1 - 0.25) = 1/3
    assert close(timesteps(3, 0.5), [1.0, 1 / 3, 0.0])


def test_step_sizes_are_the_first_n_minus_1_times_and_their_gaps():
    t, dt = step_sizes(timesteps(5, 3.0))
    assert close(t, [1.0, 0.9, 0.75, 0.5])
    assert close(dt, [0.1, 0.15, 0.25, 0.5])
    assert math.isclose(dt.sum().item(), 1.0, abs_tol=1e-6)  # Euler steps walk from noise (t=1) to data (t=0)


@pytest.mark.parametrize("bad", [1, 0, 2.5])
def test_timesteps_rejects_bad_counts(bad):
    with pytest.raises(ValueError, match="num_steps"):
        timesteps(bad, 3.0)


def test_timesteps_rejects_bad_shift():
    with pytest.raises(ValueError, match="timestep_shift"):
        timesteps(10, 0.0)


# --- cfg interval ------------------------------------------------------------------------------------------


def test_interval_is_open_below_closed_above():
    assert in_cfg_interval(1.0, (0.4, 1.0))
    assert in_cfg_interval(0.41, (0.4, 1.0))
    assert not in_cfg_interval(0.4, (0.4, 1.0))
    assert not in_cfg_interval(0.3, (0.4, 1.0))
    assert in_cfg_interval(0.0001, (0.0, 1.0))
    assert not in_cfg_interval(0.0, (0.0, 1.0))


def test_interval_with_float32_tensor_times():
    # default text-to-image schedule, 5 points, shift 3: times 1, 0.9, 0.75, 0.5 are all above 0.4
    ts, _ = step_sizes(timesteps(5, 3.0))
    assert [in_cfg_interval(t, (0.4, 1.0)) for t in ts] == [True, True, True, True]
    ts, _ = step_sizes(timesteps(5, 1.0))  # 1, 0.75, 0.5, 0.25
    assert [in_cfg_interval(t, (0.4, 1.0)) for t in ts] == [True, True, True, False]
    assert [in_cfg_interval(t, (0.5, 0.8)) for t in ts] == [False, True, False, False]


# --- guidance -----------------------------------------------------------------------------------------------

V = torch.tensor([[3.0, 4.0]])  # |v| = 5
VT = torch.tensor([[1.0, 0.0]])  # text-dropped
VI = torch.tensor([[0.0, 1.0]])  # image-dropped


def test_branches_needed():
    assert needed_branches(4.0, 1.0) == (True, False)
    assert needed_branches(4.0, 2.0) == (True, True)
    assert needed_branches(1.0, 2.0) == (False, False)  # the reference ignores image guidance without text guidance
    assert needed_branches(0.5, 0.5) == (False, False)


def test_no_text_guidance_returns_v_unchanged():
    for renorm in RENORM_TYPES:
        out = cfg_combine(V, None, None, text_scale=1.0, img_scale=2.0, renorm_type=renorm, renorm_min=0.0)
        assert torch.equal(out, V)


def test_text_only_global_renorm():
    # v_t = VT + 2 (V - VT) = (1,0) + 2 (2,4) = (5, 8); |v_t| = sqrt(89); factor 5/sqrt(89) < 1
    out = cfg_combine(V, VT, None, text_scale=2.0, img_scale=1.0, renorm_type="global", renorm_min=0.0)
    f = 5 / math.sqrt(89)
    assert close(out, [[5 * f, 8 * f]])


def test_renorm_min_floors_the_factor():
    # same as above, factor 0.53 floored to 0.8
    out = cfg_combine(V, VT, None, text_scale=2.0, img_scale=1.0, renorm_type="global", renorm_min=0.8)
    assert close(out, [[4.0, 6.4]])


def test_renorm_never_scales_up():
    # v = (1,0), v_ut = (3,0): v_t = (3,0) + 2 (-2, 0) = (-1, 0); |v|/|v_t| = 1 -> 1 (clamped at 1 anyway)
    # v = (1,0), v_ut = (2,0): v_t = (2,0) + 1.5 (-1,0) = (0.5, 0); ratio 2 -> clamped to 1
    out = cfg_combine(torch.tensor([[1.0, 0.0]]), torch.tensor([[2.0, 0.0]]), None, text_scale=1.5, img_scale=1.0,
                      renorm_type="global", renorm_min=0.0)
    assert close(out, [[0.5, 0.0]])


def test_text_and_image_global():
    # v_t = (5, 8) as above; v' = VI + 3 (v_t - VI) = (0,1) + 3 (5, 7) = (15, 22); |v'| = sqrt(709)
    out = cfg_combine(V, VT, VI, text_scale=2.0, img_scale=3.0, renorm_type="global", renorm_min=0.0)
    f = 5 / math.sqrt(709)
    assert close(out, [[15 * f, 22 * f]])


def test_global_uses_one_factor_for_all_tokens_channel_one_per_token():
    v = torch.tensor([[3.0, 4.0], [0.0, 1.0]])  # norms 5 and 1; global norm sqrt(26)
    vt = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # v_t = vt + 2 (v - vt): row 0 (5, 8) [norm sqrt(89)], row 1 (0, 1) [norm 1]; global norm sqrt(90)
    g = cfg_combine(v, vt, None, text_scale=2.0, img_scale=1.0, renorm_type="global", renorm_min=0.0)
    fg = math.sqrt(26) / math.sqrt(90)
    assert close(g, [[5 * fg, 8 * fg], [0.0, 1 * fg]])
    c = cfg_combine(v, vt, None, text_scale=2.0, img_scale=1.0, renorm_type="channel", renorm_min=0.0)
    f0 = 5 / math.sqrt(89)
    assert close(c, [[5 * f0, 8 * f0], [0.0, 1.0]])


def test_channel_with_image_guidance():
    # v' = (15, 22) for the single row: channel equals global with one token
    out = cfg_combine(V, VT, VI, text_scale=2.0, img_scale=3.0, renorm_type="channel", renorm_min=0.0)
    f = 5 / math.sqrt(709)
    assert close(out, [[15 * f, 22 * f]])


def test_text_channel_renorms_text_part_then_applies_image_guidance_unnormed():
    # v_t = (5, 8) renormed per token by 5/sqrt(89): (25/sqrt(89), 40/sqrt(89)) = (2.65, 4.24)
    # v' = VI + 3 (v_t' - VI) = (3 * 2.65, 1 + 3 * (4.24 - 1))
    out = cfg_combine(V, VT, VI, text_scale=2.0, img_scale=3.0, renorm_type="text_channel", renorm_min=0.0)
    a, b = 25 / math.sqrt(89), 40 / math.sqrt(89)
    assert close(out, [[3 * a, 1 + 3 * (b - 1)]])
    assert close(out, [[7.949984, 10.719975]])


def test_text_channel_without_image_guidance():
    out = cfg_combine(V, VT, None, text_scale=2.0, img_scale=1.0, renorm_type="text_channel", renorm_min=0.0)
    assert close(out, [[25 / math.sqrt(89), 40 / math.sqrt(89)]])


def test_missing_branch_and_bad_renorm_are_errors():
    with pytest.raises(ValueError, match="v_text_uncond"):
        cfg_combine(V, None, None, text_scale=2.0, img_scale=1.0, renorm_type="global", renorm_min=0.0)
    with pytest.raises(ValueError, match="v_img_uncond"):
        cfg_combine(V, VT, None, text_scale=2.0, img_scale=1.5, renorm_type="global", renorm_min=0.0)
    with pytest.raises(ValueError, match="cfg_renorm_type"):
        cfg_combine(V, VT, None, text_scale=2.0, img_scale=1.0, renorm_type="norm", renorm_min=0.0)
