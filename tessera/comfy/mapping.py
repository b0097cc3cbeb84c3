"""The one table from ComfyUI node types to Tessera's, with sampler and scheduler names.

Each `Rule` says which of our nodes a ComfyUI node becomes, how its inputs are renamed, which
of our outputs stands at each ComfyUI output index, and the order of its widget values in
ComfyUI's UI format. Values are mapped only where the algorithm is the same; anything else is
refused by name with the list of what is supported (see `convert`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

CONTROL = "control_after_generate"  # the UI format's extra widget value after a seed

# ComfyUI sampler -> ours (same update rule).
SAMPLERS = {"euler": "euler", "euler_ancestral": "euler_ancestral", "heun": "heun", "dpmpp_2m": "dpmpp_2m"}
# ComfyUI scheduler -> our schedule. `simple` walks the model's own sigmas evenly: for Flux that is
# the time-shifted flow schedule (ComfyUI fixes the shift at the 1024x1024 value unless a
# ModelSamplingFlux node sets it; ours takes it from the image size, as BFL's reference does).
# `beta` is the same Beta(0.6, 0.6) quantile schedule.
SCHEDULERS = {"simple": "flux", "beta": "beta"}

# Our socket types under ComfyUI's names in /object_info, so ComfyUI clients connect them.
COMFY_TYPES = {"DIT_MODEL": "MODEL", "TEXT_ENCODER": "CLIP"}


@dataclass(frozen=True)
class Rule:
    type: str  # our node type
    inputs: dict[str, str]  # ComfyUI input -> our input (links and widgets)
    outputs: tuple[str, ...]  # our output at each ComfyUI output index ("" = handled by the converter)
    output_types: tuple[str, ...]  # ComfyUI's type of each output
    widgets: tuple[str, ...] = ()  # ComfyUI widget order in `widgets_values` (CONTROL after seeds)
    constants: dict = field(default_factory=dict)  # our inputs set to fixed values
    values: dict[str, dict] = field(default_factory=dict)  # ComfyUI input -> {ComfyUI value: ours}
    accepted: dict[str, tuple | None] = field(
        default_factory=dict
    )  # inputs read but not passed on: allowed values (None: any)
    optional: tuple[str, ...] = ()  # ComfyUI inputs that may be absent
    link_types: dict[str, str] = field(default_factory=dict)  # ComfyUI type of each link input
    output_node: bool = False
    # /object_info specs of inputs read but not passed on (shown as ComfyUI shows them)
    widget_specs: dict[str, list] = field(default_factory=dict)
    output_names: tuple[str, ...] = ()  # ComfyUI's output names where they are not the types
    # A part of SamplerCustomAdvanced (noise, sampler, sigmas, guider): no node of ours, its
    # inputs (renamed to the sampler's) are folded into the DiTSampler it feeds (see `convert`).
    folded: bool = False


def _same(*names: str) -> dict[str, str]:
    return {n: n for n in names}


DTYPES = {"default": "default", "fp8_e4m3fn": "fp8_e4m3fn", "fp8_e4m3fn_fast": "fp8_e4m3fn"}
UPSCALE = {"nearest-exact": "nearest", "bilinear": "bilinear", "area": "area", "bicubic": "bicubic"}
SAMPLER_INPUTS = {
    "model": "MODEL",
    "positive": "CONDITIONING",
    "negative": "CONDITIONING",
    "latent_image": "LATENT",
}

RULES: dict[str, Rule] = {
    "CheckpointLoaderSimple": Rule(
        "LoadCheckpoint",
        {"ckpt_name": "file"},
        ("model", "text_encoder", "vae"),
        ("MODEL", "CLIP", "VAE"),
        widgets=("ckpt_name",),
    ),
    "UNETLoader": Rule(
        "LoadDiffusionModel",
        {"unet_name": "file", "weight_dtype": "weight_dtype"},
        ("model",),
        ("MODEL",),
        widgets=("unet_name", "weight_dtype"),
        values={"weight_dtype": DTYPES},
    ),
    "VAELoader": Rule(
        "LoadVAE",
        {"vae_name": "file"},
        ("vae",),
        ("VAE",),
        widgets=("vae_name",),
        constants={"family": "auto"},
    ),
    # The two files are told apart (CLIP-L or T5) by the converter: ComfyUI takes them in either order.
    "DualCLIPLoader": Rule(
        "DualCLIPLoader",
        {"clip_name1": "", "clip_name2": ""},
        ("text_encoder",),
        ("CLIP",),
        widgets=("clip_name1", "clip_name2", "type", "device"),
        accepted={"type": ("flux",), "device": ("default", "cpu")},
        optional=("device",),
    ),
    # The file says what it is (CLIP or T5); ComfyUI's `type` only picks the model family it is for.
    "CLIPLoader": Rule(
        "CLIPLoader",
        {"clip_name": "file"},
        ("text_encoder",),
        ("CLIP",),
        widgets=("clip_name", "type", "device"),
        accepted={"type": None, "device": ("default", "cpu")},
        optional=("type", "device"),
    ),
    "CLIPTextEncode": Rule(
        "TextEncode",
        {"text": "text", "clip": "text_encoder"},
        ("conditioning",),
        ("CONDITIONING",),
        widgets=("text",),
        link_types={"clip": "CLIP"},
    ),
    "FluxGuidance": Rule(
        "FluxGuidance",
        _same("conditioning", "guidance"),
        ("conditioning",),
        ("CONDITIONING",),
        widgets=("guidance",),
        link_types={"conditioning": "CONDITIONING"},
    ),
    "ConditioningZeroOut": Rule(
        "ConditioningZeroOut",
        _same("conditioning"),
        ("conditioning",),
        ("CONDITIONING",),
        link_types={"conditioning": "CONDITIONING"},
    ),
    # ComfyUI gives the model's channel count to an empty latent; the converter connects the graph's VAE.
    "EmptyLatentImage": Rule(
        "EmptyLatent",
        _same("width", "height", "batch_size"),
        ("latent",),
        ("LATENT",),
        widgets=("width", "height", "batch_size"),
        constants={"channels": 16},
    ),
    "KSampler": Rule(
        "DiTSampler",
        {
            "model": "model",
            "seed": "seed",
            "steps": "steps",
            "cfg": "cfg",
            "sampler_name": "sampler",
            "scheduler": "schedule",
            "positive": "positive",
            "negative": "negative",
            "latent_image": "latent",
            "denoise": "denoise",
        },
        ("latent",),
        ("LATENT",),
        widgets=("seed", CONTROL, "steps", "cfg", "sampler_name", "scheduler", "denoise"),
        values={"sampler_name": SAMPLERS, "scheduler": SCHEDULERS},
        link_types=SAMPLER_INPUTS,
    ),
    # Only a full pass from `start_at_step` (ComfyUI's denoise arithmetic); see convert._ksampler_advanced.
    "KSamplerAdvanced": Rule(
        "DiTSampler",
        {
            "model": "model",
            "noise_seed": "seed",
            "steps": "steps",
            "cfg": "cfg",
            "sampler_name": "sampler",
            "scheduler": "schedule",
            "positive": "positive",
            "negative": "negative",
            "latent_image": "latent",
        },
        ("latent",),
        ("LATENT",),
        widgets=(
            "add_noise",
            "noise_seed",
            CONTROL,
            "steps",
            "cfg",
            "sampler_name",
            "scheduler",
            "start_at_step",
            "end_at_step",
            "return_with_leftover_noise",
        ),
        values={"sampler_name": SAMPLERS, "scheduler": SCHEDULERS},
        accepted={
            "add_noise": ("enable",),
            "start_at_step": None,
            "end_at_step": None,
            "return_with_leftover_noise": ("disable",),
        },
        link_types=SAMPLER_INPUTS,
    ),
    "VAEEncode": Rule(
        "VAEEncode",
        {"pixels": "image", "vae": "vae"},
        ("latent",),
        ("LATENT",),
        link_types={"pixels": "IMAGE", "vae": "VAE"},
    ),
    "VAEDecode": Rule(
        "VAEDecode",
        {"samples": "latent", "vae": "vae"},
        ("image",),
        ("IMAGE",),
        constants={"tile_size": 0},
        link_types={"samples": "LATENT", "vae": "VAE"},
    ),
    # Our tiles overlap by a fixed share; ComfyUI's overlap and video settings are read and not used.
    "VAEDecodeTiled": Rule(
        "VAEDecode",
        {"samples": "latent", "vae": "vae", "tile_size": "tile_size"},
        ("image",),
        ("IMAGE",),
        widgets=("tile_size", "overlap", "temporal_size", "temporal_overlap"),
        accepted={"overlap": None, "temporal_size": None, "temporal_overlap": None},
        optional=("overlap", "temporal_size", "temporal_overlap"),
        link_types={"samples": "LATENT", "vae": "VAE"},
    ),
    "SaveImage": Rule(
        "SaveImage",
        _same("images", "filename_prefix"),
        (),
        (),
        widgets=("filename_prefix",),
        link_types={"images": "IMAGE"},
        output_node=True,
    ),
    "PreviewImage": Rule(
        "PreviewImage", _same("images"), (), (), link_types={"images": "IMAGE"}, output_node=True
    ),
    "LoadImage": Rule(
        "LoadImage",
        _same("image"),
        ("image", "mask"),
        ("IMAGE", "MASK"),
        widgets=("image", "upload"),
        accepted={"upload": None},
        optional=("upload",),
    ),
    "ImageScale": Rule(
        "ImageScale",
        {"image": "image", "upscale_method": "method", "width": "width", "height": "height"},
        ("image",),
        ("IMAGE",),
        widgets=("upscale_method", "width", "height", "crop"),
        values={"upscale_method": UPSCALE},
        accepted={"crop": ("disabled",)},
        link_types={"image": "IMAGE"},
    ),
    "LoraLoaderModelOnly": Rule(
        "LoadLoRA",
        {"model": "model", "lora_name": "file", "strength_model": "strength"},
        ("model",),
        ("MODEL",),
        widgets=("lora_name", "strength_model"),
        link_types={"model": "MODEL"},
    ),
    "ControlNetLoader": Rule(
        "LoadControlNet",
        {"control_net_name": "file"},
        ("control_net",),
        ("CONTROL_NET",),
        widgets=("control_net_name",),
    ),
    # ComfyUI attaches the ControlNet to both conditionings; ours wraps the model the sampler reads.
    # Its outputs pass the conditionings on, and the converter puts an ApplyControlNet in front of
    # the model of each sampler they reach.
    "ControlNetApplyAdvanced": Rule(
        "ApplyControlNet",
        {
            "control_net": "control_net",
            "image": "image",
            "vae": "vae",
            "strength": "strength",
            "start_percent": "start",
            "end_percent": "end",
            "positive": "",
            "negative": "",
        },
        ("", ""),
        ("CONDITIONING", "CONDITIONING"),
        widgets=("strength", "start_percent", "end_percent"),
        optional=("vae",),
        link_types={
            "positive": "CONDITIONING",
            "negative": "CONDITIONING",
            "control_net": "CONTROL_NET",
            "image": "IMAGE",
            "vae": "VAE",
        },
    ),
    # ComfyUI's Canny blurs with a Gaussian of sigma 1 first.
    "Canny": Rule(
        "CannyEdges",
        _same("image", "low_threshold", "high_threshold"),
        ("image",),
        ("IMAGE",),
        widgets=("low_threshold", "high_threshold"),
        constants={"blur": 1.0},
        link_types={"image": "IMAGE"},
    ),
    "SetLatentNoiseMask": Rule(
        "SetLatentMask",
        {"samples": "latent", "mask": "mask"},
        ("latent",),
        ("LATENT",),
        link_types={"samples": "LATENT", "mask": "MASK"},
    ),
}

# SamplerCustomAdvanced and its parts are one DiTSampler: the seed from RandomNoise, the sampler
# from KSamplerSelect, schedule/steps/denoise from BasicScheduler, model and conditionings (and
# cfg) from BasicGuider (cfg 1, guidance from FluxGuidance) or CFGGuider.
_GUIDER_LINKS = {"model": "MODEL", "positive": "CONDITIONING", "negative": "CONDITIONING"}
RULES.update(
    {
        "RandomNoise": Rule(
            "DiTSampler",
            {"noise_seed": "seed"},
            ("",),
            ("NOISE",),
            widgets=("noise_seed", CONTROL),
            folded=True,
        ),
        "KSamplerSelect": Rule(
            "DiTSampler",
            {"sampler_name": "sampler"},
            ("",),
            ("SAMPLER",),
            widgets=("sampler_name",),
            values={"sampler_name": SAMPLERS},
            folded=True,
        ),
        "BasicScheduler": Rule(
            "DiTSampler",
            {"model": "model", "scheduler": "schedule", "steps": "steps", "denoise": "denoise"},
            ("",),
            ("SIGMAS",),
            widgets=("scheduler", "steps", "denoise"),
            values={"scheduler": SCHEDULERS},
            link_types={"model": "MODEL"},
            folded=True,
        ),
        "BasicGuider": Rule(
            "DiTSampler",
            {"model": "model", "conditioning": "positive"},
            ("",),
            ("GUIDER",),
            constants={"cfg": 1.0},
            link_types={"model": "MODEL", "conditioning": "CONDITIONING"},
            folded=True,
        ),
        "CFGGuider": Rule(
            "DiTSampler",
            {"model": "model", "positive": "positive", "negative": "negative", "cfg": "cfg"},
            ("",),
            ("GUIDER",),
            widgets=("cfg",),
            link_types=_GUIDER_LINKS,
            folded=True,
        ),
        # Our schedules end at sigma 0, where the last step of euler, euler_ancestral, heun and
        # dpmpp_2m lands on its own x0 prediction: `denoised_output` is the same latent as `output`.
        "SamplerCustomAdvanced": Rule(
            "DiTSampler",
            {"noise": "", "guider": "", "sampler": "", "sigmas": "", "latent_image": "latent"},
            ("latent", "latent"),
            ("LATENT", "LATENT"),
            link_types={
                "noise": "NOISE",
                "guider": "GUIDER",
                "sampler": "SAMPLER",
                "sigmas": "SIGMAS",
                "latent_image": "LATENT",
            },
            output_names=("output", "denoised_output"),
        ),
        # Flux's resolution shift for the model's width x height. Ours is the same formula from the
        # latent's own size (BFL's reference), so the node passes the model on where the two agree
        # (checked by the converter) with the default shifts.
        "ModelSamplingFlux": Rule(
            "",
            {"model": ""},
            ("",),
            ("MODEL",),
            widgets=("max_shift", "base_shift", "width", "height"),
            accepted={"max_shift": (1.15,), "base_shift": (0.5,), "width": None, "height": None},
            link_types={"model": "MODEL"},
            widget_specs={
                "max_shift": ["FLOAT", {"default": 1.15, "min": 0.0, "max": 100.0, "step": 0.01}],
                "base_shift": ["FLOAT", {"default": 0.5, "min": 0.0, "max": 100.0, "step": 0.01}],
                "width": ["INT", {"default": 1024, "min": 16, "max": 16384, "step": 8}],
                "height": ["INT", {"default": 1024, "min": 16, "max": 16384, "step": 8}],
            },
        ),
    }
)

RULES["EmptySD3LatentImage"] = RULES["EmptyLatentImage"]  # the same empty latent for ComfyUI's SD3/Flux node

# UI-format nodes that are not part of the executed graph.
UI_ONLY = ("Note", "MarkdownNote", "PrimitiveNode", "Reroute")
