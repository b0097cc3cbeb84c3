"""torch.compile for the runtime: the DiT's blocks and the GPT's decode step, once per shape.

`tessera serve|run --compile off|default|max` sets the process-wide mode (default: off on a
CPU, default on CUDA). "default" compiles with inductor's default mode and the AR decode
step with CUDA graphs over the static KV cache ("reduce-overhead"); "max" autotunes the
kernels as well. Inductor keeps one artefact per input shape (`dynamic=False`), so a shape
compiles on its first call and is reused after that. The first call of each shape is timed
and recorded: `compile_info()` feeds /api/system and the nodes report it as progress text.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import torch

MODES = ("off", "default", "max")

_lock = threading.Lock()
_mode = "off"
_records: list[dict] = []
_decode_steps: dict[str, Callable] = {}


def default_mode(device: torch.device) -> str:
    """off on a CPU (compiling costs more than it saves for small models there), default on CUDA."""
    return "default" if device.type == "cuda" else "off"


def set_compile_mode(mode: str | None, device: torch.device) -> str:
    """Set the process-wide mode (None: the device's default); returns the mode in force."""
    global _mode
    chosen = default_mode(device) if mode is None else mode
    if chosen not in MODES:
        raise ValueError(f"unknown compile mode '{chosen}' (choose from {', '.join(MODES)})")
    with _lock:
        _mode = chosen
    return chosen


def compile_mode() -> str:
    return _mode


def compile_info() -> dict:
    """The mode, the compile seconds so far and one record per compiled (function, shape)."""
    with _lock:
        records = [dict(r) for r in _records]
    return {"mode": _mode, "seconds": round(sum(r["seconds"] for r in records), 3), "artefacts": records}


def _shape_key(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return (tuple(value.shape), str(value.dtype), value.device.type)
    if isinstance(value, (list, tuple)):
        return tuple(_shape_key(v) for v in value)
    return type(value).__name__


class FirstCallTimer:
    """Calls `fn`; the first call per input-shape signature (which compiles) is timed and recorded."""

    def __init__(self, fn: Callable, what: str, on_compile: Callable[[dict], None] | None = None):
        self.fn, self.what, self.on_compile = fn, what, on_compile
        self.seen: set = set()

    def __call__(self, *args, **kwargs):
        key = _shape_key(args) + _shape_key(tuple(kwargs.values()))
        if key in self.seen:
            return self.fn(*args, **kwargs)
        start = time.perf_counter()
        out = self.fn(*args, **kwargs)
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        record = {"what": self.what, "shapes": repr(key), "seconds": round(time.perf_counter() - start, 3)}
        with _lock:
            _records.append(record)
        self.seen.add(key)
        if self.on_compile is not None:
            self.on_compile(record)
        return out


def _torch_mode(device: torch.device, cuda_graphs: bool) -> str:
    if _mode == "max":
        return "max-autotune" if device.type == "cuda" and cuda_graphs else "max-autotune-no-cudagraphs"
    return "reduce-overhead" if device.type == "cuda" and cuda_graphs else "default"


def compile_dit(model: torch.nn.Module) -> torch.nn.Module:
    """Compile every double- and single-stream block of a Flux DiT in place (idempotent; a no-op
    when the mode is off). Identical blocks share one compiled graph per shape."""
    if _mode == "off" or getattr(model, "_tessera_compiled", None) == _mode:
        return model
    device = next(model.parameters()).device
    for block in (*model.double_blocks, *model.single_blocks):
        block.compile(mode=_torch_mode(device, cuda_graphs=False), dynamic=False)
    model.forward_tokens = FirstCallTimer(type(model).forward_tokens.__get__(model), "DiT forward")
    model._tessera_compiled = _mode
    return model


def _compiled(fn: Callable, what: str, device: torch.device) -> Callable | None:
    if _mode == "off":
        return None
    key = f"{what}:{_mode}:{device.type}"
    with _lock:
        if key not in _decode_steps:
            step = torch.compile(fn, mode=_torch_mode(device, cuda_graphs=True), dynamic=False)
            _decode_steps[key] = FirstCallTimer(step, what)
        return _decode_steps[key]


def compiled_decode_step(device: torch.device) -> Callable | None:
    """The AR decode step (`ar_decoding.decode_one_token`: forward + CFG mix) compiled for this
    device and mode, with CUDA graphs over the static KV cache on CUDA; None when the mode is off."""
    from tessera.engines.ar_decoding import decode_one_token

    return _compiled(decode_one_token, "AR decode step", device)


def compiled_sampler(device: torch.device) -> Callable | None:
    """`ar_decoding.sample` (filters, softmax, inverse-CDF draw) compiled the same way, so the
    token after the decode step is drawn on the device in one graph; None when the mode is off."""
    from tessera.engines.ar_decoding import sample

    return _compiled(sample, "AR sampler", device)
