"""Llama-style GPT over VQ tokens in the LlamaGen layout (class- or caption-conditioned).

Pre-RMSNorm blocks with SwiGLU feed-forward, fused `wqkv` attention (optionally
grouped-query) and 2-D RoPE over the token grid. The condition is a prefix of
`cls_token_num` embeddings: one class embedding, or caption features projected by
`cls_embedding.cap_proj`. The module keeps gpt-fast's shape: `setup_caches` allocates a
static KV cache once and `forward(x, input_pos)` runs any slice of the sequence.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import CheckpointError, assign_checked, read_safetensors, write_safetensors
from .conditioning import Conditioning
from .layouts import wrong_family

# LlamaGen's sizes by width (gpt.py GPT_models): dim -> heads. Shapes give dim but not heads.
LLAMAGEN_HEADS = {768: 12, 1024: 16, 1280: 20, 1536: 24, 2048: 32, 2560: 40, 3200: 32, 4096: 32}


@dataclass
class GPTConfig:
    dim: int = 1280
    n_layer: int = 36
    n_head: int = 20
    n_kv_head: int = 20
    ffn_hidden: int = 3584  # LlamaGen: find_multiple(int(8 * dim / 3), 256)
    vocab_size: int = 16384
    num_classes: int = 1000  # class models; 0 for caption models
    caption_dim: int = 0  # caption models (2048 for LlamaGen's flan-t5-xl); 0 for class models
    cls_token_num: int = 1  # 1 for class models, 120 for LlamaGen t2i
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    grid_size: int = 16  # the square token grid the model was trained on (a default, not a limit)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def is_caption(self) -> bool:
        return self.caption_dim > 0


def find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - n % k


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class KVCache(nn.Module):
    """Static per-layer cache [B, n_kv_head, max_seq, head_dim], written in place at `input_pos`."""

    def __init__(
        self,
        batch: int,
        max_seq: int,
        n_kv_head: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        super().__init__()
        shape = (batch, n_kv_head, max_seq, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        self.k_cache.index_copy_(2, input_pos, k)
        self.v_cache.index_copy_(2, input_pos, v)
        return self.k_cache, self.v_cache


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate pairs of x [B, S, H, Dh] by freqs [S, Dh/2, 2] (cos, sin), computed in fp32."""
    xs = x.float().reshape(*x.shape[:-1], -1, 2)
    f = freqs.view(1, xs.shape[1], 1, xs.shape[3], 2)
    out = torch.stack(
        [xs[..., 0] * f[..., 0] - xs[..., 1] * f[..., 1], xs[..., 1] * f[..., 0] + xs[..., 0] * f[..., 1]], -1
    )
    return out.flatten(3).type_as(x)


