"""The SD/Flux AutoencoderKL family: pixels ⇄ latents, sized by `VAEConfig`.

Parameter names follow the original ldm / Flux `ae.safetensors` layout (`encoder.down.N.block.M`,
`encoder.mid.attn_1.q`, ...); diffusers `AutoencoderKL` checkpoints are renamed to it by
`load_vae`. Latents leave `encode` normalised with the family's (scale, shift) so the DiT sees
unit-variance inputs, and `decode` undoes it.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tessera.engines.checkpoint import (
    CheckpointError,
    assign_checked,
    metadata_config,
    require,
    write_safetensors,
)
from tessera.engines.conv_blocks import AttnBlock, Downsample, ResnetBlock, Upsample, group_norm
from tessera.engines.layouts import read_weights, wrong_family

# (scaling_factor, shift_factor) per family: z_normalised = (z - shift) * scale.
FAMILIES: dict[str, tuple[float, float]] = {
    "sd15": (0.18215, 0.0),
    "sdxl": (0.13025, 0.0),
    "sd3": (1.5305, 0.0609),
    "flux": (0.3611, 0.1159),
}
# Architecture alone cannot tell SD1.5 from SDXL or SD3 from Flux; these are the defaults.
DEFAULT_FAMILY = {4: "sd15", 16: "flux"}


@dataclass(frozen=True)
class VAEConfig:
    """Every size of the autoencoder; the defaults are the Flux.1 VAE."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 16
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_groups: int = 32
    mid_attention: bool = True
    use_quant_conv: bool = False
    use_post_quant_conv: bool = False
    scaling_factor: float = 0.3611
    shift_factor: float = 0.1159

    def __post_init__(self) -> None:
        object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
        bad = [c for c in self.block_out_channels if c % self.norm_groups]
        if bad:
            raise ValueError(f"channels {bad} are not divisible by norm_groups {self.norm_groups}")

    @property
    def downscale(self) -> int:
        """Pixels per latent cell along each side."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_dict(cls, d: dict) -> VAEConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# ---------------------------------------------------------------- building blocks


class Level(nn.Module):
    """One resolution: residual blocks, then an optional resampling."""

    def __init__(self, cin: int, cout: int, n_blocks: int, groups: int, resample: str | None):
        super().__init__()
        self.block = nn.ModuleList(
            ResnetBlock(cin if i == 0 else cout, cout, groups) for i in range(n_blocks)
        )
        if resample == "down":
            self.downsample = Downsample(cout)
        elif resample == "up":
            self.upsample = Upsample(cout)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        if hasattr(self, "downsample"):
            x = self.downsample(x)
        if hasattr(self, "upsample"):
            x = self.upsample(x)
        return x


class Mid(nn.Module):
    def __init__(self, channels: int, groups: int, with_attention: bool):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups) if with_attention else None
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, x: Tensor) -> Tensor:
        x = self.block_1(x)
        if self.attn_1 is not None:
            x = self.attn_1(x)
        return self.block_2(x)


class Encoder(nn.Module):
    def __init__(self, c: VAEConfig):
        super().__init__()
        ch, g, n = c.block_out_channels, c.norm_groups, len(c.block_out_channels)
        self.conv_in = nn.Conv2d(c.in_channels, ch[0], 3, padding=1)
        self.down = nn.ModuleList(
            Level(ch[max(i - 1, 0)], ch[i], c.layers_per_block, g, "down" if i < n - 1 else None)
            for i in range(n)
        )
        self.mid = Mid(ch[-1], g, c.mid_attention)
        self.norm_out = group_norm(ch[-1], g)
        self.conv_out = nn.Conv2d(ch[-1], 2 * c.latent_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_in(x)
        for level in self.down:
            x = level(x)
        return self.conv_out(F.silu(self.norm_out(self.mid(x))))


class Decoder(nn.Module):
    def __init__(self, c: VAEConfig):
        super().__init__()
        ch, g, n = c.block_out_channels, c.norm_groups, len(c.block_out_channels)
        self.conv_in = nn.Conv2d(c.latent_channels, ch[-1], 3, padding=1)
        self.mid = Mid(ch[-1], g, c.mid_attention)
        # up[i] works at the resolution of down[i]; it runs from the coarsest level (i = n-1) to 0.
        self.up = nn.ModuleList(
            Level(ch[min(i + 1, n - 1)], ch[i], c.layers_per_block + 1, g, "up" if i > 0 else None)
            for i in range(n)
        )
        self.norm_out = group_norm(ch[0], g)
        self.conv_out = nn.Conv2d(ch[0], c.out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        x = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            x = level(x)
        return self.conv_out(F.silu(self.norm_out(x)))


def _feather(n: int, ramp: int, ramp_start: bool, ramp_end: bool) -> Tensor:
    """1-D blend weights: rising over `ramp` samples on the sides that overlap another tile."""
    w = torch.ones(n)
    r = (torch.arange(min(ramp, n)) + 0.5) / ramp
    if ramp_start and ramp:
        w[: len(r)] = torch.minimum(w[: len(r)], r)
    if ramp_end and ramp:
        w[n - len(r) :] = torch.minimum(w[n - len(r) :], r.flip(0))
    return w


def _tile_starts(n: int, tile: int, stride: int) -> list[int]:
    if n <= tile:
        return [0]
    starts = list(range(0, n - tile, stride))
    return starts + [n - tile]


class AutoencoderKL(nn.Module):
    """KL autoencoder; `encode`/`decode` speak normalised latents and pixels in [-1, 1]."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = c = config
        self.encoder, self.decoder = Encoder(c), Decoder(c)
        z = c.latent_channels
        self.quant_conv = nn.Conv2d(2 * z, 2 * z, 1) if c.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(z, z, 1) if c.use_post_quant_conv else None

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.encoder.conv_in.weight.device

    def encode_moments(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        """Posterior mean and log-variance of raw (unnormalised) latents, in fp32."""
        h = self.encoder(pixels.to(self.device, self.dtype))
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        mean, logvar = h.float().chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def encode(self, pixels: Tensor, sample: bool = False, noise: Tensor | None = None) -> Tensor:
        """Normalised latents of [B, 3, H, W] pixels in [-1, 1]: the posterior mean, or a draw using `noise`."""
        mean, logvar = self.encode_moments(pixels)
        z = mean
        if sample:
            eps = torch.randn_like(mean) if noise is None else noise.to(mean)
            z = mean + torch.exp(0.5 * logvar) * eps
        return (z - self.config.shift_factor) * self.config.scaling_factor

    def decode(self, latent: Tensor) -> Tensor:
        """Pixels in about [-1, 1] (fp32) from normalised latents [B, C, h, w]."""
        z = latent.float() / self.config.scaling_factor + self.config.shift_factor
        z = z.to(self.device, self.dtype)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z).float()

    def decode_tiled(self, latent: Tensor, tile: int = 64, overlap: int = 16) -> Tensor:
        """`decode` in overlapping latent tiles blended linearly, so memory stays bounded for large images."""
        _, _, h, w = latent.shape
        if h <= tile and w <= tile:
            return self.decode(latent)
        overlap = min(overlap, tile // 2)
        f, stride = self.config.downscale, tile - overlap
        out = weight = None
        ys, xs = _tile_starts(h, tile, stride), _tile_starts(w, tile, stride)
        for y0 in ys:
            for x0 in xs:
                px = self.decode(latent[:, :, y0 : y0 + tile, x0 : x0 + tile]).cpu()
                if out is None:
                    out = torch.zeros(px.shape[0], px.shape[1], h * f, w * f)
                    weight = torch.zeros(1, 1, h * f, w * f)
                th, tw = px.shape[-2:]
                wy = _feather(th, overlap * f, y0 > 0, y0 + tile < h)
                wx = _feather(tw, overlap * f, x0 > 0, x0 + tile < w)
                wmap = (wy[:, None] * wx[None])[None, None]
                out[:, :, y0 * f : y0 * f + th, x0 * f : x0 * f + tw] += px * wmap
                weight[:, :, y0 * f : y0 * f + th, x0 * f : x0 * f + tw] += wmap
        return (out / weight).to(latent.device)


# ---------------------------------------------------------------- checkpoints

_PREFIXES = ("first_stage_model.", "vae.")
_LDM_MARK, _DIFFUSERS_MARK = (
    "encoder.down.0.block.0.conv1.weight",
    "encoder.down_blocks.0.resnets.0.conv1.weight",
)


def detect_vae_layout(sd: dict[str, Tensor]) -> str | None:
    """ "ldm" (original SD / Flux ae), "diffusers", or None when neither layout is present."""
    if _LDM_MARK in sd and "decoder.conv_in.weight" in sd:
        return "ldm"
    if _DIFFUSERS_MARK in sd and "decoder.conv_in.weight" in sd:
        return "diffusers"
    return None


def _count(sd: dict, pattern: str) -> int:
    rx = re.compile(pattern)
    return len({int(m.group(1)) for k in sd if (m := rx.match(k))})


_RESNET_RENAMES = {"conv_shortcut": "nin_shortcut"}
_ATTN_RENAMES = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
    "query": "q",
    "key": "k",
    "value": "v",
    "proj_attn": "proj_out",
}


