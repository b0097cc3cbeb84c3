"""The Flux.1 DiT: double-stream then single-stream transformer blocks, sized entirely by `FluxConfig`.

Parameter names follow Black Forest Labs' original layout (`double_blocks.N.img_attn.qkv`,
`single_blocks.N.linear1`, ...), which is the one layout this module knows. Checkpoints in
the diffusers `FluxTransformer2DModel` layout are converted to it by `load_dit`, and the config
is inferred from tensor names and shapes (plus `tessera.config` metadata for what shapes
cannot tell: patch size, RoPE axes, theta).

Numerics: weights and the residual stream run in the load dtype (bf16/fp16 on CUDA); norms,
RoPE and the timestep embedding are computed in fp32 because their small differences compound.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tessera.engines.attention import attention
from tessera.engines.checkpoint import (
    CheckpointError,
    assign_checked,
    metadata_config,
    require,
    write_safetensors,
)
from tessera.engines.conditioning import Conditioning
from tessera.engines.layouts import header_weights, read_weights, wrong_family
from tessera.engines.step_cache import StepCache


@dataclass(frozen=True)
class FluxConfig:
    """Every size of the network; the defaults are Flux.1-dev."""

    in_channels: int = 16  # latent channels (before patchifying)
    out_channels: int = 16
    patch_size: int = 2
    hidden_size: int = 3072
    num_heads: int = 24
    depth: int = 19  # double-stream blocks
    depth_single: int = 38  # single-stream blocks
    mlp_ratio: float = 4.0
    context_dim: int = 4096  # width of Conditioning.tokens
    vec_dim: int = 768  # width of Conditioning.pooled
    axes_dim: tuple[int, ...] = (16, 56, 56)  # RoPE dims per position axis; sums to head_dim
    theta: int = 10_000
    qkv_bias: bool = True
    guidance_embed: bool = True  # distilled-guidance input (dev: yes, schnell: no)

    def __post_init__(self) -> None:
        object.__setattr__(self, "axes_dim", tuple(int(a) for a in self.axes_dim))
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if sum(self.axes_dim) != self.head_dim or any(a % 2 for a in self.axes_dim):
            raise ValueError(f"axes_dim {self.axes_dim} must be even and sum to head_dim {self.head_dim}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @classmethod
    def from_dict(cls, d: dict) -> FluxConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def default_axes_dim(head_dim: int) -> tuple[int, int, int]:
    """Flux's split of a head into (index, row, column) RoPE axes, (16, 56, 56) at 128, scaled otherwise."""
    a = 2 * max(1, round(head_dim / 16))
    b = 2 * ((head_dim - a) // 4)
    return a, b, head_dim - a - b


# ---------------------------------------------------------------- embeddings and positions


def timestep_embedding(
    t: Tensor, dim: int = 256, max_period: float = 10_000.0, time_factor: float = 1000.0
) -> Tensor:
    """Sinusoidal embedding [cos | sin] of t∈[0,1] scaled by 1000, in fp32 (t is a fraction, not an index)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (t.float() * time_factor)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rope_cos_sin(ids: Tensor, axes_dim: tuple[int, ...], theta: int) -> tuple[Tensor, Tensor]:
    """Rotation angles for [L, n_axes] positions: each axis rotates its own slice of the head's dims."""
    # float64 keeps large angles (pos · ω) exact before the cos/sin; MPS has no float64.
    f64 = torch.float64 if ids.device.type != "mps" else torch.float32
    angles = []
    for axis, d in enumerate(axes_dim):
        omega = 1.0 / theta ** (torch.arange(0, d, 2, dtype=f64, device=ids.device) / d)
        angles.append(ids[:, axis].to(f64)[:, None] * omega[None])
    angle = torch.cat(angles, dim=-1)
    return angle.cos().float()[None, None], angle.sin().float()[None, None]  # [1, 1, L, head_dim/2]


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate adjacent pairs (x₂ᵢ, x₂ᵢ₊₁) of [B, H, L, D] by the position angles, in fp32.

    Written into one output buffer (no stacked temporaries): this runs twice per block.
    """
    pairs = x.float().unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    if torch.compiler.is_compiling():  # inductor fuses this anyway, and `out=` views break its graph
        rotated = (torch.mul(x0, cos).addcmul_(x1, sin, value=-1), torch.mul(x0, sin).addcmul_(x1, cos))
        return torch.stack(rotated, -1).flatten(-2).to(x.dtype)
    out = torch.empty(pairs.shape, dtype=torch.float32, device=x.device)
    torch.mul(x0, cos, out=out[..., 0]).addcmul_(x1, sin, value=-1)
    torch.mul(x0, sin, out=out[..., 1]).addcmul_(x1, cos)
    return out.flatten(-2).to(x.dtype)


def image_ids(h: int, w: int, device: torch.device) -> Tensor:
    """Positions (0, row, col) of an h×w token grid, row-major like `patchify`."""
    rows = torch.arange(h, device=device).repeat_interleave(w)
    cols = torch.arange(w, device=device).repeat(h)
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).float()


def patchify(x: Tensor, p: int) -> Tensor:
    """[B, C, H, W] → [B, (H/p)(W/p), C·p·p] with channels ordered (c, ph, pw) as Flux packs them."""
    b, c, h, w = x.shape
    return (
        x.view(b, c, h // p, p, w // p, p)
        .permute(0, 2, 4, 1, 3, 5)
        .reshape(b, (h // p) * (w // p), c * p * p)
    )


def unpatchify(tokens: Tensor, h: int, w: int, p: int) -> Tensor:
    """Inverse of `patchify` for an (h, w) token grid."""
    b = tokens.shape[0]
    c = tokens.shape[-1] // (p * p)
    return tokens.view(b, h, w, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h * p, w * p)


# ---------------------------------------------------------------- building blocks


def _layer_norm(x: Tensor) -> Tensor:
    """Affine-free LayerNorm (adaLN supplies scale and shift).

    torch's kernels take half-precision statistics in fp32 and round once, which is what an explicit
    fp32 round trip would give, minus two casts of the whole residual stream per norm.
    """
    return F.layer_norm(x, (x.shape[-1],), eps=1e-6)


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return (1 + scale) * _layer_norm(x) + shift


def _clip_fp16(x: Tensor) -> Tensor:
    """fp16 residual streams overflow in the deep single blocks; saturate instead of producing inf."""
    return x.clamp(-65504, 65504) if x.dtype == torch.float16 else x


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden)
        self.out_layer = nn.Linear(hidden, hidden)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype) * self.scale


class QKNorm(nn.Module):
    def __init__(self, head_dim: int):
        super().__init__()
        self.query_norm = RMSNorm(head_dim)
        self.key_norm = RMSNorm(head_dim)


class Modulation(nn.Module):
    """adaLN: the conditioning vector yields (shift, scale, gate) per sub-layer."""

    def __init__(self, dim: int, n_sets: int):
        super().__init__()
        self.n_sets = n_sets
        self.lin = nn.Linear(dim, 3 * n_sets * dim)

    def forward(self, vec: Tensor) -> list[tuple[Tensor, Tensor, Tensor]]:
        chunks = self.lin(F.silu(vec))[:, None, :].chunk(3 * self.n_sets, dim=-1)
        return [tuple(chunks[3 * i : 3 * i + 3]) for i in range(self.n_sets)]


def _split_heads(qkv: Tensor, heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """[B, L, 3·H·D] → three [B, H, L, D] (the fused layout is (qkv, head, dim))."""
    b, length, _ = qkv.shape
    q, k, v = qkv.view(b, length, 3, heads, -1).permute(2, 0, 3, 1, 4)
    return q, k, v


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, qkv_bias: bool):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.norm = QKNorm(dim // heads)
        self.proj = nn.Linear(dim, dim)

    def qkv_heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = _split_heads(self.qkv(x), self.heads)
        return self.norm.query_norm(q), self.norm.key_norm(k), v


def _mlp(dim: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))


def _attend(q: Tensor, k: Tensor, v: Tensor, pe: tuple[Tensor, Tensor], key_mask: Tensor | None) -> Tensor:
    q, k = apply_rope(q, *pe), apply_rope(k, *pe)
    return attention(q, k, v, key_mask).transpose(1, 2).flatten(2)  # [B, L, H·D]


class DoubleStreamBlock(nn.Module):
    """Text and image keep separate weights but attend jointly over the concatenated sequence."""

    def __init__(self, cfg: FluxConfig):
        super().__init__()
        d, h = cfg.hidden_size, cfg.num_heads
        self.img_mod, self.txt_mod = Modulation(d, 2), Modulation(d, 2)
        self.img_attn, self.txt_attn = SelfAttention(d, h, cfg.qkv_bias), SelfAttention(d, h, cfg.qkv_bias)
        self.img_mlp, self.txt_mlp = _mlp(d, cfg.mlp_hidden), _mlp(d, cfg.mlp_hidden)

    def forward(
        self, img: Tensor, txt: Tensor, vec: Tensor, pe, key_mask: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        (img_shift1, img_scale1, img_gate1), (img_shift2, img_scale2, img_gate2) = self.img_mod(vec)
        (txt_shift1, txt_scale1, txt_gate1), (txt_shift2, txt_scale2, txt_gate2) = self.txt_mod(vec)
        img_attn, txt_attn = self._attention(
            _modulate(img, img_shift1, img_scale1), _modulate(txt, txt_shift1, txt_scale1), pe, key_mask
        )
        img = img + img_gate1 * img_attn
        txt = txt + txt_gate1 * txt_attn
        del img_attn, txt_attn
        img = _clip_fp16(img + img_gate2 * self.img_mlp(_modulate(img, img_shift2, img_scale2)))
        txt = _clip_fp16(txt + txt_gate2 * self.txt_mlp(_modulate(txt, txt_shift2, txt_scale2)))
        return img, txt

    def _attention(self, img: Tensor, txt: Tensor, pe, key_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """Joint attention, projected per stream. A function of its own so that q, k, v and the
        projections' inputs are freed before the MLPs run (they would otherwise set the peak)."""
        img_q, img_k, img_v = self.img_attn.qkv_heads(img)
        txt_q, txt_k, txt_v = self.txt_attn.qkv_heads(txt)
        q, k, v = (torch.cat(pair, dim=2) for pair in ((txt_q, img_q), (txt_k, img_k), (txt_v, img_v)))
        del img_q, img_k, img_v, txt_q, txt_k, txt_v
        out = _attend(q, k, v, pe, key_mask)
        n = txt.shape[1]
        return self.img_attn.proj(out[:, n:]), self.txt_attn.proj(out[:, :n])


class SingleStreamBlock(nn.Module):
    """One weight set over [txt; img], attention and MLP in parallel from one fused input projection."""

    def __init__(self, cfg: FluxConfig):
        super().__init__()
        d = cfg.hidden_size
        self.heads, self.dim, self.mlp_hidden = cfg.num_heads, d, cfg.mlp_hidden
        self.linear1 = nn.Linear(d, 3 * d + cfg.mlp_hidden)
        self.linear2 = nn.Linear(d + cfg.mlp_hidden, d)
        self.norm = QKNorm(cfg.head_dim)
        self.modulation = Modulation(d, 1)

    def forward(self, x: Tensor, vec: Tensor, pe, key_mask: Tensor | None) -> Tensor:
        ((shift, scale, gate),) = self.modulation(vec)
        return _clip_fp16(x + gate * self.linear2(self._mixed(_modulate(x, shift, scale), pe, key_mask)))

    def _mixed(self, x: Tensor, pe, key_mask: Tensor | None) -> Tensor:
        """[attention | gelu(mlp)] from one projection; its temporaries die before linear2 runs."""
        h = self.linear1(x)
        del x
        q, k, v = _split_heads(h[..., : 3 * self.dim], self.heads)
        out = _attend(self.norm.query_norm(q), self.norm.key_norm(k), v, pe, key_mask)
        del q, k, v
        act = F.gelu(h[..., 3 * self.dim :], approximate="tanh")
        del h  # q, k, v and the MLP input share this buffer; free it before the concatenation
        return torch.cat([out, act], dim=-1)


class LastLayer(nn.Module):
    def __init__(self, dim: int, out_features: int):
        super().__init__()
        self.linear = nn.Linear(dim, out_features)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(vec)[:, None, :].chunk(2, dim=-1)
        return self.linear(_modulate(x, shift, scale))


def embed_inputs(
    model: nn.Module,
    img: Tensor,
    img_ids: Tensor,
    txt: Tensor,
    txt_ids: Tensor,
    t: Tensor,
    y: Tensor,
    guidance: Tensor | None,
    txt_mask: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """What the blocks of a DiT or of its ControlNet read (one path for both): image and text tokens
    embedded in the model's dtype, the vector of time, guidance (models with a guidance input) and
    pooled text, the RoPE table of the joint sequence, and the key mask hiding text padding (None
    when nothing is padded)."""
    dt = model.dtype
    vec = model.time_in(timestep_embedding(t).to(dt))
    if model.guidance_in is not None:
        vec = vec + model.guidance_in(timestep_embedding(guidance).to(dt))
    vec = vec + model.vector_in(y.to(dt))
    img, txt = model.img_in(img.to(dt)), model.txt_in(txt.to(dt))
    pe = rope_cos_sin(torch.cat([txt_ids, img_ids]), model.config.axes_dim, model.config.theta)
    key_mask = None
    if txt_mask is not None and not bool(txt_mask.all()):
        key_mask = torch.cat([txt_mask.bool(), txt_mask.new_ones(img.shape[:2], dtype=torch.bool)], dim=1)
    return img, txt, vec, pe, key_mask


class Flux(nn.Module):
    """Flow-matching DiT: predicts the velocity (noise − data) of a latent at time t∈[0,1]."""

    def __init__(self, config: FluxConfig):
        super().__init__()
        self.config = c = config
        d, p = c.hidden_size, c.patch_size
        self.img_in = nn.Linear(c.in_channels * p * p, d)
        self.time_in = MLPEmbedder(256, d)
        self.vector_in = MLPEmbedder(c.vec_dim, d)
        self.guidance_in = MLPEmbedder(256, d) if c.guidance_embed else None
        self.txt_in = nn.Linear(c.context_dim, d)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(c) for _ in range(c.depth))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(c) for _ in range(c.depth_single))
        self.final_layer = LastLayer(d, c.out_channels * p * p)

    @property
    def dtype(self) -> torch.dtype:
        return self.img_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.img_in.weight.device

    def forward_tokens(
        self,
        img: Tensor,
        img_ids: Tensor,
        txt: Tensor,
        txt_ids: Tensor,
        t: Tensor,
        y: Tensor,
        guidance: Tensor | None = None,
        txt_mask: Tensor | None = None,
        controlnet_double: list[Tensor | None] | None = None,
        controlnet_single: list[Tensor | None] | None = None,
        step_cache: StepCache | None = None,
    ) -> Tensor:
        """The network on packed tokens: img [B, N, C·p²], txt [B, L, context_dim], t and guidance [B].

        `controlnet_double` / `controlnet_single` hold one residual (or None) per block, added to the
        image tokens after that block: how a ControlNet steers the base model. `step_cache` (a
        sampler run's First-Block Cache) may skip every block after the first; it is not used
        together with a ControlNet, nor at threshold 0.
        """
        if self.guidance_in is not None and guidance is None:
            raise ValueError("this DiT was distilled with a guidance input; pass guidance (e.g. 3.5)")
        img, txt, vec, pe, key_mask = embed_inputs(self, img, img_ids, txt, txt_ids, t, y, guidance, txt_mask)
        double = controlnet_double or [None] * len(self.double_blocks)
        single = controlnet_single or [None] * len(self.single_blocks)
        cache = step_cache if step_cache is not None and step_cache.threshold > 0 else None
        if controlnet_double is not None or controlnet_single is not None or not len(self.double_blocks):
            cache = None
        for i, (block, residual) in enumerate(zip(self.double_blocks, double)):
            before = img
            img, txt = block(img, txt, vec, pe, key_mask)
            if residual is not None:
                img = img + residual.to(img.dtype)
            if i == 0 and cache is not None:
                first_out, first_residual = img, img - before
                if cache.reusable(first_residual):
                    return self.final_layer(cache.apply(first_out), vec)
        n = txt.shape[1]
        x = torch.cat([txt, img], dim=1)
        for block, residual in zip(self.single_blocks, single):
            x = block(x, vec, pe, key_mask)
            if residual is not None:
                x = torch.cat([x[:, :n], x[:, n:] + residual.to(x.dtype)], dim=1)
        if cache is not None:
            cache.store(first_residual, x[:, n:] - first_out)
        return self.final_layer(x[:, n:], vec)

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        context: Tensor,
        pooled: Tensor,
        guidance: Tensor | None = None,
        context_mask: Tensor | None = None,
        step_cache: StepCache | None = None,
    ) -> Tensor:
        """Velocity of latents x [B, C, H, W] at times t [B]; returned in x's dtype and shape."""
        p = self.config.patch_size
        h, w = x.shape[-2:]
        ph, pw = -h % p, -w % p
        xp = F.pad(x, (0, pw, 0, ph), mode="replicate") if ph or pw else x
        gh, gw = xp.shape[2] // p, xp.shape[3] // p
        txt_ids = torch.zeros(context.shape[1], 3, device=x.device)
        out = self.forward_tokens(
            patchify(xp, p),
            image_ids(gh, gw, x.device),
            context,
            txt_ids,
            t,
            pooled,
            guidance,
            context_mask,
            step_cache=step_cache,
        )
        return unpatchify(out, gh, gw, p)[:, :, :h, :w].to(x.dtype)


