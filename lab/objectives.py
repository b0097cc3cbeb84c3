"""The training objectives and schedule, written once for the base models and the adapters.

- `drop_captions`: classifier-free-guidance caption dropout (one draw per caption from the
  step's generator, so the DiT and the GPT trained side by side drop the same captions).
- `flow_matching_loss`: rectified flow, x_σ = (1 − σ)·x₀ + σ·ε with σ ~ logit-normal(0, 1), the
  model predicting ε − x₀; a DiT with a distilled-guidance input is fed `guidance` (3.5, Flux's
  default), one without it gets none.
- `token_loss`: next-token cross-entropy over VQ ids after the caption prefix (teacher forcing),
  dropped captions replaced by the null caption; the logits come from the model's own forward, so
  a controlled or LoRA-wrapped GPT trains exactly as the nodes run it.
- `lr_at`: linear warmup, then cosine decay to a floor of the peak learning rate.
- `step_generator`: the random stream of one step, a function of (seed, step) alone, so a run
  resumed at any step draws what the uninterrupted run drew there.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
import torch.nn.functional as F
from torch import Tensor

from tessera.engines.conditioning import Conditioning
from tessera.engines.flux import Flux
from tessera.engines.gpt import GPT

CAPTION_DROPOUT = 0.1  # share of captions replaced by the empty one, so the model learns the uncond (CFG)
GUIDANCE = 3.5  # the distilled-guidance input of DiTs that have one


def drop_captions(
    captions: list[str], gen: torch.Generator, p: float = CAPTION_DROPOUT
) -> tuple[list[str], Tensor]:
    """The captions with a share `p` replaced by "" (one uniform per caption), and which were dropped."""
    drop = torch.rand(len(captions), generator=gen) < p
    return [("" if d else c) for c, d in zip(captions, drop.tolist())], drop


def flow_matching_loss(
    model: Flux,
    x0: Tensor,
    cond: Conditioning,
    gen: torch.Generator,
    guidance: float = GUIDANCE,
    forward_context: Callable[[], AbstractContextManager] = contextlib.nullcontext,
) -> Tensor:
    """Rectified-flow MSE on clean latents `x0` [B, C, h, w]: draws σ [B] then ε from `gen` (in that
    order), runs the model under `forward_context()` (autocast, trainable RoPE) and compares its
    velocity with ε − x₀ in fp32."""
    b, dev = x0.shape[0], x0.device
    sigma = torch.sigmoid(torch.randn(b, generator=gen)).to(dev)
    noise = torch.randn(x0.shape, generator=gen).to(dev)
    s = sigma[:, None, None, None]
    xt = (1 - s) * x0 + s * noise
    g = torch.full((b,), guidance, device=dev) if model.config.guidance_embed else None
    mask = None if bool(cond.mask.all()) else cond.mask
    with forward_context():
        v = model(xt, sigma, cond.tokens.float(), cond.pooled.float(), g, mask).float()
    return F.mse_loss(v, noise - x0)


def teacher_forced_logits(model: GPT, features: Tensor, valid: Tensor, ids: Tensor) -> Tensor:
    """Logits [B, H·W, V] (fp32) of the GPT predicting every VQ id of `ids` [B, H, W] from the caption
    prefix and the ids before it.

    `features` [B, T, caption_dim] and `valid` [B, T] are right-aligned as `GPT.caption_features`
    makes them. The prefix is trimmed to the longest caption in the batch and the rest keep their
    sequence positions: condition tokens carry no rotation (LlamaGen zeroes their RoPE rows) and
    padding keys are masked, so the trimmed rows change nothing for the real tokens, only the cost.
    """
    b, gh, gw = ids.shape
    t, keep = model.prefix_len, int(valid.sum(1).max())
    flat = ids.reshape(b, -1)
    x = torch.cat([model.caption_prefix(features[:, t - keep :]), model.embed_tokens(flat[:, :-1])], dim=1)
    model.setup_caches(b, gh, gw, valid, allocate_kv=False)
    try:
        logits = model(x, torch.arange(t - keep, t - keep + x.shape[1], device=x.device), use_cache=False)
    finally:
        model.clear_caches()
    return logits[:, keep - 1 :]


def token_loss(
    model: GPT,
    cond: Conditioning,
    ids: Tensor,
    drop: Tensor,
    null: Tensor | None = None,
    forward_context: Callable[[], AbstractContextManager] = contextlib.nullcontext,
) -> Tensor:
    """Next-token cross-entropy of VQ ids [B, H, W] after the caption prefix, run under
    `forward_context()` (autocast). The captions where `drop` [B] is set become the null caption
    `null` [T, caption_dim] (default: the model's learned one) under the caption's mask, which is the
    uncond row `ar_decoding.condition_prefix` builds for CFG."""
    features, valid = model.caption_features(cond)
    null = model.cls_embedding.uncond_embedding if null is None else null
    features = torch.where(drop.to(features.device)[:, None, None], null[None].float(), features.float())
    with forward_context():
        logits = teacher_forced_logits(model, features, valid, ids).float()
    return F.cross_entropy(logits.flatten(0, 1), ids.flatten())


def lr_at(step: int, total: int, warmup: int, floor: float = 0.1) -> float:
    """The learning-rate factor at `step` of `total`: linear warmup over `warmup` steps, then cosine
    decay to `floor` of the peak (read at every step: pacing to a deadline may shorten `total`)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def step_generator(seed: int, step: int) -> torch.Generator:
    """The CPU generator of training step `step` of a run seeded `seed`."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)
