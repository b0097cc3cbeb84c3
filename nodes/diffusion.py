"""Diffusion nodes: load a DiT and a VAE, make and move latents, denoise whole or one step at a time."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open

from tessera.compile import compile_dit
from tessera.engines.checkpoint import CheckpointError
from tessera.engines.flux import (
    Flux,
    FluxConfig,
    bfl_state_dict,
    check_conditioning,
    check_widths,
    dit_config,
    dit_from_state_dict,
    guided_velocity,
    infer_dit_config,
    load_dit,
)
from tessera.engines.fp8 import Fp8Unavailable, require_fp8, store_fp8
from tessera.engines.generation import diffusion_sigmas, latent_to_image
from tessera.engines.latent import Latent
from tessera.engines.latent import denoise as run_denoise  # the nodes' `denoise` input is the strength
from tessera.engines.layouts import (
    detect_family,
    family_of,
    header_weights,
    load_text_encoder,
    locate,
    read_weights,
    related_files,
    split_checkpoint,
    text_encoder_from_state_dict,
    text_encoder_width,
    tokenizer_for,
)
from tessera.engines.preview import latent_preview, rgb_projection_for
from tessera.engines.samplers import SAMPLERS
from tessera.engines.schedules import SCHEDULES
from tessera.engines.step_cache import StepCache
from tessera.engines.tokenization import TokenizerError
from tessera.engines.vae import FAMILIES, AutoencoderKL, load_vae, vae_from_state_dict, with_family
from tessera.node import MAX_SEED, ExecutionContext, Input, Node, NodeError, Output, Result
from tessera.nodes.text import RealTextEncoder

MAX_SIDE = 8192
DTYPES = {"default": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FP8 = "fp8_e4m3fn"  # Linear weights stored in fp8, upcast per layer to the compute dtype (engines/fp8.py)


def _files_key(ctx: ExecutionContext, node: type[Node], folder: str, file: str) -> str:
    """Cache-key material for a loader: every file the model is read from (all shards of a sharded
    folder, its index and config.json, a pipeline's model_index.json), not only the chosen one."""
    path = ctx.model_file(folder, file)
    try:
        return _identity(related_files(path))
    except CheckpointError as e:
        raise NodeError(f"{node.type_name}: {e}", input="file") from None


def _dit_facts(config: FluxConfig) -> dict:
    """What validation knows of a DiT (Node.describe): the conditioning widths it takes."""
    return {"context_dim": config.context_dim, "vec_dim": config.vec_dim}


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

    @classmethod
    def fingerprint(cls, ctx: ExecutionContext, inputs: dict) -> str | None:
        return _files_key(ctx, cls, "diffusion_models", inputs["file"])

    @classmethod
    def describe(cls, ctx: ExecutionContext, constants: dict, upstream: dict[str, dict]) -> dict[str, dict]:
        try:  # from the file headers: a wrong file is refused before anything loads
            return {"model": _dit_facts(dit_config(ctx.model_file("diffusion_models", constants["file"])))}
        except CheckpointError as e:
            raise NodeError(str(e), input="file") from None

    def execute(self, ctx: ExecutionContext, file: str, weight_dtype: str = "default"):
        path = ctx.model_file("diffusion_models", file)
        try:
            return (_with_weight_dtype(lambda dtype: load_dit(path, "cpu", dtype), weight_dtype, ctx),)
        except CheckpointError as e:
            raise NodeError(str(e), input="file") from None


def _with_weight_dtype(load, weight_dtype: str, ctx: ExecutionContext) -> Flux:
    """`load(dtype)` a DiT in the `weight_dtype` a loader node's input names (fp8: stored in
    e4m3fn, computing in ctx.dtype); an fp8 choice on a torch without fp8 names that input."""
    if weight_dtype == FP8:
        try:
            require_fp8(f"weight_dtype {FP8}")
        except Fp8Unavailable as e:
            raise NodeError(str(e), input="weight_dtype") from None
        # Keep the file's own dtypes while loading (an fp8 file stays 8-bit), then quantise.
        return store_fp8(load(None), ctx.dtype)
    return load(DTYPES[weight_dtype] or ctx.dtype)


class LoadVAE(Node):
    """Load an AutoencoderKL (SD or Flux family, ldm or diffusers layout) from the vae folder."""

    category = "loaders"
    inputs = (
        Input("file", "STRING", model_folder="vae", link="widget"),
        Input("family", "STRING", default="auto", choices=("auto", *FAMILIES), link="widget"),
    )
    outputs = (Output("vae", "VAE"),)

    @classmethod
    def fingerprint(cls, ctx: ExecutionContext, inputs: dict) -> str | None:
        return _files_key(ctx, cls, "vae", inputs["file"])

    def execute(self, ctx: ExecutionContext, file: str, family: str = "auto"):
        path = ctx.model_file("vae", file)
        try:
            vae = load_vae(
                path, "cpu", ctx.dtype
            )  # into RAM: the model manager moves it when a node needs it
        except CheckpointError as e:
            raise NodeError(str(e), input="file") from None
        vae = with_family(vae, family) if family != "auto" else vae
        vae.native_resolution = native_resolution(path)  # EmptyLatent's size when its width/height are 0
        return (vae,)


class LoadCheckpoint(Node):
    """Load an all-in-one checkpoint (ComfyUI's layout): the DiT, its VAE and its text encoders from one file.

    The file's parts are told by their prefixes (`model.diffusion_model.`, `vae.` or
    `first_stage_model.`, `text_encoders.<name>.transformer.`); each text encoder's kind (CLIP or
    T5) by its tensors, and its tokenizer is looked for beside the file, then in models/tokenizers/.
    `weight_dtype` is the DiT's, as in LoadDiffusionModel (fp8_e4m3fn: Linear weights stored in fp8).
    """

    category = "loaders"
    inputs = (
        Input("file", "STRING", model_folder="checkpoints", link="widget"),
        Input("weight_dtype", "STRING", default="default", choices=(*DTYPES, FP8), link="widget"),
    )
    outputs = (Output("model", "DIT_MODEL"), Output("vae", "VAE"), Output("text_encoder", "TEXT_ENCODER"))

    @classmethod
    def fingerprint(cls, ctx: ExecutionContext, inputs: dict) -> str | None:
        """The tokenizers it reads join the cache key (the runtime keys the checkpoint file itself)."""
        path = ctx.model_file("checkpoints", inputs["file"])
        return _identity(
            [
                *path.parent.glob("*.json"),
                *path.parent.glob("*.txt"),
                *(Path(ctx.models_dir) / "tokenizers").rglob("*"),
            ]
        )

    @classmethod
    def describe(cls, ctx: ExecutionContext, constants: dict, upstream: dict[str, dict]) -> dict[str, dict]:
        """The DiT's and the text encoders' widths from the headers (execute names a missing part)."""
        path = ctx.model_file("checkpoints", constants["file"])
        try:
            parts = split_checkpoint(header_weights(path)[0])
            model = (
                _dit_facts(infer_dit_config(bfl_state_dict(parts.pop("model"), path), path))
                if "model" in parts
                else {}
            )
            parts.pop("vae", None)
            widths = dict(text_encoder_width(part, path) for part in parts.values())
        except CheckpointError as e:
            raise NodeError(f"{cls.type_name}: {e}", input="file") from None
        return {"model": model, "vae": {}, "text_encoder": {"encoders": widths} if widths else {}}

    def execute(self, ctx: ExecutionContext, file: str, weight_dtype: str = "default"):
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
            # every part into RAM, as LoadDiffusionModel does: the model manager moves them
            dit = parts.pop("model")
            model = _with_weight_dtype(
                lambda dtype: dit_from_state_dict(dit, {}, path, "cpu", dtype), weight_dtype, ctx
            )
            vae = vae_from_state_dict(parts.pop("vae"), {}, path, "cpu", ctx.dtype)
            encoders: dict = {}
            for name, part in sorted(parts.items()):
                encoder = text_encoder_from_state_dict(
                    part, {}, f"{path.name} text_encoders.{name}", "cpu", ctx.dtype
                )
                family = family_of(encoder)
                if family in encoders:
                    raise NodeError(
                        f"{self.type_name}: {path.name} holds two {family.upper()} text encoders",
                        input="file",
                    )
                encoders[family] = (encoder, tokenizer_for(encoder, where, Path(ctx.models_dir)))
        except (CheckpointError, TokenizerError) as e:
            raise NodeError(f"{self.type_name}: {e}", input="file") from None
        if not encoders:
            raise NodeError(
                f"{self.type_name}: {path.name} has no text encoders (text_encoders.*); load them with DualCLIPLoader",
                input="file",
            )
        return model, vae, RealTextEncoder(**encoders)


class LoadDiffusersPipeline(Node):
    """Load a diffusers pipeline folder (e.g. FLUX.1-schnell as cloned from the Hub): DiT, VAE, text encoders.

    Pick any `.safetensors` file inside the pipeline folder (the one holding `model_index.json`);
    `transformer/`, `vae/`, `text_encoder/` + `tokenizer/` and `text_encoder_2/` + `tokenizer_2/`
    load from it, sharded or not, every component's `config.json` honoured.
    """

    category = "loaders"
    inputs = (Input("file", "STRING", model_folder="diffusion_models", link="widget"),)
    outputs = (Output("model", "DIT_MODEL"), Output("vae", "VAE"), Output("text_encoder", "TEXT_ENCODER"))

    @classmethod
    def fingerprint(cls, ctx: ExecutionContext, inputs: dict) -> str | None:
        """Every file of the pipeline folder (and models/tokenizers/) joins the cache key."""
        path = ctx.model_file("diffusion_models", inputs["file"])
        try:
            pipeline = locate(path).pipeline or path.parent
        except CheckpointError as e:
            raise NodeError(f"{cls.type_name}: {e}", input="file") from None
        return _identity([*pipeline.rglob("*"), *(Path(ctx.models_dir) / "tokenizers").rglob("*")])

    @classmethod
    def describe(cls, ctx: ExecutionContext, constants: dict, upstream: dict[str, dict]) -> dict[str, dict]:
        """The DiT's and the text encoders' widths from the components' headers."""
        path = ctx.model_file("diffusion_models", constants["file"])
        try:
            pipeline = locate(path).pipeline
            if pipeline is None:
                return {}  # execute says what to load instead
            first = {
                name: sorted((pipeline / name).glob("*.safetensors"))
                for name in ("transformer", "text_encoder", "text_encoder_2")
            }
            model = _dit_facts(dit_config(first["transformer"][0])) if first["transformer"] else {}
            widths = dict(
                text_encoder_width(header_weights(files[0])[0], files[0])
                for name, files in first.items()
                if name != "transformer" and files
            )
        except CheckpointError as e:
            raise NodeError(f"{cls.type_name}: {e}", input="file") from None
        return {"model": model, "vae": {}, "text_encoder": {"encoders": widths} if widths else {}}

    def execute(self, ctx: ExecutionContext, file: str):
        path = ctx.model_file("diffusion_models", file)
        try:
            pipeline = locate(path).pipeline
            if pipeline is None:
                raise NodeError(
                    f"{self.type_name}: {path.name} is not inside a diffusers pipeline folder (no model_index.json "
                    "in the folder above it); load a single file with LoadDiffusionModel",
                    input="file",
                )
            model = load_dit(
                self._component(pipeline, "transformer"), "cpu", ctx.dtype
            )  # the manager moves it
            vae = load_vae(self._component(pipeline, "vae"), "cpu", ctx.dtype)
            encoders: dict = {}
            for name in ("text_encoder", "text_encoder_2"):
                if (pipeline / name).is_dir():
                    encoder, where = load_text_encoder(self._component(pipeline, name), "cpu", ctx.dtype)
                    encoders[family_of(encoder)] = (
                        encoder,
                        tokenizer_for(encoder, where, Path(ctx.models_dir)),
                    )
        except (CheckpointError, TokenizerError) as e:
            raise NodeError(f"{self.type_name}: {e}", input="file") from None
        return model, vae, RealTextEncoder(**encoders)

    def _component(self, pipeline: Path, name: str) -> Path:
        files = sorted((pipeline / name).glob("*.safetensors"))
        if not files:
            raise NodeError(
                f"{self.type_name}: the pipeline folder {pipeline.name} has no {name}/*.safetensors",
                input="file",
            )
        return files[0]


def _identity(paths: list[Path]) -> str:
    """Size and mtime of each file: a loader's files besides the one the runtime already keys on."""
    return json.dumps(sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in paths if p.is_file()))