def convert_diffusers_vae(sd: dict[str, Tensor], path: str | Path = "<state dict>") -> dict[str, Tensor]:
    """Rename a diffusers `AutoencoderKL` state dict to the ldm layout (decoder levels reversed)."""
    n_up = _count(sd, r"decoder\.up_blocks\.(\d+)\.")
    out: dict[str, Tensor] = {}
    for key, t in sd.items():
        new = key
        if m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.*)", key):
            new = f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)\.(weight|bias)$", key):
            if m[2] not in _ATTN_RENAMES:
                raise CheckpointError(path, "unexpected tensor in a diffusers VAE mid-block attention", key)
            new = f"{m[1]}.mid.attn_1.{_ATTN_RENAMES[m[2]]}.{m[3]}"
            if m[2] != "group_norm" and m[3] == "weight" and t.ndim == 2:
                t = t[:, :, None, None]  # linear → 1×1 conv
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
            new = f"encoder.down.{m[1]}.block.{m[2]}.{m[3]}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
            new = f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
            new = f"decoder.up.{n_up - 1 - int(m[1])}.block.{m[2]}.{m[3]}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
            new = f"decoder.up.{n_up - 1 - int(m[1])}.upsample.conv.{m[2]}"
        elif m := re.match(r"(encoder|decoder)\.conv_norm_out\.(.*)", key):
            new = f"{m[1]}.norm_out.{m[2]}"
        for old, renamed in _RESNET_RENAMES.items():
            new = new.replace(f".{old}.", f".{renamed}.")
        if new in out:
            raise CheckpointError(path, "two tensors map to the same ldm name", key)
        out[new] = t
    return out


