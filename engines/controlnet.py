"""ControlNet for the Flux DiT, in the layout of diffusers' `FluxControlNetModel`.

The control net is a shallow copy of the DiT's trunk (N double and M single blocks of the same
width) that reads the noisy image tokens plus the control hint, fed in through a zero-initialised
`controlnet_x_embedder`. After each of its blocks a zero-initialised projection
(`controlnet_blocks.N`, `controlnet_single_blocks.N`) gives a residual for the base model's image
tokens; N residuals are spread over the base's blocks by diffusers' interval rule (block i takes
residual i // ceil(depth / N)), or repeated (i % N) for nets with a pixel-space hint encoder
(XLabs and diffusers' `input_hint_block` variant), as diffusers does.

Files load from the diffusers layout or the BFL layout (`img_in`, `double_blocks.N`, … plus the
`controlnet_*` heads; XLabs' `pos_embed_input` is `controlnet_x_embedder`), reusing the DiT
loader's conversion and config inference. The hint is the control image encoded by the VAE and
packed like the latent, or, with a hint encoder, the image itself in [-1, 1].

`with_control(model, net, hint, strength, start, end)` returns the DiT as a new model object
(sharing every base tensor) whose forward adds the residuals while the noise level lies in the
[start, end] part of the run, so a sampler uses it as it would the plain DiT.

The AR engine's counterpart (`ARControlNet`, `with_ar_control`) turns the control image into
per-token embeddings added to the GPT's input and to the input of chosen layers where that token
is predicted; a net may carry the LoRA on the GPT it was trained with, applied together with it.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checkpoint import CheckpointError, assign_checked, metadata_config, read_safetensors, write_safetensors
from .flux import (
    DoubleStreamBlock,
    Flux,
    FluxConfig,
    MLPEmbedder,
    SingleStreamBlock,
    convert_diffusers_dit,
    detect_dit_layout,
    embed_inputs,
    infer_dit_config,
    patchify,
)
from .gpt import GPT, Block
from .lora import Lora, copy_structure, lora_from_state_dict, with_loras
from .schedules import flux_mu, time_shift

HINT_DOWNSCALE = 8  # the hint encoder's three stride-2 convolutions


class HintEncoder(nn.Sequential):
    """Pixels [-1, 1] → features at 1/8 size: XLabs' `input_hint_block` (= diffusers'
    `ControlNetConditioningEmbedding` with channels (16, 16, 16, 16)); convs at even indices."""

    def __init__(self, out_channels: int, in_channels: int = 3, width: int = 16):
        layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 3, padding=1), nn.SiLU()]
        for _ in range(3):
            layers += [nn.Conv2d(width, width, 3, padding=1), nn.SiLU()]
            layers += [nn.Conv2d(width, width, 3, padding=1, stride=2), nn.SiLU()]
        layers.append(nn.Conv2d(width, out_channels, 3, padding=1))
        super().__init__(*layers)


class FluxControlNet(nn.Module):
    """The control trunk: `config.depth` double and `config.depth_single` single blocks."""

    def __init__(self, config: FluxConfig, hint_channels: int = 0):
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
        self.controlnet_x_embedder = nn.Linear(c.in_channels * p * p, d)
        self.controlnet_blocks = nn.ModuleList(nn.Linear(d, d) for _ in range(c.depth))
        self.controlnet_single_blocks = nn.ModuleList(nn.Linear(d, d) for _ in range(c.depth_single))
        self.input_hint_block = HintEncoder(hint_channels) if hint_channels else None

    @property
    def dtype(self) -> torch.dtype:
        return self.img_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.img_in.weight.device

    @property
    def pixel_hint(self) -> bool:
        """True when the hint is the control image itself (a hint encoder), False for a VAE latent."""
        return self.input_hint_block is not None

    def hint_tokens(self, hint: Tensor) -> Tensor:
        """[B, C, H, W] hint (latent, or pixels for a hint encoder) → packed tokens [B, N, C·p²]."""
        hint = hint.to(self.device, self.dtype)
        if self.input_hint_block is not None:
            hint = self.input_hint_block(hint)
        return patchify(hint, self.config.patch_size)

    def zero_init_heads(self) -> None:
        """Zero the hint input and every residual projection: a fresh net leaves the base unchanged.

        A hint encoder's last convolution keeps its random weights: zeroed too, it and the
        zeroed `controlnet_x_embedder` would each pass the other a zero gradient, and never train.
        """
        heads = [self.controlnet_x_embedder, *self.controlnet_blocks, *self.controlnet_single_blocks]
        with torch.no_grad():
            for layer in heads:
                for p in layer.parameters():
                    p.zero_()

    def forward_tokens(
        self,
        img: Tensor,
        img_ids: Tensor,
        txt: Tensor,
        txt_ids: Tensor,
        t: Tensor,
        y: Tensor,
        hint: Tensor,
        guidance: Tensor | None = None,
        txt_mask: Tensor | None = None,
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Residuals (one per double block, one per single block) for the base's image tokens.

        Inputs are the base DiT's `forward_tokens` inputs plus `hint`, packed tokens [B, N, C·p²].
        """
        if self.guidance_in is not None and guidance is None:
            raise ValueError("this ControlNet has a guidance input; the model it controls passed none")
        img, txt, vec, pe, key_mask = embed_inputs(self, img, img_ids, txt, txt_ids, t, y, guidance, txt_mask)
        img = img + self.controlnet_x_embedder(hint.to(self.dtype))

        double, single = [], []
        for block, head in zip(self.double_blocks, self.controlnet_blocks):
            img, txt = block(img, txt, vec, pe, key_mask)
            double.append(head(img))
        x = torch.cat([txt, img], dim=1)
        for block, head in zip(self.single_blocks, self.controlnet_single_blocks):
            x = block(x, vec, pe, key_mask)
            single.append(head(x[:, txt.shape[1] :]))
        return double, single


