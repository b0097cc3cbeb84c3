"""VAR: next-scale autoregressive transformer over multi-scale VQ maps (Tian et al. 2024).

The sequence is every scale's tokens, coarse to fine (1 + 4 + … + 256 = 680 for VAR's ten
scales). Scale 0's input is the condition vector plus `pos_start`; scale k's input is the
area-downsampled f_hat after scales 0..k-1 (`MultiScaleQuantizer.next_input`) through
`word_embed`. Learned `pos_1LC` and level (`lvl_embed`) embeddings are added everywhere.
Attention is block-causal: a token sees every token of its own and coarser scales, so a whole
scale is predicted in one forward, and at inference each scale's keys/values are cached.
Blocks are AdaLN-conditioned: `ada_lin` turns the condition vector into (γ1, γ2, scale1,
scale2, shift1, shift2); `head_nm` does the same (scale, shift) before the head. With
`attn_l2_norm`, q and k are unit vectors and q carries a learned per-head scale (≤ 100).

The condition is a class (`class_emb`, row num_classes = null class for CFG), or, for our
built-in models, a caption: the pooled text vector through `caption_pool` is the AdaLN/start
vector, and the per-token features through `caption_proj` form a prefix every scale attends
to (level -1, padding masked). Module names follow FoundationVision/VAR's `models/var.py`, so
a converted var_d16 … var_d30 loads by name.

Guidance ramps over the scales as VAR does it: scale k mixes uncond + s_k·(cond − uncond) with
s_k = 1 + (cfg − 1)·k/(K − 1), so the first scale is unguided and the last gets `cfg`
(VAR's own `cfg=c` argument is our cfg = c + 1). Sampling reuses the raster engine's per-image
random streams (`ar_decoding.ImageNoise`): image k draws from seed + k alone.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .ar_decoding import ImageNoise, draw, guidance_scales, token_probs
from .checkpoint import CheckpointError, assign_checked, read_safetensors, write_safetensors
from .conditioning import Conditioning
from .gpt import CaptionProjection
from .layouts import wrong_family
from .multiscale_vq import DEFAULT_PATCH_NUMS, MultiScaleQuantizer, MultiScaleTokens

Callback = Callable[[dict], None]


@dataclass
class VARConfig:
    """Sizes of a VAR transformer (defaults: VAR-d16 on VAR's tokenizer)."""

    depth: int = 16
    width: int = 1024  # embed dim C (= the condition width D)
    heads: int = 16
    ffn_hidden: int = 4096  # round(width * mlp_ratio), mlp_ratio 4
    vocab_size: int = 4096
    cvae: int = 32  # the tokenizer's codebook dim
    patch_nums: list[int] = field(default_factory=lambda: list(DEFAULT_PATCH_NUMS))
    num_classes: int = 1000  # class models; 0 for caption models
    caption_dim: int = 0  # caption models: width of the per-token text features (0: no prefix)
    pooled_dim: int = 0  # caption models: width of the pooled text vector
    attn_l2_norm: bool = True
    norm_eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def is_caption(self) -> bool:
        return self.num_classes == 0

    @property
    def seq_len(self) -> int:
        return sum(p * p for p in self.patch_nums)

    @property
    def first_l(self) -> int:
        return self.patch_nums[0] ** 2

    def scale_bounds(self) -> list[tuple[int, int]]:
        """(begin, end) of each scale in the token sequence."""
        out, cur = [], 0
        for p in self.patch_nums:
            out.append((cur, cur + p * p))
            cur += p * p
        return out

    def levels(self) -> Tensor:
        """[L] long: the scale index of every sequence position."""
        return torch.cat([torch.full((p * p,), i, dtype=torch.long) for i, p in enumerate(self.patch_nums)])


@dataclass
class VARCondition:
    """What a batch is conditioned on, embedded: rows are images (cond rows, then uncond rows for CFG)."""

    vec: Tensor  # [R, C]: AdaLN condition and start token (class embedding or pooled caption)
    prefix: Tensor | None = None  # [R, T, C] projected caption tokens (caption models with a prefix)
    prefix_valid: Tensor | None = None  # [R, T] bool, False on text padding

    @property
    def rows(self) -> int:
        return self.vec.shape[0]

    @property
    def prefix_len(self) -> int:
        return 0 if self.prefix is None else self.prefix.shape[1]

    @staticmethod
    def cat(a: VARCondition, b: VARCondition) -> VARCondition:
        """Stack two conditions' rows (prefixes padded to the longer one, padding masked)."""
        if a.prefix is None or b.prefix is None:
            return VARCondition(torch.cat([a.vec, b.vec]))
        t = max(a.prefix_len, b.prefix_len)

        def pad(c: VARCondition) -> tuple[Tensor, Tensor]:
            extra = t - c.prefix_len
            return F.pad(c.prefix, (0, 0, 0, extra)), F.pad(c.prefix_valid, (0, extra), value=False)

        (pa, va), (pb, vb) = pad(a), pad(b)
        return VARCondition(torch.cat([a.vec, b.vec]), torch.cat([pa, pb]), torch.cat([va, vb]))


# ---------------------------------------------------------------- blocks


def _layer_norm(x: Tensor, eps: float) -> Tensor:
    """LayerNorm without affine, statistics in fp32."""
    return F.layer_norm(x.float(), x.shape[-1:], eps=eps).to(x.dtype)


class FFN(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SelfAttention(nn.Module):
    """`mat_qkv` without bias plus `q_bias`/`v_bias` (k has none); optional l2-normalised q·k."""

    def __init__(self, cfg: VARConfig):
        super().__init__()
        c = cfg.width
        self.heads, self.head_dim, self.l2 = cfg.heads, cfg.head_dim, cfg.attn_l2_norm
        self.mat_qkv = nn.Linear(c, 3 * c, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(c))
        self.v_bias = nn.Parameter(torch.zeros(c))
        self.register_buffer("zero_k_bias", torch.zeros(c))
        if self.l2:
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, cfg.heads, 1, 1), 4.0).log())
        self.proj = nn.Linear(c, c)

    def forward(self, x: Tensor, mask: Tensor | None, cache: list[Tensor] | None) -> Tensor:
        """x [R, l, C]; `mask` [R, 1, l, keys] bool (None: attend to every key); `cache` [k, v]
        ([] to start) is extended in place with this call's keys and values."""
        r, n, c = x.shape
        bias = torch.cat([self.q_bias, self.zero_k_bias, self.v_bias])
        qkv = F.linear(x, self.mat_qkv.weight, bias).view(r, n, 3, self.heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # [R, H, l, Dh]
        if self.l2:
            mul = self.scale_mul_1H11.float().clamp_max(math.log(100.0)).exp()
            q = (F.normalize(q.float(), dim=-1) * mul).to(v.dtype)
            k = F.normalize(k.float(), dim=-1).to(v.dtype)
            scale = 1.0
        else:
            scale = 0.25 / math.sqrt(self.head_dim)
        if cache is not None:
            if cache:
                k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
            cache[:] = [k, v]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        return self.proj(out.transpose(1, 2).reshape(r, n, c))


class AdaLNSelfAttn(nn.Module):
    def __init__(self, cfg: VARConfig):
        super().__init__()
        self.width, self.eps = cfg.width, cfg.norm_eps
        self.attn = SelfAttention(cfg)
        self.ffn = FFN(cfg.width, cfg.ffn_hidden)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(cfg.width, 6 * cfg.width))

    def forward(self, x: Tensor, cond: Tensor, mask: Tensor | None, cache: list[Tensor] | None) -> Tensor:
        g1, g2, s1, s2, b1, b2 = self.ada_lin(cond).view(-1, 1, 6, self.width).unbind(2)
        x = x + self.attn(_layer_norm(x, self.eps) * (s1 + 1) + b1, mask, cache) * g1
        return x + self.ffn(_layer_norm(x, self.eps) * (s2 + 1) + b2) * g2


