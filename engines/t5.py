"""The T5 encoder (T5 v1.1 and FLAN-T5): token ids -> per-token features for Flux and LlamaGen t2i.

Pre-norm blocks with RMS LayerNorm (no mean, no bias), unscaled dot-product attention with a
learned bias per relative-position bucket (shared by all blocks, owned by block 0), and a
gated-GELU feed-forward (a ReLU one for the original T5). Flux reads its T5-XXL output as the
DiT's text stream; LlamaGen's t2i GPT projects FLAN-T5-XL's output into its prefix.

fp16: T5's activations exceed fp16's range in the feed-forward, so the hidden state is clamped
after every sub-layer when running in fp16, as the reference implementation does.

Parameter names follow Hugging Face's `T5EncoderModel` (`encoder.block.N.layer.0.SelfAttention.q`),
the layout of ComfyUI's `t5xxl_fp16.safetensors`, diffusers' `text_encoder_2/` and the HF repos.
The head count and bucket count are visible in `relative_attention_bias`; only the bucket
`max_distance` (128 in every released T5) is not, and comes from config.json when present.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class T5Config:
    """Every size of the encoder; the defaults are T5 v1.1 XXL's (Flux's text_encoder_2)."""

    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    is_gated_act: bool = True  # v1.1 / FLAN: gated-GELU; original T5: ReLU
    dense_act_fn: str = "gelu_new"
    pad_token_id: int = 0
    eos_token_id: int = 1

    def __post_init__(self) -> None:
        if self.dense_act_fn not in _ACTIVATIONS:
            raise ValueError(f"dense_act_fn {self.dense_act_fn!r} is not one of {', '.join(_ACTIVATIONS)}")

    @classmethod
    def from_dict(cls, d: dict) -> T5Config:
        d = _with_ffn_fields(d)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def _with_ffn_fields(d: dict) -> dict:
    """HF config.json's `feed_forward_proj` ("gated-gelu", "relu") as our two fields; explicit
    `is_gated_act` / `dense_act_fn` in the same dict win."""
    d = dict(d)
    if "feed_forward_proj" in d:
        proj = str(d.pop("feed_forward_proj"))
        act = proj.removeprefix("gated-")
        d = {
            "is_gated_act": proj.startswith("gated-"),
            "dense_act_fn": "gelu_new" if act == "gelu" else act,
            **d,
        }
    return d


_ACTIVATIONS = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
}


def _clamp_fp16(x: Tensor) -> Tensor:
    if x.dtype != torch.float16:
        return x
    limit = torch.finfo(torch.float16).max - 1000
    return x.clamp(-limit, limit)


class T5LayerNorm(nn.Module):
    """RMS norm: scale only, statistics in fp32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return self.weight * (x.float() * torch.rsqrt(variance + self.eps)).to(self.weight.dtype)


def relative_position_bucket(relative: Tensor, num_buckets: int, max_distance: int) -> Tensor:
    """Bidirectional T5 buckets: half the buckets per direction; exact below num_buckets/4, then
    logarithmic up to max_distance, after which every distance shares the last bucket."""
    half = num_buckets // 2
    bucket = (relative > 0).long() * half
    n = relative.abs()
    max_exact = half // 2
    large = (
        max_exact
        + (
            torch.log(n.float().clamp(min=1) / max_exact)
            / math.log(max_distance / max_exact)
            * (half - max_exact)
        ).long()
    )
    large = large.clamp(max=half - 1)
    return bucket + torch.where(n < max_exact, n, large)