def spread(residuals: list[Tensor], n_blocks: int, repeat: bool) -> list[Tensor | None]:
    """One residual (or None) per base block: diffusers' interval rule, or cycling when `repeat`."""
    if not residuals:
        return [None] * n_blocks
    if repeat:
        return [residuals[i % len(residuals)] for i in range(n_blocks)]
    interval = math.ceil(n_blocks / len(residuals))
    return [residuals[i // interval] for i in range(n_blocks)]


# ---------------------------------------------------------------- the hint


@dataclass(eq=False)
class ControlHint:
    """The control image, turned into hint tokens for whatever latent size a sampler asks for.

    `image` [B, H, W, 3] in 0..1 is resized to the latent's pixel size and encoded by `vae`
    (latent nets) or scaled to [-1, 1] (hint-encoder nets); `latent` [B, C, h, w] may be given
    instead of image + vae. Results are kept per size, so each sampling step reuses them.
    """

    image: Tensor | None = None
    vae: nn.Module | None = None
    latent: Tensor | None = None
    _cache: dict = field(default_factory=dict, repr=False)

    def for_grid(self, net: FluxControlNet, gh: int, gw: int) -> Tensor:
        """Packed hint tokens [B, gh·gw, C·p²] for a gh × gw token grid."""
        key = (id(net), gh, gw)
        if key not in self._cache:
            self._cache[key] = net.hint_tokens(
                self._hint(net, gh * net.config.patch_size, gw * net.config.patch_size)
            )
        return self._cache[key]

    def _hint(self, net: FluxControlNet, h: int, w: int) -> Tensor:
        if net.pixel_hint:
            if self.image is None:
                raise ValueError(
                    "this ControlNet reads the control image itself; give an IMAGE, not a latent"
                )
            return _resized(self.image, h * HINT_DOWNSCALE, w * HINT_DOWNSCALE) * 2 - 1
        if self.latent is not None:
            latent = self.latent.float()
            if latent.shape[-2:] != (h, w):
                latent = F.interpolate(latent, size=(h, w), mode="bilinear", align_corners=False)
            return latent
        if self.image is None or self.vae is None:
            raise ValueError("this ControlNet reads a VAE latent of the control image: give the VAE")
        f = self.vae.config.downscale
        pixels = _resized(self.image, h * f, w * f) * 2 - 1
        with torch.no_grad():
            return self.vae.encode(pixels).float()


def _resized(image: Tensor, h: int, w: int) -> Tensor:
    """[B, H, W, 3] 0..1 → [B, 3, h, w] 0..1 (bicubic resize when the size differs, as ComfyUI does)."""
    x = image.permute(0, 3, 1, 2).float()
    if x.shape[-2:] != (h, w):
        x = F.interpolate(x, size=(h, w), mode="bicubic", align_corners=False).clamp(0, 1)
    return x


# ---------------------------------------------------------------- a DiT that adds control residuals


@dataclass(eq=False)
class Control:
    """One control net applied to a DiT: its hint, strength and the part of the run it acts in."""

    net: FluxControlNet
    hint: ControlHint
    strength: float = 1.0
    start: float = 0.0  # fraction of the run (0 = the first, noisiest step)
    end: float = 1.0

    def active(self, sigma: float, image_seq_len: int) -> bool:
        """Whether a step at noise level `sigma` lies in [start, end] of the run.

        The fractions map to noise levels through Flux's resolution-dependent shift, so they are
        fractions of the steps for the "flux" schedule (ComfyUI maps its percentages the same way).
        """
        if self.start <= 0.0 and self.end >= 1.0:
            return True
        mu = flux_mu(image_seq_len)
        hi = float(time_shift(mu, torch.tensor([1.0 - self.start], dtype=torch.float64)))
        lo = float(time_shift(mu, torch.tensor([1.0 - self.end], dtype=torch.float64)))
        return lo - 1e-6 <= sigma <= hi + 1e-6


class ControlledFlux(Flux):
    """A Flux DiT (sharing the base's tensors) whose forward adds its `controls`' residuals."""

    controls: list[Control]

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
        step_cache=None,
    ) -> Tensor:
        double, single = self.control_residuals(img, img_ids, txt, txt_ids, t, y, guidance, txt_mask)
        return super().forward_tokens(
            img, img_ids, txt, txt_ids, t, y, guidance, txt_mask,
            controlnet_double=_merge(controlnet_double, double),
            controlnet_single=_merge(controlnet_single, single),
            step_cache=step_cache,  # unused while a control is active
        )  # fmt: skip

    def control_residuals(self, img, img_ids, txt, txt_ids, t, y, guidance, txt_mask):
        """Per-base-block residual lists (double, single) summed over the active controls, or Nones."""
        gh, gw = int(img_ids[:, 1].max()) + 1, int(img_ids[:, 2].max()) + 1
        sigma = float(t.max())
        double: list[Tensor | None] | None = None
        single: list[Tensor | None] | None = None
        for control in self.controls:
            if control.strength == 0 or not control.active(sigma, img.shape[1]):
                continue
            net = control.net
            hint = control.hint.for_grid(net, gh, gw)
            if hint.shape[0] != img.shape[0]:
                if img.shape[0] % hint.shape[0]:
                    raise ValueError(
                        f"control image batch {hint.shape[0]} does not divide the batch {img.shape[0]}"
                    )
                hint = hint.repeat(img.shape[0] // hint.shape[0], 1, 1)
            d, s = net.forward_tokens(img, img_ids, txt, txt_ids, t, y, hint, guidance, txt_mask)
            double = _accumulate(double, spread(d, len(self.double_blocks), net.pixel_hint), control.strength)
            single = _accumulate(single, spread(s, len(self.single_blocks), net.pixel_hint), control.strength)
        return double, single


def _merge(a: list | None, b: list | None) -> list | None:
    """Per-block residual lists added together (a caller's own residuals plus this model's)."""
    if a is None or b is None:
        return b if a is None else a
    return [x if y is None else (y if x is None else x + y) for x, y in zip(a, b)]


def _accumulate(total: list | None, residuals: list[Tensor | None], strength: float) -> list | None:
    if all(r is None for r in residuals):
        return total
    total = total or [None] * len(residuals)
    return [
        a if r is None else (r * strength if a is None else a + r * strength)
        for a, r in zip(total, residuals)
    ]


def with_control(
    model: Flux,
    net: FluxControlNet,
    hint: ControlHint,
    strength: float = 1.0,
    start: float = 0.0,
    end: float = 1.0,
) -> ControlledFlux:
    """The DiT as a new model object (sharing its tensors) that applies one more control net."""
    if not isinstance(model, Flux):
        raise TypeError(f"a ControlNet controls a Flux DiT, not {type(model).__name__}")
    c, n = model.config, net.config
    if (n.hidden_size, n.in_channels, n.patch_size, n.context_dim, n.vec_dim) != (
        c.hidden_size,
        c.in_channels,
        c.patch_size,
        c.context_dim,
        c.vec_dim,
    ):
        raise ValueError(
            f"this ControlNet was made for another DiT (width {n.hidden_size}, latent "
            f"{n.in_channels}x{n.patch_size}², text {n.context_dim}/{n.vec_dim}; the model has "
            f"{c.hidden_size}, {c.in_channels}x{c.patch_size}², {c.context_dim}/{c.vec_dim})"
        )
    new = copy_structure(model)
    new.__class__ = (
        ControlledFlux
        if type(model) in (Flux, ControlledFlux)
        else type("Controlled" + type(model).__name__, (ControlledFlux, type(model)), {})
    )
    new.controls = [*getattr(model, "controls", []), Control(net, hint, strength, start, end)]
    return new


# ---------------------------------------------------------------- checkpoints

_HEADS = ("controlnet_x_embedder.", "controlnet_blocks.", "controlnet_single_blocks.", "input_hint_block.")
# diffusers' ControlNetConditioningEmbedding → the XLabs Sequential indices HintEncoder uses
_DIFFUSERS_HINT = {"conv_in": 0, **{f"blocks.{i}": 2 * i + 2 for i in range(6)}, "conv_out": 14}


def _split_heads(sd: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    heads = {k: v for k, v in sd.items() if k.startswith(_HEADS)}
    return {k: v for k, v in sd.items() if k not in heads}, heads


def controlnet_from_state_dict(
    sd: dict[str, Tensor],
    metadata: dict[str, str] | None = None,
    path: str | Path = "<state dict>",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> FluxControlNet:
    """Build and load a FluxControlNet from a diffusers- or BFL-layout state dict."""
    sd = {
        (
            "controlnet_x_embedder." + k[len("pos_embed_input.") :] if k.startswith("pos_embed_input.") else k
        ): v
        for k, v in sd.items()
    }
    for prefix in ("controlnet.", "model.control_model."):
        if not any(k.startswith(_HEADS) for k in sd) and any(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    if "controlnet_mode_embedder.weight" in sd:
        raise CheckpointError(
            path,
            "ControlNet-Union (mode embedder) files are not supported",
            "controlnet_mode_embedder.weight",
        )
    if "controlnet_x_embedder.weight" not in sd:
        raise CheckpointError(
            path,
            "not a Flux ControlNet (no 'controlnet_x_embedder' or 'pos_embed_input')",
            "controlnet_x_embedder.weight",
        )
    body, heads = _split_heads(sd)
    layout = detect_dit_layout(body)
    if layout is None:
        raise CheckpointError(
            path, "not a Flux ControlNet (its trunk is neither BFL nor diffusers DiT layout)", "img_in.weight"
        )
    width = heads["controlnet_x_embedder.weight"].shape[0]
    if layout == "diffusers":
        # the converter expects a full DiT; a stand-in output layer (dropped right after) completes the trunk
        stand_in = {
            "proj_out.weight": torch.zeros(2, 1),
            "norm_out.linear.weight": torch.zeros(2, 1),
            "norm_out.linear.bias": torch.zeros(2),
        }
        body = {
            k: v
            for k, v in convert_diffusers_dit({**body, **stand_in}, path).items()
            if not k.startswith("final_layer.")
        }
        for name, index in _DIFFUSERS_HINT.items():
            for part in ("weight", "bias"):
                old = f"input_hint_block.{name}.{part}"
                if old in heads:
                    heads[f"input_hint_block.{index}.{part}"] = heads.pop(old)
    # infer_dit_config reads the output width off the final layer, which a trunk lacks: use the input width
    sizing = {
        **body,
        "final_layer.linear.weight": torch.empty(body["img_in.weight"].shape[1], 0, device="meta"),
    }
    config = infer_dit_config(sizing, path, metadata_config(metadata or {}, path))
    hint_channels = (
        heads["input_hint_block.14.weight"].shape[0] if "input_hint_block.14.weight" in heads else 0
    )
    if config.hidden_size != width:
        raise CheckpointError(
            path,
            f"controlnet_x_embedder is {width} wide, the trunk {config.hidden_size}",
            "controlnet_x_embedder.weight",
        )
    with torch.device("meta"):
        net = FluxControlNet(config, hint_channels)
    assign_checked(net, {**body, **heads}, path, device, dtype)
    return net


def load_controlnet(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> FluxControlNet:
    """Load a Flux ControlNet `.safetensors` (diffusers, BFL or XLabs-style keys)."""
    sd, metadata = read_safetensors(path)
    return controlnet_from_state_dict(sd, metadata, path, device, dtype)


def save_controlnet(net: FluxControlNet, path: str | Path, card: str | None = None) -> None:
    """Write a ControlNet in the BFL layout with its config in the `tessera.config` metadata."""
    metadata = {"tessera.config": json.dumps(asdict(net.config))}
    if card:
        metadata["tessera.card"] = card
    write_safetensors(path, net.state_dict(), metadata)


def controlnet_from_dit(
    model: Flux, depth: int = 2, depth_single: int = 0, hint_channels: int = 0
) -> FluxControlNet:
    """A ControlNet initialised from the DiT's first blocks, heads zeroed (diffusers' `from_transformer`)."""
    config = replace(
        model.config,
        depth=min(depth, model.config.depth),
        depth_single=min(depth_single, model.config.depth_single),
    )
    net = FluxControlNet(config, hint_channels).to(model.device, model.dtype)
    trunk = {k: v for k, v in model.state_dict().items() if not k.startswith("final_layer.")}
    missing, _ = net.load_state_dict(trunk, strict=False)
    assert all(k.startswith(_HEADS) for k in missing), missing
    net.zero_init_heads()
    return net


# ---------------------------------------------------------------- control for the AR engine

LORA_PREFIX = "lora."  # an AR ControlNet file's own LoRA on the GPT: PEFT keys after this prefix
LOGITS = -1  # the key of the logit bias among an AR ControlNet's per-layer embeddings


@dataclass(frozen=True)
class ARControlConfig:
    dim: int  # the GPT's width
    downsample: int = 16  # pixels per token side (the VQ tokenizer's)
    width: int = 64  # convolution channels
    layers: tuple[int, ...] = ()  # GPT layers (besides the first) whose input also takes the control
    vocab: int = 0  # > 0: a head adding a control bias to the GPT's logits (its vocabulary size)


class ARControlNet(nn.Module):
    """Control image → per-token control embeddings for the GPT (ControlAR's conditional decoding).

    A convolutional encoder (`input_hint_block`) gives one feature vector per token; zero-initialised
    projections turn it into an embedding for the GPT's input (`controlnet_out`) and for the input of
    each layer in `config.layers` (`controlnet_blocks.N`), and optionally a bias for its logits
    (`controlnet_logits`, over `config.vocab` tokens), so an untrained net leaves the GPT unchanged. The embedding of grid position i is added at the sequence position that predicts
    token i (the previous token, or the last condition row for i = 0), so raster-order decoding sees
    the control of the token it is about to draw. Sequence length, RoPE and the KV cache are
    untouched, so fixed tokens, CFG and compiled decoding work as without it.

    `lora` holds a LoRA on the GPT trained jointly with the control (PEFT keys; empty for a control
    trained against a frozen GPT), as ControlAR fine-tunes its generator: `with_ar_control` applies
    both or raises, never one alone. `base` names the GPT it was trained on and its fingerprint.
    """

    def __init__(
        self, config: ARControlConfig, lora: dict[str, Tensor] | None = None, base: dict | None = None
    ):
        super().__init__()
        self.config = c = config
        stages = int(math.log2(c.downsample))
        if 2**stages != c.downsample:
            raise ValueError(f"downsample {c.downsample} is not a power of two")
        if any(i < 1 for i in c.layers) or len(set(c.layers)) != len(c.layers):
            raise ValueError(f"control layers {list(c.layers)}: distinct GPT layers from 1 (0 is the input)")
        layers: list[nn.Module] = [nn.Conv2d(3, c.width, 3, padding=1), nn.SiLU()]
        for _ in range(stages):
            layers += [nn.Conv2d(c.width, c.width, 3, padding=1, stride=2), nn.SiLU()]
        layers += [
            nn.Conv2d(c.width, c.width, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(c.width, c.width, 3, padding=1),
            nn.SiLU(),
        ]
        self.input_hint_block = nn.Sequential(*layers)
        self.controlnet_out = nn.Conv2d(c.width, c.dim, 1)
        self.controlnet_blocks = nn.ModuleList(nn.Linear(c.width, c.dim) for _ in c.layers)
        self.controlnet_logits = nn.Linear(c.width, c.vocab) if c.vocab else None
        self.lora: dict[str, Tensor] = dict(lora or {})
        self.base: dict = dict(base or {})

    def zero_init_heads(self) -> None:
        """Zero every projection into the GPT (the encoder keeps its random weights, so it trains)."""
        with torch.no_grad():
            for head in (
                self.controlnet_out,
                *self.controlnet_blocks,
                *filter(None, [self.controlnet_logits]),
            ):
                for p in head.parameters():
                    p.zero_()

    def embeddings(self, image: Tensor, gh: int, gw: int) -> dict[int, Tensor]:
        """IMAGE [B, H, W, 3] (0..1, resized to the grid's pixels) → {GPT layer: [B, gh·gw, dim]} in
        raster order; layer 0 is the GPT's input, `LOGITS` the logit bias [B, gh·gw, vocab]."""
        p = self.controlnet_out.weight
        f = self.config.downsample
        pixels = (_resized(image, gh * f, gw * f) * 2 - 1).to(p.device, p.dtype)
        h = self.input_hint_block(pixels)
        out = {0: self.controlnet_out(h).flatten(2).transpose(1, 2)}
        tokens = h.flatten(2).transpose(1, 2)
        for layer, head in zip(self.config.layers, self.controlnet_blocks):
            out[layer] = head(tokens)
        if self.controlnet_logits is not None:
            out[LOGITS] = self.controlnet_logits(tokens)
        return out

    def gpt_lora(self, model: GPT) -> Lora:
        """The file's LoRA matched to `model`; raises unless every tensor of it applies."""
        lora = lora_from_state_dict(self.lora, model, "the AR ControlNet's LoRA")
        if lora.unmatched:
            key, why = next(iter(lora.unmatched.items()))
            raise ValueError(
                f"this AR ControlNet's LoRA does not fit the GPT ({len(lora.unmatched)} of its tensors "
                f"apply nowhere, e.g. {key}: {why}); the control and its LoRA apply together or not at all"
            )
        return lora

    def summary(self, model: GPT) -> str:
        """What applying this net to `model` does, and whether `model` is the GPT it was trained on."""
        where = "the input" + (
            f" and layers {', '.join(map(str, self.config.layers))}" if self.config.layers else ""
        )
        text = f"AR ControlNet: control into {where}" + (
            ", and a bias on the logits" if self.config.vocab else ""
        )
        if self.lora:
            text += f", with its LoRA on the GPT ({len(self.lora) // 2} weights)"
        if self.base.get("fingerprint") and self.base["fingerprint"] != gpt_fingerprint(model):
            text += (
                f"; trained on {self.base.get('name', 'another GPT')}, not on this model: it applies, "
                "but steers less than it did there"
            )
        return text


def gpt_fingerprint(model: GPT) -> str:
    """A short hash of a few GPT weights (rounded to bf16, so fp16/bf16/fp32 copies agree): tells the
    GPT an AR ControlNet was trained on from another of the same shape."""
    h = hashlib.sha256()
    for t in (
        model.tok_embeddings.weight[:8],
        model.output.weight[:8],
        model.layers[0].attention.wqkv.weight[:8],
    ):
        h.update(t.detach().float().cpu().to(torch.bfloat16).view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass(eq=False)
class ARControl:
    """One AR control net applied to a GPT, with its control image and strength."""

    net: ARControlNet
    image: Tensor
    strength: float = 1.0
    _cache: dict = field(default_factory=dict, repr=False)

    def embeddings(self, gh: int, gw: int) -> dict[int, Tensor]:
        if (gh, gw) not in self._cache:
            self._cache[(gh, gw)] = self.net.embeddings(self.image, gh, gw)
        return self._cache[(gh, gw)]


class ControlledBlock(Block):
    """A GPT block (sharing the base's tensors) that adds `control` [B, S, dim] to its input while set."""

    control: Tensor | None = None

    def forward(self, x, freqs, input_pos, mask, use_cache: bool = True) -> Tensor:
        if self.control is not None:
            x = x + self.control.to(x.dtype)
        return super().forward(x, freqs, input_pos, mask, use_cache)


class ControlledGPT(GPT):
    """A GPT (sharing the base's tensors) whose forward adds its `ar_controls`' embeddings."""

    ar_controls: list[ARControl]

    def forward(self, x: Tensor, input_pos: Tensor, use_cache: bool = True) -> Tensor:
        if self.grid is None or not self.ar_controls:
            return super().forward(x, input_pos, use_cache)
        gh, gw = self.grid
        n = gh * gw
        sums: dict[int, Tensor] = {}
        for control in self.ar_controls:
            if control.strength:
                for layer, e in control.embeddings(gh, gw).items():
                    sums[layer] = control.strength * e + (sums[layer] if layer in sums else 0)
        if not sums:
            return super().forward(x, input_pos, use_cache)
        target = input_pos - self.prefix_len + 1  # the grid index each position predicts
        valid = ((target >= 0) & (target < n)).to(x.dtype)[None, :, None]
        index = target.clamp(0, n - 1)

        def at_positions(e: Tensor) -> Tensor:
            if e.shape[0] != x.shape[0]:
                if x.shape[0] % e.shape[0]:
                    raise ValueError(
                        f"control image batch {e.shape[0]} does not divide the batch {x.shape[0]}"
                    )
                e = e.repeat(x.shape[0] // e.shape[0], 1, 1)
            return e[:, index].to(x.dtype) * valid

        x = x + at_positions(sums.pop(0))
        bias = sums.pop(LOGITS, None)
        blocks = [self.layers[i] for i in sums]
        try:
            for block, e in zip(blocks, sums.values()):
                block.control = at_positions(e)
            logits = super().forward(x, input_pos, use_cache)
            return logits if bias is None else logits + at_positions(bias).float()
        finally:
            for block in blocks:
                block.control = None


def _subclass(obj: nn.Module, base: type, mixin: type, plain: type) -> type:
    """`mixin` for a plain `base` object (or one already mixed), else a mixin subclass of its own class."""
    if type(obj) in (base, mixin):
        return mixin
    if isinstance(obj, mixin):
        return type(obj)
    return type(mixin.__name__.replace(plain.__name__, "") + type(obj).__name__, (mixin, type(obj)), {})


def with_ar_control(model: GPT, net: ARControlNet, image: Tensor, strength: float = 1.0) -> ControlledGPT:
    """The GPT as a new model object (sharing its tensors) that applies one more AR control net.

    A net carrying a LoRA applies it too (at strength 1 whenever `strength` is not 0: it is part of
    the generator the control was trained with), or raises when the LoRA does not fit the model.
    """
    if not isinstance(model, GPT):
        raise TypeError(f"an AR ControlNet controls a GPT, not {type(model).__name__}")
    if net.config.vocab and net.config.vocab != model.config.vocab_size:
        raise ValueError(
            f"this AR ControlNet biases {net.config.vocab} token logits; the GPT has {model.config.vocab_size}"
        )
    if net.config.dim != model.config.dim:
        raise ValueError(
            f"this AR ControlNet is for a {net.config.dim}-wide GPT; the model is {model.config.dim} wide"
        )
    if net.config.layers and max(net.config.layers) >= model.config.n_layer:
        raise ValueError(
            f"this AR ControlNet feeds layer {max(net.config.layers)}; the GPT has {model.config.n_layer} layers"
        )
    if net.lora and strength != 0:
        model = with_loras(model, [(net.gpt_lora(model), 1.0)])
    new = copy_structure(model)
    new.clear_caches()
    new.__class__ = _subclass(model, GPT, ControlledGPT, GPT)
    for i in net.config.layers:
        new.layers[i].__class__ = _subclass(new.layers[i], Block, ControlledBlock, Block)
    new.ar_controls = [*getattr(model, "ar_controls", []), ARControl(net, image, strength)]
    return new


def save_ar_controlnet(net: ARControlNet, path: str | Path, card: str | None = None) -> None:
    """Write an AR ControlNet, its LoRA (if any) under `lora.`, its config and base in `tessera.config`."""
    config = {"kind": "ar", **asdict(net.config), **({"base": net.base} if net.base else {})}
    metadata = {"tessera.config": json.dumps(config)}
    if card:
        metadata["tessera.card"] = card
    dtype = net.controlnet_out.weight.dtype
    lora = {LORA_PREFIX + k: v.detach().to("cpu", dtype) for k, v in net.lora.items()}
    write_safetensors(path, {**net.state_dict(), **lora}, metadata)


def load_any_controlnet(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> FluxControlNet | ARControlNet:
    """A ControlNet file for either engine: an AR control net (`controlnet_out`) or a Flux one."""
    sd, metadata = read_safetensors(path)
    if "controlnet_out.weight" not in sd:
        return controlnet_from_state_dict(sd, metadata, path, device, dtype)
    raw = metadata_config(metadata, path)
    lora = {k[len(LORA_PREFIX) :]: v for k, v in sd.items() if k.startswith(LORA_PREFIX)}
    own = {k: v for k, v in sd.items() if not k.startswith(LORA_PREFIX)}
    blocks = {k.split(".")[1] for k in own if k.startswith("controlnet_blocks.")}
    layers = raw.get("layers", [])
    if not isinstance(layers, list) or len(layers) != len(blocks):
        raise CheckpointError(
            path, f"'layers' in tessera.config names {layers!r}, the file has {len(blocks)} controlnet_blocks"
        )
    try:
        config = ARControlConfig(
            dim=own["controlnet_out.weight"].shape[0],
            downsample=int(raw.get("downsample", 16)),
            width=own["controlnet_out.weight"].shape[1],
            layers=tuple(int(i) for i in layers),
            vocab=own["controlnet_logits.weight"].shape[0] if "controlnet_logits.weight" in own else 0,
        )
        with torch.device("meta"):
            net = ARControlNet(config, base=raw.get("base") if isinstance(raw.get("base"), dict) else None)
    except (ValueError, TypeError) as e:
        raise CheckpointError(path, f"inconsistent AR ControlNet config ({e})") from None
    assign_checked(net, own, path, device, dtype)
    net.lora = {k: v.to(device) for k, v in lora.items()}
    return net