class AdaLNBeforeHead(nn.Module):
    def __init__(self, cfg: VARConfig):
        super().__init__()
        self.width, self.eps = cfg.width, cfg.norm_eps
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(cfg.width, 2 * cfg.width))

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        scale, shift = self.ada_lin(cond).view(-1, 1, 2, self.width).unbind(2)
        return _layer_norm(x, self.eps) * (scale + 1) + shift


def attention_mask(q_levels: Tensor, k_levels: Tensor, k_valid: Tensor | None) -> Tensor:
    """[R or 1, 1, q, k] bool: a query at level a sees a key at level b when b <= a and the key
    is real (`k_valid` [R, k]). The queries are the last q of the keys (a cached step feeds only
    its own scale). Caption tokens have level -1: every scale sees them, they see only each
    other. A query always sees its own key, so a padding row is never empty.
    """
    q, k = q_levels.shape[0], k_levels.shape[0]
    allowed = (k_levels[None, :] <= q_levels[:, None])[None]
    if k_valid is not None:
        allowed = allowed & k_valid[:, None, :]
    own = torch.zeros(q, k, dtype=torch.bool, device=allowed.device)
    own[torch.arange(q), torch.arange(k - q, k)] = True
    return (allowed | own).unsqueeze(1)


# ---------------------------------------------------------------- the model