def _ldm_attention_as_conv(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Some ldm-layout exports store the mid attention projections as linears; make them 1×1 convs."""
    rx = re.compile(r"(encoder|decoder)\.mid\.attn_1\.(q|k|v|proj_out)\.weight$")
    return {k: (v[:, :, None, None] if rx.match(k) and v.ndim == 2 else v) for k, v in sd.items()}


def infer_vae_config(
    sd: dict[str, Tensor],
    path: str | Path = "<state dict>",
    overrides: dict | None = None,
    family: str | None = None,
) -> VAEConfig:
    """Read a VAEConfig off an ldm-layout state dict; scale/shift from family, then metadata, then `family`."""
    overrides = dict(overrides or {})
    levels = _count(sd, r"encoder\.down\.(\d+)\.")
    if not levels:
        raise CheckpointError(path, "no encoder levels found", _LDM_MARK)
    z = require(sd, "decoder.conv_in.weight", path).shape[1]
    inferred = dict(
        in_channels=require(sd, "encoder.conv_in.weight", path).shape[1],
        out_channels=require(sd, "decoder.conv_out.weight", path).shape[0],
        latent_channels=z,
        block_out_channels=[
            require(sd, f"encoder.down.{i}.block.0.conv1.weight", path).shape[0] for i in range(levels)
        ],
        layers_per_block=_count(sd, r"encoder\.down\.0\.block\.(\d+)\."),
        mid_attention="encoder.mid.attn_1.q.weight" in sd,
        use_quant_conv="quant_conv.weight" in sd,
        use_post_quant_conv="post_quant_conv.weight" in sd,
    )
    fam = overrides.pop("family", None) or DEFAULT_FAMILY.get(z)
    if fam is not None:
        inferred["scaling_factor"], inferred["shift_factor"] = _family(fam, path)
    else:
        inferred["scaling_factor"], inferred["shift_factor"] = 1.0, 0.0
    inferred.update(overrides)
    if family:
        inferred["scaling_factor"], inferred["shift_factor"] = _family(family, path)
    try:
        return VAEConfig.from_dict(inferred)
    except (TypeError, ValueError) as e:
        raise CheckpointError(path, f"inconsistent VAE config ({e})") from None


def _family(name: str, path: str | Path) -> tuple[float, float]:
    if name not in FAMILIES:
        raise CheckpointError(path, f"unknown VAE family {name!r} (known: {', '.join(FAMILIES)})")
    return FAMILIES[name]


# diffusers `AutoencoderKL` config.json field -> VAEConfig field. Norm groups, scale and shift are
# invisible in the shapes; the rest is passed on so a contradicting config.json fails by tensor name.
_DIFFUSERS_VAE_FIELDS = {
    "norm_num_groups": "norm_groups",
    "scaling_factor": "scaling_factor",
    "shift_factor": "shift_factor",
    "latent_channels": "latent_channels",
    "block_out_channels": "block_out_channels",
    "layers_per_block": "layers_per_block",
    "in_channels": "in_channels",
    "out_channels": "out_channels",
    "mid_block_add_attention": "mid_attention",
    "use_quant_conv": "use_quant_conv",
    "use_post_quant_conv": "use_post_quant_conv",
}


def diffusers_vae_overrides(config_json: dict) -> dict:
    """The VAEConfig fields a diffusers `vae/config.json` sets (`shift_factor: null` means no shift)."""
    out = {
        ours: config_json[theirs] for theirs, ours in _DIFFUSERS_VAE_FIELDS.items() if theirs in config_json
    }
    if "shift_factor" in out and out["shift_factor"] is None:
        out["shift_factor"] = 0.0
    return out


def vae_from_state_dict(
    sd: dict[str, Tensor],
    overrides: dict,
    path: str | Path = "<state dict>",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    family: str | None = None,
) -> AutoencoderKL:
    """An AutoencoderKL from an ldm- or diffusers-layout state dict (optionally under `vae.` /
    `first_stage_model.`); `overrides` set what shapes cannot tell, `family` sets scale and shift."""
    if detect_vae_layout(sd) is None:
        for prefix in _PREFIXES:
            stripped = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
            if detect_vae_layout(stripped):
                sd = stripped
                break
    layout = detect_vae_layout(sd)
    if layout is None:
        raise CheckpointError(
            path,
            f"not an AutoencoderKL checkpoint (neither ldm '{_LDM_MARK}' nor diffusers '{_DIFFUSERS_MARK}' found)",
        )
    sd = convert_diffusers_vae(sd, path) if layout == "diffusers" else _ldm_attention_as_conv(sd)
    config = infer_vae_config(sd, path, overrides, family)
    with torch.device("meta"):
        model = AutoencoderKL(config)
    assign_checked(model, sd, path, device, dtype)
    return model


def load_vae(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    family: str | None = None,
) -> AutoencoderKL:
    """Load an AutoencoderKL in ldm or diffusers layout: a single file or a diffusers `vae/` folder.

    Scale/shift come from the latent-channel default family (4 → sd15, 16 → flux), overridden by
    a diffusers `config.json` beside the file (which also gives the norm groups), then by
    `tessera.config` metadata (`family` or `scaling_factor`/`shift_factor`), then by `family`.
    """
    sd, metadata, where = read_weights(path)
    wrong_family(sd, path, "AutoencoderKL VAE", "all-in-one checkpoint")
    overrides = {**diffusers_vae_overrides(where.config), **metadata_config(metadata, path)}
    return vae_from_state_dict(sd, overrides, path, device, dtype, family)


def save_vae(model: AutoencoderKL, path: str | Path, card: str | None = None) -> None:
    """Write a VAE in the ldm layout with its config (scale/shift included) in `tessera.config`."""
    metadata = {"tessera.config": json.dumps(asdict(model.config))}
    if card:
        metadata["tessera.card"] = card
    write_safetensors(path, model.state_dict(), metadata)


def with_family(model: AutoencoderKL, family: str) -> AutoencoderKL:
    """Switch a loaded VAE's latent normalisation to another family's (scale, shift), in place."""
    scale, shift = _family(family, "<model>")
    model.config = replace(model.config, scaling_factor=scale, shift_factor=shift)
    return model
