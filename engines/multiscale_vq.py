"""Multi-scale residual VQ tokenizer (VAR's VQVAE): image <-> one token map per scale.

The encoder's feature map f [B, Cvae, H, W] is quantised coarse to fine over `patch_nums`
(1x1, 2x2, ... HxW). At scale k the residual still to explain, r = f - f_hat, is
area-downsampled to pn_k x pn_k and each cell takes its nearest codebook entry; those codes
are upsampled back to H x W (bicubic), passed through a φ convolution
(φ(h) = (1 - r)·h + r·conv3x3(h), a few convs shared by nearby scales) and added to f_hat.
Decoding is f_hat -> post_quant_conv -> decoder, so any prefix of the scales decodes to a
coarser image. The VAR transformer predicts scale k + 1 from an area-downsampled f_hat
(`next_input`), and `add_scale` folds a sampled map into f_hat the same way.

The module tree mirrors FoundationVision/VAR's `models/vqvae.py` (`encoder.down.N.block.M…`,
`quantize.embedding`, `quantize.quant_resi.qresi_ls.K`, …) so a converted `vae_ch160v4096z32`
loads by name; sizes come from a `MultiScaleVQConfig` read from `tessera.config` metadata or
inferred from tensor shapes. The conv blocks are the shared ones (`conv_blocks.py`); VAR's
attention block has a fused `qkv` conv, so it has its own small class here.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import attention
from .checkpoint import CheckpointError, assign_checked, read_safetensors, write_safetensors
from .conv_blocks import Downsample, ResnetBlock, Upsample, group_norm
from .layouts import wrong_family

# VAR's ten scales for a 256-px image through a 16x tokenizer.
DEFAULT_PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


@dataclass
class MultiScaleVQConfig:
    """Sizes of a multi-scale VQ tokenizer (defaults: VAR's vae_ch160v4096z32)."""

    in_channels: int = 3
    channels: int = 160
    ch_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    num_res_blocks: int = 2  # the decoder has one more per level
    attn_deepest: bool = True  # attention blocks at the deepest level (VAR's using_sa)
    mid_attn: bool = True  # attention in the middle block (using_mid_sa)
    z_channels: int = 32  # Cvae: latent width = codebook dim
    vocab_size: int = 4096
    patch_nums: list[int] = field(default_factory=lambda: list(DEFAULT_PATCH_NUMS))
    quant_resi: float = 0.5  # φ's mix ratio; 0 makes φ the identity
    share_quant_resi: int = 4  # 0: one φ per scale, 1: one φ for all, K: K φs shared by nearby scales
    quant_conv_ks: int = 3
    using_znorm: bool = False  # cosine instead of L2 nearest neighbours
    norm_groups: int = 32
    beta: float = 0.25  # commitment weight of the training loss

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def image_size(self) -> int:
        """The square image side the scale list is made for (last scale x downsample)."""
        return self.patch_nums[-1] * self.downsample

    @property
    def num_phi(self) -> int:
        if abs(self.quant_resi) <= 1e-6:
            return 0
        if self.share_quant_resi == 0:
            return len(self.patch_nums)
        return self.share_quant_resi


@dataclass(frozen=True)
class MultiScaleTokens:
    """The MULTISCALE_TOKENS socket value: one id map per scale, coarse to fine.

    `maps[k]` is [B, pn_k, pn_k] long. A value may hold only the first k scales of its
    tokenizer's list (a partly generated image, or the scales a variation keeps).
    """

    maps: tuple[Tensor, ...]

    def __post_init__(self) -> None:
        maps = tuple(m.long() for m in self.maps)
        if not maps:
            raise ValueError("MultiScaleTokens needs at least one scale")
        for m in maps:
            if m.dim() != 3:
                raise ValueError(f"each scale map must be [B, h, w], got shape {tuple(m.shape)}")
            if m.shape[0] != maps[0].shape[0]:
                raise ValueError("every scale map must have the same batch size")
        object.__setattr__(self, "maps", maps)

    @property
    def batch(self) -> int:
        return self.maps[0].shape[0]

    @property
    def num_scales(self) -> int:
        return len(self.maps)

    @property
    def patch_nums(self) -> tuple[int, ...]:
        return tuple(int(m.shape[1]) for m in self.maps)

    def first(self, k: int) -> MultiScaleTokens:
        """The coarsest `k` scales (1 <= k <= num_scales)."""
        if not 1 <= k <= self.num_scales:
            raise ValueError(f"cannot take the first {k} of {self.num_scales} scales")
        return MultiScaleTokens(self.maps[:k])

    def flat(self) -> Tensor:
        """[B, L] ids, scales concatenated in raster order (the transformer's sequence order)."""
        return torch.cat([m.reshape(m.shape[0], -1) for m in self.maps], dim=1)

    def to(self, device: torch.device | str) -> MultiScaleTokens:
        return MultiScaleTokens(tuple(m.to(device) for m in self.maps))

    def expand(self, batch: int) -> MultiScaleTokens:
        """The same maps for `batch` images (a batch of 1 is repeated; a matching batch is kept)."""
        if self.batch == batch:
            return self
        if self.batch != 1:
            raise ValueError(
                f"multi-scale tokens have batch {self.batch}, which does not match batch {batch}"
            )
        return MultiScaleTokens(tuple(m.expand(batch, -1, -1) for m in self.maps))


# ---------------------------------------------------------------- encoder / decoder (VAR key layout)


class FusedAttnBlock(nn.Module):
    """Single-head spatial self-attention with one `qkv` 1x1 conv (VAR's AttnBlock), scale c^-½."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = group_norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(2, 3).unbind(1)
        out = attention(q[:, None], k[:, None], v[:, None])[:, 0].transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class _Level(nn.Module):
    """One resolution level: `block.M` resnets, optional `attn.M`, then `downsample` or `upsample`."""

    def __init__(self, cin: int, cout: int, n: int, attn: bool, resample: str | None, groups: int):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(cin if i == 0 else cout, cout, groups) for i in range(n))
        self.attn = nn.ModuleList(FusedAttnBlock(cout, groups) for _ in range(n if attn else 0))
        if resample == "down":
            self.downsample = Downsample(cout)
        elif resample == "up":
            self.upsample = Upsample(cout)

    def forward(self, h: Tensor) -> Tensor:
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn):
                h = self.attn[i](h)
        if hasattr(self, "downsample"):
            h = self.downsample(h)
        if hasattr(self, "upsample"):
            h = self.upsample(h)
        return h


class _Mid(nn.Module):
    def __init__(self, c: int, attn: bool, groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(c, c, groups)
        self.attn_1 = FusedAttnBlock(c, groups) if attn else nn.Identity()
        self.block_2 = ResnetBlock(c, c, groups)

    def forward(self, h: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nn.Module):
    def __init__(self, cfg: MultiScaleVQConfig):
        super().__init__()
        ch, mult, n, g = cfg.channels, cfg.ch_mult, len(cfg.ch_mult), cfg.norm_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)
        cins = [ch] + [ch * m for m in mult[:-1]]
        self.down = nn.ModuleList(
            _Level(
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
        self.mid = _Mid(c, cfg.mid_attn, g)
        self.norm_out = group_norm(c, g)
        self.conv_out = nn.Conv2d(c, cfg.z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    """`up.i` is level i (0 = full resolution), run from the deepest level up, as VAR numbers them."""

    def __init__(self, cfg: MultiScaleVQConfig):
        super().__init__()
        ch, mult, n, g = cfg.channels, cfg.ch_mult, len(cfg.ch_mult), cfg.norm_groups
        c = ch * mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, c, 3, padding=1)
        self.mid = _Mid(c, cfg.mid_attn, g)
        levels: list[_Level] = []
        for i in reversed(range(n)):
            levels.insert(
                0,
                _Level(
                    c,
                    ch * mult[i],
                    cfg.num_res_blocks + 1,
                    cfg.attn_deepest and i == n - 1,
                    "up" if i != 0 else None,
                    g,
                ),
            )
            c = ch * mult[i]
        self.up = nn.ModuleList(levels)
        self.norm_out = group_norm(c, g)
        self.conv_out = nn.Conv2d(c, cfg.in_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


# ---------------------------------------------------------------- the multi-scale quantiser


class Phi(nn.Conv2d):
    """φ(h) = (1 - ratio)·h + ratio·conv3x3(h), computed in fp32."""

    def __init__(self, channels: int, ratio: float):
        super().__init__(channels, channels, 3, padding=1)
        self.ratio = abs(ratio)

    def forward(self, h: Tensor) -> Tensor:
        h = h.float()
        conv = F.conv2d(h, self.weight.float(), None if self.bias is None else self.bias.float(), padding=1)
        return h * (1 - self.ratio) + conv * self.ratio


def _ticks(k: int) -> list[float]:
    """Where on [0, 1] each of k shared φs sits (VAR's spacing; 4 φs are spaced by thirds)."""
    lo = 1 / 3 / k if k == 4 else 1 / 2 / k
    return torch.linspace(lo, 1 - lo, k, dtype=torch.float64).tolist()


def phi_index(si: int, num_scales: int, k: int) -> int:
    """Which of k φs serves scale si: the one whose tick is nearest si / (num_scales - 1)."""
    at = si / (num_scales - 1) if num_scales > 1 else 0.0
    ticks = _ticks(k)
    return min(range(k), key=lambda i: abs(ticks[i] - at))


class _PhiShared(nn.Module):
    def __init__(self, phi: Phi):
        super().__init__()
        self.qresi = phi


class _PhiPartiallyShared(nn.Module):
    def __init__(self, phis: list[Phi]):
        super().__init__()
        self.qresi_ls = nn.ModuleList(phis)


class MultiScaleQuantizer(nn.Module):
    """Residual quantisation over `patch_nums` with the φ convs (VAR's VectorQuantizer2)."""

    def __init__(self, cfg: MultiScaleVQConfig):
        super().__init__()
        self.config = cfg
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.z_channels)
        n = cfg.num_phi
        if n == 0:
            self.quant_resi: nn.Module = nn.Identity()
        elif cfg.share_quant_resi == 0:
            self.quant_resi = nn.ModuleList(Phi(cfg.z_channels, cfg.quant_resi) for _ in range(n))
        elif cfg.share_quant_resi == 1:
            self.quant_resi = _PhiShared(Phi(cfg.z_channels, cfg.quant_resi))
        else:
            self.quant_resi = _PhiPartiallyShared([Phi(cfg.z_channels, cfg.quant_resi) for _ in range(n)])

    @property
    def patch_nums(self) -> list[int]:
        return self.config.patch_nums

    def phi(self, si: int, h: Tensor) -> Tensor:
        """φ for scale si applied to h [B, Cvae, H, W] (fp32 out)."""
        q = self.quant_resi
        if isinstance(q, nn.Identity):
            return h.float()
        if isinstance(q, _PhiShared):
            return q.qresi(h)
        phis = q if isinstance(q, nn.ModuleList) else q.qresi_ls
        return phis[phi_index(si, len(self.patch_nums), len(phis))](h)

    def codebook(self) -> Tensor:
        return self.embedding.weight.float()

    def nearest(self, z: Tensor) -> Tensor:
        """[B, C, h, w] features -> [B, h, w] ids of the nearest codes (fp32; cosine with znorm)."""
        b, c, h, w = z.shape
        z = z.float().permute(0, 2, 3, 1).reshape(-1, c)
        e = self.codebook()
        if self.config.using_znorm:
            ids = (F.normalize(z, dim=-1) @ F.normalize(e, dim=-1).t()).argmax(-1)
        else:
            d = (z * z).sum(-1, keepdim=True) + (e * e).sum(-1) - 2 * z @ e.t()
            ids = d.argmin(-1)
        return ids.view(b, h, w)

    def lookup(self, ids: Tensor) -> Tensor:
        """[B, h, w] ids -> [B, Cvae, h, w] fp32 codes."""
        return self.codebook()[ids].permute(0, 3, 1, 2)

    def _full_size(self, si: int, codes: Tensor, hw: tuple[int, int]) -> Tensor:
        """A scale's codes brought to the full H x W (bicubic; the last scale is already full) then φ."""
        if si != len(self.patch_nums) - 1:
            codes = F.interpolate(codes, size=hw, mode="bicubic")
        return self.phi(si, codes)

    def add_scale(self, f_hat: Tensor, ids: Tensor, si: int) -> Tensor:
        """f_hat [B, Cvae, H, W] plus scale si's contribution from ids [B, pn, pn] (a new tensor, fp32)."""
        return f_hat.float() + self._full_size(si, self.lookup(ids), tuple(f_hat.shape[-2:]))

    def next_input(self, f_hat: Tensor, si: int) -> Tensor:
        """The transformer's input for scale si + 1: f_hat area-downsampled, [B, pn·pn, Cvae] fp32."""
        pn = self.patch_nums[si + 1]
        x = F.interpolate(f_hat.float(), size=(pn, pn), mode="area")
        return x.flatten(2).transpose(1, 2)

    def empty_fhat(self, batch: int, device: torch.device | str) -> Tensor:
        side = self.patch_nums[-1]
        return torch.zeros(batch, self.config.z_channels, side, side, device=device)

    def tokenize(self, f: Tensor) -> list[Tensor]:
        """Quantise features f [B, Cvae, H, W] (H = W = last scale) into one id map per scale."""
        _, _, h, w = f.shape
        if (h, w) != (self.patch_nums[-1], self.patch_nums[-1]):
            raise ValueError(f"feature map {h}x{w} does not match the last scale {self.patch_nums[-1]}")
        f = f.float()
        f_hat = torch.zeros_like(f)
        maps = []
        last = len(self.patch_nums) - 1
        for si, pn in enumerate(self.patch_nums):
            rest = f - f_hat
            ids = self.nearest(rest if si == last else F.interpolate(rest, size=(pn, pn), mode="area"))
            maps.append(ids)
            f_hat = self.add_scale(f_hat, ids, si)
        return maps

    def fhat(self, maps: list[Tensor] | tuple[Tensor, ...]) -> Tensor:
        """f_hat after the given (first k) scales' maps."""
        f_hat = self.empty_fhat(maps[0].shape[0], maps[0].device)
        for si, ids in enumerate(maps):
            f_hat = self.add_scale(f_hat, ids, si)
        return f_hat

    def teacher_inputs(self, maps: list[Tensor] | tuple[Tensor, ...]) -> Tensor:
        """Teacher-forcing input of every scale but the first: [B, L - pn_0², Cvae] fp32, the
        area-downsampled f_hat after scales 0..k-1 for each scale k >= 1 (VAR's idxBl_to_var_input)."""
        f_hat = self.empty_fhat(maps[0].shape[0], maps[0].device)
        parts = []
        for si in range(len(self.patch_nums) - 1):
            f_hat = self.add_scale(f_hat, maps[si], si)
            parts.append(self.next_input(f_hat, si))
        if not parts:
            return f_hat.new_zeros(f_hat.shape[0], 0, self.config.z_channels)
        return torch.cat(parts, dim=1)

    def forward(self, f: Tensor) -> tuple[Tensor, Tensor, list[Tensor]]:
        """Training: (f_hat with a straight-through gradient to f, the VQ loss averaged over scales,
        the id map [B, pn, pn] of every scale).

        The loss per scale is beta·|sg(f_hat) - f|² + |f_hat - sg(f)|², as VAR trains it; the codes
        (`embedding`) and the φ convs get gradients through the second term."""
        f32 = f.float()
        target = f32.detach()
        f_hat = torch.zeros_like(target)
        loss = f32.new_zeros(())
        last = len(self.patch_nums) - 1
        maps = []
        for si, pn in enumerate(self.patch_nums):
            rest = (target - f_hat).detach()
            with torch.no_grad():
                ids = self.nearest(rest if si == last else F.interpolate(rest, size=(pn, pn), mode="area"))
            maps.append(ids)
            f_hat = f_hat + self._full_size(si, self.embedding(ids).permute(0, 3, 1, 2).float(), f.shape[-2:])
            loss = loss + self.config.beta * F.mse_loss(f_hat.detach(), f32) + F.mse_loss(f_hat, target)
        return (f_hat.detach() - target) + f32, loss / len(self.patch_nums), maps


class MultiScaleVQ(nn.Module):
    """Image <-> multi-scale token maps. Pixels are [-1, 1] here; nodes convert from IMAGE's 0..1."""

    def __init__(self, cfg: MultiScaleVQConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = MultiScaleQuantizer(cfg)
        ks = cfg.quant_conv_ks
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, ks, padding=ks // 2)
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, ks, padding=ks // 2)

    @property
    def downsample(self) -> int:
        return self.config.downsample

    @property
    def patch_nums(self) -> list[int]:
        return self.config.patch_nums

    def features(self, images: Tensor) -> Tensor:
        """[B, 3, H, W] in [-1, 1] -> the pre-quantisation features [B, Cvae, h, w]."""
        p = next(self.parameters())
        return self.quant_conv(self.encoder(images.to(p.device, p.dtype)))

    @torch.no_grad()
    def encode(self, images: Tensor) -> MultiScaleTokens:
        """[B, 3, S, S] in [-1, 1], S = last scale x downsample -> one id map per scale."""
        side = self.config.image_size
        if tuple(images.shape[-2:]) != (side, side):
            raise ValueError(
                f"image size {tuple(images.shape[-2:])} does not fit this tokenizer's scales "
                f"(it takes {side}x{side}: last scale {self.patch_nums[-1]} x {self.downsample})"
            )
        return MultiScaleTokens(tuple(self.quantize.tokenize(self.features(images))))

    def check_tokens(self, tokens: MultiScaleTokens) -> None:
        """Refuse maps that are not a prefix of this tokenizer's scales or hold ids outside its codebook."""
        want = tuple(self.patch_nums[: tokens.num_scales])
        if tokens.num_scales > len(self.patch_nums) or tokens.patch_nums != want:
            raise ValueError(
                f"token maps of sizes {list(tokens.patch_nums)} are not the first scales of this "
                f"tokenizer's {list(self.patch_nums)}"
            )
        for m in tokens.maps:
            if m.shape[1] != m.shape[2]:
                raise ValueError(f"scale maps must be square, got {tuple(m.shape[1:])}")
            if m.numel() and (int(m.min()) < 0 or int(m.max()) >= self.config.vocab_size):
                raise ValueError(f"token ids must lie in [0, {self.config.vocab_size})")

    @torch.no_grad()
    def decode_fhat(self, f_hat: Tensor) -> Tensor:
        """Accumulated features [B, Cvae, H, W] -> [B, 3, H·f, W·f] in [-1, 1]."""
        p = next(self.parameters())
        return self.decoder(self.post_quant_conv(f_hat.to(p.device, p.dtype))).float().clamp(-1, 1)

    @torch.no_grad()
    def decode(self, tokens: MultiScaleTokens, scales: int | None = None) -> Tensor:
        """Decode the first `scales` scales (default: all the value holds) to [B, 3, S, S] in [-1, 1]."""
        self.check_tokens(tokens)
        if scales is not None:
            tokens = tokens.first(min(scales, tokens.num_scales))
        p = next(self.parameters())
        return self.decode_fhat(self.quantize.fhat(tokens.to(p.device).maps))

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, MultiScaleTokens]:
        """Training: (reconstruction [B, 3, S, S] with gradients everywhere, VQ loss, the id maps)."""
        f_hat, loss, maps = self.quantize(self.features(images))
        p = next(self.parameters())
        return self.decoder(self.post_quant_conv(f_hat.to(p.dtype))), loss, MultiScaleTokens(tuple(maps))


# ---------------------------------------------------------------- files

_DOWN = re.compile(r"^encoder\.down\.(\d+)\.block\.(\d+)\.conv1\.weight$")
_PHI = re.compile(r"^quantize\.quant_resi\.(?:qresi_ls\.)?(\d+)\.weight$")


def _patch_nums_for(num_scales: int, raw: dict, what: str) -> list[int]:
    if "patch_nums" in raw:
        return [int(p) for p in raw["patch_nums"]]
    if num_scales == len(DEFAULT_PATCH_NUMS):
        return list(DEFAULT_PATCH_NUMS)
    raise ValueError(
        f"{what} has {num_scales} scales, not VAR's {len(DEFAULT_PATCH_NUMS)}, and its scale sizes are not "
        "stored: set 'patch_nums' in the file's 'tessera.config' metadata (or --config for tessera convert)"
    )


def infer_multiscale_vq_config(
    sd: dict[str, Tensor], metadata: dict[str, str] | None = None
) -> MultiScaleVQConfig:
    """A `MultiScaleVQConfig` from tensor shapes, then overridden by any `tessera.config` metadata.

    Shapes give the widths, levels, attention, codebook and φ count; the number of scales comes
    from `quantize.ema_vocab_hit_SV` (VAR's files carry it), and the scale sizes are VAR's ten
    when there are ten. φ's ratio, znorm and GroupNorm groups take VAR's values (0.5, False,
    32) unless the metadata says otherwise. Anything else is refused, naming the missing setting.
    """
    raw = json.loads(metadata["tessera.config"]) if metadata and "tessera.config" in metadata else {}
    if not isinstance(raw, dict):
        raise TypeError("metadata 'tessera.config' is not a JSON object")
    blocks: dict[int, int] = {}
    out_ch: dict[int, int] = {}
    for key, t in sd.items():
        m = _DOWN.match(key)
        if m:
            lvl, j = int(m.group(1)), int(m.group(2))
            blocks[lvl] = max(blocks.get(lvl, 0), j + 1)
            if j == 0:
                out_ch[lvl] = t.shape[0]
    conv_in = sd["encoder.conv_in.weight"]
    ch = conv_in.shape[0]
    n = len(out_ch)
    emb = sd["quantize.embedding.weight"]
    phis = sorted({int(m.group(1)) for k in sd if (m := _PHI.match(k))})
    if "quantize.quant_resi.qresi.weight" in sd:
        share, ratio = 1, 0.5
    elif any(k.startswith("quantize.quant_resi.qresi_ls.") for k in sd):
        share, ratio = len(phis), 0.5
    elif phis:
        share, ratio = 0, 0.5
    else:
        share, ratio = 4, 0.0
    hits = sd.get("quantize.ema_vocab_hit_SV")
    if "patch_nums" in raw:
        patch_nums = [int(p) for p in raw["patch_nums"]]
    elif hits is not None:
        patch_nums = _patch_nums_for(int(hits.shape[0]), raw, "this tokenizer")
    elif share == 0:  # one φ per scale
        patch_nums = _patch_nums_for(len(phis), raw, "this tokenizer")
    else:
        raise ValueError(
            "the number and sizes of the scales are not stored in this file (no quantize.ema_vocab_hit_SV): "
            "set 'patch_nums' in its 'tessera.config' metadata (or --config for tessera convert)"
        )
    cfg = MultiScaleVQConfig(
        in_channels=conv_in.shape[1],
        channels=ch,
        ch_mult=[out_ch[i] // ch for i in range(n)],
        num_res_blocks=blocks.get(0, 2),
        attn_deepest=f"encoder.down.{n - 1}.attn.0.qkv.weight" in sd,
        mid_attn="encoder.mid.attn_1.qkv.weight" in sd,
        z_channels=emb.shape[1],
        vocab_size=emb.shape[0],
        patch_nums=patch_nums,
        quant_resi=ratio,
        share_quant_resi=share,
        quant_conv_ks=sd["quant_conv.weight"].shape[-1],
    )
    for key, value in raw.items():
        if key in MultiScaleVQConfig.__dataclass_fields__:
            setattr(cfg, key, value)
    return cfg


_REQUIRED = (
    "encoder.conv_in.weight",
    "quantize.embedding.weight",
    "quant_conv.weight",
    "decoder.conv_in.weight",
)
# Buffers VAR's files carry that inference does not use (codebook usage statistics).
_IGNORED = ("ema_vocab_hit_SV",)


def multiscale_vq_from_state_dict(
    sd: dict[str, Tensor], metadata: dict[str, str] | None = None, path: str | Path = "<state dict>"
) -> MultiScaleVQ:
    """Build a MultiScaleVQ sized from `sd` (see `infer_multiscale_vq_config`) and load it."""
    for key in _REQUIRED:
        if key not in sd:
            raise CheckpointError(path, "missing tensor (not a VAR-layout multi-scale VQ tokenizer?)", key)
    try:
        cfg = infer_multiscale_vq_config(sd, metadata)
        model = MultiScaleVQ(cfg)
    except (ValueError, TypeError, KeyError, ZeroDivisionError) as e:
        raise CheckpointError(path, f"cannot size a multi-scale VQ tokenizer from this file ({e})") from None
    assign_checked(model, sd, path, ignored=_IGNORED)
    return model


def load_multiscale_vq(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> MultiScaleVQ:
    """Load a multi-scale VQ tokenizer (VAR layout) from a `.safetensors` file."""
    sd, metadata = read_safetensors(path)
    wrong_family(sd, path, "multi-scale VQ tokenizer")
    return multiscale_vq_from_state_dict(sd, metadata, path).to(device, dtype)


def multiscale_vq_config_metadata(cfg: MultiScaleVQConfig) -> dict[str, str]:
    """Metadata that pins a config when saving (`tessera.config`)."""
    return {"tessera.config": json.dumps(asdict(cfg))}


def save_multiscale_vq(model: MultiScaleVQ, path: str | Path, card: str | None = None) -> None:
    """Write a multi-scale VQ tokenizer in the VAR layout with its config (and a model card)."""
    metadata = multiscale_vq_config_metadata(model.config)
    if card:
        metadata["tessera.card"] = card
    write_safetensors(path, model.state_dict(), metadata)