class VAR(nn.Module):
    def __init__(self, cfg: VARConfig):
        super().__init__()
        if cfg.width % cfg.heads:
            raise ValueError(f"width {cfg.width} is not divisible by {cfg.heads} heads")
        if cfg.is_caption and cfg.pooled_dim <= 0:
            raise ValueError("a caption VAR (num_classes 0) needs pooled_dim > 0")
        self.config = cfg
        c = cfg.width
        self.word_embed = nn.Linear(cfg.cvae, c)
        if cfg.is_caption:
            self.caption_pool = CaptionProjection(cfg.pooled_dim, c)
            self.null_pooled = nn.Parameter(torch.zeros(cfg.pooled_dim))
            if cfg.caption_dim > 0:
                self.caption_proj = CaptionProjection(cfg.caption_dim, c)
                self.null_tokens = nn.Parameter(torch.zeros(1, cfg.caption_dim))
        else:
            self.class_emb = nn.Embedding(cfg.num_classes + 1, c)
        self.pos_start = nn.Parameter(torch.zeros(1, cfg.first_l, c))
        self.pos_1LC = nn.Parameter(torch.zeros(1, cfg.seq_len, c))
        self.lvl_embed = nn.Embedding(len(cfg.patch_nums), c)
        self.blocks = nn.ModuleList(AdaLNSelfAttn(cfg) for _ in range(cfg.depth))
        self.head_nm = AdaLNBeforeHead(cfg)
        self.head = nn.Linear(c, cfg.vocab_size)

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> VAR:
        """VAR's training init: truncated normals of std √(1/3C) for weights and tables, zero
        biases, the head scaled by 0.02, the AdaLN projections by 0.5 (their γ rows by 1e-5, so
        each block starts close to the identity), residual outputs by 1/√(2·depth)."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        std = math.sqrt(1 / self.config.width / 3)

        def normal_(t: Tensor) -> None:
            t.copy_(torch.nn.init.trunc_normal_(torch.empty(t.shape), std=std, generator=gen))

        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                normal_(m.weight)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
        for p in (self.pos_start, self.pos_1LC):
            normal_(p)
        c, depth = self.config.width, self.config.depth
        self.head.weight.mul_(0.02)
        self.head_nm.ada_lin[-1].weight.mul_(0.5)
        for block in self.blocks:
            block.attn.proj.weight.div_(math.sqrt(2 * depth))
            block.ffn.fc2.weight.div_(math.sqrt(2 * depth))
            block.ada_lin[-1].weight[2 * c :].mul_(0.5)
            block.ada_lin[-1].weight[: 2 * c].mul_(1e-5)
        return self

    @property
    def device(self) -> torch.device:
        return self.word_embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.word_embed.weight.dtype

    # ---- conditions --------------------------------------------------------------------------
    def class_condition(self, class_ids: Tensor, uncond: bool = False) -> VARCondition:
        """[B] class ids -> condition rows; uncond uses the null class (row num_classes)."""
        if self.config.is_caption:
            raise ValueError("this VAR model is caption-conditioned; give it text CONDITIONING")
        ids = torch.as_tensor(class_ids, dtype=torch.long).reshape(-1).to(self.device)
        if uncond:
            ids = torch.full_like(ids, self.config.num_classes)
        elif ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.config.num_classes):
            raise ValueError(f"class id must lie in [0, {self.config.num_classes})")
        return VARCondition(self.class_emb(ids))

    def caption_condition(
        self, cond: Conditioning | None, drop: Tensor | None = None, batch: int = 0
    ) -> VARCondition:
        """Text features -> condition rows. Rows where `drop` [B] is set (caption dropout in
        training), or every row when `cond` is None (`batch` rows), take the learned null caption."""
        cfg = self.config
        if not cfg.is_caption:
            raise ValueError("this VAR model is class-conditioned; it takes a class id, not text")
        dev, dt = self.device, self.dtype
        if cond is None:
            pooled = self.null_pooled[None].expand(batch, -1)
            tokens = None if cfg.caption_dim == 0 else self.null_tokens[None].expand(batch, -1, -1)
            valid = None if tokens is None else torch.ones(batch, 1, dtype=torch.bool, device=dev)
        else:
            if cond.pooled.shape[-1] != cfg.pooled_dim or (
                cfg.caption_dim and cond.tokens.shape[-1] != cfg.caption_dim
            ):
                raise ValueError(
                    f"text features are {cond.tokens.shape[-1]}-dim tokens / {cond.pooled.shape[-1]}-dim pooled "
                    f"but this VAR model expects {cfg.caption_dim} / {cfg.pooled_dim} "
                    "(use the text encoder it was trained with)"
                )
            pooled = cond.pooled.to(dev, dt)
            tokens = None if cfg.caption_dim == 0 else cond.tokens.to(dev, dt)
            valid = None if tokens is None else cond.mask.to(dev).bool()
            if drop is not None:
                drop = drop.to(dev).bool()
                pooled = torch.where(drop[:, None], self.null_pooled[None].to(dt), pooled)
                if tokens is not None:
                    null = torch.zeros_like(tokens)
                    null[:, :1] = self.null_tokens.to(dt)
                    tokens = torch.where(drop[:, None, None], null, tokens)
                    first = torch.zeros_like(valid)
                    first[:, 0] = True
                    valid = torch.where(drop[:, None], first, valid)
        vec = self.caption_pool(pooled.to(dt))
        if tokens is None:
            return VARCondition(vec)
        return VARCondition(vec, self.caption_proj(tokens.to(dt)), valid)

    # ---- the transformer ---------------------------------------------------------------------
    def level_pos(self) -> Tensor:
        """[1, L, C]: level plus position embedding of every token."""
        lv = self.config.levels().to(self.device)
        return self.lvl_embed(lv)[None] + self.pos_1LC

    def start_tokens(self, cond: VARCondition) -> Tensor:
        """Scale 0's input [R, first_l, C]: the condition vector plus `pos_start` (before level/pos)."""
        return cond.vec[:, None].expand(-1, self.config.first_l, -1) + self.pos_start

    def run_blocks(
        self, x: Tensor, cond: VARCondition, mask: Tensor | None, caches: list[list[Tensor]] | None
    ) -> Tensor:
        h = x.to(self.dtype)
        vec = cond.vec.to(self.dtype)
        for i, block in enumerate(self.blocks):
            h = block(h, vec, mask, None if caches is None else caches[i])
        return h

    def logits(self, h: Tensor, cond: VARCondition) -> Tensor:
        """Hidden states [R, l, C] -> fp32 logits [R, l, V]."""
        return self.head(self.head_nm(h, cond.vec.to(h.dtype))).float()

    def forward(self, cond: VARCondition, inputs: Tensor) -> Tensor:
        """Teacher forcing: `inputs` [R, L - first_l, cvae] (the tokenizer's `teacher_inputs`) ->
        fp32 logits [R, L, V] for every scale's tokens, under the block-causal mask."""
        cfg = self.config
        x = torch.cat([self.start_tokens(cond), self.word_embed(inputs.to(self.dtype))], dim=1)
        x = x + self.level_pos()[:, : x.shape[1]]
        levels = cfg.levels().to(self.device)[: x.shape[1]]
        t = cond.prefix_len
        if t:
            x = torch.cat([cond.prefix.to(x.dtype), x], dim=1)
            levels = torch.cat([torch.full((t,), -1, dtype=torch.long, device=self.device), levels])
            ones = torch.ones(cond.rows, x.shape[1] - t, dtype=torch.bool, device=self.device)
            valid = torch.cat([cond.prefix_valid.to(self.device), ones], dim=1)
        else:
            valid = None
        mask = attention_mask(levels, levels, valid)
        h = self.run_blocks(x, cond, mask, None)
        return self.logits(h[:, t:], cond)


