"""Step caching for a DiT sampler run (First-Block Cache, in the TeaCache family).

Neighbouring sampler steps change the DiT's input little, and the change of the first block's
output residual predicts how much the rest of the network's output changes. So each step runs
the first block, compares its residual with the one of the last fully computed step (relative
mean absolute difference), and when that is below `threshold` adds the remaining blocks'
residual cached at that step instead of running them. A full step refreshes both residuals.

`threshold=0` never reuses: the step runs exactly the uncached computation. One `StepCache`
belongs to one sampling run (its residuals are only meaningful for that latent and prompt);
a change of batch shape starts over.
"""

from __future__ import annotations

import torch
from torch import Tensor


class StepCache:
    """The First-Block-Cache state of one sampling run; `hits` and `calls` count reuse."""

    def __init__(self, threshold: float):
        if threshold < 0:
            raise ValueError(f"step cache threshold must be >= 0, got {threshold}")
        self.threshold = float(threshold)
        self.first: Tensor | None = None  # first block's residual at the last full step
        self.rest: Tensor | None = None  # the remaining blocks' residual at that step
        self.hits = 0
        self.calls = 0

    def reusable(self, first_residual: Tensor) -> bool:
        """Whether this step may skip the remaining blocks; counts the call."""
        self.calls += 1
        if self.threshold <= 0 or self.first is None or self.first.shape != first_residual.shape:
            return False
        change = (first_residual - self.first).abs().mean() / self.first.abs().mean().clamp_min(1e-12)
        if float(change) >= self.threshold:
            return False
        self.hits += 1
        return True

    def store(self, first_residual: Tensor, rest_residual: Tensor) -> None:
        """Remember a fully computed step (only when caching is on: threshold 0 keeps nothing)."""
        if self.threshold > 0:
            self.first, self.rest = first_residual, rest_residual

    def apply(self, first_output: Tensor) -> Tensor:
        """The remaining blocks' output, approximated from the cached residual."""
        assert self.rest is not None
        return first_output + self.rest.to(first_output.dtype)


def psnr(a: Tensor, b: Tensor, peak: float = 2.0) -> float:
    """Peak signal-to-noise ratio in dB of `a` against reference `b` (peak 2 for [-1, 1] images)."""
    mse = (a.double() - b.double()).pow(2).mean()
    return float("inf") if mse == 0 else float(10 * torch.log10(peak**2 / mse))