# ---------------------------------------------------------------- guidance: the DiT as a velocity model


def check_conditioning(model: Flux, cond: Conditioning, who: str) -> None:
    """Fail early, naming the node input, when a text encoder's widths do not fit this DiT."""
    c = model.config
    check_widths(c.context_dim, c.vec_dim, cond.tokens.shape[-1], cond.pooled.shape[-1], cond.source, who)


def check_widths(context_dim: int, vec_dim: int, tokens: int, pooled: int, source: str, who: str) -> None:
    """`check_conditioning` on widths alone (a DiT's text context and vector widths, a
    conditioning's token and pooled widths): what validation uses, before anything runs."""
    made_by = f" (made by {source})" if source else ""
    if tokens != context_dim:
        raise ValueError(
            f"{who}: conditioning tokens{made_by} are {tokens} wide but this DiT's text "
            f"context (txt_in) expects {context_dim}; use the text encoder that matches the model "
            "(Flux.1: T5-XXL tokens and CLIP-L pooled, from FluxTextEncode)"
        )
    if pooled != vec_dim:
        raise ValueError(
            f"{who}: pooled conditioning{made_by} is {pooled} wide but this DiT's vector "
            f"input (vector_in) expects {vec_dim}; use the text encoder that matches the model "
            "(Flux.1: T5-XXL tokens and CLIP-L pooled, from FluxTextEncode)"
        )