# ---------------------------------------------------------------- conditions for a batch


def condition_rows(
    model: VAR,
    batch: int,
    *,
    positive: Conditioning | None = None,
    negative: Conditioning | None = None,
    class_ids: Tensor | int | list[int] | None = None,
    cfg: bool = True,
) -> VARCondition:
    """The condition of `batch` images, with CFG's uncond rows appended when `cfg`.

    Caption models: the positive's rows (one caption broadcast to the batch), uncond rows from
    `negative` or the learned null caption. Class models: `class_ids` (one id broadcast), uncond
    rows from the null class.
    """
    if model.config.is_caption:
        if positive is None:
            raise ValueError("this VAR model is caption-conditioned and needs a positive CONDITIONING")
        rows = _fit(model.caption_condition(positive), batch, "positive conditioning")
        if not cfg:
            return rows
        neg = (
            model.caption_condition(None, batch=batch)
            if negative is None
            else _fit(model.caption_condition(negative), batch, "negative conditioning")
        )
        return VARCondition.cat(rows, neg)
    if class_ids is None:
        raise ValueError("this VAR model is class-conditioned and needs a class id")
    ids = torch.as_tensor(class_ids, dtype=torch.long).reshape(-1)
    if ids.shape[0] == 1:
        ids = ids.expand(batch)
    elif ids.shape[0] != batch:
        raise ValueError(f"{ids.shape[0]} class ids do not match batch {batch}")
    rows = model.class_condition(ids)
    return VARCondition.cat(rows, model.class_condition(ids, uncond=True)) if cfg else rows


