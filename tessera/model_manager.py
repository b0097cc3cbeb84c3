"""Which models sit on the GPU: a VRAM budget, least-recently-used offload, and block streaming.

A 12B DiT plus a 4.7B T5 does not fit a 24 GB GPU at once. As in ComfyUI, a node that needs
a model gets it on the compute device; to make room, the least recently used models go back
to (pinned) CPU memory, from where they return quickly; a model larger than the budget keeps
what fits on the device and streams the rest of its blocks (the entries of its ModuleLists:
Flux's double/single blocks, the GPT's layers) through the device one at a time. Moves are
reported as progress on the node that asked, and `state()` is shown in /api/system.

Bytes are counted per tensor storage, so models that share weights (a LoRA'd copy and its
base) are counted once. On the CPU there is no separate device memory and nothing moves;
`simulate=True` keeps the same accounts there (what the tests check).
"""

from __future__ import annotations

import dataclasses
import re
import threading
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

GiB = 1 << 30
DEFAULT_MARGIN = 2 * GiB  # left free for activations and the CUDA context when no budget is given
DEFAULT_RESERVE = 1 * GiB  # of the budget, kept for activations: weights get the rest
Progress = Callable[[int, int], None]

_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "kib": 2**10,
    "m": 10**6,
    "mb": 10**6,
    "mib": 2**20,
    "g": 10**9,
    "gb": 10**9,
    "gib": 2**30,
    "t": 10**12,
    "tb": 10**12,
    "tib": 2**40,
}


def parse_bytes(text: str) -> int:
    """'12GiB', '24GB', '800MiB', '1.5g' or a plain byte count -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"{text!r} is not a size (e.g. 12GiB, 24GB, 800MiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def default_budget(device: torch.device) -> int | None:
    """Free device memory minus a margin, or None on the CPU (no device memory to manage)."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return max(0, free - DEFAULT_MARGIN)


def _tensors(module: nn.Module) -> Iterable[torch.Tensor]:
    yield from module.parameters()
    yield from module.buffers()


def storage_key(t: torch.Tensor) -> tuple:
    """What identifies a tensor's storage: device and address (meta tensors have none: the tensor itself)."""
    ptr = t.untyped_storage().data_ptr()
    return (str(t.device), ptr) if ptr else ("tensor", id(t))


def storage_sizes(
    module: nn.Module, where: Callable[[torch.Tensor], bool] = lambda t: True
) -> dict[tuple, int]:
    """{storage key: bytes} of a module's parameters and buffers for which `where` holds, each storage once."""
    return {
        storage_key(t): t.untyped_storage().nbytes()
        for t in _tensors(module)
        if where(t) and t.untyped_storage().nbytes()
    }


def models_in(values: Iterable[object], depth: int = 4) -> list[nn.Module]:
    """The modules inside socket values: bare, or in tuples, lists, dicts and dataclasses (a TEXT_ENCODER
    holding CLIP and T5 with their tokenizers), each once, outermost first."""
    found: dict[int, nn.Module] = {}

    def walk(v: object, d: int) -> None:
        if isinstance(v, nn.Module):
            found.setdefault(id(v), v)
        elif d == 0 or isinstance(v, (torch.Tensor, str, bytes, int, float)):
            return
        elif isinstance(v, dict):
            for item in v.values():
                walk(item, d - 1)
        elif isinstance(v, (list, tuple)):
            for item in v:
                walk(item, d - 1)
        elif dataclasses.is_dataclass(v) and not isinstance(v, type):
            for f in dataclasses.fields(v):
                walk(getattr(v, f.name), d - 1)

    for v in values:
        walk(v, depth)
    return list(found.values())


def stream_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks a too-large model streams: entries of its outermost ModuleLists, in order."""
    blocks, taken = [], []
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and not any(name.startswith(t + ".") for t in taken):
            taken.append(name)
            blocks.extend(m)
    return blocks


class ModelTooLarge(RuntimeError):
    """Not even the model's resident part plus one streamed block fits the budget."""