def _expand(cond: Conditioning, batch: int, who: str) -> Conditioning:
    if cond.batch == batch:
        return cond
    if cond.batch != 1:
        raise ValueError(f"{who}: conditioning batch {cond.batch} does not match latent batch {batch}")
    return Conditioning(
        cond.tokens.expand(batch, -1, -1), cond.pooled.expand(batch, -1), cond.mask.expand(batch, -1)
    )


def _stack(conds: list[Conditioning]) -> Conditioning:
    """Concatenate along the batch, padding shorter prompts with masked-out zero tokens."""
    length = max(c.tokens.shape[1] for c in conds)
    tokens, masks = [], []
    for c in conds:
        pad = length - c.tokens.shape[1]
        tokens.append(F.pad(c.tokens, (0, 0, 0, pad)))
        masks.append(F.pad(c.mask.bool(), (0, pad), value=False))
    return Conditioning(torch.cat(tokens), torch.cat([c.pooled for c in conds]), torch.cat(masks))


def guided_velocity(
    model: Flux,
    positive: Conditioning,
    negative: Conditioning | None = None,
    cfg: float = 1.0,
    guidance: float = 3.5,
    who: str = "DiT",
    step_cache: StepCache | None = None,
) -> Callable[[Tensor, Tensor], Tensor]:
    """A `model(x, sigma) -> velocity` for the samplers, with classifier-free guidance.

    With a negative prompt and cfg ≠ 1 both predictions come from ONE forward over the doubled
    batch: v = v_neg + cfg·(v_pos − v_neg). `guidance` feeds the distilled-guidance embedding
    of models that have one (a value carried by `positive`, set by FluxTextEncode, takes its place)
    and is ignored otherwise. Output is fp32 for the sampler arithmetic.
    `step_cache` (one per sampling run) lets steps reuse the DiT's deeper blocks (`step_cache.py`).
    """
    check_conditioning(model, positive, who + " positive")
    use_cfg = negative is not None and cfg != 1.0
    if use_cfg:
        check_conditioning(model, negative, who + " negative")
    dev, dt = model.device, model.dtype
    if positive.guidance is not None:
        guidance = positive.guidance
    positive = positive.to(dev, dt)
    negative = negative.to(dev, dt) if use_cfg else None

    n = 2 if use_cfg else 1
    batched: dict[int, tuple[Conditioning, Tensor | None, Tensor | None]] = {}

    def inputs_for(b: int) -> tuple[Conditioning, Tensor | None, Tensor | None]:
        """Stacked conditioning, key mask (None when nothing is padding) and guidance for batch b."""
        if b not in batched:
            conds = [_expand(positive, b, who)] + ([_expand(negative, b, who)] if use_cfg else [])
            cond = _stack(conds)
            mask = None if bool(cond.mask.all()) else cond.mask
            g = torch.full((n * b,), float(guidance), device=dev) if model.config.guidance_embed else None
            batched[b] = cond, mask, g
        return batched[b]

    def velocity(x: Tensor, sigma: Tensor) -> Tensor:
        cond, mask, g = inputs_for(x.shape[0])
        out = model(
            x.to(dev).repeat(n, 1, 1, 1),
            sigma.to(dev).repeat(n),
            cond.tokens,
            cond.pooled,
            g,
            mask,
            step_cache,
        )
        out = out.float()
        if not use_cfg:
            return out
        v_pos, v_neg = out.chunk(2)
        return v_neg + cfg * (v_pos - v_neg)

    return velocity