def _fit(c: VARCondition, batch: int, what: str) -> VARCondition:
    if c.rows == batch:
        return c
    if c.rows != 1:
        raise ValueError(f"{what} has batch {c.rows}, which does not match batch {batch}")
    return VARCondition(
        c.vec.expand(batch, -1),
        None if c.prefix is None else c.prefix.expand(batch, -1, -1),
        None if c.prefix_valid is None else c.prefix_valid.expand(batch, -1),
    )


def teacher_forced_logits(
    model: VAR, quantizer: MultiScaleQuantizer, cond: VARCondition, tokens: MultiScaleTokens
) -> Tensor:
    """Logits [B, L, V] of `model` predicting every scale of `tokens` (all scales) from the
    coarser ones, i.e. the training objective's input; `tokens.flat()` is the target."""
    if tokens.patch_nums != tuple(model.config.patch_nums):
        raise ValueError(f"tokens have scales {list(tokens.patch_nums)}, the model {model.config.patch_nums}")
    return model(cond, quantizer.teacher_inputs(tokens.to(model.device).maps))


# ---------------------------------------------------------------- sampling, scale by scale


def _guide(logits: Tensor, batch: int, scale: float | None) -> Tensor:
    if logits.shape[0] == batch or scale is None:
        return logits[:batch]
    cond, uncond = logits[:batch], logits[batch:]
    return uncond + scale * (cond - uncond)


