"""`tessera convert`: turn a PyTorch pickle (.pt/.pth/.bin/.ckpt) into a safetensors file, explicitly.

The server loads only safetensors, so a pickle is converted once, by the user, here. The
pickle is read with `torch.load(weights_only=True)`, whose unpickler only rebuilds tensors
and plain containers: a `__reduce__` payload is refused before it can run. What comes out
must be a plain dict of tensors, possibly under one of the usual wrapper keys (`model`,
`module`, `state_dict`, `ema`: what DDP, DeepSpeed, Lightning and LlamaGen write). The file
is written atomically, with the family and config we detect in its metadata so the loaders
do not have to guess again.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import pickle
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path

import torch

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
# Checked in this order; the first that holds a dict of tensors is the state dict.
WRAPPER_KEYS = ("model", "module", "state_dict", "ema")
# Prefixes that wrap every key of a state dict saved from DDP or torch.compile.
KEY_PREFIXES = ("module.", "_orig_mod.")


class ConvertError(ValueError):
    """A pickle that cannot be converted; the message names the file and, if any, the key."""

    def __init__(self, path: str | Path, reason: str, key: str | None = None):
        super().__init__(f"{Path(path).name}" + (f", key '{key}'" if key else "") + f": {reason}")


def load_pickle(path: Path) -> object:
    """`torch.load` restricted to tensors and plain containers (no code runs), memory-mapped when possible."""
    from argparse import Namespace

    # LlamaGen's trainers save their argparse arguments beside the weights; a Namespace only
    # holds attributes, so allowing it lets those files load without allowing any code.
    safe = getattr(torch.serialization, "safe_globals", None)
    guard = safe([Namespace]) if safe is not None else contextlib.nullcontext()
    try:
        with guard:
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                # The legacy (pre-zip) format cannot be memory-mapped; still weights_only.
                return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if "Unsupported global" in ln]
        if not lines:
            raise ConvertError(
                path, f"cannot read as a PyTorch checkpoint ({str(e).splitlines()[0]})"
            ) from None
        detail = lines[0].split(" was not an allowed")[0].removeprefix("WeightsUnpickler error: ")
        raise ConvertError(
            path,
            f"refused: the pickle asks to run or build something other than tensors ({detail}); nothing was run",
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise ConvertError(path, f"cannot read as a PyTorch checkpoint ({str(e).splitlines()[0]})") from None


def _is_tensor_dict(value: object) -> bool:
    return (
        isinstance(value, Mapping)
        and bool(value)
        and all(isinstance(v, torch.Tensor) for v in value.values())
    )


def unwrap_state_dict(
    obj: object, path: str | Path = "<checkpoint>"
) -> tuple[dict[str, torch.Tensor], str | None]:
    """The plain `{name: tensor}` dict inside a loaded checkpoint, and the wrapper key it sat under.

    Rule: a dict whose values are all tensors is the state dict; otherwise the first of
    `WRAPPER_KEYS` that holds one (nested wrappers are unwrapped the same way). Anything else
    is refused, naming the first entry that is not a tensor.
    """
    trail: list[str] = []
    while isinstance(obj, Mapping) and not _is_tensor_dict(obj):
        key = next((k for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if key is None:
            bad = next((k for k, v in obj.items() if not isinstance(v, torch.Tensor)), None)
            kind = type(obj.get(bad)).__name__ if bad is not None else "nothing"
            raise ConvertError(
                path,
                f"not a plain dict of tensors (entry is a {kind}; none of {', '.join(WRAPPER_KEYS)} "
                "holds the weights)",
                None if bad is None else str(bad),
            )
        trail.append(key)
        obj = obj[key]
    if not _is_tensor_dict(obj):
        raise ConvertError(path, f"not a dict of tensors (found a {type(obj).__name__})")
    sd = {}
    for k, v in obj.items():
        if not isinstance(k, str):
            raise ConvertError(path, f"tensor name {k!r} is not a string")
        sd[k] = v
    for prefix in KEY_PREFIXES:
        if all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items()}
    return sd, ".".join(trail) or None


def detect_family(
    sd: dict[str, torch.Tensor], path: str | Path = "<checkpoint>", overrides: dict | None = None
) -> tuple[str | None, dict | None]:
    """(family, config) read off the tensors (family names as `engines.layouts` gives them); config
    is None when the family's loaders read everything from the shapes and config files.

    A setting the shapes cannot tell and no known size table gives is refused with its name
    (supply it with `--config`), never guessed.
    """
    from tessera.engines.checkpoint import CheckpointError
    from tessera.engines.flux import detect_dit_layout, infer_dit_config
    from tessera.engines.layouts import detect_family as family_name
    from tessera.engines.vae import detect_vae_layout, infer_vae_config

    family, config, overrides = family_name(sd), None, dict(overrides or {})
    try:
        if family == "LlamaGen GPT" and "layers.0.attention.wqkv.weight" in sd:
            config = _gpt_config(sd, path, overrides)
        elif family == "VQ tokenizer" and "encoder.conv_in.weight" in sd:
            from tessera.engines.vq import VQModel, infer_vq_config

            cfg = infer_vq_config(sd, {"tessera.config": json.dumps(overrides)})
            _check_shapes(lambda: VQModel(cfg), sd, path)
            config = asdict(cfg)
        elif family == "multi-scale VQ tokenizer" and "encoder.conv_in.weight" in sd:
            from tessera.engines.multiscale_vq import MultiScaleVQ, infer_multiscale_vq_config

            ms_cfg = infer_multiscale_vq_config(sd, {"tessera.config": json.dumps(overrides)})
            _check_shapes(lambda: MultiScaleVQ(ms_cfg), sd, path)
            config = asdict(ms_cfg)
        elif family == "VAR transformer" and "word_embed.weight" in sd:
            from tessera.engines.var import VAR, infer_var_config

            var_cfg = infer_var_config(sd, {"tessera.config": json.dumps(overrides)})
            _check_shapes(lambda: VAR(var_cfg), sd, path)
            config = asdict(var_cfg)
        elif family == "Flux DiT" and detect_dit_layout(sd) == "bfl":
            config = asdict(infer_dit_config(sd, path, overrides))
        elif family == "AutoencoderKL VAE" and detect_vae_layout(sd) == "ldm":
            config = asdict(infer_vae_config(sd, path, overrides))
    except CheckpointError as e:
        raise ConvertError(path, str(e).split(": ", 1)[-1], e.key) from None
    except (KeyError, ValueError, TypeError, ZeroDivisionError) as e:
        raise ConvertError(path, f"the tensors do not describe a consistent model ({e})") from None
    return (None if family == "unknown model" else family), config


def _gpt_config(sd: dict[str, torch.Tensor], path: str | Path, overrides: dict) -> dict:
    from tessera.engines.gpt import GPT, LLAMAGEN_HEADS, infer_gpt_config

    dim = sd["tok_embeddings.weight"].shape[1]
    if "n_head" not in overrides and dim not in LLAMAGEN_HEADS:
        raise ConvertError(
            path,
            f"cannot tell the GPT's head count: width {dim} is not a LlamaGen size "
            f"({', '.join(map(str, LLAMAGEN_HEADS))}); pass it with --config '{{\"n_head\": N}}'",
            "tok_embeddings.weight",
        )
    cfg = infer_gpt_config(sd, {"tessera.config": json.dumps(overrides)})
    _check_shapes(lambda: GPT(cfg), sd, path)
    return asdict(cfg)


def _check_shapes(build, sd: dict[str, torch.Tensor], path: str | Path) -> None:
    """The detected config must describe every tensor the model has, at its shape."""
    with torch.device("meta"):
        model = build()
    for key, t in model.state_dict().items():
        if key not in sd:
            raise ConvertError(path, "missing tensor for the detected config", key)
        if tuple(sd[key].shape) != tuple(t.shape):
            raise ConvertError(
                path, f"shape {tuple(sd[key].shape)} does not fit the detected config {tuple(t.shape)}", key
            )


def convert(src: str | Path, out: str | Path, overrides: dict | None = None, force: bool = False) -> dict:
    """Convert `src` to `out`; returns a summary (family, tensors, bytes, wrapper key)."""
    from tessera.engines.checkpoint import write_safetensors

    src, out = Path(src), Path(out)
    if src.suffix.lower() not in PICKLE_SUFFIXES:
        raise ConvertError(src, f"expected a PyTorch pickle ({', '.join(PICKLE_SUFFIXES)})")
    if out.suffix != ".safetensors":
        raise ConvertError(out, "the output must be a .safetensors file")
    if not src.is_file():
        raise ConvertError(src, "file not found")
    if out.exists() and not force:
        raise ConvertError(out, "already exists (pass --force to replace it)")
    if not out.parent.is_dir():
        raise ConvertError(out, f"folder {out.parent} does not exist")
    sd, wrapper = unwrap_state_dict(load_pickle(src), src)
    family, config = detect_family(sd, src, overrides)
    metadata = {"tessera.converted_from": src.name}
    if family:
        metadata["tessera.family"] = family
    if config is not None:
        metadata["tessera.config"] = json.dumps(config)
    write_safetensors(out, sd, metadata)
    return {
        "family": family,
        "tensors": len(sd),
        "bytes": sum(t.numel() * t.element_size() for t in sd.values()),
        "wrapper": wrapper,
        "config": config,
    }


def main(args: argparse.Namespace) -> int:
    """`tessera convert IN OUT [--config JSON] [--force]` (arguments parsed in tessera.cli)."""
    try:
        overrides = json.loads(args.config)
    except json.JSONDecodeError as e:
        raise SystemExit(f"tessera convert: --config is not JSON ({e})") from None
    if not isinstance(overrides, dict):
        raise SystemExit("tessera convert: --config must be a JSON object")
    try:
        summary = convert(args.input, args.output, overrides, args.force)
    except ConvertError as e:
        raise SystemExit(f"tessera convert: {e}") from None
    under = f" (under '{summary['wrapper']}')" if summary["wrapper"] else ""
    print(
        f"{args.output}: {summary['tensors']} tensors{under}, {summary['bytes'] / 2**20:.1f} MiB, "
        f"family {summary['family'] or 'not recognised (no config recorded)'}"
    )
    return 0