# ---------------------------------------------------------------- checkpoints

_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.")


def _strip_prefix(sd: dict[str, Tensor], marks: tuple[str, ...]) -> dict[str, Tensor]:
    """Drop a wrapper prefix (ComfyUI full checkpoints, diffusers pipelines) if the marks sit under one."""
    if any(m in sd for m in marks):
        return sd
    for prefix in _PREFIXES:
        if any(prefix + m in sd for m in marks):
            return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    return sd


def _count(sd: dict, pattern: str) -> int:
    rx = re.compile(pattern)
    return len({int(m.group(1)) for k in sd if (m := rx.match(k))})


def detect_dit_layout(sd: dict[str, Tensor]) -> str | None:
    """ "bfl", "diffusers", or None when the tensors are not a Flux DiT in either layout."""
    if "img_in.weight" in sd and "txt_in.weight" in sd:
        return "bfl"
    if "x_embedder.weight" in sd and "context_embedder.weight" in sd:
        return "diffusers"
    return None


def convert_diffusers_dit(
    sd: dict[str, Tensor], path: str | Path = "<state dict>", consume: bool = False
) -> dict[str, Tensor]:
    """Rename a diffusers `FluxTransformer2DModel` state dict to the BFL layout, fusing q/k/v(/mlp).

    `consume=True` empties `sd` as it goes, so a 24 GB checkpoint is never held twice.
    """
    src = sd if consume else dict(sd)
    out: dict[str, Tensor] = {}

    def take(key: str) -> Tensor:
        t = require(src, key, path)
        del src[key]
        return t

    def linear(dst: str, *names: str) -> None:
        """One BFL linear from one or more diffusers linears stacked along the output dim."""
        for suffix in ("weight", "bias"):
            if suffix == "bias" and names[0] + ".bias" not in src:
                continue
            parts = [(n + "." + suffix, take(n + "." + suffix)) for n in names]
            for key, t in parts[1:]:
                if t.shape[1:] != parts[0][1].shape[1:]:
                    raise CheckpointError(
                        path,
                        f"shape {tuple(t.shape)} cannot be fused with {parts[0][0]} {tuple(parts[0][1].shape)}",
                        key,
                    )
            out[f"{dst}.{suffix}"] = torch.cat([t for _, t in parts])

    linear("img_in", "x_embedder")
    linear("txt_in", "context_embedder")
    for ours, theirs in (
        ("time_in", "timestep_embedder"),
        ("vector_in", "text_embedder"),
        ("guidance_in", "guidance_embedder"),
    ):
        if theirs == "guidance_embedder" and f"time_text_embed.{theirs}.linear_1.weight" not in src:
            continue
        linear(f"{ours}.in_layer", f"time_text_embed.{theirs}.linear_1")
        linear(f"{ours}.out_layer", f"time_text_embed.{theirs}.linear_2")

    for i in range(_count(src, r"transformer_blocks\.(\d+)\.")):
        s, d = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        linear(d + "img_mod.lin", s + "norm1.linear")
        linear(d + "txt_mod.lin", s + "norm1_context.linear")
        linear(d + "img_attn.qkv", s + "attn.to_q", s + "attn.to_k", s + "attn.to_v")
        linear(d + "txt_attn.qkv", s + "attn.add_q_proj", s + "attn.add_k_proj", s + "attn.add_v_proj")
        out[d + "img_attn.norm.query_norm.scale"] = take(s + "attn.norm_q.weight")
        out[d + "img_attn.norm.key_norm.scale"] = take(s + "attn.norm_k.weight")
        out[d + "txt_attn.norm.query_norm.scale"] = take(s + "attn.norm_added_q.weight")
        out[d + "txt_attn.norm.key_norm.scale"] = take(s + "attn.norm_added_k.weight")
        linear(d + "img_attn.proj", s + "attn.to_out.0")
        linear(d + "txt_attn.proj", s + "attn.to_add_out")
        linear(d + "img_mlp.0", s + "ff.net.0.proj")
        linear(d + "img_mlp.2", s + "ff.net.2")
        linear(d + "txt_mlp.0", s + "ff_context.net.0.proj")
        linear(d + "txt_mlp.2", s + "ff_context.net.2")

    for i in range(_count(src, r"single_transformer_blocks\.(\d+)\.")):
        s, d = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        linear(d + "linear1", s + "attn.to_q", s + "attn.to_k", s + "attn.to_v", s + "proj_mlp")
        linear(d + "linear2", s + "proj_out")
        out[d + "norm.query_norm.scale"] = take(s + "attn.norm_q.weight")
        out[d + "norm.key_norm.scale"] = take(s + "attn.norm_k.weight")
        linear(d + "modulation.lin", s + "norm.linear")

    linear("final_layer.linear", "proj_out")
    # diffusers orders the final modulation (scale, shift); BFL orders it (shift, scale).
    for part in ("weight", "bias"):
        scale, shift = take(f"norm_out.linear.{part}").chunk(2)
        out[f"final_layer.adaLN_modulation.1.{part}"] = torch.cat([shift, scale])

    if src:
        raise CheckpointError(path, "unexpected tensor for a diffusers Flux transformer", min(src))
    return out


