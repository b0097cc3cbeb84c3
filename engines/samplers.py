"""Flow-matching samplers with one k-diffusion-style signature.

Rectified flow: x_σ = (1 − σ)·x₀ + σ·ε, and `model(x, sigma[B]) -> velocity` predicts ε − x₀,
so dx/dσ = v and the clean estimate is x₀ ≈ x − σ·v. Every sampler is

    sample_NAME(model, x, sigmas, extra_args=None, callback=None, generator=None, state=None) -> x

walking `sigmas` (descending, ending at 0 for a full run). `state`, when given, carries what a
multistep method remembers across calls (`old_denoised`, `sigma_prev`) and the absolute index of
the first step (`step`), so running steps one call at a time equals one call over all of them.
`generator` draws the ancestral noise: a torch.Generator, or a callable `(like, step) -> noise`
that makes the noise a function of the step index. The arithmetic stays in fp32.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

Model = Callable[..., Tensor]
Noise = torch.Generator | Callable[[Tensor, int], Tensor] | None
Callback = Callable[[dict], None] | None


def _report(callback: Callback, state: dict, i: int, x: Tensor, sigma: float, denoised: Tensor) -> None:
    if callback is not None:
        callback({"i": i, "total": state.get("total"), "x": x, "sigma": sigma, "denoised": denoised})


def _begin(x: Tensor, sigmas: Tensor, state: dict | None) -> tuple[Tensor, list[float], dict, int, Tensor]:
    state = {} if state is None else state
    sig = [float(s) for s in sigmas.tolist()]
    state.setdefault("total", state.get("step", 0) + len(sig) - 1)
    return x.float(), sig, state, state.get("step", 0), x.new_ones(x.shape[0], dtype=torch.float32)


def _noise(generator: Noise, like: Tensor, step: int) -> Tensor:
    if callable(generator) and not isinstance(generator, torch.Generator):
        return generator(like, step).to(like)
    return torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)


@torch.no_grad()
def sample_euler(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    extra_args: dict | None = None,
    callback: Callback = None,
    generator: Noise = None,
    state: dict | None = None,
) -> Tensor:
    """Euler's method on the flow ODE (first order): x ← x + (σₙ − σ)·v."""
    extra_args = extra_args or {}
    x, sig, state, start, s_in = _begin(x, sigmas, state)
    for j in range(len(sig) - 1):
        v = model(x, sig[j] * s_in, **extra_args).float()
        _report(callback, state, start + j, x, sig[j], x - sig[j] * v)
        x = x + (sig[j + 1] - sig[j]) * v
    state["step"] = start + len(sig) - 1
    return x


@torch.no_grad()
def sample_heun(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    extra_args: dict | None = None,
    callback: Callback = None,
    generator: Noise = None,
    state: dict | None = None,
) -> Tensor:
    """Heun's method (Karras et al. 2022, alg. 1): trapezoid of v at both ends; Euler on the step to σ=0."""
    extra_args = extra_args or {}
    x, sig, state, start, s_in = _begin(x, sigmas, state)
    for j in range(len(sig) - 1):
        s, s_next = sig[j], sig[j + 1]
        v = model(x, s * s_in, **extra_args).float()
        _report(callback, state, start + j, x, s, x - s * v)
        x_euler = x + (s_next - s) * v
        if s_next == 0:
            x = x_euler
        else:
            v_next = model(x_euler, s_next * s_in, **extra_args).float()
            x = x + (s_next - s) * 0.5 * (v + v_next)
    state["step"] = start + len(sig) - 1
    return x


def _lambda(sigma: float) -> float:
    """Half log-SNR, log(α/σ) with α = 1 − σ; −inf at pure noise, +inf at the data."""
    if sigma >= 1.0:
        return -math.inf
    if sigma <= 0.0:
        return math.inf
    return math.log((1.0 - sigma) / sigma)


@torch.no_grad()
def sample_dpmpp_2m(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    extra_args: dict | None = None,
    callback: Callback = None,
    generator: Noise = None,
    state: dict | None = None,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022): second-order multistep in log-SNR on the data prediction.

    In flow form (α = 1 − σ) a step is x ← (σₙ/σ)·x + (αₙ − α·σₙ/σ)·D, exact for constant D;
    D extrapolates the last two data predictions. It falls back to first order where the previous
    log-SNR step is infinite (leaving pure noise) and on the final step to σ = 0.
    """
    extra_args = extra_args or {}
    x, sig, state, start, s_in = _begin(x, sigmas, state)
    old_denoised, sigma_prev = state.get("old_denoised"), state.get("sigma_prev")
    for j in range(len(sig) - 1):
        s, s_next = sig[j], sig[j + 1]
        denoised = x - s * model(x, s * s_in, **extra_args).float()
        _report(callback, state, start + j, x, s, denoised)
        if s_next == 0:
            x = denoised
        else:
            d = denoised
            h = _lambda(s_next) - _lambda(s)
            h_last = _lambda(s) - _lambda(sigma_prev) if sigma_prev is not None else math.inf
            if old_denoised is not None and math.isfinite(h_last) and math.isfinite(h):
                r = h_last / h
                d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised.to(denoised)
            ratio = s_next / s
            x = ratio * x + ((1 - s_next) - (1 - s) * ratio) * d
        old_denoised, sigma_prev = denoised, s
    state.update(step=start + len(sig) - 1, old_denoised=old_denoised, sigma_prev=sigma_prev)
    return x


@torch.no_grad()
def sample_euler_ancestral(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    extra_args: dict | None = None,
    callback: Callback = None,
    generator: Noise = None,
    state: dict | None = None,
    eta: float = 1.0,
) -> Tensor:
    """Euler ancestral for rectified flow: a DDIM step down to σ_down, then fresh noise back up to σₙ.

    σ_down = σₙ·(1 + (σₙ/σ − 1)·η); rescaling by αₙ/α_down and adding noise of std
    √(σₙ² − (αₙ·σ_down/α_down)²) restores the marginal of x at σₙ. η = 0 is plain Euler.
    """
    extra_args = extra_args or {}
    x, sig, state, start, s_in = _begin(x, sigmas, state)
    for j in range(len(sig) - 1):
        s, s_next = sig[j], sig[j + 1]
        denoised = x - s * model(x, s * s_in, **extra_args).float()
        _report(callback, state, start + j, x, s, denoised)
        if s_next == 0:
            x = denoised
            continue
        s_down = s_next * (1 + (s_next / s - 1) * eta)
        a_next, a_down = 1 - s_next, 1 - s_down
        x = (s_down / s) * x + (1 - s_down / s) * denoised
        renoise = math.sqrt(max(s_next**2 - (s_down * a_next / a_down) ** 2, 0.0))
        x = (a_next / a_down) * x + renoise * _noise(generator, x, start + j)
    state["step"] = start + len(sig) - 1
    return x


SAMPLERS = {
    "euler": sample_euler,
    "heun": sample_heun,
    "dpmpp_2m": sample_dpmpp_2m,
    "euler_ancestral": sample_euler_ancestral,
}
DETERMINISTIC_SAMPLERS = ("euler", "heun", "dpmpp_2m")
