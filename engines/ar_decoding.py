"""Raster-order token decoding for the GPT, in gpt-fast's shape.

`prefill` runs the condition prefix (plus any leading fixed tokens) once, then
`decode_n_tokens` calls `decode_one_token` per position against the static KV cache.
Classifier-free guidance batches cond and uncond rows in one forward and mixes the
logits (uncond + s * (cond - uncond)), with s following a schedule over the token
index. Randomness is per image and device-independent: image k draws its uniforms from a
CPU generator seeded seed + k (`ImageNoise`), so image k of a batch is the image seed + k
gives alone, on any device; sampling is an inverse-CDF lookup of one uniform per token,
so it stays on the device without a host sync. Fixed positions are forced, not sampled,
which gives continuation, outpainting and in-filling for free. `decoding="jacobi"` swaps
the one-token loop for lossless Speculative Jacobi Decoding (`jacobi.py`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .conditioning import Conditioning
from .gpt import GPT
from .tokens import TokenGrid

Callback = Callable[[dict], None]


# ---- guidance schedules: token index i of n -> scale ------------------------------------------
def _constant(cfg: float, t: float) -> float:
    return cfg


def _linear(cfg: float, t: float) -> float:
    return 1.0 + (cfg - 1.0) * t


def _cosine(cfg: float, t: float) -> float:
    return 1.0 + (cfg - 1.0) * (1.0 - math.cos(math.pi * t)) / 2.0


SCHEDULES: dict[str, Callable[[float, float], float]] = {
    "constant": _constant,  # s = cfg everywhere (LlamaGen)
    "linear": _linear,  # 1 at the first token, cfg at the last: early tokens stay diverse
    "cosine": _cosine,  # the same ramp, flat at both ends
}


def guidance_scales(schedule: str, cfg: float, n: int) -> torch.Tensor:
    """Per-token guidance scales [n] (fp32) for a schedule name in SCHEDULES."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown guidance schedule '{schedule}' (choose from {', '.join(SCHEDULES)})")
    f = SCHEDULES[schedule]
    return torch.tensor([f(cfg, i / max(n - 1, 1)) for i in range(n)], dtype=torch.float32)


DECODINGS = ("sequential", "jacobi")


# ---- sampling -----------------------------------------------------------------------------------
def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set logits outside the top-k / top-p (nucleus) set to -inf; always keeps the best token."""
    if top_k > 0:
        k = min(top_k, logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = (cum - sorted_logits.softmax(-1)) > top_p  # mass before this token already > p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


_U64 = (1 << 64) - 1


class ImageNoise:
    """One CPU generator per image, seeded seed + k: the uniforms image k draws never depend on
    the batch it sits in or on the device (they are drawn on the CPU, then moved)."""

    def __init__(self, seed: int, batch: int):
        self.generators = [torch.Generator().manual_seed((seed + k) & _U64) for k in range(batch)]

    def uniform(self, *shape: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """[B, *shape] fp32 uniforms in [0, 1), row k from image k's stream."""
        rows = [torch.rand(shape, generator=g) for g in self.generators]
        return torch.stack(rows).to(device)