def infer_dit_config(
    sd: dict[str, Tensor], path: str | Path = "<state dict>", overrides: dict | None = None
) -> FluxConfig:
    """Read a FluxConfig off a BFL-layout state dict; `overrides` supply what shapes cannot tell."""
    overrides = dict(overrides or {})
    hidden, in_features = require(sd, "img_in.weight", path).shape
    depth = _count(sd, r"double_blocks\.(\d+)\.")
    depth_single = _count(sd, r"single_blocks\.(\d+)\.")
    if depth:
        head_dim = require(sd, "double_blocks.0.img_attn.norm.query_norm.scale", path).shape[0]
        mlp_hidden = require(sd, "double_blocks.0.img_mlp.0.weight", path).shape[0]
        qkv_bias = "double_blocks.0.img_attn.qkv.bias" in sd
    elif depth_single:
        head_dim = require(sd, "single_blocks.0.norm.query_norm.scale", path).shape[0]
        mlp_hidden = require(sd, "single_blocks.0.linear1.weight", path).shape[0] - 3 * hidden
        qkv_bias = True
    else:
        raise CheckpointError(path, "no transformer blocks found", "double_blocks.0.img_attn.qkv.weight")
    p = int(overrides.get("patch_size", 2))
    out_features = require(sd, "final_layer.linear.weight", path).shape[0]
    for key, n in (("img_in.weight", in_features), ("final_layer.linear.weight", out_features)):
        if n % (p * p):
            raise CheckpointError(path, f"{n} features do not divide into {p}x{p} patches", key)
    inferred = dict(
        in_channels=in_features // (p * p),
        out_channels=out_features // (p * p),
        patch_size=p,
        hidden_size=hidden,
        num_heads=hidden // head_dim,
        depth=depth,
        depth_single=depth_single,
        mlp_ratio=mlp_hidden / hidden,
        context_dim=require(sd, "txt_in.weight", path).shape[1],
        vec_dim=require(sd, "vector_in.in_layer.weight", path).shape[1],
        axes_dim=default_axes_dim(head_dim),
        qkv_bias=qkv_bias,
        guidance_embed="guidance_in.in_layer.weight" in sd,
    )
    inferred.update(overrides)
    try:
        return FluxConfig.from_dict(inferred)
    except (TypeError, ValueError) as e:
        raise CheckpointError(path, f"inconsistent DiT config ({e})") from None


