"""VQ image tokenizer in the LlamaGen (taming-style VQGAN) layout: image <-> grid of codebook ids.

The module tree mirrors LlamaGen's `tokenizer/tokenizer_image/vq_model.py` so its state
dicts load by name (`encoder.conv_blocks.N.res.M.…`, `quantize.embedding.weight`, …);
the sizes come from a `VQConfig` that is read from the file's `tessera.config` metadata
or inferred from tensor shapes.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import CheckpointError, assign_checked, read_safetensors, write_safetensors
from .conv_blocks import AttnBlock, Downsample, ResnetBlock, Upsample, group_norm
from .layouts import wrong_family


@dataclass
class VQConfig:
    """Sizes of a LlamaGen VQ model (defaults: VQ-16, 16x downsampling, 16384 codes of dim 8)."""

    in_channels: int = 3
    channels: int = 128
    ch_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    decoder_ch_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    num_res_blocks: int = 2  # the decoder has one more per level, as in LlamaGen
    attn_deepest: bool = True  # attention blocks at the deepest level (besides the mid block)
    z_channels: int = 256
    codebook_size: int = 16384
    codebook_dim: int = 8
    codebook_l2_norm: bool = True
    norm_groups: int = 32

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


class Level(nn.Module):
    """One resolution level: `res.M`, optional `attn.M`, then a `downsample` or `upsample`."""

    def __init__(self, cin: int, cout: int, n_res: int, attn: bool, resample: str | None, groups: int):
        super().__init__()
        self.res = nn.ModuleList(ResnetBlock(cin if i == 0 else cout, cout, groups) for i in range(n_res))
        self.attn = nn.ModuleList(AttnBlock(cout, groups) for _ in range(n_res if attn else 0))
        if resample == "down":
            self.downsample = Downsample(cout)
        elif resample == "up":
            self.upsample = Upsample(cout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for i, res in enumerate(self.res):
            h = res(h)
            if len(self.attn):
                h = self.attn[i](h)
        if hasattr(self, "downsample"):
            h = self.downsample(h)
        if hasattr(self, "upsample"):
            h = self.upsample(h)
        return h


def _mid(c: int, groups: int) -> nn.ModuleList:
    return nn.ModuleList([ResnetBlock(c, c, groups), AttnBlock(c, groups), ResnetBlock(c, c, groups)])


class Encoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        ch, mult, n, g = cfg.channels, cfg.ch_mult, len(cfg.ch_mult), cfg.norm_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)
        cins = [ch] + [ch * m for m in mult[:-1]]
        self.conv_blocks = nn.ModuleList(
            Level(
                cins[i],
                ch * mult[i],
                cfg.num_res_blocks,
                cfg.attn_deepest and i == n - 1,
                "down" if i != n - 1 else None,
                g,
            )
            for i in range(n)
        )
        c = ch * mult[-1]
        self.mid = _mid(c, g)
        self.norm_out = group_norm(c, g)
        self.conv_out = nn.Conv2d(c, cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for block in self.conv_blocks:
            h = block(h)
        for block in self.mid:
            h = block(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        ch, mult, n, g = cfg.channels, cfg.decoder_ch_mult, len(cfg.decoder_ch_mult), cfg.norm_groups
        c = ch * mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, c, 3, padding=1)
        self.mid = _mid(c, g)
        levels = []
        for j, i in enumerate(reversed(range(n))):  # deepest level first, as LlamaGen numbers them
            levels.append(
                Level(
                    c,
                    ch * mult[i],
                    cfg.num_res_blocks + 1,
                    cfg.attn_deepest and j == 0,
                    "up" if i != 0 else None,
                    g,
                )
            )
            c = ch * mult[i]
        self.conv_blocks = nn.ModuleList(levels)
        self.norm_out = group_norm(c, g)
        self.conv_out = nn.Conv2d(c, cfg.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        for block in self.mid:
            h = block(h)
        for block in self.conv_blocks:
            h = block(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Quantizer(nn.Module):
    """Nearest-codebook lookup; with l2 norm both latents and codes are unit vectors (cosine match)."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.l2_norm = cfg.codebook_l2_norm
        self.embedding = nn.Embedding(cfg.codebook_size, cfg.codebook_dim)

    def codebook(self) -> torch.Tensor:
        w = self.embedding.weight.float()
        return F.normalize(w, dim=-1) if self.l2_norm else w

    def ids(self, z: torch.Tensor) -> torch.Tensor:
        """[B, D, h, w] latents -> [B, h, w] ids (fp32 distances: bf16 would flip near-ties)."""
        z = z.float().permute(0, 2, 3, 1)
        if self.l2_norm:
            z = F.normalize(z, dim=-1)
        e = self.codebook()
        d = (z * z).sum(-1, keepdim=True) + (e * e).sum(-1) - 2 * z @ e.t()
        return d.argmin(-1)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """[B, h, w] ids -> [B, D, h, w] code vectors."""
        return self.codebook()[ids].permute(0, 3, 1, 2)