def token_probs(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """[..., V] logits -> the fp32 distribution tokens are drawn from (temperature, then filters)."""
    return filter_logits(logits.float() / temperature, top_k, top_p).softmax(-1)


def draw(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw: [..., V] non-negative weights (need not sum to 1) and [...] uniforms in
    [0, 1) -> [...] ids. Zero-weight ids are never drawn; no host sync."""
    cdf = probs.cumsum(-1)
    target = (uniform * cdf[..., -1]).unsqueeze(-1)
    ids = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    last = (probs > 0).cumsum(-1).argmax(-1)  # the last id with weight: guards fp rounding at u -> 1
    return torch.minimum(ids, last)


def sample(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    uniform: torch.Tensor | None = None,
) -> torch.Tensor:
    """[B, V] logits -> [B] long ids. temperature <= 0 is greedy; otherwise `uniform` [B] in
    [0, 1) picks the token by inverse CDF (one uniform per token, so seeds are per image)."""
    if temperature <= 0:
        return logits.argmax(-1)
    if uniform is None:
        raise ValueError("sampling at temperature > 0 needs one uniform per row")
    return draw(token_probs(logits, temperature, top_k, top_p), uniform)


# ---- condition prefix ---------------------------------------------------------------------------
@dataclass
class Prefix:
    """Embedded condition rows for one batched forward: cond rows, then uncond rows if CFG."""

    x: torch.Tensor  # [B or 2B, T, dim]
    key_valid: torch.Tensor | None  # [B or 2B, T] bool, False on text padding
    batch: int
    cfg: bool


def _fit_batch(t: torch.Tensor, batch: int, what: str) -> torch.Tensor:
    if t.shape[0] == batch:
        return t
    if t.shape[0] == 1:
        return t.expand(batch, *t.shape[1:])
    raise ValueError(f"{what} has batch {t.shape[0]}, which does not match batch {batch}")


def condition_prefix(
    model: GPT,
    batch: int,
    *,
    positive: Conditioning | None = None,
    negative: Conditioning | None = None,
    class_ids: torch.Tensor | None = None,
    cfg: bool = True,
) -> Prefix:
    """Embed the condition prefix for `batch` images, with the CFG uncond rows appended.

    Caption models project text features; their uncond rows are the learned null caption
    (`cls_embedding.uncond_embedding`, under the positive's padding mask, as LlamaGen does)
    or the projected `negative` if one is given. Class models embed `class_ids`; their
    uncond row is the table's extra null class.
    """
    cfg_model = model.config
    if cfg_model.is_caption:
        if positive is None:
            raise ValueError("this AR model is caption-conditioned and needs a positive CONDITIONING")
        feats, valid = model.caption_features(positive)
        feats, valid = _fit_batch(feats, batch, "positive conditioning"), _fit_batch(valid, batch, "positive")
        rows, keys = [model.caption_prefix(feats)], [valid]
        if cfg:
            if negative is not None:
                nf, nv = model.caption_features(negative)
                nf, nv = _fit_batch(nf, batch, "negative conditioning"), _fit_batch(nv, batch, "negative")
            else:
                nf, nv = model.uncond_features(batch), valid
            rows.append(model.caption_prefix(nf))
            keys.append(nv)
        return Prefix(torch.cat(rows), torch.cat(keys).to(rows[0].device), batch, cfg)
    if class_ids is None:
        raise ValueError("this AR model is class-conditioned and needs a class id")
    ids = _fit_batch(torch.as_tensor(class_ids, dtype=torch.long).reshape(-1), batch, "class ids")
    rows = [model.class_prefix(ids)]
    if cfg:
        rows.append(model.class_prefix(ids, uncond=True))
    return Prefix(torch.cat(rows), None, batch, cfg)


# ---- the decoding steps (gpt-fast shape) ----------------------------------------------------------
def _guide(logits: torch.Tensor, batch: int, scale: torch.Tensor | None) -> torch.Tensor:
    """[B or 2B, ...] -> [B, ...]: uncond + s * (cond - uncond) when the uncond rows are present
    (`scale` broadcasts against the trailing dims, e.g. [S, 1] for [2B, S, V])."""
    if logits.shape[0] == batch:
        return logits
    cond, uncond = logits[:batch], logits[batch:]
    return uncond + scale * (cond - uncond)


def prefill(
    model: GPT, x: torch.Tensor, input_pos: torch.Tensor, batch: int, scale: torch.Tensor | None
) -> torch.Tensor:
    """Run the prefix (and leading fixed tokens) into the cache; guided logits [B, V] of the
    last position, i.e. for the first token still to decode."""
    return _guide(model(x, input_pos)[:, -1], batch, scale)


def decode_one_token(
    model: GPT, ids: torch.Tensor, input_pos: torch.Tensor, scale: torch.Tensor | None
) -> torch.Tensor:
    """Feed one token per image ([B, 1]) at `input_pos` [1]; guided logits [B, V] for the next.

    The token is duplicated for the uncond rows when the cache holds 2B rows (CFG).
    """
    batch = ids.shape[0]
    cache_batch = model.layers[0].attention.kv_cache.k_cache.shape[0]
    if cache_batch != batch:
        ids = torch.cat([ids, ids])
    return _guide(model(model.embed_tokens(ids), input_pos)[:, -1], batch, scale)


def recompute_logits(
    model: GPT, prefix: Prefix, ids: torch.Tensor, scale: torch.Tensor | None
) -> torch.Tensor:
    """The naive reference: run prefix + all tokens so far ([B, n]) without a cache; guided
    logits [B, V] for position n. Used by tests and the benchmark baseline."""
    ids = torch.cat([ids, ids]) if prefix.cfg else ids
    x = torch.cat([prefix.x, model.embed_tokens(ids)], dim=1)
    pos = torch.arange(x.shape[1], device=x.device)
    return _guide(model(x, pos, use_cache=False)[:, -1], prefix.batch, scale)


def decode_n_tokens(
    logits: torch.Tensor,
    seq: torch.Tensor,
    start: int,
    forced: torch.Tensor,
    forced_ids: torch.Tensor,
    *,
    temperature: float,
    top_k: int,
    top_p: float,
    uniforms: torch.Tensor,
    callback: Callback | None,
    step: Callable[[torch.Tensor, int], torch.Tensor],
    sample_fn: Callable = sample,
) -> torch.Tensor:
    """Fill seq[:, start:] one token at a time. `logits` predict position `start`;
    `step(token [B,1], i)` feeds the token at grid position i and returns logits for i+1.

    Position i uses uniforms[:, i], fixed or not, so which positions are fixed does not
    shift the random stream of the others; the forced id replaces the drawn one.
    """
    n = seq.shape[1]
    for i in range(start, n):
        drawn = sample_fn(logits, temperature, top_k, top_p, uniforms[:, i])
        tok = torch.where(forced[:, i], forced_ids[:, i], drawn)
        seq[:, i] = tok
        if callback is not None:
            callback({"i": i, "total": n, "tokens": seq[:, : i + 1]})
        if i + 1 < n:
            logits = step(tok[:, None], i)
    return seq


@torch.inference_mode()
def generate(
    model: GPT,
    prefix: Prefix,
    grid_h: int,
    grid_w: int,
    *,
    cfg_scale: float = 1.0,
    schedule: str = "constant",
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    fixed: TokenGrid | None = None,
    callback: Callback | None = None,
    use_cache: bool = True,
    decode_fn: Callable = decode_one_token,
    sample_fn: Callable = sample,
    keep_caches: bool = False,
    decoding: str = "sequential",
    jacobi_window: int = 16,
    stats: dict | None = None,
) -> torch.Tensor:
    """Decode a grid_h x grid_w token grid in raster order; returns ids [B, H, W].

    Image k draws from seed + k (see `ImageNoise`). Leading positions fixed in every image
    are prefilled in one pass instead of one at a time. `use_cache=False` recomputes the whole
    sequence per token (the baseline). `decode_fn` / `sample_fn` let a caller pass a compiled
    `decode_one_token` / `sample` (CUDA graphs: few launches, no host sync per token);
    `keep_caches=True` keeps the KV cache allocated afterwards so a compiled (CUDA-graph)
    step can reuse it. `decoding="jacobi"` verifies `jacobi_window` drafted tokens per
    forward (lossless, see `jacobi.py`). `stats`, if given, receives the tokens decoded, the
    batch's forwards and the mean forwards per image.
    """
    if decoding not in DECODINGS:
        raise ValueError(f"unknown decoding '{decoding}' (choose from {', '.join(DECODINGS)})")
    if decoding == "jacobi" and not use_cache:
        raise ValueError("Jacobi decoding needs the KV cache")
    b, n, t = prefix.batch, grid_h * grid_w, model.prefix_len
    device = prefix.x.device
    if prefix.x.shape[1] != t:
        raise ValueError(f"prefix has {prefix.x.shape[1]} tokens, the model expects {t}")
    if fixed is not None:
        if (fixed.height, fixed.width) != (grid_h, grid_w):
            raise ValueError(f"fixed tokens are {fixed.height}x{fixed.width}, the grid is {grid_h}x{grid_w}")
        forced = _fit_batch(fixed.fixed_mask().reshape(fixed.batch, n), b, "fixed tokens").to(device)
        forced_ids = _fit_batch(fixed.ids.reshape(fixed.batch, n), b, "fixed tokens").to(device)
        if bool((forced_ids[forced] >= model.config.vocab_size).any() or (forced_ids[forced] < 0).any()):
            raise ValueError(f"fixed token ids must lie in [0, {model.config.vocab_size})")
    else:
        forced = torch.zeros(b, n, dtype=torch.bool, device=device)
        forced_ids = torch.zeros(b, n, dtype=torch.long, device=device)
    # one host sync, up front: how many leading positions every image has fixed
    free = (~forced.all(0)).nonzero()
    lead = int(free[0]) if free.numel() else n
    seq = forced_ids.clone()
    if stats is not None:
        stats.update(forwards=0, tokens=n - lead)
    if lead == n:
        return seq.view(b, grid_h, grid_w)
    noise = ImageNoise(seed, b)

    scales = guidance_scales(schedule, cfg_scale, n).to(device) if prefix.cfg else None
    rows = prefix.x.shape[0]
    model.setup_caches(rows, grid_h, grid_w, prefix.key_valid, allocate_kv=use_cache)
    try:
        if use_cache:
            lead_ids = seq[:, :lead].repeat(rows // b, 1)
            x = torch.cat([prefix.x, model.embed_tokens(lead_ids)], dim=1)
            logits = prefill(
                model, x, torch.arange(t + lead, device=device), b, None if scales is None else scales[lead]
            )
            if decoding == "jacobi":
                from .jacobi import jacobi_decode  # jacobi builds on this module's sampling

                forwards, per_image = jacobi_decode(
                    model,
                    logits,
                    seq,
                    lead,
                    forced,
                    forced_ids,
                    scales,
                    noise,
                    window=jacobi_window,
                    temperature=temperature,
                    top_k=top_k,
                    top_p=top_p,
                    callback=callback,
                )
                if stats is not None:
                    stats.update(forwards=1 + forwards, forwards_per_image=1 + per_image)
                return seq.view(b, grid_h, grid_w)
            pos = torch.tensor([t], device=device, dtype=torch.long)

            def step(tok: torch.Tensor, i: int) -> torch.Tensor:
                pos.fill_(t + i)
                return decode_fn(model, tok, pos, None if scales is None else scales[i + 1])
        else:
            logits = recompute_logits(model, prefix, seq[:, :lead], None if scales is None else scales[lead])

            def step(tok: torch.Tensor, i: int) -> torch.Tensor:
                return recompute_logits(
                    model, prefix, seq[:, : i + 1], None if scales is None else scales[i + 1]
                )

        decode_n_tokens(
            logits,
            seq,
            lead,
            forced,
            forced_ids,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            uniforms=noise.uniform(n, device=device),
            callback=callback,
            step=step,
            sample_fn=sample_fn,
        )
        if stats is not None:
            stats.update(forwards=n - lead, forwards_per_image=float(n - lead))
    finally:
        if not keep_caches:
            model.clear_caches()
    return seq.view(b, grid_h, grid_w)