CHECKPOINT_PARTS = {"model": "model.diffusion_model.*", "vae": "vae.* / first_stage_model.*"}


def _a(noun: str) -> str:
    return ("an " if noun[0] in "AEIOUaeiou" else "a ") + noun


def native_resolution(path: Path) -> int | None:
    """The side in pixels a model file was trained at, from its model card: `resolution`, else
    the `NxN` its data description names (the built-in models' cards: "64x64 ... scenes")."""
    try:
        with safe_open(str(path), "pt") as f:  # the JSON header only, no tensor is read
            card = json.loads((f.metadata() or {}).get("tessera.card") or "{}")
    except (OSError, ValueError, SafetensorError):
        return None
    if isinstance(card.get("resolution"), int):
        return card["resolution"]
    found = re.search(r"\b(\d{2,5})x\1\b", str(card.get("data", "")))
    return int(found.group(1)) if found else None


AUTO_SIDE = 1024  # an "auto" size with no model card to tell: Flux's native resolution


class EmptyLatent(Node):
    """A zero latent of a pixel size: channels and scale from a connected VAE, else from `channels`.

    A width or height of 0 means the connected VAE's native resolution (from its model card),
    else 1024; a size far above the native one runs, with a warning shown in the editor.
    """

    category = "latent"
    version = 3  # 2: `batch` is `batch_size`, as in every node; 3: 0 = the VAE's native size
    inputs = (
        Input("width", "INT", default=0, min=0, max=MAX_SIDE, step=16),
        Input("height", "INT", default=0, min=0, max=MAX_SIDE, step=16),
        Input("batch_size", "INT", default=1, min=1, max=64),
        Input("channels", "INT", default=16, min=1, max=128),
        Input("vae", "VAE", optional=True),
    )
    outputs = (Output("latent", "LATENT"),)

    def execute(
        self, ctx: ExecutionContext, width, height, batch_size, channels, vae: AutoencoderKL | None = None
    ):
        f = vae.config.downscale if vae is not None else 8
        c = vae.config.latent_channels if vae is not None else channels
        native = getattr(vae, "native_resolution", None)
        width, height = width or native or AUTO_SIDE, height or native or AUTO_SIDE
        h, w = height // f, width // f
        if h < 1 or w < 1:
            raise NodeError(f"{width}x{height} is smaller than one {f}x{f} latent cell", input="width")
        projection = rgb_projection_for(vae) if vae is not None else None
        latent = Latent(torch.zeros(batch_size, c, h, w), rgb_projection=projection)
        if native and max(width, height) > 2 * native:
            warning = (
                f"{width}x{height} is far above the VAE's native {native}x{native}: sampling will be slow "
                "and may not look right (set width and height to 0 for the native size)"
            )
            return Result(outputs=(latent,), ui={"warnings": [warning]})
        return (latent,)


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
        return (latent_to_image(vae, latent.samples.to(ctx.device), tile_size),)


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
    sigmas = diffusion_sigmas(model, schedule, steps, denoise_strength, tuple(latent.samples.shape[-2:]))
    compile_dit(model)  # a no-op unless --compile is on
    velocity = guided_velocity(model, positive, negative, cfg, guidance, who=name, step_cache=step_cache)
    return velocity, sigmas