@torch.no_grad()
def sample_scales(
    model: VAR,
    quantizer: MultiScaleQuantizer,
    cond: VARCondition,
    batch: int,
    *,
    cfg: float = 1.0,
    schedule: str = "linear",
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    source: MultiScaleTokens | None = None,
    keep_scales: int = 0,
    use_cache: bool = True,
    callback: Callback | None = None,
) -> tuple[MultiScaleTokens, Tensor]:
    """Generate every scale of `batch` images; returns (token maps, final f_hat [B, cvae, H, W]).

    `cond` holds `batch` rows, or 2·batch when guiding (uncond rows second); scale k is guided
    by `guidance_scales(schedule, cfg, K)[k]` ("linear" is VAR's ramp). temperature <= 0 is
    greedy. The first `keep_scales` scales are taken from `source` instead of sampled (a
    variation keeps the source's composition). Image k draws from seed + k only, one uniform
    per token whether or not its scale is kept. `use_cache=False` recomputes the whole sequence
    per scale (the reference). `callback` gets {"i", "total", "tokens" (maps so far), "f_hat"}
    after each scale.
    """
    mc = model.config
    k_total = len(mc.patch_nums)
    if list(quantizer.patch_nums) != list(mc.patch_nums) or quantizer.config.z_channels != mc.cvae:
        raise ValueError(
            f"the tokenizer (scales {list(quantizer.patch_nums)}, dim {quantizer.config.z_channels}) does not "
            f"fit the VAR model (scales {mc.patch_nums}, dim {mc.cvae})"
        )
    if quantizer.config.vocab_size != mc.vocab_size:
        raise ValueError(
            f"the tokenizer has {quantizer.config.vocab_size} codes, the VAR model {mc.vocab_size}"
        )
    if cond.rows not in (batch, 2 * batch):
        raise ValueError(f"condition has {cond.rows} rows for batch {batch}")
    keep_scales = max(0, min(int(keep_scales), k_total))
    if keep_scales:
        if source is None:
            raise ValueError("keep_scales needs source tokens")
        if source.num_scales < keep_scales or source.patch_nums[:keep_scales] != tuple(
            mc.patch_nums[:keep_scales]
        ):
            raise ValueError(
                f"source tokens have scales {list(source.patch_nums)}; keeping {keep_scales} needs "
                f"the model's first {keep_scales}: {mc.patch_nums[:keep_scales]}"
            )
        source = source.expand(batch).to(model.device)
    guided = cond.rows == 2 * batch
    scales = guidance_scales(schedule, cfg, k_total).tolist() if guided else [None] * k_total
    dev = model.device
    noise = ImageNoise(seed, batch).uniform(mc.seq_len, device=dev)
    bounds = mc.scale_bounds()
    lvl_pos = model.level_pos()
    t = cond.prefix_len
    prefix_levels = torch.full((t,), -1, dtype=torch.long, device=dev)
    all_levels = torch.cat([prefix_levels, mc.levels().to(dev)])
    prefix_valid = cond.prefix_valid.to(dev) if t else None

    x = model.start_tokens(cond) + lvl_pos[:, : mc.first_l]
    inputs = [x]  # every scale's input so far (the no-cache path recomputes from these)
    caches: list[list[Tensor]] | None = [[] for _ in model.blocks] if use_cache else None
    f_hat = quantizer.empty_fhat(batch, dev)
    maps: list[Tensor] = []
    for si, pn in enumerate(mc.patch_nums):
        b0, b1 = bounds[si]
        if use_cache:
            step_x = torch.cat([cond.prefix.to(x.dtype), x], 1) if (si == 0 and t) else x
            q_levels = all_levels[t + b0 : t + b1] if not (si == 0 and t) else all_levels[: t + b1]
            k_levels = all_levels[: t + b1]
            valid = None
            if t:
                ones = torch.ones(cond.rows, b1, dtype=torch.bool, device=dev)
                valid = torch.cat([prefix_valid, ones], 1)
            mask = attention_mask(q_levels, k_levels, valid) if (t or si == 0) else None
            h = model.run_blocks(step_x, cond, mask, caches)[:, -(pn * pn) :]
        else:
            seq = torch.cat(([cond.prefix.to(x.dtype)] if t else []) + inputs, 1)
            lv = all_levels[: t + b1]
            valid = None
            if t:
                valid = torch.cat([prefix_valid, torch.ones(cond.rows, b1, dtype=torch.bool, device=dev)], 1)
            h = model.run_blocks(seq, cond, attention_mask(lv, lv, valid), None)[:, -(pn * pn) :]
        logits = _guide(model.logits(h, cond), batch, scales[si])
        if si < keep_scales:
            ids = source.maps[si].reshape(batch, -1)
        elif temperature <= 0:
            ids = logits.argmax(-1)
        else:
            ids = draw(token_probs(logits, temperature, top_k, top_p), noise[:, b0:b1])
        ids_map = ids.view(batch, pn, pn)
        maps.append(ids_map)
        f_hat = quantizer.add_scale(f_hat, ids_map, si)
        if callback is not None:
            callback({"i": si, "total": k_total, "tokens": MultiScaleTokens(tuple(maps)), "f_hat": f_hat})
        if si + 1 < k_total:
            nb0, nb1 = bounds[si + 1]
            x = model.word_embed(quantizer.next_input(f_hat, si).to(model.dtype)) + lvl_pos[:, nb0:nb1]
            if guided:
                x = torch.cat([x, x])
            inputs.append(x)
    return MultiScaleTokens(tuple(maps)), f_hat