class T5Attention(nn.Module):
    def __init__(self, c: T5Config, has_relative_bias: bool):
        super().__init__()
        inner = c.num_heads * c.d_kv
        self.heads, self.c = c.num_heads, c
        self.q = nn.Linear(c.d_model, inner, bias=False)
        self.k = nn.Linear(c.d_model, inner, bias=False)
        self.v = nn.Linear(c.d_model, inner, bias=False)
        self.o = nn.Linear(inner, c.d_model, bias=False)
        if has_relative_bias:
            self.relative_attention_bias = nn.Embedding(c.relative_attention_num_buckets, c.num_heads)

    def position_bias(self, n: int, device: torch.device) -> Tensor:
        """[1, heads, n, n] additive bias from the (key − query) distance buckets, in fp32."""
        pos = torch.arange(n, device=device)
        buckets = relative_position_bucket(
            pos[None, :] - pos[:, None],
            self.c.relative_attention_num_buckets,
            self.c.relative_attention_max_distance,
        )
        return self.relative_attention_bias(buckets).float().permute(2, 0, 1)[None]

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        b, n, _ = x.shape
        q, k, v = (p(x).view(b, n, self.heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) + bias  # T5 does not scale by 1/√d
        weights = scores.softmax(-1).to(v.dtype)
        return self.o(torch.matmul(weights, v).transpose(1, 2).flatten(2))


class T5LayerSelfAttention(nn.Module):
    def __init__(self, c: T5Config, has_relative_bias: bool):
        super().__init__()
        self.SelfAttention = T5Attention(c, has_relative_bias)
        self.layer_norm = T5LayerNorm(c.d_model, c.layer_norm_epsilon)

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        return _clamp_fp16(x + self.SelfAttention(self.layer_norm(x), bias))


class T5DenseActDense(nn.Module):
    def __init__(self, c: T5Config):
        super().__init__()
        self.act, self.gated = _ACTIVATIONS[c.dense_act_fn], c.is_gated_act
        if c.is_gated_act:
            self.wi_0 = nn.Linear(c.d_model, c.d_ff, bias=False)
            self.wi_1 = nn.Linear(c.d_model, c.d_ff, bias=False)
        else:
            self.wi = nn.Linear(c.d_model, c.d_ff, bias=False)
        self.wo = nn.Linear(c.d_ff, c.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(self.wi_0(x)) * self.wi_1(x) if self.gated else self.act(self.wi(x))
        return self.wo(_clamp_fp16(h))


class T5LayerFF(nn.Module):
    def __init__(self, c: T5Config):
        super().__init__()
        self.DenseReluDense = T5DenseActDense(c)
        self.layer_norm = T5LayerNorm(c.d_model, c.layer_norm_epsilon)

    def forward(self, x: Tensor) -> Tensor:
        return _clamp_fp16(x + self.DenseReluDense(self.layer_norm(x)))


class T5Block(nn.Module):
    def __init__(self, c: T5Config, first: bool):
        super().__init__()
        self.layer = nn.ModuleList([T5LayerSelfAttention(c, first), T5LayerFF(c)])

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        return self.layer[1](self.layer[0](x, bias))


class T5Stack(nn.Module):
    def __init__(self, c: T5Config):
        super().__init__()
        self.block = nn.ModuleList(T5Block(c, i == 0) for i in range(c.num_layers))
        self.final_layer_norm = T5LayerNorm(c.d_model, c.layer_norm_epsilon)


class T5Encoder(nn.Module):
    """Token ids [B, L] and an optional key mask [B, L] -> features [B, L, d_model] (final RMS norm applied)."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = T5Stack(config)

    @property
    def device(self) -> torch.device:
        return self.shared.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.shared.weight.dtype

    def forward(self, ids: Tensor, mask: Tensor | None = None) -> Tensor:
        ids = ids.to(self.device)
        x = self.shared(ids)
        bias = self.encoder.block[0].layer[0].SelfAttention.position_bias(ids.shape[1], ids.device)
        if mask is not None:
            keep = mask.to(ids.device).bool()[:, None, None, :]
            bias = bias.masked_fill(~keep, torch.finfo(torch.float32).min)
        for block in self.encoder.block:
            x = block(x, bias)
        return self.encoder.final_layer_norm(x)


def t5_config_from_weights(sd: dict[str, Tensor], overrides: dict) -> T5Config:
    """Size a T5 encoder from HF-layout tensor shapes; `overrides` (config.json / metadata) win."""
    vocab, d_model = sd["shared.weight"].shape
    rel = sd["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    heads = rel.shape[1]
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in sd
    wi = "wi_0" if gated else "wi"
    inferred: dict = dict(
        vocab_size=vocab,
        d_model=d_model,
        d_kv=sd["encoder.block.0.layer.0.SelfAttention.q.weight"].shape[0] // heads,
        d_ff=sd[f"encoder.block.0.layer.1.DenseReluDense.{wi}.weight"].shape[0],
        num_layers=len({int(k.split(".")[2]) for k in sd if k.startswith("encoder.block.")}),
        num_heads=heads,
        relative_attention_num_buckets=rel.shape[0],
        is_gated_act=gated,
        dense_act_fn="gelu_new" if gated else "relu",
    )
    inferred.update(_with_ffn_fields(overrides))
    return T5Config.from_dict(inferred)
