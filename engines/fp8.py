"""fp8 (e4m3fn) weight storage: Linear weights kept in 8 bits, upcast per layer when used.

A 12B-parameter Flux DiT is 24 GB in bf16 and 12 GB in fp8, which is what lets it run on
consumer GPUs. As ComfyUI does for fp8 Flux and T5 files, only the big matrices (every
`nn.Linear` weight) are stored in fp8; each layer casts its weight to the compute dtype
right before its matmul, so at most one layer's upcast copy exists at a time. Norms,
embeddings, biases and convolutions stay in the compute dtype. Values beyond e4m3's range
(±448) are clamped when quantising, since e4m3fn has no infinity and would give NaN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FP8_MAX = 448.0
# Modules whose weight dtype an engine reads as "the model's dtype" (Flux.dtype reads
# img_in's): they stay in the compute dtype so inputs are never cast to fp8.
DTYPE_ANCHORS = ("img_in",)


class Fp8Unavailable(RuntimeError):
    """This torch build has no float8_e4m3fn dtype."""


def fp8_available() -> bool:
    return hasattr(torch, "float8_e4m3fn")


def require_fp8(what: str = "fp8 weights") -> torch.dtype:
    """torch.float8_e4m3fn, or a clear error naming the torch version that lacks it."""
    if not fp8_available():
        raise Fp8Unavailable(
            f"{what} need torch.float8_e4m3fn, which torch {torch.__version__} does not have "
            "(torch 2.1 or newer has it); choose another weight_dtype or upgrade torch"
        )
    return torch.float8_e4m3fn


def is_fp8(dtype: torch.dtype) -> bool:
    return fp8_available() and dtype in (torch.float8_e4m3fn, getattr(torch, "float8_e5m2", None))


def to_fp8(weight: torch.Tensor) -> torch.Tensor:
    """Quantise to e4m3fn, clamping to its finite range first."""
    dtype = require_fp8()
    if weight.dtype == dtype:
        return weight
    return weight.float().clamp(-FP8_MAX, FP8_MAX).to(dtype) if weight.is_floating_point() else weight


class Fp8Linear(nn.Linear):
    """An nn.Linear whose weight is stored in fp8 and upcast to the activations' dtype per call."""

    compute_dtype: torch.dtype = torch.bfloat16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if is_fp8(x.dtype):  # a caller that cast its input to "the layer's dtype"
            x = x.to(self.compute_dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias)


def store_fp8(
    model: nn.Module, compute_dtype: torch.dtype, keep: tuple[str, ...] = DTYPE_ANCHORS
) -> nn.Module:
    """Store every Linear weight of `model` in fp8 (in place), everything else in `compute_dtype`.

    Tensors already in fp8 (an fp8 file loaded with its own dtypes) are kept as they are;
    modules named in `keep` (any path component) stay in the compute dtype.
    """
    require_fp8()
    for name, module in model.named_modules():
        kept = any(part in keep for part in name.split("."))
        for pname, p in list(module.named_parameters(recurse=False)) + list(
            module.named_buffers(recurse=False)
        ):
            if not p.is_floating_point():
                continue
            fp8 = isinstance(module, nn.Linear) and pname == "weight" and not kept
            new = to_fp8(p.data) if fp8 else p.data.to(compute_dtype)
            if new is not p.data:
                p.data = new
        if isinstance(module, nn.Linear) and not kept and type(module) in (nn.Linear, Fp8Linear):
            module.__class__ = Fp8Linear
            module.compute_dtype = compute_dtype
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by a model's parameters and buffers (each storage once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
    return total