def _check_conditioning_widths(node: type[Node], upstream: dict[str, dict]) -> None:
    """What `_prepare` checks of the conditioning, refused when the workflow is compiled: the
    widths the text encoders' files give against the DiT's (Node.describe facts)."""
    model = upstream.get("model", {})
    if "context_dim" not in model:
        return
    for input_name in ("positive", "negative"):
        cond = upstream.get(input_name, {})
        if "tokens" in cond:
            try:
                check_widths(
                    model["context_dim"],
                    model["vec_dim"],
                    cond["tokens"],
                    cond["pooled"],
                    cond.get("source", ""),
                    f"{node.type_name} {input_name}",
                )
            except ValueError as e:
                raise NodeError(str(e), input=input_name) from None


def _guidance_problems(node: type[Node], constants: dict, linked: frozenset[str]) -> list[NodeError]:
    """cfg other than 1 needs a negative: refused when the workflow is checked, not after sampling."""
    cfg = constants.get("cfg")
    if "negative" not in linked and "cfg" not in linked and cfg != 1.0:
        return [
            NodeError(
                f"{node.type_name}: cfg {cfg} needs a negative conditioning: connect one (a TextEncode of the "
                "empty prompt is the usual choice), or set cfg to 1",
                input="negative",
            )
        ]
    return []


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

    @classmethod
    def check(cls, constants: dict, linked: frozenset[str]) -> list[NodeError]:
        return _guidance_problems(cls, constants, linked)

    @classmethod
    def describe(cls, ctx: ExecutionContext, constants: dict, upstream: dict[str, dict]) -> dict[str, dict]:
        _check_conditioning_widths(cls, upstream)
        return {"latent": {}}

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
            self,
            model,
            positive,
            negative,
            latent,
            schedule,
            steps,
            cfg,
            guidance,
            denoise,
            StepCache(step_cache),
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

    @classmethod
    def check(cls, constants: dict, linked: frozenset[str]) -> list[NodeError]:
        problems = _guidance_problems(cls, constants, linked)
        step, steps = constants.get("step"), constants.get("steps")
        if "step" not in linked and "steps" not in linked and step >= steps:
            problems.append(
                NodeError(
                    f"step {step} is past the last step ({steps - 1}) of a {steps}-step schedule",
                    input="step",
                )
            )
        return problems

    @classmethod
    def describe(cls, ctx: ExecutionContext, constants: dict, upstream: dict[str, dict]) -> dict[str, dict]:
        _check_conditioning_widths(cls, upstream)
        return {"latent": {}}

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
