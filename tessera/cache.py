"""The intermediate-output cache: node outputs by cache key, bounded by bytes, LRU-evicted.

Budgets are kept per memory pool (CPU RAM, each CUDA device), so large models on the GPU
and images in RAM are each held to their own limit.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from dataclasses import dataclass, field

import torch


def memory_footprint(value: object, seen: set | None = None) -> dict[str, int]:
    """Bytes held by tensors inside `value`, per device ('cpu', 'cuda:0', …), each storage once."""
    seen = set() if seen is None else seen
    sizes: dict[str, int] = {}

    def add(tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        device = str(tensor.device)
        key = (
            (device, storage.data_ptr()) if storage.data_ptr() else id(tensor)
        )  # meta tensors have no address
        if key in seen or storage.nbytes() == 0:
            return
        seen.add(key)
        sizes[device] = sizes.get(device, 0) + storage.nbytes()

    def walk(v: object) -> None:
        if isinstance(v, torch.Tensor):
            add(v)
        elif isinstance(v, torch.nn.Module):
            for t in list(v.parameters()) + list(v.buffers()):
                add(t)
        elif isinstance(v, dict):
            for item in v.values():
                walk(item)
        elif isinstance(v, (list, tuple)):
            for item in v:
                walk(item)
        elif dataclasses.is_dataclass(v) and not isinstance(v, type):
            for f in dataclasses.fields(v):
                walk(getattr(v, f.name))

    walk(value)
    return sizes


@dataclass
class CacheEntry:
    outputs: tuple
    ui: dict = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)


class OutputCache:
    """LRU cache of node outputs with a byte budget per memory pool."""

    def __init__(self, cpu_bytes: int = 8 << 30, cuda_bytes: int = 16 << 30):
        self.budgets = {"cpu": cpu_bytes, "cuda": cuda_bytes}
        self.entries: OrderedDict[str, CacheEntry] = OrderedDict()
        self._usage: dict[str, int] = {}
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> CacheEntry | None:
        entry = self.entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self.entries.move_to_end(key)
        self.hits += 1
        return entry

    def put(self, key: str, outputs: tuple, ui: dict | None = None) -> None:
        entry = CacheEntry(outputs, ui or {}, memory_footprint(outputs))
        if any(size > self._budget(device) for device, size in entry.sizes.items()):
            return  # larger than its whole budget: never cached
        self._drop(key)
        self.entries[key] = entry
        self._recount()
        while any(size > self._budget(d) for d, size in self._usage.items()):
            self._drop(next(iter(self.entries)))
            self._recount()

    def usage(self) -> dict[str, int]:
        self._recount()
        return {d: s for d, s in self._usage.items() if s}

    def _recount(self) -> None:
        """Bytes per pool over all entries, each tensor storage once and where it is now: a model
        shared by a LoRA'd copy counts once, and one the model manager offloaded counts in RAM."""
        seen: set[int] = set()
        self._usage = {}
        for entry in self.entries.values():
            for device, size in memory_footprint(entry.outputs, seen).items():
                self._usage[device] = self._usage.get(device, 0) + size

    def clear(self) -> None:
        self.entries.clear()
        self._usage.clear()

    def _budget(self, device: str) -> int:
        return self.budgets["cpu" if device == "cpu" else "cuda"]

    def _drop(self, key: str) -> None:
        self.entries.pop(key, None)
