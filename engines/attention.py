"""Scaled dot-product attention behind one function, with the backend chosen once per process.

xformers' memory-efficient kernel is used on CUDA when it is installed (it is imported
lazily, so a CPU install never needs it); everything else goes through torch's SDPA.
Both compute the same softmax(q·kᵀ/√d)·v, so results agree within kernel tolerance.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

_backend: str | None = None
_xformers_ops = None


def _choose_backend() -> str:
    """xformers when CUDA and the package are both present (or forced by TESSERA_ATTENTION), else SDPA."""
    global _xformers_ops
    wanted = os.environ.get("TESSERA_ATTENTION", "auto").lower()
    if wanted == "sdpa" or (wanted == "auto" and not torch.cuda.is_available()):
        return "sdpa"
    try:
        import xformers.ops as xops
    except Exception:  # a broken install (wrong CUDA/torch build) must not stop the app
        if wanted == "xformers":
            raise RuntimeError("TESSERA_ATTENTION=xformers but xformers cannot be imported") from None
        return "sdpa"
    _xformers_ops = xops
    return "xformers"


def attention_backend_name() -> str:
    """The backend every `attention` call uses in this process: "xformers" or "sdpa"."""
    global _backend
    if _backend is None:
        _backend = _choose_backend()
    return _backend


def set_attention_backend(name: str) -> str:
    """Force a backend ("sdpa", "xformers" or "auto"); for tests and benchmarks. Returns the one chosen."""
    global _backend
    if name not in ("sdpa", "xformers", "auto"):
        raise ValueError(f"unknown attention backend {name!r}")
    previous = os.environ.get("TESSERA_ATTENTION")
    os.environ["TESSERA_ATTENTION"] = name
    try:
        _backend = _choose_backend()
    finally:
        if previous is None:
            os.environ.pop("TESSERA_ATTENTION", None)
        else:
            os.environ["TESSERA_ATTENTION"] = previous
    return _backend


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Multi-head attention over [B, H, L, D] tensors; `key_mask` [B, Lk] bool is True for keys to attend.

    Masked calls take SDPA even when xformers is selected: xformers wants a padded additive bias,
    and masks only appear when prompts of different lengths share a batch.
    """
    if attention_backend_name() == "xformers" and q.is_cuda and key_mask is None:
        out = _xformers_ops.memory_efficient_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        )
        return out.transpose(1, 2)
    mask = None if key_mask is None else key_mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
