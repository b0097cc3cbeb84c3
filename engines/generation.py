"""Caption -> image, once per paradigm: `generate_diffusion`, `generate_autoregressive` and
`generate_next_scale`.

The graph nodes, the benchmarks, the lab's held-out evaluation and training-time samples all
make images through these functions (the nodes through the same pieces: `diffusion_sigmas`,
`latent_to_image`, `tokens_to_image`, `scales_to_image`), so there is one definition of how noise is seeded,
how guidance is applied and how model outputs become an IMAGE ([B, H, W, 3] in 0..1, CPU).
Image k of a batch depends only on seed + k, in every paradigm.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .ar_decoding import condition_prefix, generate
from .conditioning import Conditioning
from .flux import Flux, guided_velocity
from .gpt import GPT
from .latent import Latent, denoise
from .multiscale_vq import MultiScaleTokens, MultiScaleVQ
from .schedules import sigmas_for
from .vae import AutoencoderKL
from .var import VAR, condition_rows, sample_scales
from .vq import VQModel


def diffusion_sigmas(
    model: Flux, schedule: str, steps: int, denoise_strength: float, latent_hw: tuple[int, int]
) -> Tensor:
    """The sigmas a DiT run walks over a latent of `latent_hw` cells (the schedule's shift
    follows the number of image tokens, which depends on the model's patch size)."""
    p = model.config.patch_size
    h, w = latent_hw
    return sigmas_for(schedule, steps, denoise_strength, (-(-h // p)) * (-(-w // p)))


def latent_to_image(vae: AutoencoderKL, latent: Tensor, tile_size: int = 0) -> Tensor:
    """Decode normalised latents [B, C, h, w] to an IMAGE; `tile_size` > 0 (pixels) decodes in
    overlapping tiles to bound memory."""
    tile = tile_size // vae.config.downscale
    pixels = vae.decode_tiled(latent, tile, max(1, tile // 4)) if tile > 0 else vae.decode(latent)
    return ((pixels.float().cpu() + 1) / 2).clamp(0, 1).movedim(1, -1)


def tokens_to_image(vq: VQModel, ids: Tensor) -> Tensor:
    """Decode token grids [B, h, w] to an IMAGE."""
    pixels = vq.decode(ids.to(next(vq.parameters()).device))
    return ((pixels.float().cpu() + 1) / 2).clamp(0, 1).movedim(1, -1)


def scales_to_image(vq: MultiScaleVQ, tokens: MultiScaleTokens, scales: int | None = None) -> Tensor:
    """Decode multi-scale token maps (the first `scales` of them; default all) to an IMAGE."""
    return ((vq.decode(tokens, scales) + 1) / 2).clamp(0, 1).cpu().movedim(1, -1)


def fhat_to_image(vq: MultiScaleVQ, f_hat: Tensor) -> Tensor:
    """Decode accumulated multi-scale features [B, Cvae, H, W] (a scale-by-scale preview) to an IMAGE."""
    return ((vq.decode_fhat(f_hat) + 1) / 2).clamp(0, 1).cpu().movedim(1, -1)


@torch.no_grad()
def generate_diffusion(
    model: Flux,
    vae: AutoencoderKL,
    positive: Conditioning,
    negative: Conditioning | None = None,
    *,
    height: int,
    width: int,
    seed: int = 0,
    steps: int = 20,
    cfg: float = 1.0,
    guidance: float = 3.5,
    sampler: str = "euler",
    schedule: str = "flux",
    callback: Callable[[dict], None] | None = None,
) -> Tensor:
    """Images of `height` x `width` pixels for the captions in `positive` (one per row), with
    classifier-free guidance against `negative` when cfg != 1; image k from seed + k."""
    f = vae.config.downscale
    if height % f or width % f:
        raise ValueError(f"{width}x{height} is not a multiple of the VAE's {f}-pixel latent cell")
    latent = Latent(torch.zeros(positive.batch, model.config.in_channels, height // f, width // f))
    sigmas = diffusion_sigmas(model, schedule, steps, 1.0, (height // f, width // f))
    velocity = guided_velocity(model, positive, negative, cfg, guidance)
    out = denoise(
        velocity, latent, sampler=sampler, sigmas=sigmas, seed=seed, device=model.device, callback=callback
    )
    return latent_to_image(vae, out.samples)


@torch.no_grad()
def generate_autoregressive(
    model: GPT,
    vq: VQModel,
    positive: Conditioning,
    negative: Conditioning | None = None,
    *,
    grid: tuple[int, int] | None = None,
    seed: int = 0,
    cfg: float = 1.0,
    schedule: str = "constant",
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    callback: Callable[[dict], None] | None = None,
) -> Tensor:
    """Images for the captions in `positive` (one per row), a token `grid` (rows, columns; default
    the model's trained `grid_size`) decoded by `vq`; CFG against `negative` (or the model's null
    caption) when cfg != 1; image k from seed + k."""
    rows, cols = grid or (model.config.grid_size, model.config.grid_size)
    prefix = condition_prefix(model, positive.batch, positive=positive, negative=negative, cfg=cfg != 1.0)
    ids = generate(
        model,
        prefix,
        rows,
        cols,
        cfg_scale=cfg,
        schedule=schedule,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        callback=callback,
    )
    return tokens_to_image(vq, ids)


@torch.no_grad()
def generate_next_scale(
    model: VAR,
    vq: MultiScaleVQ,
    positive: Conditioning | None,
    negative: Conditioning | None = None,
    *,
    class_ids: Tensor | int | list[int] | None = None,
    batch: int | None = None,
    seed: int = 0,
    cfg: float = 1.0,
    schedule: str = "linear",
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    keep_scales: int = 0,
    source_tokens: MultiScaleTokens | None = None,
    on_scale: Callable[[dict], None] | None = None,
) -> Tensor:
    """Images from a VAR model, coarse to fine, decoded by its multi-scale `vq`.

    Caption models take `positive` (one caption per row), class models `class_ids` (and
    `batch`, default one image per id). CFG against `negative` (or the null caption / class)
    when cfg != 1, ramped over the scales as VAR does ("linear": unguided at the first scale,
    `cfg` at the last). `keep_scales` = k with `source_tokens` keeps the source's first k scales
    and samples the rest (variations with the same composition). `on_scale` is called after each
    scale with {"i", "total", "tokens", "f_hat"}. Image k from seed + k.
    """
    if positive is not None:
        b = positive.batch if batch is None else batch
    elif class_ids is not None:
        b = batch or torch.as_tensor(class_ids).reshape(-1).shape[0]
    else:
        b = batch or 1
    cond = condition_rows(model, b, positive=positive, negative=negative, class_ids=class_ids, cfg=cfg != 1.0)
    tokens, f_hat = sample_scales(
        model,
        vq.quantize,
        cond,
        b,
        cfg=cfg,
        schedule=schedule,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        source=source_tokens,
        keep_scales=keep_scales,
        callback=on_scale,
    )
    return fhat_to_image(vq, f_hat)