# diffusers `FluxTransformer2DModel` config.json field -> FluxConfig field. A field the shapes also
# show is passed on too, so a config.json that contradicts its tensors fails on the tensor it names.
_DIFFUSERS_DIT_FIELDS = {
    "axes_dims_rope": "axes_dim",
    "num_attention_heads": "num_heads",
    "num_layers": "depth",
    "num_single_layers": "depth_single",
    "joint_attention_dim": "context_dim",
    "pooled_projection_dim": "vec_dim",
    "guidance_embeds": "guidance_embed",
}


def diffusers_dit_overrides(config_json: dict, patch_size: int = 2) -> dict:
    """The FluxConfig fields a diffusers transformer `config.json` sets (RoPE axes above all: shapes cannot tell them).

    diffusers packs 2x2 latent patches outside the model, so its `in_channels` (64) is our
    `in_channels * patch_size**2`.
    """
    out = {
        ours: config_json[theirs] for theirs, ours in _DIFFUSERS_DIT_FIELDS.items() if theirs in config_json
    }
    if "axes_dim" in out:
        out["axes_dim"] = tuple(out["axes_dim"])
    packed = patch_size * patch_size
    if isinstance(config_json.get("in_channels"), int):
        out["in_channels"] = config_json["in_channels"] // packed
        out["out_channels"] = (config_json.get("out_channels") or config_json["in_channels"]) // packed
    return out


