"""An independent reference for the GPT and the VQ tokenizer, written from LlamaGen's algorithm.

Why: our `engines/gpt.py` and `engines/vq.py` were otherwise only checked against themselves
(cached against uncached decoding share one forward). These functions compute the same
models straight from a state dict in LlamaGen's key layout (`autoregressive/models/gpt.py`,
`tokenizer/tokenizer_image/vq_model.py`), in float64, with no module classes and without
importing anything from `tessera`: RMSNorm, 2-D RoPE on interleaved pairs written with complex
numbers (zero rotation for the condition tokens), grouped-query attention by
`repeat_interleave`, SwiGLU, the caption MLP with tanh-GELU, the text-padding mask with its
kept diagonal, the l2-normalised codebook lookup and the taming conv stack (GroupNorm(32),
swish, asymmetric-pad stride-2 downsampling, nearest upsampling, single-head spatial
attention by `bmm`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


# ---- random weights in LlamaGen's key layout -------------------------------------------------
def gpt_state_dict(
    dim: int,
    n_layer: int,
    n_head: int,
    n_kv_head: int,
    hidden: int,
    vocab: int,
    *,
    num_classes: int = 0,
    caption_dim: int = 0,
    cls_token_num: int = 1,
    seed: int = 0,
    scale: float = 0.2,
) -> dict[str, Tensor]:
    """Random float32 tensors under the names LlamaGen's `Transformer` saves."""
    hd = dim // n_head
    shapes: dict[str, tuple] = {
        "tok_embeddings.weight": (vocab, dim),
        "norm.weight": (dim,),
        "output.weight": (vocab, dim),
    }
    if caption_dim:
        shapes["cls_embedding.cap_proj.fc1.weight"] = (dim, caption_dim)
        shapes["cls_embedding.cap_proj.fc2.weight"] = (dim, dim)
        shapes["cls_embedding.uncond_embedding"] = (cls_token_num, caption_dim)
    else:
        shapes["cls_embedding.embedding_table.weight"] = (num_classes + 1, dim)
    for i in range(n_layer):
        p = f"layers.{i}."
        shapes[p + "attention.wqkv.weight"] = ((n_head + 2 * n_kv_head) * hd, dim)
        shapes[p + "attention.wo.weight"] = (dim, n_head * hd)
        shapes[p + "feed_forward.w1.weight"] = (hidden, dim)
        shapes[p + "feed_forward.w3.weight"] = (hidden, dim)
        shapes[p + "feed_forward.w2.weight"] = (dim, hidden)
        shapes[p + "attention_norm.weight"] = (dim,)
        shapes[p + "ffn_norm.weight"] = (dim,)
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in shapes.items():
        if key.endswith("norm.weight"):  # norms near 1, so every layer matters and nothing explodes
            sd[key] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            sd[key] = scale * torch.randn(shape, generator=g)
    return sd


