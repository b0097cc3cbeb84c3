"""Noise schedules for rectified flow: descending sigmas (= t) from ≤1 to 0, one more than the steps.

Every schedule has the signature `schedule(steps, image_seq_len) -> Tensor[steps + 1]`, so the
table `SCHEDULES` can be offered as a choice; `image_seq_len` (DiT tokens per image) only
matters to the resolution-dependent Flux shift.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def time_shift(mu: float, t: Tensor) -> Tensor:
    """Flux's shift of t∈[0,1] towards 1 (more steps at high noise): e^μ / (e^μ + 1/t − 1)."""
    t = t.double()
    shifted = math.exp(mu) / (math.exp(mu) + (1.0 / t.clamp_min(1e-12) - 1.0))
    return torch.where(t > 0, shifted, torch.zeros_like(t)).float()


def static_shift(shift: float, t: Tensor) -> Tensor:
    """SD3's shift σ' = s·t / (1 + (s − 1)·t); equals `time_shift` with μ = ln s."""
    t = t.double()
    return (shift * t / (1 + (shift - 1) * t)).float()


def flux_mu(
    image_seq_len: int,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
    min_len: int = 256,
    max_len: int = 4096,
) -> float:
    """μ grows linearly with the token count: 0.5 at 256 tokens (512²), 1.15 at 4096 (1024²)."""
    slope = (max_shift - base_shift) / (max_len - min_len)
    return base_shift + slope * (image_seq_len - min_len)


def _grid(steps: int) -> Tensor:
    return torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)


def schedule_linear(steps: int, image_seq_len: int = 4096) -> Tensor:
    """Uniform steps in t."""
    return _grid(steps).float()


def schedule_shifted(steps: int, image_seq_len: int = 4096, shift: float = 3.0) -> Tensor:
    """Uniform grid under a static shift (SD3 uses 3.0)."""
    return static_shift(shift, _grid(steps))


def schedule_flux(steps: int, image_seq_len: int = 4096) -> Tensor:
    """Uniform grid under Flux's resolution-dependent shift μ = flux_mu(image_seq_len)."""
    return time_shift(flux_mu(image_seq_len), _grid(steps))


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b) by Lentz's continued fraction (no scipy at runtime)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1) / (a + b + 2):  # the fraction converges fast only below the mean
        return 1.0 - _betainc(b, a, 1.0 - x)
    front = (
        math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
        / a
    )
    tiny = 1e-300
    f, c, d = 1.0, 1.0, 0.0
    for i in range(400):
        m = i // 2
        if i == 0:
            num = 1.0
        elif i % 2 == 0:
            num = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        else:
            num = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        d = 1.0 + num * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + num / c
        c = c if abs(c) > tiny else tiny
        f *= c * d
        if abs(1.0 - c * d) < 1e-15:
            break
    return front * (f - 1.0)


def beta_ppf(q: float, a: float, b: float) -> float:
    """Inverse CDF of Beta(a, b) by bisection on `_betainc` (60 halvings: below fp64 resolution)."""
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if _betainc(a, b, mid) < q:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def schedule_beta(steps: int, image_seq_len: int = 4096, alpha: float = 0.6, beta: float = 0.6) -> Tensor:
    """Beta-distribution quantiles of a uniform grid (Lee et al. 2024): dense at both ends of t."""
    qs = [1.0 - i / steps for i in range(steps)]
    return torch.tensor([beta_ppf(q, alpha, beta) for q in qs] + [0.0], dtype=torch.float32)


SCHEDULES = {
    "linear": schedule_linear,
    "shifted": schedule_shifted,
    "flux": schedule_flux,
    "beta": schedule_beta,
}


def sigmas_for(schedule: str, steps: int, denoise: float = 1.0, image_seq_len: int = 4096) -> Tensor:
    """The `steps + 1` sigmas a run walks: the tail of a longer schedule when denoise < 1 (img2img).

    A full schedule of round(steps / denoise) steps is built and its last `steps` steps kept, so
    partial denoising uses the same step density a full run of that length would.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r} (known: {', '.join(SCHEDULES)})")
    if steps < 1:
        raise ValueError("steps must be at least 1")
    if not 0.0 < denoise <= 1.0:
        raise ValueError(f"denoise must be in (0, 1], got {denoise}")
    total = max(steps, round(steps / denoise))
    return SCHEDULES[schedule](total, image_seq_len)[-(steps + 1) :].contiguous()