# ---------------------------------------------------------------- files

_BLOCK = re.compile(r"^blocks\.(\d+)\.")
_IGNORED = ("lvl_1L", "attn_bias_for_masking")


def _patch_nums_from(sd: dict[str, Tensor], raw: dict) -> list[int]:
    """Scale sizes: metadata, else VAR's `lvl_1L` buffer (the level of every position), else
    the one square list the level and position tables allow (VAR's ten, or 1..K); else refused."""
    if "patch_nums" in raw:
        return [int(p) for p in raw["patch_nums"]]
    n_levels = int(sd["lvl_embed.weight"].shape[0])
    seq = int(sd["pos_1LC"].shape[1])
    lvl = sd.get("lvl_1L")
    if lvl is not None and lvl.device.type != "meta":
        counts = torch.bincount(lvl.reshape(-1).long(), minlength=n_levels).tolist()
        sides = [math.isqrt(c) for c in counts]
        if all(s * s == c and s > 0 for s, c in zip(sides, counts)):
            return sides
    if n_levels == len(DEFAULT_PATCH_NUMS) and seq == sum(p * p for p in DEFAULT_PATCH_NUMS):
        return list(DEFAULT_PATCH_NUMS)
    if seq == sum(p * p for p in range(1, n_levels + 1)):
        return list(range(1, n_levels + 1))
    raise ValueError(
        f"{n_levels} scales over {seq} positions is not VAR's scale list and the scale sizes are not stored: "
        "set 'patch_nums' in the file's 'tessera.config' metadata (or --config for tessera convert)"
    )