def vq_state_dict(
    ch: int,
    ch_mult: list[int],
    num_res_blocks: int,
    z_channels: int,
    n_codes: int,
    code_dim: int,
    seed: int = 0,
) -> dict[str, Tensor]:
    """Random float32 tensors under the names LlamaGen's `VQModel` saves (encoder and decoder share `ch_mult`)."""
    shapes: dict[str, tuple] = {}

    def conv(p: str, cin: int, cout: int, k: int) -> None:
        shapes[p + "weight"], shapes[p + "bias"] = (cout, cin, k, k), (cout,)

    def norm(p: str, c: int) -> None:
        shapes[p + "weight"], shapes[p + "bias"] = (c,), (c,)

    def res(p: str, cin: int, cout: int) -> None:
        norm(p + "norm1.", cin)
        conv(p + "conv1.", cin, cout, 3)
        norm(p + "norm2.", cout)
        conv(p + "conv2.", cout, cout, 3)
        if cin != cout:
            conv(p + "nin_shortcut.", cin, cout, 1)

    def attn(p: str, c: int) -> None:
        norm(p + "norm.", c)
        for n in ("q", "k", "v", "proj_out"):
            conv(f"{p}{n}.", c, c, 1)

    n = len(ch_mult)
    conv("encoder.conv_in.", 3, ch, 3)
    cin = ch
    for i, m in enumerate(ch_mult):
        for r in range(num_res_blocks):
            res(f"encoder.conv_blocks.{i}.res.{r}.", cin, ch * m)
            cin = ch * m
            if i == n - 1:
                attn(f"encoder.conv_blocks.{i}.attn.{r}.", cin)
        if i != n - 1:
            conv(f"encoder.conv_blocks.{i}.downsample.conv.", cin, cin, 3)
    res("encoder.mid.0.", cin, cin)
    attn("encoder.mid.1.", cin)
    res("encoder.mid.2.", cin, cin)
    norm("encoder.norm_out.", cin)
    conv("encoder.conv_out.", cin, z_channels, 3)
    conv("quant_conv.", z_channels, code_dim, 1)
    shapes["quantize.embedding.weight"] = (n_codes, code_dim)
    conv("post_quant_conv.", code_dim, z_channels, 1)
    c = ch * ch_mult[-1]
    conv("decoder.conv_in.", z_channels, c, 3)
    res("decoder.mid.0.", c, c)
    attn("decoder.mid.1.", c)
    res("decoder.mid.2.", c, c)
    for j, i in enumerate(reversed(range(n))):
        for r in range(num_res_blocks + 1):
            res(f"decoder.conv_blocks.{j}.res.{r}.", c, ch * ch_mult[i])
            c = ch * ch_mult[i]
            if i == n - 1:
                attn(f"decoder.conv_blocks.{j}.attn.{r}.", c)
        if i != 0:
            conv(f"decoder.conv_blocks.{j}.upsample.conv.", c, c, 3)
    norm("decoder.norm_out.", c)
    conv("decoder.conv_out.", c, 3, 3)

    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in shapes.items():
        if "norm" in key and key.endswith("weight"):
            sd[key] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif key.endswith("bias"):
            sd[key] = 0.05 * torch.randn(shape, generator=g)
        else:  # He-like scale so activations neither vanish nor blow up through the stack
            fan_in = math.prod(shape[1:])
            sd[key] = torch.randn(shape, generator=g) / math.sqrt(fan_in)
    return sd