class VQModel(nn.Module):
    """Image <-> token grid. Pixels are [-1, 1] here; nodes convert from IMAGE's 0..1."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = Quantizer(cfg)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.codebook_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.codebook_dim, cfg.z_channels, 1)

    @property
    def downsample(self) -> int:
        return self.config.downsample

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [-1, 1] (H, W multiples of `downsample`) -> [B, H/f, W/f] long ids."""
        f = self.downsample
        if images.shape[-1] % f or images.shape[-2] % f:
            raise ValueError(f"image size {tuple(images.shape[-2:])} is not a multiple of {f}")
        p = next(self.parameters())
        h = self.quant_conv(self.encoder(images.to(p.device, p.dtype)))
        return self.quantize.ids(h)

    @torch.no_grad()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """[B, h, w] ids -> [B, 3, h*f, w*f] in [-1, 1]."""
        p = next(self.parameters())
        if ids.min() < 0 or ids.max() >= self.config.codebook_size:
            raise ValueError(f"token ids must lie in [0, {self.config.codebook_size})")
        z = self.quantize.lookup(ids.to(p.device)).to(p.dtype)
        return self.decoder(self.post_quant_conv(z)).float().clamp(-1, 1)

    @torch.no_grad()
    def decode_partial(self, ids: torch.Tensor, known: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """Decode a grid of which only `known` ([B, h, w] bool) positions mean anything.

        Unknown positions get grey (`fill`, in [-1, 1]) in pixel space, so a preview shows
        what has been generated so far rather than whatever id 0 decodes to.
        """
        img = self.decode(torch.where(known, ids, torch.zeros_like(ids)))
        f = self.downsample
        m = known.to(img.device, img.dtype).repeat_interleave(f, 1).repeat_interleave(f, 2)[:, None]
        return img * m + fill * (1 - m)


_LEVEL = re.compile(r"^(encoder|decoder)\.conv_blocks\.(\d+)\.res\.(\d+)\.conv1\.weight$")


def infer_vq_config(sd: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> VQConfig:
    """A `VQConfig` from tensor shapes, then overridden by any `tessera.config` metadata.

    Shapes give every size except the l2 normalisation and the GroupNorm group count,
    which take LlamaGen's values (True, 32) unless the metadata says otherwise.
    """
    raw = json.loads(metadata["tessera.config"]) if metadata and "tessera.config" in metadata else {}
    if not isinstance(raw, dict):
        raise TypeError("metadata 'tessera.config' is not a JSON object")
    res: dict[str, dict[int, int]] = {"encoder": {}, "decoder": {}}
    out_ch: dict[str, dict[int, int]] = {"encoder": {}, "decoder": {}}
    for key, t in sd.items():
        m = _LEVEL.match(key)
        if m:
            part, lvl, r = m.group(1), int(m.group(2)), int(m.group(3))
            res[part][lvl] = max(res[part].get(lvl, 0), r + 1)
            if r == 0:
                out_ch[part][lvl] = t.shape[0]
    conv_in = sd["encoder.conv_in.weight"]
    ch = conv_in.shape[0]
    n_enc, n_dec = len(out_ch["encoder"]), len(out_ch["decoder"])
    ch_mult = [out_ch["encoder"][i] // ch for i in range(n_enc)]
    dec_mult = [out_ch["decoder"][n_dec - 1 - i] // ch for i in range(n_dec)]
    emb = sd["quantize.embedding.weight"]
    cfg = VQConfig(
        in_channels=conv_in.shape[1],
        channels=ch,
        ch_mult=ch_mult,
        decoder_ch_mult=dec_mult,
        num_res_blocks=res["encoder"].get(0, 2),
        attn_deepest=f"encoder.conv_blocks.{n_enc - 1}.attn.0.q.weight" in sd,
        z_channels=sd["encoder.conv_out.weight"].shape[0],
        codebook_size=emb.shape[0],
        codebook_dim=emb.shape[1],
    )
    for key, value in raw.items():
        if key in VQConfig.__dataclass_fields__:
            setattr(cfg, key, value)
    return cfg


# Buffers LlamaGen checkpoints may carry that inference does not use.
_IGNORED = ("codebook_used",)


def vq_from_state_dict(
    sd: dict[str, torch.Tensor], metadata: dict[str, str] | None = None, path: str | Path = "<state dict>"
) -> VQModel:
    """Build a VQModel sized from `sd` (see `infer_vq_config`) and load it."""
    wrong_family(sd, path, "VQ tokenizer")
    for key in ("encoder.conv_in.weight", "encoder.conv_out.weight", "quantize.embedding.weight"):
        if key not in sd:
            raise CheckpointError(path, "missing tensor (not a LlamaGen-layout VQ model?)", key)
    try:
        cfg = infer_vq_config(sd, metadata)
        model = VQModel(cfg)
    except (ValueError, TypeError, KeyError, ZeroDivisionError) as e:
        raise CheckpointError(path, f"cannot size a VQ model from this file ({e})") from None
    assign_checked(model, sd, path, ignored=_IGNORED)
    return model


def load_vq(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> VQModel:
    """Load a LlamaGen-layout VQ tokenizer from a `.safetensors` file."""
    sd, metadata = read_safetensors(path)
    return vq_from_state_dict(sd, metadata, path).to(device, dtype)


def vq_config_metadata(cfg: VQConfig) -> dict[str, str]:
    """Metadata that pins a config when saving (`tessera.config`)."""
    return {"tessera.config": json.dumps(asdict(cfg))}


def save_vq(model: VQModel, path: str | Path, card: str | None = None) -> None:
    """Write a VQ tokenizer in the LlamaGen layout with its config in `tessera.config` (and a model card)."""
    metadata = vq_config_metadata(model.config)
    if card:
        metadata["tessera.card"] = card
    write_safetensors(path, model.state_dict(), metadata)
