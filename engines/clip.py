"""The CLIP text transformer (CLIP-L/14 as Flux and SD use it): token ids -> hidden states + pooled vector.

Pre-LayerNorm encoder layers under a causal mask, quick-GELU MLPs (plain GELU for OpenCLIP's
bigG), learned absolute positions over 77 tokens. The pooled output is the final-LayerNorm
hidden state at the first end-of-text token, which is what Flux feeds its `vector_in`.

Parameter names follow Hugging Face's `CLIPTextModel` (`text_model.encoder.layers.N.self_attn.q_proj`),
the layout of ComfyUI's `clip_l.safetensors`, of diffusers' `text_encoder/` and of the HF repos,
so a state dict loads without renaming. Heads are not visible in the shapes: they come from a
`config.json`, `tessera.config` metadata, or the table of known CLIP widths.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Known CLIP text towers by width: (heads, activation). ViT-B (512), ViT-L (768), ViT-H (1024), bigG (1280).
KNOWN_WIDTHS: dict[int, tuple[int, str]] = {
    512: (8, "quick_gelu"),
    768: (12, "quick_gelu"),
    1024: (16, "gelu"),
    1280: (20, "gelu"),
}


@dataclass(frozen=True)
class CLIPTextConfig:
    """Every size of the text tower; the defaults are OpenAI CLIP ViT-L/14's."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    bos_token_id: int = 49406
    eos_token_id: int = 49407

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
            )
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not one of {', '.join(_ACTIVATIONS)}")

    @classmethod
    def from_dict(cls, d: dict) -> CLIPTextConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def quick_gelu(x: Tensor) -> Tensor:
    return x * torch.sigmoid(1.702 * x)


_ACTIVATIONS = {
    "quick_gelu": quick_gelu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
}


class CLIPAttention(nn.Module):
    def __init__(self, c: CLIPTextConfig):
        super().__init__()
        d = c.hidden_size
        self.heads = c.num_attention_heads
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        q, k, v = (
            p(x).view(b, n, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(out.transpose(1, 2).flatten(2))


class CLIPMLP(nn.Module):
    def __init__(self, c: CLIPTextConfig):
        super().__init__()
        self.act = _ACTIVATIONS[c.hidden_act]
        self.fc1 = nn.Linear(c.hidden_size, c.intermediate_size)
        self.fc2 = nn.Linear(c.intermediate_size, c.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, c: CLIPTextConfig):
        super().__init__()
        self.self_attn = CLIPAttention(c)
        self.layer_norm1 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.mlp = CLIPMLP(c)
        self.layer_norm2 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEmbeddings(nn.Module):
    def __init__(self, c: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(c.vocab_size, c.hidden_size)
        self.position_embedding = nn.Embedding(c.max_position_embeddings, c.hidden_size)


class CLIPEncoder(nn.Module):
    def __init__(self, c: CLIPTextConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(c) for _ in range(c.num_hidden_layers))


class CLIPTextTransformer(nn.Module):
    def __init__(self, c: CLIPTextConfig):
        super().__init__()
        self.embeddings = CLIPEmbeddings(c)
        self.encoder = CLIPEncoder(c)
        self.final_layer_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)


class CLIPTextModel(nn.Module):
    """Token ids [B, L] (L ≤ 77) -> (hidden states [B, L, D] after the final LayerNorm, pooled [B, D])."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.config = config
        self.text_model = CLIPTextTransformer(config)

    @property
    def device(self) -> torch.device:
        return self.text_model.final_layer_norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.text_model.final_layer_norm.weight.dtype

    def forward(self, ids: Tensor, eos_token_id: int | None = None) -> tuple[Tensor, Tensor]:
        """`eos_token_id` (the tokenizer's end-of-text id) picks the pooled token; default: the config's."""
        c, tm = self.config, self.text_model
        n = ids.shape[1]
        if n > c.max_position_embeddings:
            raise ValueError(f"{n} tokens is more than CLIP's {c.max_position_embeddings} positions")
        ids = ids.to(self.device)
        positions = torch.arange(n, device=ids.device)
        x = tm.embeddings.token_embedding(ids) + tm.embeddings.position_embedding(positions)[None]
        for layer in tm.encoder.layers:
            x = layer(x)
        x = tm.final_layer_norm(x)
        eos = c.eos_token_id if eos_token_id is None else eos_token_id
        return x, x[torch.arange(x.shape[0], device=x.device), eos_positions(ids, eos)]


def eos_positions(ids: Tensor, eos_token_id: int) -> Tensor:
    """Index of the pooled token per row: the first end-of-text token.

    Configs written before HF fixed `eos_token_id` say 2; for them the pooled token is the
    highest id, which in the real vocabulary is end-of-text (49407, the last entry).
    """
    if eos_token_id == 2:
        return ids.argmax(-1)
    return (ids == eos_token_id).int().argmax(-1)


def clip_config_from_weights(sd: dict[str, Tensor], overrides: dict) -> CLIPTextConfig:
    """Size a CLIP text tower from HF-layout tensor shapes; `overrides` (config.json / metadata) win.

    Raises ValueError naming `num_attention_heads` when the width is not a known CLIP width and
    no override gives the head count (a guess would load silently wrong).
    """
    vocab, width = sd["text_model.embeddings.token_embedding.weight"].shape
    layers = {int(k.split(".")[3]) for k in sd if k.startswith("text_model.encoder.layers.")}
    inferred: dict = dict(
        vocab_size=vocab,
        hidden_size=width,
        intermediate_size=sd["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=len(layers),
        max_position_embeddings=sd["text_model.embeddings.position_embedding.weight"].shape[0],
    )
    if width in KNOWN_WIDTHS:
        inferred["num_attention_heads"], inferred["hidden_act"] = KNOWN_WIDTHS[width]
    inferred.update({k: v for k, v in overrides.items() if k != "projection_dim"})
    if "num_attention_heads" not in inferred:
        raise ValueError(
            f"width {width} is not a known CLIP text size ({', '.join(map(str, KNOWN_WIDTHS))}), so the "
            "head count cannot be inferred: supply 'num_attention_heads' in a config.json beside the "
            "weights or in the file's 'tessera.config' metadata"
        )
    return CLIPTextConfig.from_dict(inferred)