@dataclass
class _Record:
    ref: weakref.ref
    name: str
    bytes: int
    where: str = "offloaded"  # "device" | "offloaded" | "streaming"
    last_used: int = 0
    device_bytes: int = 0  # what it holds on the device (streaming: resident + kept blocks + one slot)
    hooks: list = field(default_factory=list)
    streamed: int = 0  # blocks streamed per forward (streaming only)


class ModelManager:
    """Keeps managed models' weights on `device` within `budget` bytes (minus `reserve` for activations)."""

    def __init__(
        self,
        device: torch.device | str,
        budget: int | None = None,
        reserve: int | None = None,
        offload_device: torch.device | str = "cpu",
        pin: bool | None = None,
        simulate: bool = False,
    ):
        self.device, self.offload_device = torch.device(device), torch.device(offload_device)
        self.simulate = simulate  # account as if `device` were separate memory, but move nothing
        self.active = simulate or self.device != self.offload_device
        self.budget = budget if budget is not None else default_budget(self.device)
        self.reserve = (
            reserve if reserve is not None else (DEFAULT_RESERVE if self.device.type == "cuda" else 0)
        )
        self.pin = pin if pin is not None else (self.device.type == "cuda" and not simulate)
        self._records: dict[int, _Record] = {}
        self._dead: list[int] = []  # keys of garbage-collected models, appended by weakref callbacks
        self._protected: set[int] = set()
        self._clock = 0
        self._lock = threading.RLock()
        self.moves: list[tuple[str, str]] = []  # (model name, "device" | "offloaded" | "streaming"), in order
        self.block_loads = 0  # streamed blocks brought to the device so far

    @property
    def weight_budget(self) -> int | None:
        return None if self.budget is None else max(0, self.budget - self.reserve)

    # ---------------------------------------------------------------- public

    def prepare(self, values: Iterable[object], progress: Progress | None = None) -> None:
        """Make every model among a node's input values ready on the device (called before it runs)."""
        models = models_in(values)
        with self._lock:
            self._protected = {id(m) for m in models}  # a node's models never evict each other
            try:
                for model in models:
                    self.use(model, progress=progress)
            finally:
                self._protected = set()

    def adopt(self, values: Iterable[object], name: str) -> None:
        """Register the models a node produced (called after it runs), making room if they arrived on the device."""
        if not self.active:
            return
        for model in models_in(values):
            with self._lock, torch.no_grad():
                rec = self._record(model, name)
                if rec.where != "device":
                    continue
                if self.weight_budget is not None and rec.bytes > self.weight_budget:
                    # Loaded onto the device whole, but larger than the budget: stream it instead.
                    rec.where, rec.device_bytes = "offloaded", 0
                    self._stream(model, rec, None)
                else:
                    self._make_room(rec, lambda: 0)

    def use(self, model: nn.Module, name: str | None = None, progress: Progress | None = None) -> nn.Module:
        """`model`, with its weights on the device (or streaming through it); offloads others as needed."""
        if not self.active:
            return model
        with self._lock, torch.no_grad():
            rec = self._record(model, name or type(model).__name__)
            self._clock += 1
            rec.last_used = self._clock
            if rec.where == "streaming" or (rec.where == "device" and self._physically_there(model)):
                return model
            rec.where, rec.device_bytes = "offloaded", 0
            if self.weight_budget is not None and rec.bytes > self.weight_budget:
                self._stream(model, rec, progress)
            else:
                self._make_room(rec, lambda: self._missing_bytes(model))
                self._move(_tables([model]), self.device, progress)
                rec.where, rec.device_bytes = "device", rec.bytes
                self.moves.append((rec.name, "device"))
            return model

    def offload(self, model: nn.Module, progress: Progress | None = None) -> None:
        with self._lock:
            rec = self._records.get(id(model))
            if rec is not None and rec.where != "offloaded":
                self._offload(model, rec, progress)

    def device_bytes(self) -> int:
        """Weight bytes the managed models hold on the device, shared storages once."""
        with self._lock:
            seen: dict[tuple, int] = {}
            streaming = 0
            self._purge()
            for rec in list(self._records.values()):
                model = rec.ref()
                if model is None:
                    continue
                if rec.where == "device":
                    seen.update(self._device_storages(model))
                elif rec.where == "streaming":
                    streaming += rec.device_bytes
            return sum(seen.values()) + streaming

    def state(self) -> dict:
        """What /api/system shows: the budget and every managed model, most recently used first."""
        with self._lock:
            models = [
                {
                    "name": r.name,
                    "bytes": r.bytes,
                    "where": r.where,
                    "device_bytes": r.device_bytes,
                    "last_used": r.last_used,
                    **({"streamed_blocks": r.streamed} if r.where == "streaming" else {}),
                }
                for r in sorted(list(self._records.values()), key=lambda r: -r.last_used)
                if r.ref() is not None
            ]
            return {
                "device": str(self.device),
                "budget": self.budget,
                "reserve": self.reserve,
                "device_bytes": self.device_bytes(),
                "active": self.active,
                "models": models,
            }

    # ---------------------------------------------------------------- internals

    def _record(self, model: nn.Module, name: str) -> _Record:
        self._purge()
        key = id(model)
        rec = self._records.get(key)
        if rec is None or rec.ref() is not model:
            # A dead model's key is only noted here; its record goes at the next purge, under the lock.
            ref = weakref.ref(model, lambda _, k=key: self._dead.append(k))
            on_device = not self.simulate and any(t.device == self.device for t in _tensors(model))
            rec = _Record(ref, name, sum(storage_sizes(model).values()))
            if on_device:
                rec.where, rec.device_bytes = "device", rec.bytes
            self._records[key] = rec
        return rec

    def _purge(self) -> None:
        while self._dead:
            key = self._dead.pop()
            rec = self._records.get(key)
            if rec is not None and rec.ref() is None:
                del self._records[key]

    def _physically_there(self, model: nn.Module) -> bool:
        # A model sharing weights with one that was offloaded may have lost some of them.
        return self.simulate or all(t.device == self.device for t in _tensors(model))

    def _device_storages(self, model: nn.Module) -> dict[tuple, int]:
        return storage_sizes(model, lambda t: self.simulate or t.device == self.device)

    def _missing_bytes(self, model: nn.Module) -> int:
        """Bytes `model` would add to the device: its storages not already there for another model."""
        there: set[tuple] = set()
        for rec in list(self._records.values()):
            other = rec.ref()
            if other is not None and other is not model and rec.where == "device":
                there |= set(self._device_storages(other))
        return sum(n for p, n in storage_sizes(model).items() if p not in there)

    def _make_room(self, rec: _Record, need: Callable[[], int]) -> None:
        """Offload least recently used models (never `rec`'s) until `need()` more bytes fit the weight budget."""
        if self.weight_budget is None:
            return
        while self.device_bytes() + need() > self.weight_budget:
            victims = [
                r
                for key, r in list(self._records.items())
                if r is not rec
                and r.ref() is not None
                and r.where != "offloaded"
                and key not in self._protected
            ]
            if not victims:
                return
            victim = min(victims, key=lambda r: r.last_used)
            self._offload(victim.ref(), victim, None)

    def _offload(self, model: nn.Module, rec: _Record, progress: Progress | None) -> None:
        for h in rec.hooks:
            h.remove()
        rec.hooks.clear()
        self._move(_tables([model]), self.offload_device, progress)
        rec.where, rec.device_bytes, rec.streamed = "offloaded", 0, 0
        self.moves.append((rec.name, "offloaded"))

    def _to(self, t: torch.Tensor, device: torch.device) -> torch.Tensor:
        """`t` on `device`: pinned when it is the CPU (so it returns asynchronously), as is when already there."""
        if self.simulate:
            return t
        if device.type == "cpu":
            out = t if t.device == device else t.to(device)
            return out.pin_memory() if self.pin and not out.is_pinned() else out
        return t if t.device == device else t.to(device, non_blocking=t.is_pinned())

    def _move(self, tables: list[dict], device: torch.device, progress: Progress | None = None) -> None:
        """Move every tensor in `tables` (modules' _parameters/_buffers) to `device`, reporting progress."""
        for i, table in enumerate(tables):
            for key, t in list(table.items()):
                if t is not None:
                    moved = self._to(t.data, device)
                    if moved is not t.data:
                        _assign(table, key, moved)
            if progress is not None and ((i + 1) % max(1, len(tables) // 50) == 0 or i + 1 == len(tables)):
                progress(i + 1, len(tables))

    def _stream(self, model: nn.Module, rec: _Record, progress: Progress | None) -> None:
        """Keep what fits on the device; stream the remaining blocks through one slot."""
        blocks = stream_blocks(model)
        block_tensors = {id(t) for b in blocks for t in _tensors(b)}
        resident = sum(t.untyped_storage().nbytes() for t in _tensors(model) if id(t) not in block_tensors)
        sizes = [sum(storage_sizes(b).values()) for b in blocks]
        slot = max(sizes, default=0)
        if not blocks or resident + slot > self.weight_budget:
            raise ModelTooLarge(
                f"{rec.name} needs {rec.bytes / GiB:.2f} GiB; even streaming it needs "
                f"{(resident + slot) / GiB:.2f} GiB (its resident weights plus one block) but the weight "
                f"budget is {self.weight_budget / GiB:.2f} GiB: raise --vram-budget or store it in fp8"
            )
        self._make_room(rec, lambda: self.weight_budget + 1)  # every other model leaves first
        room = self.weight_budget - resident - slot - self.device_bytes()
        kept, streamed = [], []
        for b, n in zip(blocks, sizes):
            (kept if n <= room else streamed).append(b)
            room -= n if n <= room else 0
        in_blocks = {id(m) for b in blocks for m in b.modules()}
        resident_modules = [m for m in model.modules() if id(m) not in in_blocks]
        self._move(_tables(resident_modules, recurse=False), self.device)
        self._move(_tables(kept), self.device, progress)
        self._move(_tables(streamed, buffers=False), self.offload_device)
        self._move(_tables(streamed, params=False), self.device)  # KV caches and tables stay on the device
        for b in streamed:
            rec.hooks.append(b.register_forward_pre_hook(self._bring))
            rec.hooks.append(b.register_forward_hook(self._send_back))
        rec.where, rec.streamed = "streaming", len(streamed)
        rec.device_bytes = resident + sum(sizes[i] for i, b in enumerate(blocks) if b in kept) + slot
        self.moves.append((rec.name, "streaming"))

    def _bring(self, block: nn.Module, args) -> None:
        self.block_loads += 1
        if self.simulate:
            return
        offloaded = {}
        for m in block.modules():
            for key, p in list(m._parameters.items()):
                if p is not None:
                    offloaded[(id(m), key)] = p.data
                    _assign(m._parameters, key, p.data.to(self.device, non_blocking=p.data.is_pinned()))
        block.__dict__["_tessera_offloaded"] = offloaded

    def _send_back(self, block: nn.Module, args, output) -> None:
        if self.simulate:
            return
        offloaded = block.__dict__.pop("_tessera_offloaded", {})
        for m in block.modules():
            for key in list(m._parameters):
                if (id(m), key) in offloaded:  # back to the pinned copy; the device copy is freed
                    _assign(m._parameters, key, offloaded[(id(m), key)])


def _assign(table: dict, key: str, new: torch.Tensor) -> None:
    """Point a parameter/buffer at `new` in place, so modules sharing it (a LoRA'd copy) follow."""
    t = table[key]
    try:
        t.data = new
    except RuntimeError:  # another tensor type (e.g. `meta`) needs a new Parameter, as nn.Module.to makes
        table[key] = nn.Parameter(new, requires_grad=False) if isinstance(t, nn.Parameter) else new


def _tables(
    modules: Iterable[nn.Module], params: bool = True, buffers: bool = True, recurse: bool = True
) -> list[dict]:
    """The parameter/buffer tables of `modules` (and their children when `recurse`), for `_move`."""
    out = []
    for part in modules:
        for m in part.modules() if recurse else (part,):
            out += ([m._parameters] if params else []) + ([m._buffers] if buffers else [])
    return out