def bfl_state_dict(sd: dict[str, Tensor], path: str | Path = "<state dict>") -> dict[str, Tensor]:
    """A Flux DiT state dict in the BFL layout, whatever wrapper prefix and layout it came in
    (`sd` is consumed when it needs converting); works on `meta` tensors too."""
    sd = _strip_prefix(sd, ("img_in.weight", "x_embedder.weight"))
    layout = detect_dit_layout(sd)
    if layout is None:
        raise CheckpointError(
            path,
            "not a Flux DiT checkpoint (neither BFL 'img_in.weight' nor diffusers 'x_embedder.weight' found)",
        )
    return convert_diffusers_dit(sd, path, consume=True) if layout == "diffusers" else sd


def dit_config(path: str | Path) -> FluxConfig:
    """The config `load_dit` would build, from the file headers alone (no tensor is read)."""
    sd, metadata, where = header_weights(path)
    wrong_family(sd, path, "Flux DiT", "all-in-one checkpoint")
    overrides = {**diffusers_dit_overrides(where.config), **metadata_config(metadata, path)}
    return infer_dit_config(bfl_state_dict(sd, path), path, overrides)


def dit_from_state_dict(
    sd: dict[str, Tensor],
    overrides: dict,
    path: str | Path = "<state dict>",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Flux:
    """A Flux DiT from a BFL- or diffusers-layout state dict; `overrides` set what shapes cannot tell."""
    sd = bfl_state_dict(sd, path)
    config = infer_dit_config(sd, path, overrides)
    with torch.device("meta"):
        model = Flux(config)
    assign_checked(model, sd, path, device, dtype)
    return model


def load_dit(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> Flux:
    """Load a Flux DiT in BFL or diffusers layout: a single file, or any shard of a diffusers
    `transformer/` folder, whose `config.json` is honoured (then `tessera.config` metadata)."""
    sd, metadata, where = read_weights(path)
    wrong_family(sd, path, "Flux DiT", "all-in-one checkpoint")
    overrides = {**diffusers_dit_overrides(where.config), **metadata_config(metadata, path)}
    return dit_from_state_dict(sd, overrides, path, device, dtype)


def save_dit(model: Flux, path: str | Path, card: str | None = None) -> None:
    """Write a DiT in the BFL layout with its config in the `tessera.config` metadata."""
    metadata = {"tessera.config": json.dumps(asdict(model.config))}
    if card:
        metadata["tessera.card"] = card
    write_safetensors(path, model.state_dict(), metadata)
