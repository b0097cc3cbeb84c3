"""Where a model's tensors and settings live, told from the files themselves, never from names.

A loader is given one `.safetensors` file. Around it this module finds:

- **single files** (ComfyUI's `text_encoders/clip_l.safetensors`, `t5xxl_fp16.safetensors`, BFL's
  `flux1-schnell.safetensors`): the file is the whole model; settings shapes cannot tell come
  from its `tessera.config` metadata;
- **Hugging Face folders**: a `config.json` beside the file, and a `*.safetensors.index.json`
  when the weights are sharded (choosing any shard loads them all; the index must name only
  shards that exist, and each tensor must be in the shard the index says);
- **diffusers pipeline folders**: the file's folder is a component (`transformer/`, `vae/`,
  `text_encoder_2/`, ...) of a folder holding `model_index.json`; the component's tokenizer
  folder is its sibling (`text_encoder` -> `tokenizer`, `text_encoder_2` -> `tokenizer_2`);
- **all-in-one checkpoints**: one state dict with `model.diffusion_model.*`, `vae.*` (or
  `first_stage_model.*`) and `text_encoders.<name>.transformer.*`, split by `split_checkpoint`.

What kind of model a state dict holds (`detect_family`) is read from its tensor names, so a
loader given another family's file says what it got. Text encoders (CLIP, T5) are built here;
the DiT and VAE loaders read their files through `read_weights`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from .checkpoint import CheckpointError, assign_checked, metadata_config, read_safetensors
from .clip import CLIPTextModel, clip_config_from_weights
from .t5 import T5Encoder, t5_config_from_weights
from .tokenization import FAMILIES as TOKENIZER_FAMILIES
from .tokenization import TextTokenizer, find_tokenizer


@dataclass
class WeightFiles:
    """The files one model is stored in, and the settings found beside them."""

    path: Path  # the file the user chose
    files: list[Path]  # every shard (just `path` for a single file)
    layout: str  # "single file", "hf folder", "hf sharded", "diffusers", "diffusers sharded"
    config: dict = field(default_factory=dict)  # config.json beside the weights ({} if none)
    pipeline: Path | None = None  # the diffusers pipeline folder (holding model_index.json)
    component: str | None = None  # its component folder name, e.g. "text_encoder_2"


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(path, f"cannot read this JSON file ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(path, "not a JSON object")
    return data


def _shard_index(path: Path) -> tuple[Path, dict[str, str]] | None:
    """The index beside `path` that names it as a shard: (index file, tensor -> shard file name)."""
    for index in sorted(path.parent.glob("*.safetensors.index.json")):
        weight_map = _json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(index, "no 'weight_map' object of tensor name -> shard file")
        if path.name in set(weight_map.values()):
            return index, weight_map
    return None


def locate(path: str | Path) -> WeightFiles:
    """Describe the storage around one chosen `.safetensors` file (see the module docstring)."""
    path = Path(path)
    folder = path.parent
    files, sharded = [path], False
    found = _shard_index(path)
    if found is not None:
        index, weight_map = found
        names = sorted(set(weight_map.values()))
        for name in names:
            shard = folder / name
            if "/" in name or "\\" in name or name in (".", ".."):
                raise CheckpointError(index, f"names a shard outside its folder: {name!r}")
            if not shard.is_file():
                raise CheckpointError(index, f"names shard '{name}', which is missing from {folder}")
        files, sharded = [folder / n for n in names], True
    config = _json(folder / "config.json") if (folder / "config.json").is_file() else {}
    pipeline = folder.parent if (folder.parent / "model_index.json").is_file() else None
    if pipeline is not None:
        layout = "diffusers sharded" if sharded else "diffusers"
    elif config or sharded:
        layout = "hf sharded" if sharded else "hf folder"
    else:
        layout = "single file"
    return WeightFiles(path, files, layout, config, pipeline, folder.name if pipeline else None)


def read_weights(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str], WeightFiles]:
    """Every tensor of the model `path` belongs to (all shards), the first file's metadata, and where they came from."""
    where = locate(path)
    sd: dict[str, Tensor] = {}
    metadata: dict[str, str] = {}
    index = _shard_index(where.path) if len(where.files) > 1 or where.layout.endswith("sharded") else None
    for shard in where.files:
        tensors, meta = read_safetensors(shard)
        if not metadata:
            metadata = meta
        if index is not None:
            for key in tensors:
                if index[1].get(key, shard.name) != shard.name:
                    raise CheckpointError(
                        shard, f"tensor is listed in {index[0].name} under another shard", key
                    )
        sd.update(tensors)
    if index is not None:
        missing = sorted(k for k, name in index[1].items() if k not in sd)
        if missing:
            raise CheckpointError(
                where.files[0].parent / index[1][missing[0]],
                f"tensor listed in {index[0].name} is missing",
                missing[0],
            )
    return sd, metadata, where


def stored_keys(path: str | Path) -> dict[str, None]:
    """The tensor names of the model `path` belongs to, from the safetensors headers (or the shard
    index) alone: enough to tell its family before any tensor is read."""
    where = locate(path)
    found = _shard_index(where.path) if where.layout.endswith("sharded") else None
    if found is not None:
        return dict.fromkeys(found[1])
    return dict.fromkeys(k for k in _header(where.path) if k != "__metadata__")