def infer_var_config(sd: dict[str, Tensor], metadata: dict[str, str] | None = None) -> VARConfig:
    """A `VARConfig` from tensor shapes, then overridden by any `tessera.config` metadata.

    Depth counts `blocks.N`; width, vocab, codebook dim and FFN width are shapes; the head count
    is the length of `scale_mul_1H11` (l2-normalised attention, as VAR's releases have), else
    VAR's rule (heads = depth when width = 64·depth), else refused; scale sizes see
    `_patch_nums_from`.
    """
    raw = json.loads(metadata["tessera.config"]) if metadata and "tessera.config" in metadata else {}
    if not isinstance(raw, dict):
        raise TypeError("metadata 'tessera.config' is not a JSON object")
    if "blocks.0.ada_gss" in sd:
        raise ValueError("shared AdaLN (shared_aln=True) is not supported")
    width, cvae = sd["word_embed.weight"].shape
    depth = 1 + max(int(m.group(1)) for k in sd if (m := _BLOCK.match(k)))
    l2 = "blocks.0.attn.scale_mul_1H11" in sd
    if "heads" in raw:
        heads = int(raw["heads"])
    elif l2:
        heads = int(sd["blocks.0.attn.scale_mul_1H11"].shape[1])
    elif width == 64 * depth:
        heads = depth
    else:
        raise ValueError(
            f"the head count cannot be read from a width-{width}, depth-{depth} model without l2-normalised "
            "attention: set 'heads' in the file's 'tessera.config' metadata (or --config for tessera convert)"
        )
    cfg = VARConfig(
        depth=depth,
        width=int(width),
        heads=heads,
        ffn_hidden=int(sd["blocks.0.ffn.fc1.weight"].shape[0]),
        vocab_size=int(sd["head.weight"].shape[0]),
        cvae=int(cvae),
        patch_nums=_patch_nums_from(sd, raw),
        attn_l2_norm=l2,
    )
    if "class_emb.weight" in sd:
        cfg.num_classes = int(sd["class_emb.weight"].shape[0]) - 1
    else:
        cfg.num_classes = 0
        cfg.pooled_dim = int(sd["caption_pool.fc1.weight"].shape[1])
        if "caption_proj.fc1.weight" in sd:
            cfg.caption_dim = int(sd["caption_proj.fc1.weight"].shape[1])
    for key, value in raw.items():
        if key in VARConfig.__dataclass_fields__:
            setattr(cfg, key, value)
    return cfg


_REQUIRED = (
    "word_embed.weight",
    "pos_1LC",
    "lvl_embed.weight",
    "blocks.0.attn.mat_qkv.weight",
    "head.weight",
)


def var_from_state_dict(
    sd: dict[str, Tensor], metadata: dict[str, str] | None = None, path: str | Path = "<state dict>"
) -> VAR:
    """Build a VAR sized from `sd` (see `infer_var_config`) and load it."""
    for key in _REQUIRED:
        if key not in sd:
            raise CheckpointError(path, "missing tensor (not a VAR-layout model?)", key)
    if "class_emb.weight" not in sd and "caption_pool.fc1.weight" not in sd:
        raise CheckpointError(
            path, "missing condition embedding (class table or caption projection)", "class_emb.weight"
        )
    try:
        cfg = infer_var_config(sd, metadata)
        with torch.device("meta"):
            model = VAR(cfg)
    except (ValueError, TypeError, KeyError, ZeroDivisionError) as e:
        raise CheckpointError(path, f"cannot size a VAR model from this file ({e})") from None
    assign_checked(model, sd, path, ignored=_IGNORED)
    return model


def load_var(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> VAR:
    """Load a VAR transformer (FoundationVision layout, or ours with a caption path) from `.safetensors`."""
    sd, metadata = read_safetensors(path)
    wrong_family(sd, path, "VAR transformer")
    return var_from_state_dict(sd, metadata, path).to(device, dtype)


def var_config_metadata(cfg: VARConfig) -> dict[str, str]:
    return {"tessera.config": json.dumps(asdict(cfg))}


def save_var(model: VAR, path: str | Path, card: str | None = None) -> None:
    """Write a VAR model with its config in `tessera.config` (and a model card in `tessera.card`)."""
    metadata = var_config_metadata(model.config)
    if card:
        metadata["tessera.card"] = card
    write_safetensors(path, model.state_dict(), metadata)
