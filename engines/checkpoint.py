"""Model files, read and written safely: safetensors only, with errors that name the file and key.

Every engine loader goes through `read_safetensors`, so a truncated, malformed or
non-safetensors file fails the same clear way everywhere, and nothing is unpickled. Every
saver (model files, adapters, training state) goes through `write_safetensors`, which writes
a temporary file beside the target and renames it into place, so a crash or a full disk never
leaves a half-written file under the real name.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import fp8


class CheckpointError(ValueError):
    """A model file that cannot be used; the message names the file (and key, if any)."""

    def __init__(self, path: str | Path, reason: str, key: str | None = None):
        self.path = str(path)
        self.key = key
        where = f"{Path(path).name}" + (f", key '{key}'" if key else "")
        super().__init__(f"{where}: {reason}")


def _check_header(path: Path) -> None:
    """Validate the safetensors header against the file size before handing it to the parser."""
    size = path.stat().st_size
    if size < 8:
        raise CheckpointError(path, f"not a safetensors file (only {size} bytes)")
    with path.open("rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > size - 8 or header_len > 100_000_000:
            raise CheckpointError(path, "not a safetensors file (header length is past the end of the file)")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(path, f"malformed safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(path, "malformed safetensors header (not a JSON object)")
    data_len = size - 8 - header_len
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            _, end = info["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise CheckpointError(path, "malformed tensor entry", key) from None
        if end > data_len:
            raise CheckpointError(
                path, f"file is truncated (tensor data ends at byte {end} of {data_len})", key
            )
        dtype = info.get("dtype")
        if isinstance(dtype, str) and dtype.startswith("F8_") and not fp8.fp8_available():
            raise CheckpointError(
                path,
                f"stores {dtype} (fp8) tensors, which torch {torch.__version__} cannot read (it has no "
                "torch.float8_e4m3fn; torch 2.1 or newer has): use a bf16/fp16 copy of this model or upgrade torch",
                key,
            )


def read_safetensors(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load every tensor of a `.safetensors` file plus its string metadata."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(path, "only .safetensors model files are loaded")
    if not path.is_file():
        raise CheckpointError(path, "file not found")
    _check_header(path)
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except CheckpointError:
        raise
    except Exception as e:  # the parser's own errors carry no file name
        raise CheckpointError(path, f"cannot read safetensors file ({e})") from None
    return tensors, metadata


def write_safetensors(
    path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> Path:
    """Write `tensors` (made contiguous, on the CPU) and string `metadata` to `path` atomically.

    The bytes go to a hidden temporary file in the same folder, are flushed to disk, and the file
    is renamed over `path` (`os.replace`, atomic on one file system); on any failure the
    temporary file is removed and `path` is left as it was. Tensors sharing storage (tied
    weights) are written as separate copies, which safetensors requires.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    flat: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for k, v in tensors.items():
        v = v.detach().to("cpu").contiguous()
        ptr = v.untyped_storage().data_ptr()
        if ptr in seen and v.numel():
            v = v.clone()
        seen.add(ptr)
        flat[k] = v
    try:
        save_file(flat, str(tmp), metadata=metadata)
        with tmp.open("rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def require(
    state_dict: dict[str, torch.Tensor], key: str, path: str | Path, shape: tuple | None = None
) -> torch.Tensor:
    """Fetch a tensor a loader cannot do without, failing with file and key named."""
    if key not in state_dict:
        raise CheckpointError(path, "missing tensor", key)
    t = state_dict[key]
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise CheckpointError(path, f"shape {tuple(t.shape)} does not match the expected {tuple(shape)}", key)
    return t


def metadata_config(metadata: dict[str, str], path: str | Path) -> dict:
    """The JSON object in a file's `tessera.config` metadata ({} when absent), failing clearly when malformed."""
    raw = metadata.get("tessera.config")
    if not raw:
        return {}
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as e:
        raise CheckpointError(path, f"metadata 'tessera.config' is not JSON ({e})") from None
    if not isinstance(config, dict):
        raise CheckpointError(path, "metadata 'tessera.config' is not a JSON object")
    return config


def assign_checked(
    model: torch.nn.Module,
    state_dict: dict[str, torch.Tensor],
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    ignored: tuple[str, ...] = (),
) -> None:
    """Load exactly the model's keys at exactly its shapes, assigning tensors (the model may live on `meta`).

    Building on `meta` and assigning avoids a random init and a second copy of multi-GB weights.
    Keys containing one of `ignored` are known training leftovers in other projects' files and skipped.
    """
    expected = model.state_dict()
    for key, t in expected.items():
        require(state_dict, key, path, tuple(t.shape))
    extra = sorted(k for k in set(state_dict) - set(expected) if not any(part in k for part in ignored))
    if extra:
        raise CheckpointError(
            path, "unexpected tensor (not part of the model the other tensors describe)", extra[0]
        )
    model.load_state_dict({k: state_dict[k].to(device=device, dtype=dtype) for k in expected}, assign=True)
    model.eval().requires_grad_(False)