# safetensors dtype names -> torch dtypes (the float8 ones only where this torch has them).
_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": getattr(torch, "float8_e4m3fn", torch.uint8),
    "F8_E5M2": getattr(torch, "float8_e5m2", torch.uint8),
}


def _header(path: Path) -> dict:
    try:
        with path.open("rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 0 < size <= min(100_000_000, path.stat().st_size - 8):
                raise CheckpointError(
                    path, "not a safetensors file (header length is past the end of the file)"
                )
            header = json.loads(f.read(size))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(path, f"malformed safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(path, "malformed safetensors header (not a JSON object)")
    return header


def header_weights(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str], WeightFiles]:
    """`read_weights` without reading any tensor: every tensor of the model as a `meta` tensor of
    its stored shape and dtype, from the safetensors headers of all its shards. The same config
    inference the loaders run works on it, so a model's sizes are known before it is loaded."""
    where = locate(path)
    sd: dict[str, Tensor] = {}
    metadata: dict[str, str] = {}
    for shard in where.files:
        header = _header(shard)
        if not metadata and isinstance(header.get("__metadata__"), dict):
            metadata = {str(k): str(v) for k, v in header["__metadata__"].items()}
        for key, info in header.items():
            if key == "__metadata__":
                continue
            try:
                sd[key] = torch.empty(
                    info["shape"], dtype=_DTYPES.get(info["dtype"], torch.uint8), device="meta"
                )
            except (TypeError, KeyError, ValueError, RuntimeError):
                raise CheckpointError(shard, "malformed tensor entry", key) from None
    return sd, metadata, where


def related_files(path: str | Path) -> list[Path]:
    """Every file a model at `path` is read from: its shards, the index and config.json beside
    them, and for a diffusers component the pipeline's model_index.json."""
    where = locate(path)
    folder = where.path.parent
    extra = [folder / "config.json", *folder.glob("*.safetensors.index.json")]
    if where.pipeline is not None:
        extra.append(where.pipeline / "model_index.json")
    return [*where.files, *(f for f in extra if f.is_file())]


# ---------------------------------------------------------------- what a state dict holds

# A tensor name that only one family has (after any wrapper prefix).
_MARKS = (
    ("all-in-one checkpoint", ("model.diffusion_model.",)),
    ("Flux DiT", ("img_in.weight", "x_embedder.weight", "double_blocks.0.img_attn.qkv.weight")),
    (
        "multi-scale VQ tokenizer",  # VAR's VQVAE: its φ convs or its per-scale usage buffer
        (
            "quantize.quant_resi.qresi_ls.0.weight",
            "quantize.quant_resi.qresi.weight",
            "quantize.quant_resi.0.weight",
            "quantize.ema_vocab_hit_SV",
        ),
    ),
    ("VQ tokenizer", ("quantize.embedding.weight",)),
    ("AutoencoderKL VAE", ("decoder.conv_in.weight",)),
    ("CLIP text encoder", ("embeddings.token_embedding.weight",)),
    ("T5 text encoder", ("encoder.block.0.layer.0.SelfAttention.q.weight",)),
    ("LlamaGen GPT", ("tok_embeddings.weight",)),
    ("VAR transformer", ("pos_1LC", "lvl_embed.weight")),
    ("Tessera character-level text encoder", ("pooled_proj.weight",)),
)


def detect_family(sd: dict[str, Tensor]) -> str:
    """A human name for the kind of model `sd` holds, from its tensor names ("unknown model" if none fits)."""
    for name, marks in _MARKS:
        if name == "all-in-one checkpoint":
            if any(k.startswith(marks[0]) for k in sd):
                return name
        elif any(k == m or k.endswith("." + m) for k in sd for m in marks):
            return name
    return "unknown model"


def wrong_family(sd: dict[str, Tensor], path: str | Path, expected: str, *also: str) -> None:
    """Refuse, naming both, a file that plainly holds another kind of model than the loader's."""
    found = detect_family(sd)
    if found not in (expected, "unknown model", *also):
        raise CheckpointError(path, f"not {_a(expected)}: this file holds {_a(found)}")


def _a(noun: str) -> str:
    return ("an " if noun[0] in "AEIOUaeiou" else "a ") + noun


def split_checkpoint(sd: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """An all-in-one checkpoint's parts: 'model', 'vae' and one entry per text encoder
    ('clip_l', 't5xxl', ... from `text_encoders.<name>.`; 'clip' for SD's `cond_stage_model.`)."""
    parts: dict[str, dict[str, Tensor]] = {}
    for key, t in sd.items():
        if key.startswith("model.diffusion_model."):
            parts.setdefault("model", {})[key.removeprefix("model.diffusion_model.")] = t
        elif key.startswith(("vae.", "first_stage_model.")):
            parts.setdefault("vae", {})[key.split(".", 1)[1]] = t
        elif key.startswith("text_encoders."):
            name, rest = key.removeprefix("text_encoders.").split(".", 1)
            parts.setdefault(name, {})[rest.removeprefix("transformer.")] = t
        elif key.startswith("cond_stage_model.transformer."):
            parts.setdefault("clip", {})[key.removeprefix("cond_stage_model.transformer.")] = t
    return parts


# ---------------------------------------------------------------- text encoders

_CLIP_IGNORED = ("position_ids", "text_projection", "logit_scale", "vision_model.", "visual_projection")


def _clip_state_dict(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """HF CLIP keys under `text_model.`: older files carry that prefix, transformers 5 drops it."""
    if any(k.startswith("text_model.") for k in sd):
        return sd
    return {
        ("text_model." + k if k.startswith(("embeddings.", "encoder.", "final_layer_norm.")) else k): v
        for k, v in sd.items()
    }


def _t5_state_dict(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Encoder keys only; the input embedding is `shared` (some files keep only its tied copy)."""
    sd = {k: v for k, v in sd.items() if not k.startswith(("decoder.", "lm_head."))}
    if "shared.weight" not in sd and "encoder.embed_tokens.weight" in sd:
        sd["shared.weight"] = sd.pop("encoder.embed_tokens.weight")
    else:
        sd.pop("encoder.embed_tokens.weight", None)
    return sd


def text_encoder_from_state_dict(
    sd: dict[str, Tensor],
    overrides: dict,
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> CLIPTextModel | T5Encoder:
    """A CLIP or T5 encoder from an HF-layout state dict, by what the tensors are; anything else is refused."""
    family = detect_family(sd)
    try:
        if family == "CLIP text encoder":
            sd = _clip_state_dict(sd)
            config = clip_config_from_weights(sd, overrides.get("text_config", overrides))
            with torch.device("meta"):
                model: CLIPTextModel | T5Encoder = CLIPTextModel(config)
            ignored = _CLIP_IGNORED
        elif family == "T5 text encoder":
            sd = _t5_state_dict(sd)
            config = t5_config_from_weights(sd, overrides)
            with torch.device("meta"):
                model = T5Encoder(config)
            ignored = ()
        else:
            raise CheckpointError(path, f"this is a {family}, not a CLIP or T5 text encoder")
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(path, f"cannot size a {family} from this file ({e})") from None
    assign_checked(model, sd, path, device, dtype, ignored=ignored)
    return model


def load_text_encoder(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[CLIPTextModel | T5Encoder, WeightFiles]:
    """A CLIP or T5 encoder from a single file, an HF folder (sharded or not) or a diffusers component."""
    sd, metadata, where = read_weights(path)
    overrides = {**where.config, **metadata_config(metadata, path)}
    return text_encoder_from_state_dict(_encoder_part(sd), overrides, path, device, dtype), where


def _encoder_part(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """The encoder's own tensors of a file that wraps them in a checkpoint-style prefix."""
    for prefix in (
        "text_encoders.clip_l.transformer.",
        "text_encoders.t5xxl.transformer.",
        "cond_stage_model.transformer.",
    ):
        if any(k.startswith(prefix) for k in sd):
            return {k.removeprefix(prefix): v for k, v in sd.items() if k.startswith(prefix)}
    return sd


def text_encoder_width(sd: dict[str, Tensor], path: str | Path) -> tuple[str, int]:
    """("clip" or "t5", width of its features) of a text encoder state dict; `meta` tensors
    (`header_weights`) will do, so a workflow can be checked before anything loads."""
    sd = _encoder_part(sd)
    family = detect_family(sd)
    if family == "CLIP text encoder":
        return "clip", int(_clip_state_dict(sd)["text_model.embeddings.token_embedding.weight"].shape[1])
    if family == "T5 text encoder":
        return "t5", int(_t5_state_dict(sd)["shared.weight"].shape[1])
    raise CheckpointError(path, f"this is {_a(family)}, not a CLIP or T5 text encoder")


def family_of(model: CLIPTextModel | T5Encoder) -> str:
    """The tokenizer family ("clip" or "t5") of a loaded encoder."""
    return "clip" if isinstance(model, CLIPTextModel) else "t5"


def tokenizer_folders(where: WeightFiles | None, family: str, models_dir: Path | None) -> list[Path]:
    """Where a tokenizer is looked for, in order: beside the weights, the diffusers pipeline's
    tokenizer folder for this component, then `models/tokenizers/<default folder>/`."""
    folders: list[Path] = []
    if where is not None:
        folders.append(where.path.parent)
        if where.pipeline is not None and where.component and where.component.startswith("text_encoder"):
            folders.append(where.pipeline / where.component.replace("text_encoder", "tokenizer", 1))
    if models_dir is not None:
        folders.append(Path(models_dir) / "tokenizers" / TOKENIZER_FAMILIES[family]["folder"])
    return folders


def tokenizer_for(
    model: CLIPTextModel | T5Encoder, where: WeightFiles | None, models_dir: Path | None
) -> TextTokenizer:
    family = family_of(model)
    return find_tokenizer(family, tokenizer_folders(where, family, models_dir), model.config.vocab_size)