# ---- GPT ---------------------------------------------------------------------------------------
def _rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _rotations(grid: int, head_dim: int, base: float, prefix: int) -> Tensor:
    """Complex rotations [prefix + grid*grid, head_dim/2]: pair j < head_dim/4 turns with the row,
    the rest with the column; condition tokens get 0 (LlamaGen's zero cos/sin rows)."""
    quarter = head_dim // 4
    inv = base ** (-torch.arange(quarter, dtype=torch.float64) * 2 / (head_dim // 2))
    rows = torch.arange(grid, dtype=torch.float64).repeat_interleave(grid)  # raster order
    cols = torch.arange(grid, dtype=torch.float64).repeat(grid)
    angle = torch.cat([rows[:, None] * inv, cols[:, None] * inv], -1)
    image = torch.polar(torch.ones_like(angle), angle)
    return torch.cat([torch.zeros(prefix, head_dim // 2, dtype=image.dtype), image])


def _rotate(x: Tensor, rot: Tensor) -> Tensor:
    """x [B, S, H, D] as D/2 complex numbers (x[2j] + i x[2j+1]) times rot [S, D/2]."""
    z = torch.complex(x[..., 0::2], x[..., 1::2]) * rot[None, :, None, :]
    return torch.stack([z.real, z.imag], -1).flatten(-2)


def gpt_logits(
    sd: dict[str, Tensor],
    n_head: int,
    prefix: Tensor,
    tokens: Tensor,
    grid: int,
    prefix_valid: Tensor | None = None,
    eps: float = 1e-5,
    base: float = 10000.0,
) -> Tensor:
    """Logits [B, T + N, vocab] for condition embeddings `prefix` [B, T, dim] followed by image
    tokens [B, N] (N <= grid*grid), computed over the whole sequence without a cache."""
    sd = {k: v.double() for k, v in sd.items()}
    x = torch.cat([prefix.double(), sd["tok_embeddings.weight"][tokens]], 1)
    b, s, dim = x.shape
    t = prefix.shape[1]
    head_dim = dim // n_head
    rot = _rotations(grid, head_dim, base, t)[:s]
    allowed = torch.ones(s, s, dtype=torch.bool).tril()[None].repeat(b, 1, 1)
    if prefix_valid is not None:  # text padding is hidden from every query, but each row sees itself
        allowed[:, :, :t] &= prefix_valid[:, None, :].bool()
        allowed |= torch.eye(s, dtype=torch.bool)[None]
    n_layer = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("layers."))
    for i in range(n_layer):
        p = f"layers.{i}."
        h = _rms_norm(x, sd[p + "attention_norm.weight"], eps)
        qkv = h @ sd[p + "attention.wqkv.weight"].T
        kv_heads = (qkv.shape[-1] - dim) // (2 * head_dim)
        q, k, v = qkv.split([dim, kv_heads * head_dim, kv_heads * head_dim], -1)
        q = _rotate(q.reshape(b, s, n_head, head_dim), rot).transpose(1, 2)
        k = _rotate(k.reshape(b, s, kv_heads, head_dim), rot).transpose(1, 2)
        v = v.reshape(b, s, kv_heads, head_dim).transpose(1, 2)
        k = k.repeat_interleave(n_head // kv_heads, dim=1)
        v = v.repeat_interleave(n_head // kv_heads, dim=1)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(head_dim)
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
        out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, dim)
        x = x + out @ sd[p + "attention.wo.weight"].T
        h = _rms_norm(x, sd[p + "ffn_norm.weight"], eps)
        gate = F.silu(h @ sd[p + "feed_forward.w1.weight"].T)
        x = x + (gate * (h @ sd[p + "feed_forward.w3.weight"].T)) @ sd[p + "feed_forward.w2.weight"].T
    return _rms_norm(x, sd["norm.weight"], eps) @ sd["output.weight"].T


def class_prefix(sd: dict[str, Tensor], class_ids: Tensor) -> Tensor:
    """LlamaGen's LabelEmbedder at eval: one row of the table per image, [B, 1, dim]."""
    return sd["cls_embedding.embedding_table.weight"].double()[class_ids][:, None]


def caption_prefix(sd: dict[str, Tensor], features: Tensor) -> Tensor:
    """LlamaGen's CaptionEmbedder: fc2(gelu_tanh(fc1(x))), no biases."""
    h = features.double() @ sd["cls_embedding.cap_proj.fc1.weight"].double().T
    return F.gelu(h, approximate="tanh") @ sd["cls_embedding.cap_proj.fc2.weight"].double().T


def left_pad(features: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """sample_t2i.py's left padding for right-padded T5 output: move the valid tokens to the end,
    flip the mask, and zero the padding features (`caption_embs * emb_masks[:, :, None]`)."""
    out, masks = [], []
    for f, m in zip(features, valid):
        n = int(m.sum())
        out.append(torch.cat([f[n:], f[:n]]))
        masks.append(torch.flip(m, dims=[-1]))
    masks = torch.stack(masks)
    return torch.stack(out) * masks[..., None], masks


def greedy_tokens(
    sd: dict[str, Tensor],
    n_head: int,
    cond: Tensor,
    uncond: Tensor,
    grid: int,
    cfg_scale: float,
    prefix_valid: Tensor | None = None,
) -> Tensor:
    """Greedy decoding with classifier-free guidance by full recomputation at every token:
    logits = uncond + s * (cond - uncond), argmax. Returns ids [B, grid*grid]."""
    b = cond.shape[0]
    prefix = torch.cat([cond, uncond])
    valid = None if prefix_valid is None else torch.cat([prefix_valid, prefix_valid])
    ids = torch.zeros(2 * b, 0, dtype=torch.long)
    for _ in range(grid * grid):
        last = gpt_logits(sd, n_head, prefix, ids, grid, valid)[:, -1]
        c, u = last[:b], last[b:]
        nxt = (u + cfg_scale * (c - u)).argmax(-1)
        ids = torch.cat([ids, torch.cat([nxt, nxt])[:, None]], 1)
    return ids[:b]


# ---- VQ ----------------------------------------------------------------------------------------
def _conv(sd: dict[str, Tensor], p: str, x: Tensor, stride: int = 1) -> Tensor:
    w = sd[p + "weight"]
    return F.conv2d(x, w, sd[p + "bias"], stride=stride, padding=w.shape[-1] // 2 if stride == 1 else 0)


def _group_norm(sd: dict[str, Tensor], p: str, x: Tensor, groups: int = 32) -> Tensor:
    b, c, h, w = x.shape
    g = x.reshape(b, groups, -1)
    g = (g - g.mean(-1, keepdim=True)) / torch.sqrt(g.var(-1, unbiased=False, keepdim=True) + 1e-6)
    return g.reshape(b, c, h, w) * sd[p + "weight"][None, :, None, None] + sd[p + "bias"][None, :, None, None]


def _swish(x: Tensor) -> Tensor:
    return x * torch.sigmoid(x)


def _resnet(sd: dict[str, Tensor], p: str, x: Tensor) -> Tensor:
    h = _conv(sd, p + "conv1.", _swish(_group_norm(sd, p + "norm1.", x)))
    h = _conv(sd, p + "conv2.", _swish(_group_norm(sd, p + "norm2.", h)))
    if p + "nin_shortcut.weight" in sd:
        x = _conv(sd, p + "nin_shortcut.", x)
    return x + h


def _spatial_attention(sd: dict[str, Tensor], p: str, x: Tensor) -> Tensor:
    b, c, h, w = x.shape
    n = _group_norm(sd, p + "norm.", x)
    q = _conv(sd, p + "q.", n).reshape(b, c, h * w).permute(0, 2, 1)
    k = _conv(sd, p + "k.", n).reshape(b, c, h * w)
    v = _conv(sd, p + "v.", n).reshape(b, c, h * w)
    weights = torch.softmax(torch.bmm(q, k) * c**-0.5, dim=2)
    out = torch.bmm(v, weights.permute(0, 2, 1)).reshape(b, c, h, w)
    return x + _conv(sd, p + "proj_out.", out)


def _count(sd: dict[str, Tensor], prefix: str) -> int:
    return len({k[len(prefix) :].split(".")[0] for k in sd if k.startswith(prefix)})


def _level(sd: dict[str, Tensor], p: str, h: Tensor) -> Tensor:
    attn = _count(sd, p + "attn.")
    for r in range(_count(sd, p + "res.")):
        h = _resnet(sd, f"{p}res.{r}.", h)
        if attn:
            h = _spatial_attention(sd, f"{p}attn.{r}.", h)
    if p + "downsample.conv.weight" in sd:
        h = _conv(sd, p + "downsample.conv.", F.pad(h, (0, 1, 0, 1)), stride=2)
    if p + "upsample.conv.weight" in sd:
        h = _conv(sd, p + "upsample.conv.", F.interpolate(h, scale_factor=2.0, mode="nearest"))
    return h


def _mid_and_levels(sd: dict[str, Tensor], part: str, h: Tensor, mid_first: bool) -> Tensor:
    def mid(h: Tensor) -> Tensor:
        h = _resnet(sd, f"{part}.mid.0.", h)
        h = _spatial_attention(sd, f"{part}.mid.1.", h)
        return _resnet(sd, f"{part}.mid.2.", h)

    if mid_first:
        h = mid(h)
    for i in range(_count(sd, f"{part}.conv_blocks.")):
        h = _level(sd, f"{part}.conv_blocks.{i}.", h)
    if not mid_first:
        h = mid(h)
    return h


def _codebook(sd: dict[str, Tensor]) -> Tensor:
    return F.normalize(sd["quantize.embedding.weight"].double(), p=2, dim=-1)


def vq_latent(sd: dict[str, Tensor], images: Tensor) -> Tensor:
    """Encoder then quant_conv: [B, 3, H, W] in [-1, 1] -> unquantised latents [B, D, h, w]."""
    sd = {k: v.double() for k, v in sd.items()}
    h = _conv(sd, "encoder.conv_in.", images.double())
    h = _mid_and_levels(sd, "encoder", h, mid_first=False)
    h = _conv(sd, "encoder.conv_out.", _swish(_group_norm(sd, "encoder.norm_out.", h)))
    return _conv(sd, "quant_conv.", h)


def vq_distances(sd: dict[str, Tensor], latents: Tensor) -> Tensor:
    """Squared distances [B, h, w, n_codes] between l2-normalised latents and l2-normalised codes."""
    z = F.normalize(latents.permute(0, 2, 3, 1), p=2, dim=-1)
    e = _codebook(sd)
    return (z[..., None, :] - e).pow(2).sum(-1)


def vq_encode(sd: dict[str, Tensor], images: Tensor) -> Tensor:
    """[B, 3, H, W] -> code ids [B, h, w] (nearest l2-normalised code)."""
    return vq_distances(sd, vq_latent(sd, images)).argmin(-1)


def vq_decode(sd: dict[str, Tensor], ids: Tensor) -> Tensor:
    """Code ids [B, h, w] -> images [B, 3, H, W] (unclamped, as LlamaGen's decode_code)."""
    z = _codebook(sd)[ids].permute(0, 3, 1, 2)
    sd = {k: v.double() for k, v in sd.items()}
    h = _conv(sd, "decoder.conv_in.", _conv(sd, "post_quant_conv.", z))
    h = _mid_and_levels(sd, "decoder", h, mid_first=True)
    return _conv(sd, "decoder.conv_out.", _swish(_group_norm(sd, "decoder.norm_out.", h)))
