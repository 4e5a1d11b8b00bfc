"""Step caching for the denoising loop (TeaCache-style): skip the model on steps whose input barely changed.

Consecutive denoising steps of a flow model see nearly the same input, and where the input changes little the
predicted velocity changes little too. Each step, before running the model, a request measures how far the
model's input moved since the previous step: the relative L1 change of the *embedded latent input* (what
the transformer's first layer reads: ``vae2llm(x_t) + timestep(t) + position``; cheap, one small matrix
product), summed over its images,

    d_i = mean|e_i - e_{i-1}| / mean|e_{i-1}|

and adds it to an accumulator. While the accumulated change stays under the threshold, the step reuses the
guided velocity of the last computed step (no forward at all for that request); once it reaches the
threshold, the step runs the model and the accumulator restarts from 0. The first and the last steps always
run, and so does any step whose guidance differs from the last computed one's (entering or leaving the cfg
interval changes the velocity abruptly, whatever the input does).

``threshold = 0`` (or ``None``) computes every step: the output is then exactly the uncached one. Larger
thresholds skip more steps: faster, further from the uncached image. :data:`RECOMMENDED_THRESHOLD` is the
value the benchmarks call "default settings".
"""

from __future__ import annotations

import math

import torch

#: The threshold ``benchmarks/engine_bench.py`` measures as the cache's default setting.
RECOMMENDED_THRESHOLD = 0.1


def check_threshold(value: float | None) -> float | None:
    """``None`` (off) or a finite number >= 0 (0 is off too); a ``ValueError`` naming ``step_cache`` otherwise."""
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"step_cache must be a number >= 0 (the cache threshold) or None; got {value!r}") from None
    if isinstance(value, bool) or not math.isfinite(number) or number < 0:
        raise ValueError(f"step_cache must be a finite number >= 0 (the cache threshold) or None; got {value!r}")
    return number or None


def relative_l1(current: torch.Tensor, previous: torch.Tensor) -> float:
    """``mean|current - previous| / mean|previous|`` in float32 (0 when both are zero)."""
    current, previous = current.float(), previous.float()
    scale = float(previous.abs().mean())
    diff = float((current - previous).abs().mean())
    return diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf)


class StepCache:
    """The cache state of one request over one denoising run of ``total`` steps."""

    def __init__(self, threshold: float, total: int):
        self.threshold = threshold
        self.total = total
        self.accumulated = 0.0
        self.computed = 0
        self._previous: torch.Tensor | None = None
        self._guidance: object = None
        self.velocities: list[torch.Tensor] | None = None

    def should_compute(self, step: int, signal: torch.Tensor, guidance: object) -> bool:
        """Whether step ``step`` (0-based) must run the model, given its embedded input ``signal`` and a
        hashable description of its ``guidance``; records ``signal`` for the next step either way."""
        previous, self._previous = self._previous, signal
        if (step == 0 or step == self.total - 1 or previous is None or self.velocities is None
                or guidance != self._guidance):
            return self._compute(guidance)
        self.accumulated += relative_l1(signal, previous)
        if self.accumulated < self.threshold:
            return False
        return self._compute(guidance)

    def _compute(self, guidance: object) -> bool:
        self.accumulated = 0.0
        self.computed += 1
        self._guidance = guidance
        return True

    def store(self, velocities: list[torch.Tensor]) -> None:
        """The guided velocity of each image at the step just computed (reused while steps are skipped)."""
        self.velocities = velocities
