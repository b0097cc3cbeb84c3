"""The LATENT value and what happens to it while it is denoised: seeded noise, img2img, inpainting.

`denoise` runs steps [start, stop) of one sampler over one schedule. A whole run and a chain of
one-step calls go through the same code, so they give the same numbers: between calls the
partly-finished run (the source latent, the initial noise, the sampler's multistep memory)
travels inside the Latent as a `DenoiseRun`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from tessera.engines.samplers import SAMPLERS

_U64 = (1 << 64) - 1


@dataclass(frozen=True)
class DenoiseRun:
    """A denoising run that stopped part-way; the next step continues it exactly."""

    plan: tuple  # (sampler, sigmas, seed): memory is reused only by a step of the same plan
    next_step: int
    source: Tensor  # the clean latent the run started from (img2img start, inpainting keep-region)
    noise: Tensor  # the initial noise ε, reused to re-noise the keep-region
    history: dict  # the sampler's multistep memory (tensors on CPU)


@dataclass(frozen=True)
class Latent:
    samples: Tensor  # [B, C, h, w] float32 on CPU, normalised by the VAE's scale/shift
    noise_mask: Tensor | None = None  # [B, 1, h, w] in 0..1; 1 = regenerate, 0 = keep the source
    rgb_projection: Tensor | None = None  # [C + 1, 3] latent → RGB fit for previews (see preview.py)
    run: DenoiseRun | None = None  # set while a chain of single steps is unfinished

    @property
    def batch(self) -> int:
        return self.samples.shape[0]

    @property
    def channels(self) -> int:
        return self.samples.shape[1]


def _mix(seed: int, step: int) -> int:
    """splitmix64 of (seed, step): unrelated streams for every step of every item."""
    z = (seed * 0x9E3779B97F4A7C15 + (step + 1) * 0xBF58476D1CE4E5B9) & _U64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _U64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _U64
    return z ^ (z >> 31)


def seeded_noise(seed: int, shape: tuple[int, ...]) -> Tensor:
    """Gaussian noise [B, ...] where item k is drawn from a CPU generator seeded `seed + k`.

    Item k's noise depends only on seed + k, never on the batch size or the device, so a batch
    of 4 contains the images that seeds seed..seed+3 would give one at a time.
    """
    items = []
    for k in range(shape[0]):
        g = torch.Generator().manual_seed((seed + k) & _U64)
        items.append(torch.randn(shape[1:], generator=g))
    return torch.stack(items)


class StepNoise:
    """Ancestral noise as a function of (item seed, step), so it does not depend on call order."""

    def __init__(self, seed: int):
        self.seed = seed

    def __call__(self, like: Tensor, step: int) -> Tensor:
        items = []
        for k in range(like.shape[0]):
            g = torch.Generator().manual_seed(_mix(self.seed + k, step))
            items.append(torch.randn(like.shape[1:], generator=g))
        return torch.stack(items).to(like)


def _to(history: dict, device) -> dict:
    return {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in history.items()}


def denoise(
    velocity: Callable[[Tensor, Tensor], Tensor],
    latent: Latent,
    *,
    sampler: str,
    sigmas: Tensor,
    seed: int,
    start: int = 0,
    stop: int | None = None,
    device: torch.device | str = "cpu",
    callback: Callable[[dict], None] | None = None,
) -> Latent:
    """Run steps [start, stop) of `sampler` over `sigmas` (default: all of them).

    Step 0 noises the input: x = (1 − σ₀)·latent + σ₀·ε (σ₀ < 1 is img2img). A later step takes
    the input as the current x, continuing its `run` when that run has the same plan. With a
    noise_mask, the kept region is reset each step to the source re-noised to the current σ and
    to the source itself at the end.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r} (known: {', '.join(SAMPLERS)})")
    n = len(sigmas) - 1
    stop = n if stop is None else stop
    if not 0 <= start < stop <= n:
        raise ValueError(f"steps [{start}, {stop}) are outside the schedule's {n} steps")
    sig = [float(s) for s in sigmas.tolist()]
    plan = (sampler, tuple(sig), int(seed))

    if start == 0:
        source = latent.samples.float()
        noise = seeded_noise(seed, tuple(source.shape))
        x = (1 - sig[0]) * source + sig[0] * noise
        history: dict = {}
    elif latent.run is not None:
        source, noise = latent.run.source, latent.run.noise
        same = latent.run.plan == plan and latent.run.next_step == start
        history = dict(latent.run.history) if same else {}
        x = latent.samples.float()
    else:
        if latent.noise_mask is not None:
            raise ValueError(
                "inpainting needs the chain of steps to start at step 0 (the source latent is unknown)"
            )
        source = noise = None
        history = {}
        x = latent.samples.float()

    mask = None if latent.noise_mask is None else latent.noise_mask.float().to(device)
    src = None if source is None else source.to(device)
    eps = None if noise is None else noise.to(device)
    x = x.to(device)
    history = _to(history, device)
    step_noise = StepNoise(seed)
    sample = SAMPLERS[sampler]
    for i in range(start, stop):
        if mask is not None:
            x = mask * x + (1 - mask) * ((1 - sig[i]) * src + sig[i] * eps)
        state = dict(history, step=i, total=n)
        x = sample(velocity, x, sigmas[i : i + 2], callback=callback, generator=step_noise, state=state)
        history = {k: v for k, v in state.items() if k not in ("step", "total")}
    if stop == n and mask is not None:
        x = mask * x + (1 - mask) * src

    run = None
    if stop < n:
        run = DenoiseRun(plan, stop, source, noise, _to(history, "cpu"))
    return replace(latent, samples=x.float().cpu(), run=run)