def rope_2d(grid_h: int, grid_w: int, head_dim: int, base: float, prefix: int) -> torch.Tensor:
    """(cos, sin) table [prefix + H*W, head_dim/2, 2] in raster order: half the pairs turn with
    the row, half with the column.

    The prefix rows are zeros, not the identity rotation: LlamaGen's table does this, which
    zeroes q and k of condition tokens; its weights were trained that way, so we keep it.
    """
    half = head_dim // 2
    inv = 1.0 / (base ** (torch.arange(0, half, 2)[: half // 2].float() / half))
    rows = torch.outer(torch.arange(grid_h).float(), inv)  # [H, Dh/4]
    cols = torch.outer(torch.arange(grid_w).float(), inv)  # [W, Dh/4]
    ang = torch.cat([rows[:, None, :].expand(-1, grid_w, -1), cols[None, :, :].expand(grid_h, -1, -1)], -1)
    table = torch.stack([ang.cos(), ang.sin()], -1).flatten(0, 1)
    return torch.cat([torch.zeros(prefix, head_dim // 2, 2), table])


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.wqkv = nn.Linear(cfg.dim, (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_head * cfg.head_dim, cfg.dim, bias=False)
        self.kv_cache: KVCache | None = None

    def forward(
        self,
        x: torch.Tensor,
        freqs: torch.Tensor,
        input_pos: torch.Tensor,
        mask: torch.Tensor,
        use_cache: bool = True,
    ) -> torch.Tensor:
        b, s, _ = x.shape
        kv = self.n_kv_head * self.head_dim
        q, k, v = self.wqkv(x).split([self.n_head * self.head_dim, kv, kv], dim=-1)
        q = apply_rope(q.view(b, s, self.n_head, self.head_dim), freqs).transpose(1, 2)
        k = apply_rope(k.view(b, s, self.n_kv_head, self.head_dim), freqs).transpose(1, 2)
        v = v.view(b, s, self.n_kv_head, self.head_dim).transpose(1, 2)
        if use_cache and self.kv_cache is not None:
            k, v = self.kv_cache.update(input_pos, k, v)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, enable_gqa=self.n_kv_head != self.n_head
        )
        return self.wo(out.transpose(1, 2).reshape(b, s, -1))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(cfg.dim, cfg.ffn_hidden)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x, freqs, input_pos, mask, use_cache: bool = True) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), freqs, input_pos, mask, use_cache)
        return h + self.feed_forward(self.ffn_norm(h))


class ClassEmbedder(nn.Module):
    """`embedding_table` with num_classes + 1 rows; the last row is the null (CFG) class."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, dim)


class CaptionProjection(nn.Module):
    def __init__(self, cin: int, dim: int):
        super().__init__()
        self.fc1 = nn.Linear(cin, dim, bias=False)
        self.fc2 = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class CaptionEmbedder(nn.Module):
    """`cap_proj` MLP plus `uncond_embedding` [cls_token_num, caption_dim], the learned null caption."""

    def __init__(self, caption_dim: int, dim: int, token_num: int):
        super().__init__()
        self.cap_proj = CaptionProjection(caption_dim, dim)
        self.register_buffer("uncond_embedding", torch.zeros(token_num, caption_dim))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        if cfg.is_caption:
            self.cls_embedding: nn.Module = CaptionEmbedder(cfg.caption_dim, cfg.dim, cfg.cls_token_num)
        else:
            self.cls_embedding = ClassEmbedder(cfg.num_classes, cfg.dim)
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.freqs: torch.Tensor | None = None
        self.mask: torch.Tensor | None = None
        self.grid: tuple[int, int] | None = None

    @property
    def prefix_len(self) -> int:
        return self.config.cls_token_num

    # ---- condition prefix -------------------------------------------------------------------
    def class_prefix(self, class_ids: torch.Tensor, uncond: bool = False) -> torch.Tensor:
        """[B] class ids -> [B, 1, dim]; uncond uses the null row (index num_classes)."""
        if self.config.is_caption:
            raise ValueError("this AR model is caption-conditioned; give it text CONDITIONING")
        table = self.cls_embedding.embedding_table
        if uncond:
            class_ids = torch.full_like(class_ids, self.config.num_classes)
        elif class_ids.min() < 0 or class_ids.max() >= self.config.num_classes:
            raise ValueError(f"class id must lie in [0, {self.config.num_classes})")
        return table(class_ids.to(table.weight.device)).unsqueeze(1)

    def caption_features(self, cond: Conditioning) -> tuple[torch.Tensor, torch.Tensor]:
        """Fit text features to the prefix: [B, T, caption_dim] features and [B, T] valid mask.

        Valid tokens are kept in order, truncated to T = cls_token_num and right-aligned
        (left padding), which is how LlamaGen feeds T5 features by default.
        """
        cfg = self.config
        if not cfg.is_caption:
            raise ValueError("this AR model is class-conditioned; it takes a class id, not text")
        tok, mask = cond.tokens, cond.mask.bool()
        if tok.shape[-1] != cfg.caption_dim:
            raise ValueError(
                f"text features are {tok.shape[-1]}-dim but this AR model expects {cfg.caption_dim} "
                "(use the text encoder it was trained with)"
            )
        b, t = tok.shape[0], cfg.cls_token_num
        out = torch.zeros(b, t, cfg.caption_dim, dtype=tok.dtype, device=tok.device)
        valid = torch.zeros(b, t, dtype=torch.bool, device=tok.device)
        for i in range(b):
            feats = tok[i][mask[i]][:t]
            n = feats.shape[0]
            if n:
                out[i, t - n :] = feats
                valid[i, t - n :] = True
        return out, valid

    def caption_prefix(self, features: torch.Tensor) -> torch.Tensor:
        """[B, T, caption_dim] -> [B, T, dim] through `cap_proj`."""
        w = self.cls_embedding.cap_proj.fc1.weight
        return self.cls_embedding.cap_proj(features.to(w.device, w.dtype))

    def uncond_features(self, batch: int) -> torch.Tensor:
        """The learned null caption, [B, T, caption_dim]."""
        u = self.cls_embedding.uncond_embedding
        return u.unsqueeze(0).expand(batch, -1, -1)

    # ---- caches ---------------------------------------------------------------------------
    def setup_caches(
        self,
        batch: int,
        grid_h: int,
        grid_w: int,
        key_valid: torch.Tensor | None = None,
        dtype: torch.dtype | None = None,
        allocate_kv: bool = True,
    ) -> None:
        """Allocate the static KV cache, the RoPE table for this grid and the attention mask.

        `key_valid` [batch, prefix_len] marks real condition tokens (text padding is False).
        The mask is causal, hides invalid prefix keys, and keeps the diagonal so a padding
        row still attends to something (LlamaGen does the same).
        """
        p = self.tok_embeddings.weight
        dtype = dtype or p.dtype
        seq = self.prefix_len + grid_h * grid_w
        max_seq = find_multiple(seq, 8)
        cfg = self.config
        for layer in self.layers:
            old = layer.attention.kv_cache
            if not allocate_kv:
                layer.attention.kv_cache = None
            elif (
                old is None
                or old.k_cache.shape != (batch, cfg.n_kv_head, max_seq, cfg.head_dim)
                or old.k_cache.dtype != dtype
            ):
                layer.attention.kv_cache = KVCache(
                    batch, max_seq, cfg.n_kv_head, cfg.head_dim, dtype, p.device
                )
            # a reused cache keeps stale entries; the causal mask hides them until overwritten
        freqs = rope_2d(grid_h, grid_w, cfg.head_dim, cfg.rope_base, self.prefix_len)
        freqs = torch.cat([freqs, torch.zeros(max_seq - seq, *freqs.shape[1:])]).to(p.device)
        keys = torch.ones(batch, max_seq, dtype=torch.bool, device=p.device)
        if key_valid is not None:
            keys[:, : self.prefix_len] = key_valid.to(p.device)
        causal = torch.ones(max_seq, max_seq, dtype=torch.bool, device=p.device).tril()
        eye = torch.eye(max_seq, dtype=torch.bool, device=p.device)
        mask = ((causal[None] & keys[:, None, :]) | eye[None]).unsqueeze(1)  # [B, 1, S, S]
        # refill in place when the shapes repeat, so a CUDA-graph step sees the same tensors
        if self.freqs is not None and self.freqs.shape == freqs.shape and self.mask.shape == mask.shape:
            self.freqs.copy_(freqs)
            self.mask.copy_(mask)
        else:
            self.freqs, self.mask = freqs, mask
        self.grid = (grid_h, grid_w)

    def clear_caches(self) -> None:
        for layer in self.layers:
            layer.attention.kv_cache = None
        self.freqs = self.mask = self.grid = None

    # ---- forward ----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, input_pos: torch.Tensor, use_cache: bool = True) -> torch.Tensor:
        """Embeddings x [B, S, dim] at sequence positions `input_pos` [S] -> fp32 logits [B, S, vocab].

        With the cache, keys/values land in it and attention spans the whole static length
        (masked); with use_cache=False, x must be the full sequence from position 0.
        """
        if self.freqs is None or self.mask is None:
            raise RuntimeError("call setup_caches(...) before running the GPT")
        freqs = self.freqs[input_pos]
        if use_cache and self.layers[0].attention.kv_cache is not None:
            mask = self.mask[: x.shape[0], :, input_pos]
        else:
            mask = self.mask[: x.shape[0], :, input_pos][..., input_pos]
        h = x
        for layer in self.layers:
            h = layer(h, freqs, input_pos, mask, use_cache)
        return self.output(self.norm(h)).float()

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.tok_embeddings(ids)


_LAYER = re.compile(r"^layers\.(\d+)\.")


def infer_gpt_config(sd: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> GPTConfig:
    """A `GPTConfig` from tensor shapes, then overridden by any `tessera.config` metadata.

    Head count is not visible in the shapes, so it comes from metadata, else LlamaGen's
    size table by width, else the file is refused; kv heads then follow from the `wqkv` rows.
    """
    raw = json.loads(metadata["tessera.config"]) if metadata and "tessera.config" in metadata else {}
    if not isinstance(raw, dict):
        raise TypeError("metadata 'tessera.config' is not a JSON object")
    vocab, dim = sd["tok_embeddings.weight"].shape
    n_layer = 1 + max(int(m.group(1)) for k in sd if (m := _LAYER.match(k)))
    if "n_head" in raw:
        n_head = int(raw["n_head"])
    elif dim in LLAMAGEN_HEADS:
        n_head = LLAMAGEN_HEADS[dim]
    else:  # a guess (dim // 64) would load without error and generate noise
        raise ValueError(
            f"width {dim} is not one of LlamaGen's sizes ({', '.join(map(str, LLAMAGEN_HEADS))}), so the "
            "head count cannot be inferred: set 'n_head' in the file's 'tessera.config' metadata"
        )
    head_dim = dim // n_head
    qkv_rows = sd["layers.0.attention.wqkv.weight"].shape[0]
    n_kv_head = (qkv_rows - dim) // (2 * head_dim)
    cfg = GPTConfig(
        dim=dim,
        n_layer=n_layer,
        n_head=n_head,
        n_kv_head=n_kv_head,
        ffn_hidden=sd["layers.0.feed_forward.w1.weight"].shape[0],
        vocab_size=vocab,
    )
    if "cls_embedding.cap_proj.fc1.weight" in sd:
        cfg.caption_dim = sd["cls_embedding.cap_proj.fc1.weight"].shape[1]
        cfg.num_classes = 0
        u = sd.get("cls_embedding.uncond_embedding")
        cfg.cls_token_num = u.shape[0] if u is not None else 120
        cfg.grid_size = 32  # LlamaGen t2i: 512 px through a 16x tokenizer
    elif "cls_embedding.embedding_table.weight" in sd:
        cfg.num_classes = sd["cls_embedding.embedding_table.weight"].shape[0] - 1
        cfg.cls_token_num = 1
    for key, value in raw.items():
        if key in GPTConfig.__dataclass_fields__:
            setattr(cfg, key, value)
    return cfg


def gpt_from_state_dict(
    sd: dict[str, torch.Tensor], metadata: dict[str, str] | None = None, path: str | Path = "<state dict>"
) -> GPT:
    """Build a GPT sized from `sd` (see `infer_gpt_config`) and load it."""
    wrong_family(sd, path, "LlamaGen GPT")
    for key in ("tok_embeddings.weight", "layers.0.attention.wqkv.weight", "layers.0.feed_forward.w1.weight"):
        if key not in sd:
            raise CheckpointError(path, "missing tensor (not a LlamaGen-layout GPT?)", key)
    if "cls_embedding.cap_proj.fc1.weight" not in sd and "cls_embedding.embedding_table.weight" not in sd:
        raise CheckpointError(
            path,
            "missing condition embedding (class table or caption projection)",
            "cls_embedding.embedding_table.weight",
        )
    try:
        cfg = infer_gpt_config(sd, metadata)
        if cfg.dim % cfg.n_head or cfg.head_dim % 4 or cfg.n_kv_head <= 0 or cfg.n_head % cfg.n_kv_head:
            raise ValueError(f"dim {cfg.dim}, {cfg.n_head} heads and {cfg.n_kv_head} kv heads do not fit")
        model = GPT(cfg)
    except (ValueError, TypeError, KeyError, ZeroDivisionError) as e:
        raise CheckpointError(path, f"cannot size a GPT from this file ({e})") from None
    if cfg.is_caption and "cls_embedding.uncond_embedding" not in sd:
        raise CheckpointError(
            path, "caption model without its null caption for CFG", "cls_embedding.uncond_embedding"
        )
    assign_checked(model, sd, path, ignored=("freqs_cis", "causal_mask", "kv_cache"))
    return model


def load_gpt(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> GPT:
    """Load a LlamaGen-layout GPT from a `.safetensors` file."""
    sd, metadata = read_safetensors(path)
    return gpt_from_state_dict(sd, metadata, path).to(device, dtype)


def gpt_config_metadata(cfg: GPTConfig) -> dict[str, str]:
    return {"tessera.config": json.dumps(asdict(cfg))}


def save_gpt(model: GPT, path: str | Path, card: str | None = None) -> None:
    """Write a GPT in the LlamaGen layout with its config in `tessera.config` (and a model card)."""
    metadata = gpt_config_metadata(model.config)
    if card:
        metadata["tessera.card"] = card
    write_safetensors(path, model.state_dict(), metadata)
