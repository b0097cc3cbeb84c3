"""The built-in text encoder: a small character-level transformer shared by both paradigms.

Characters rather than sub-words so the generators can learn to spell: every letter of
a prompt reaches them as its own token. A prompt is lower-cased, UTF-8 encoded, given a
leading BOS (so even the empty prompt has one real token) and read by a few pre-norm
transformer encoder layers; the result is a `Conditioning` with per-character features,
a pooled vector (projected masked mean) and the padding mask.

Training: the encoder is pre-trained on its own, text only, then frozen while the DiT
and the GPT are trained on top of it. One frozen encoder is what lets a single
`TextEncode` node feed either generator; end-to-end training with one generator would
tie the encoder to it. The pretraining (masked characters plus scene attributes) is in
the lab (`lab/text_encoder_training.py`). The model is a plain `nn.Module`
and `encode` is differentiable, so fine-tuning it inside a generator's loop also works.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import CheckpointError, assign_checked, metadata_config, read_safetensors, write_safetensors
from .conditioning import Conditioning

PAD, BOS, MASK = 0, 1, 2
BYTE_OFFSET = 3  # byte b is token b + 3
VOCAB_SIZE = 256 + BYTE_OFFSET
CONFIG_KEY, CARD_KEY = "tessera.config", "tessera.card"


@dataclass
class TextEncoderConfig:
    max_length: int = 96  # tokens including BOS; longer prompts are truncated
    width: int = 192
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    context_dim: int = 192  # D of Conditioning.tokens (a DiT's context_dim, a GPT's caption_dim)
    pooled_dim: int = 192  # P of Conditioning.pooled

    def __post_init__(self) -> None:
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        if self.max_length < 2:
            raise ValueError("max_length must leave room for BOS and at least one character")

    @classmethod
    def from_dict(cls, data: Mapping) -> TextEncoderConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown text encoder config field(s): {', '.join(unknown)}")
        return cls(**data)


def tokenize(
    prompts: Sequence[str], max_length: int, pad_to: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts → (ids [B, L] long, mask [B, L] bool); L = `pad_to` or the longest prompt."""
    rows = [[BOS] + [b + BYTE_OFFSET for b in p.lower().encode("utf-8")][: max_length - 1] for p in prompts]
    length = pad_to if pad_to is not None else max((len(r) for r in rows), default=1)
    ids = torch.full((len(rows), length), PAD, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return ids, ids != PAD


class EncoderBlock(nn.Module):
    """Pre-norm self-attention + MLP; padding keys are masked out."""

    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
        x = x + self.proj(att.transpose(1, 2).reshape(b, n, c))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class TextEncoder(nn.Module):
    """Character-level transformer encoder producing `Conditioning`."""

    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.config = config
        c = config
        self.embed = nn.Embedding(VOCAB_SIZE, c.width)
        self.pos = nn.Parameter(torch.randn(c.max_length, c.width) * 0.02)
        self.blocks = nn.ModuleList(EncoderBlock(c.width, c.heads, c.mlp_ratio) for _ in range(c.depth))
        self.norm = nn.LayerNorm(c.width)
        self.token_proj = nn.Linear(c.width, c.context_dim)
        self.pooled_proj = nn.Linear(c.width, c.pooled_dim)
        nn.init.normal_(self.embed.weight, std=0.02)

    @property
    def device(self) -> torch.device:
        return self.pos.device

    def tokenize(self, prompts: Sequence[str], pad_to_max: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        return tokenize(prompts, self.config.max_length, self.config.max_length if pad_to_max else None)

    def hidden(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Final normalised hidden states [B, L, width]."""
        x = self.embed(ids) + self.pos[: ids.shape[1]]
        for block in self.blocks:
            x = block(x, mask)
        return self.norm(x)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> Conditioning:
        h = self.hidden(ids, mask)
        m = mask.unsqueeze(-1).to(h.dtype)
        pooled = self.pooled_proj((h * m).sum(1) / m.sum(1).clamp(min=1.0))
        # zero the padding so a consumer that ignores the mask still sees a deterministic value
        return Conditioning(self.token_proj(h) * m, pooled, mask)

    def encode(self, prompts: Sequence[str] | str, pad_to_max: bool = False) -> Conditioning:
        """Encode prompts on the model's device.

        L is the longest prompt (+ BOS) by default, so a DiT does not attend over padding;
        `pad_to_max` gives the fixed L = max_length that static shapes (CUDA graphs) want.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        ids, mask = self.tokenize(prompts, pad_to_max)
        return self(ids.to(self.device), mask.to(self.device))


# ---------------------------------------------------------------- files


def save_text_encoder(model: TextEncoder, path: str | Path, card: str | Mapping | None = None) -> None:
    """Write the weights as safetensors with the config (and a model card) in the metadata."""
    metadata = {CONFIG_KEY: json.dumps(asdict(model.config))}
    if card:
        metadata[CARD_KEY] = card if isinstance(card, str) else json.dumps(card)
    write_safetensors(path, model.state_dict(), metadata)


def load_text_encoder(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> TextEncoder:
    """Rebuild a saved encoder (eval mode, frozen); errors name the file and the key at fault."""
    tensors, metadata = read_safetensors(path)
    raw = metadata_config(metadata, path)
    if not raw:
        raise CheckpointError(path, f"no '{CONFIG_KEY}' metadata; not a Tessera text encoder file")
    try:
        config = TextEncoderConfig.from_dict(raw)
    except (TypeError, ValueError) as e:
        raise CheckpointError(path, f"invalid text encoder config in '{CONFIG_KEY}' metadata ({e})") from None
    # built on the CPU, not `meta`: the model is small, and meta init costs seconds of imports
    model = TextEncoder(config)
    assign_checked(model, tensors, path, device, dtype)
    return model


def model_card(path: str | Path) -> str:
    """The model card stored with a text encoder file ('' if none)."""
    return read_safetensors(path)[1].get(CARD_KEY, "")


def tiny_text_encoder(seed: int = 0) -> TextEncoder:
    """A random-weight encoder small enough for tests (context 32, pooled 16)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TextEncoder(
            TextEncoderConfig(width=32, depth=1, heads=2, context_dim=32, pooled_dim=16)
        ).eval()
