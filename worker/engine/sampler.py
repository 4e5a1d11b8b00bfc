"""Flow-matching sampler math of BAGEL / Echo-4o: timestep schedule, classifier-free guidance, cfg interval.

Pure tensor functions (no model), the same operations in the same order as the reference
``Bagel.generate_image`` / ``Bagel._forward_flow``, so that float32 results match it bit for bit:

- ``timesteps(N, s)``: ``t = linspace(1, 0, N)`` then ``s * t / (1 + (s - 1) * t)``. The sampler takes Euler
  steps ``x <- x - v(t_i) * (t_i - t_{i+1})`` for the first ``N - 1`` values (``v`` points from data to noise).
- ``in_cfg_interval(t, (lo, hi))``: guidance applies when ``lo < t <= hi``; outside it both scales are 1.
- ``cfg_combine(v, v_text_uncond, v_img_uncond, ...)``: three branches, the full context ``v``, the
  text-dropped ``v_text_uncond`` and the image-dropped ``v_img_uncond``.

Which branches run (``needed_branches``): the text-dropped one when ``text_scale > 1``; the image-dropped one
when ``img_scale > 1`` and ``text_scale > 1``. With ``text_scale <= 1`` the reference returns ``v`` unguided,
whatever the image scale (it computes the image branch, then ignores it; we skip it).

Renorm (``renorm_type``), with ``clamp(norm(v) / (norm(v_guided) + 1e-8), renorm_min, 1)`` as the factor:
- ``global``: ``v_g = v_ui + si * ((v_ut + st * (v - v_ut)) - v_ui)``, one factor from the norms over the
  whole tensor (all tokens of one image: call once per image);
- ``channel``: same ``v_g``, one factor per token (norm over the last dim);
- ``text_channel``: the text-guided ``v_ut + st * (v - v_ut)`` is renormed per token first, then the image
  guidance is applied on top without renorm.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from echo4o.jobs import RENORM_TYPES

__all__ = ["RENORM_TYPES", "cfg_combine", "check_renorm_type", "in_cfg_interval", "needed_branches", "step_sizes",
           "timesteps"]
_EPS = 1e-8


def timesteps(num_steps: int, shift: float, device: torch.device | str | None = None) -> torch.Tensor:
    """The ``num_steps`` shifted flow times from 1 to 0 (float32). The sampler runs ``num_steps - 1`` steps."""
    if int(num_steps) != num_steps or num_steps < 2:
        raise ValueError(f"num_steps must be an integer >= 2 (it counts the schedule's end points); got {num_steps!r}")
    if not shift > 0:
        raise ValueError(f"timestep_shift must be > 0; got {shift!r}")
    t = torch.linspace(1, 0, int(num_steps), device=device)
    return shift * t / (1 + (shift - 1) * t)


def step_sizes(schedule: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(t_i, dt_i)`` for the Euler steps: the first ``N - 1`` times and ``t_i - t_{i+1}``."""
    return schedule[:-1], schedule[:-1] - schedule[1:]


def in_cfg_interval(t: float | torch.Tensor, interval: Sequence[float]) -> bool:
    """True when guidance applies at time ``t``: ``interval[0] < t <= interval[1]``.

    A 0-d float32 tensor ``t`` is compared as the reference does (in float32), which matters at the bounds.
    """
    lo, hi = interval
    return bool(t > lo) and bool(t <= hi)


def needed_branches(text_scale: float, img_scale: float) -> tuple[bool, bool]:
    """``(run_text_dropped, run_image_dropped)`` for the scales in force at this step."""
    text = text_scale > 1.0
    return text, text and img_scale > 1.0


def check_renorm_type(renorm_type: str) -> str:
    """``renorm_type`` itself when it is one of ``RENORM_TYPES`` (from ``echo4o.jobs``), else a ``ValueError``."""
    if renorm_type not in RENORM_TYPES:
        raise ValueError(f"cfg_renorm_type must be one of {', '.join(RENORM_TYPES)}; got {renorm_type!r}")
    return renorm_type


def cfg_combine(
    v: torch.Tensor,
    v_text_uncond: torch.Tensor | None,
    v_img_uncond: torch.Tensor | None,
    *,
    text_scale: float,
    img_scale: float,
    renorm_type: str,
    renorm_min: float,
) -> torch.Tensor:
    """Guided velocity of one image's latent tokens ``(tokens, 64)`` (see the module doc for the rules).

    ``v_text_uncond`` / ``v_img_uncond`` may be ``None`` when their branch was skipped (``needed_branches``);
    a branch that is needed but missing is a ``ValueError``.
    """
    check_renorm_type(renorm_type)
    use_text, use_img = needed_branches(text_scale, img_scale)
    if not use_text:
        return v
    if v_text_uncond is None:
        raise ValueError(f"cfg_text_scale={text_scale} > 1 needs the text-dropped prediction (v_text_uncond)")
    if use_img and v_img_uncond is None:
        raise ValueError(f"cfg_img_scale={img_scale} > 1 needs the image-dropped prediction (v_img_uncond)")

    v_text = v_text_uncond + text_scale * (v - v_text_uncond)
    if renorm_type == "text_channel":
        factor = _renorm_factor(v, v_text, per_token=True, renorm_min=renorm_min)
        v_text = v_text * factor
        return v_img_uncond + img_scale * (v_text - v_img_uncond) if use_img else v_text

    guided = v_img_uncond + img_scale * (v_text - v_img_uncond) if use_img else v_text
    factor = _renorm_factor(v, guided, per_token=renorm_type == "channel", renorm_min=renorm_min)
    return guided * factor


def _renorm_factor(v: torch.Tensor, guided: torch.Tensor, *, per_token: bool, renorm_min: float) -> torch.Tensor:
    if per_token:
        norm_v = torch.norm(v, dim=-1, keepdim=True)
        norm_g = torch.norm(guided, dim=-1, keepdim=True)
    else:
        norm_v = torch.norm(v)
        norm_g = torch.norm(guided)
    return (norm_v / (norm_g + _EPS)).clamp(min=renorm_min, max=1.0)
