"""Diffusion nodes: load a DiT and a VAE, make and move latents, denoise whole or one step at a time."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from tessera.engines.checkpoint import CheckpointError
from tessera.engines.flux import Flux, check_conditioning, dit_from_state_dict, guided_velocity, load_dit
from tessera.engines.fp8 import Fp8Unavailable, require_fp8, store_fp8
from tessera.engines.latent import Latent
from tessera.engines.latent import denoise as run_denoise  # the nodes' `denoise` input is the strength
from tessera.engines.preview import latent_preview, rgb_projection_for
from tessera.engines.samplers import SAMPLERS
from tessera.engines.schedules import SCHEDULES, sigmas_for
from tessera.engines.step_cache import StepCache
from tessera.engines.layouts import (
    detect_family,
    family_of,
    read_weights,
    split_checkpoint,
    text_encoder_from_state_dict,
    tokenizer_for,
)
from tessera.engines.tokenization import TokenizerError
from tessera.engines.vae import FAMILIES, AutoencoderKL, load_vae, vae_from_state_dict, with_family

from tessera.compile import compile_dit
from tessera.node import MAX_SEED, ExecutionContext, Input, Node, NodeError, Output
from tessera.nodes.text import RealTextEncoder

MAX_SIDE = 8192
DTYPES = {"default": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FP8 = "fp8_e4m3fn"  # Linear weights stored in fp8, upcast per layer to the compute dtype (engines/fp8.py)


class LoadDiffusionModel(Node):
    """Load a Flux-architecture DiT (BFL or diffusers layout) from the diffusion_models folder.

    It loads into RAM; the model manager (tessera/model_manager.py) moves it to the GPU when a
    node needs it, within the VRAM budget, streaming its blocks if it is larger than that.
    """

    category = "loaders"
    inputs = (
        Input("file", "STRING", model_folder="diffusion_models", link="widget"),
        Input("weight_dtype", "STRING", default="default", choices=(*DTYPES, FP8), link="widget"),
    )
    outputs = (Output("model", "DIT_MODEL"),)

    def execute(self, ctx: ExecutionContext, file: str, weight_dtype: str = "default"):
        path = ctx.model_file("diffusion_models", file)
        try:
            if weight_dtype == FP8:
                try:
                    require_fp8(f"weight_dtype {FP8}")
                except Fp8Unavailable as e:
                    raise NodeError(str(e), input="weight_dtype") from None
                # Keep the file's own dtypes while loading (an fp8 file stays 8-bit), then quantise.
                return (store_fp8(load_dit(path, "cpu", None), ctx.dtype),)
            return (load_dit(path, "cpu", DTYPES[weight_dtype] or ctx.dtype),)
        except CheckpointError as e:
            raise NodeError(str(e), input="file") from None


class LoadVAE(Node):
    """Load an AutoencoderKL (SD or Flux family, ldm or diffusers layout) from the vae folder."""

    category = "loaders"
    inputs = (
        Input("file", "STRING", model_folder="vae", link="widget"),
        Input("family", "STRING", default="auto", choices=("auto", *FAMILIES), link="widget"),
    )
    outputs = (Output("vae", "VAE"),)

    def execute(self, ctx: ExecutionContext, file: str, family: str = "auto"):
        try:
            vae = load_vae(ctx.model_file("vae", file), ctx.device, ctx.dtype)
        except CheckpointError as e:
            raise NodeError(str(e), input="file") from None
        return (with_family(vae, family) if family != "auto" else vae,)


class LoadCheckpoint(Node):
    """Load an all-in-one checkpoint (ComfyUI's layout): the DiT, its VAE and its text encoders from one file.

    The file's parts are told by their prefixes (`model.diffusion_model.`, `vae.` or
    `first_stage_model.`, `text_encoders.<name>.transformer.`); each text encoder's kind (CLIP or
    T5) by its tensors, and its tokenizer is looked for beside the file, then in models/tokenizers/.
    """

    category = "loaders"
    inputs = (Input("file", "STRING", model_folder="checkpoints", link="widget"),)
    outputs = (Output("model", "DIT_MODEL"), Output("vae", "VAE"), Output("text_encoder", "TEXT_ENCODER"))

    def execute(self, ctx: ExecutionContext, file: str):
        path = ctx.model_file("checkpoints", file)
        try:
            sd, _, where = read_weights(path)
            parts = split_checkpoint(sd)
            lacking = [name for name in ("model", "vae") if name not in parts]
            if lacking:
                raise NodeError(
                    f"{self.type_name}: {path.name} is not an all-in-one checkpoint (no "
                    f"{' or '.join(CHECKPOINT_PARTS[n] for n in lacking)} tensors; it holds {_a(detect_family(sd))}): "
                    "load its parts with LoadDiffusionModel, LoadVAE and DualCLIPLoader",
                    input="file",
                )
            model = dit_from_state_dict(parts.pop("model"), {}, path, ctx.device, ctx.dtype)
            vae = vae_from_state_dict(parts.pop("vae"), {}, path, ctx.device, ctx.dtype)
            encoders: dict = {}
            for name, part in sorted(parts.items()):
                encoder = text_encoder_from_state_dict(part, {}, f"{path.name} text_encoders.{name}", ctx.device, ctx.dtype)
                family = family_of(encoder)
                if family in encoders:
                    raise NodeError(f"{self.type_name}: {path.name} holds two {family.upper()} text encoders", input="file")
                encoders[family] = (encoder, tokenizer_for(encoder, where, Path(ctx.models_dir)))
        except (CheckpointError, TokenizerError) as e:
            raise NodeError(f"{self.type_name}: {e}", input="file") from None
        if not encoders:
            raise NodeError(
                f"{self.type_name}: {path.name} has no text encoders (text_encoders.*); load them with DualCLIPLoader",
                input="file",
            )
        return model, vae, RealTextEncoder(**encoders)


CHECKPOINT_PARTS = {"model": "model.diffusion_model.*", "vae": "vae.* / first_stage_model.*"}


def _a(noun: str) -> str:
    return ("an " if noun[0] in "AEIOUaeiou" else "a ") + noun


class EmptyLatent(Node):
    """A zero latent of a pixel size: channels and scale from a connected VAE, else from `channels`."""

    category = "latent"
    inputs = (
        Input("width", "INT", default=1024, min=16, max=MAX_SIDE, step=16),
        Input("height", "INT", default=1024, min=16, max=MAX_SIDE, step=16),
        Input("batch", "INT", default=1, min=1, max=64),
        Input("channels", "INT", default=16, min=1, max=128),
        Input("vae", "VAE", optional=True),
    )
    outputs = (Output("latent", "LATENT"),)

    def execute(
        self, ctx: ExecutionContext, width, height, batch, channels, vae: AutoencoderKL | None = None
    ):
        f = vae.config.downscale if vae is not None else 8
        c = vae.config.latent_channels if vae is not None else channels
        h, w = height // f, width // f
        if h < 1 or w < 1:
            raise NodeError(f"{width}x{height} is smaller than one {f}x{f} latent cell", input="width")
        projection = rgb_projection_for(vae) if vae is not None else None
        return (Latent(torch.zeros(batch, c, h, w), rgb_projection=projection),)


class VAEEncode(Node):
    """Encode images into normalised latents (the posterior mean), for img2img and inpainting."""

    category = "latent"
    inputs = (Input("vae", "VAE"), Input("image", "IMAGE"))
    outputs = (Output("latent", "LATENT"),)

    def execute(self, ctx: ExecutionContext, vae: AutoencoderKL, image: torch.Tensor):
        f = vae.config.downscale
        _, h, w, _ = image.shape
        ch, cw = h // f * f, w // f * f
        if ch == 0 or cw == 0:
            raise NodeError(f"image {w}x{h} is smaller than one {f}x{f} latent cell", input="image")
        top, left = (h - ch) // 2, (w - cw) // 2  # centre crop to whole latent cells
        pixels = image[:, top : top + ch, left : left + cw].movedim(-1, 1) * 2 - 1
        latent = vae.encode(pixels).float().cpu()
        return (Latent(latent, rgb_projection=rgb_projection_for(vae)),)


class VAEDecode(Node):
    """Decode a latent into an image; tile_size > 0 decodes in overlapping tiles to bound memory."""

    category = "latent"
    inputs = (
        Input("vae", "VAE"),
        Input("latent", "LATENT"),
        Input("tile_size", "INT", default=0, min=0, max=4096, step=8),
    )
    outputs = (Output("image", "IMAGE"),)

    def execute(self, ctx: ExecutionContext, vae: AutoencoderKL, latent: Latent, tile_size: int = 0):
        if latent.channels != vae.config.latent_channels:
            raise NodeError(
                f"latent has {latent.channels} channels but this VAE decodes {vae.config.latent_channels}",
                input="latent",
            )
        tile = tile_size // vae.config.downscale
        z = latent.samples.to(ctx.device)
        pixels = vae.decode_tiled(z, tile, max(1, tile // 4)) if tile > 0 else vae.decode(z)
        return (((pixels.float().cpu() + 1) / 2).clamp(0, 1).movedim(1, -1),)


class SetLatentMask(Node):
    """Attach an inpainting mask: where the mask is 1 the sampler regenerates, elsewhere it keeps the latent."""

    category = "latent"
    inputs = (Input("latent", "LATENT"), Input("mask", "MASK"))
    outputs = (Output("latent", "LATENT"),)

    def execute(self, ctx: ExecutionContext, latent: Latent, mask: torch.Tensor):
        if mask.shape[0] not in (1, latent.batch):
            raise NodeError(
                f"mask batch {mask.shape[0]} does not match latent batch {latent.batch}", input="mask"
            )
        h, w = latent.samples.shape[-2:]
        m = F.interpolate(mask.float()[:, None], size=(h, w), mode="area").clamp(0, 1)
        return (Latent(latent.samples, m.expand(latent.batch, -1, -1, -1).clone(), latent.rgb_projection),)


# ---------------------------------------------------------------- denoising

_DENOISE_INPUTS = (
    Input("model", "DIT_MODEL"),
    Input("positive", "CONDITIONING"),
    Input("negative", "CONDITIONING", optional=True),
    Input("latent", "LATENT"),
    Input("sampler", "STRING", default="euler", choices=tuple(SAMPLERS), link="widget"),
    Input("schedule", "STRING", default="flux", choices=tuple(SCHEDULES), link="widget"),
    Input("steps", "INT", default=20, min=1, max=200),
)
_GUIDANCE_INPUTS = (
    Input("cfg", "FLOAT", default=1.0, min=0.0, max=30.0, step=0.1),
    Input("guidance", "FLOAT", default=3.5, min=0.0, max=30.0, step=0.1),
    Input("seed", "INT", default=0, min=0, max=MAX_SEED, widget="seed"),
    Input("denoise", "FLOAT", default=1.0, min=0.01, max=1.0, step=0.01),
)


def _prepare(
    node: Node,
    model: Flux,
    positive,
    negative,
    latent: Latent,
    schedule: str,
    steps: int,
    cfg: float,
    guidance: float,
    denoise_strength: float,
    step_cache: StepCache | None = None,
):
    """Validate the inputs against the model and build the guided velocity and the sigmas."""
    name = node.type_name
    c = model.config
    if latent.channels != c.in_channels:
        raise NodeError(
            f"{name}: latent has {latent.channels} channels but the DiT takes {c.in_channels}; "
            "use the VAE that belongs to this model",
            input="latent",
        )
    for input_name, cond in (("positive", positive), ("negative", negative)):
        if cond is None:
            continue
        try:
            check_conditioning(model, cond, f"{name} {input_name}")
        except ValueError as e:
            raise NodeError(str(e), input=input_name) from None
        if cond.batch not in (1, latent.batch):
            raise NodeError(
                f"{name}: {input_name} batch {cond.batch} does not match latent batch {latent.batch}",
                input=input_name,
            )
    if negative is None and cfg != 1.0:
        raise NodeError(
            f"{name}: cfg {cfg} needs a negative conditioning (connect one, or set cfg to 1)",
            input="negative",
        )
    p = c.patch_size
    h, w = latent.samples.shape[-2:]
    seq_len = (-(-h // p)) * (-(-w // p))
    sigmas = sigmas_for(schedule, steps, denoise_strength, seq_len)
    compile_dit(model)  # a no-op unless --compile is on
    velocity = guided_velocity(model, positive, negative, cfg, guidance, who=name, step_cache=step_cache)
    return velocity, sigmas


def _progress(ctx: ExecutionContext, latent: Latent, total: int):
    def callback(info: dict) -> None:
        ctx.progress(info["i"] + 1, total, latent_preview(info["denoised"], latent.rgb_projection))

    return callback


class DiTSampler(Node):
    """Denoise a latent with a DiT: the whole sampler loop, with CFG, distilled guidance and img2img denoise.

    `step_cache` > 0 lets a step reuse the deeper blocks' residual of the last full step while
    the first block's output changes less than that fraction (First-Block Cache); 0 is exact.
    """

    category = "sampling"
    inputs = (
        _DENOISE_INPUTS
        + _GUIDANCE_INPUTS
        + (Input("step_cache", "FLOAT", default=0.0, min=0.0, max=1.0, step=0.01, link="widget"),)
    )
    outputs = (Output("latent", "LATENT"),)

    def execute(
        self,
        ctx: ExecutionContext,
        model,
        positive,
        latent,
        sampler,
        schedule,
        steps,
        cfg,
        guidance,
        seed,
        denoise,
        negative=None,
        step_cache=0.0,
    ):
        velocity, sigmas = _prepare(
            self, model, positive, negative, latent, schedule, steps, cfg, guidance, denoise, StepCache(step_cache)
        )
        out = run_denoise(
            velocity,
            latent,
            sampler=sampler,
            sigmas=sigmas,
            seed=seed,
            device=model.device,
            callback=_progress(ctx, latent, steps),
        )
        return (out,)


class DiTDenoiseStep(Node):
    """Exactly one sampler step (step `step` of the schedule), so a graph can change prompt or cfg mid-way.

    Chaining steps 0..steps-1 with the same settings reproduces DiTSampler: the latent carries the
    run (initial noise, source, multistep memory) from one step to the next.
    """

    category = "sampling"
    inputs = _DENOISE_INPUTS + (Input("step", "INT", default=0, min=0, max=199),) + _GUIDANCE_INPUTS
    outputs = (Output("latent", "LATENT"),)

    def execute(
        self,
        ctx: ExecutionContext,
        model,
        positive,
        latent,
        sampler,
        schedule,
        steps,
        step,
        cfg,
        guidance,
        seed,
        denoise,
        negative=None,
    ):
        if step >= steps:
            raise NodeError(
                f"step {step} is past the last step ({steps - 1}) of a {steps}-step schedule", input="step"
            )
        velocity, sigmas = _prepare(
            self, model, positive, negative, latent, schedule, steps, cfg, guidance, denoise
        )
        try:
            out = run_denoise(
                velocity,
                latent,
                sampler=sampler,
                sigmas=sigmas,
                seed=seed,
                start=step,
                stop=step + 1,
                device=model.device,
                callback=_progress(ctx, latent, steps),
            )
        except ValueError as e:
            raise NodeError(f"{self.type_name}: {e}", input="latent") from None
        return (out,)
