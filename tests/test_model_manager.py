"""The model manager on the CPU with a simulated budget: accounting, LRU offload order, streaming."""

from __future__ import annotations

import gc

import pytest
import torch
from torch import nn

from tessera.cache import OutputCache
from tessera.engines.lora import copy_structure
from tessera.executor import Executor
from tessera.model_manager import ModelManager, ModelTooLarge, parse_bytes, stream_blocks
from tessera.node import Input, Node, Output
from tessera.registry import NodeRegistry
from tessera.server import system_info

KB = 1024


def linear(kb: int) -> nn.Linear:
    """A model of exactly `kb` KiB of fp32 weights (no bias)."""
    return nn.Linear(16, kb * KB // 4 // 16, bias=False)


class Stack(nn.Module):
    """An embedding, blocks in a ModuleList, and a head: the shape of a DiT or a GPT."""

    def __init__(self, n_blocks: int = 4, width: int = 32):
        super().__init__()
        self.inp = nn.Linear(8, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(width, width), nn.GELU()) for _ in range(n_blocks)
        )
        self.out = nn.Linear(width, 8)
        self.register_buffer("table", torch.ones(width), persistent=False)

    def forward(self, x):
        h = self.inp(x) * self.table
        for b in self.blocks:
            h = h + b(h)
        return self.out(h)


def nbytes(m: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers()))


def manager(budget_kb: int) -> ModelManager:
    return ModelManager("cpu", budget=budget_kb * KB, reserve=0, simulate=True)


def test_least_recently_used_model_is_offloaded_first():
    mm = manager(3 * 64)
    a, b, c, d, e = (linear(64) for _ in range(5))
    for name, m in zip("abc", (a, b, c)):
        mm.use(m, name)
    assert mm.device_bytes() == 3 * 64 * KB and mm.moves == [
        ("a", "device"),
        ("b", "device"),
        ("c", "device"),
    ]
    mm.use(d, "d")  # a is the least recently used
    mm.use(b, "b")  # touching b makes c the oldest on the device
    mm.use(e, "e")
    assert mm.moves[3:] == [("a", "offloaded"), ("d", "device"), ("c", "offloaded"), ("e", "device")]
    where = {m["name"]: m["where"] for m in mm.state()["models"]}
    assert where == {"a": "offloaded", "b": "device", "c": "offloaded", "d": "device", "e": "device"}
    assert mm.device_bytes() == 3 * 64 * KB <= mm.weight_budget
    mm.use(a, "a")  # coming back evicts the oldest again (d)
    assert mm.moves[-2:] == [("d", "offloaded"), ("a", "device")]


def test_shared_weights_count_once_for_the_manager_and_the_cache():
    base = linear(64)
    adapted = copy_structure(base)  # what a LoRA node hands on: new modules, the same tensors
    adapted.extra = nn.Parameter(torch.zeros(16 * KB // 4))  # plus 16 KiB of its own
    mm = manager(64 + 16)
    mm.use(base, "base")
    mm.use(adapted, "adapted")
    assert mm.device_bytes() == (64 + 16) * KB
    assert ("base", "offloaded") not in mm.moves  # both fit: the shared 64 KiB are counted once
    cache = OutputCache(cpu_bytes=100 * KB)
    cache.put("base", (base,))
    cache.put("adapted", (adapted,))
    assert cache.usage() == {"cpu": (64 + 16) * KB}
    assert cache.get("base") is not None and cache.get("adapted") is not None


def test_a_model_larger_than_the_budget_streams_its_blocks_and_computes_the_same():
    torch.manual_seed(0)
    model = Stack(n_blocks=4).eval()
    x = torch.randn(3, 8)
    with torch.no_grad():
        expected = model(x)
    blocks = stream_blocks(model)
    block = nbytes(blocks[0])
    resident = nbytes(model) - 4 * block
    mm = ModelManager("cpu", budget=resident + 2 * block, reserve=0, simulate=True)
    other = linear(1)
    mm.use(other, "other")
    mm.use(model, "big")
    assert mm.moves[-2:] == [("other", "offloaded"), ("big", "streaming")]
    state = {m["name"]: m for m in mm.state()["models"]}["big"]
    assert state["streamed_blocks"] == 3  # one block kept on the device, one slot for the rest
    assert state["device_bytes"] == resident + 2 * block <= mm.weight_budget
    with torch.no_grad():
        out = model(x)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert mm.block_loads == 3
    mm.use(other, "other")  # another model needs room: the streaming one leaves, hooks removed
    assert mm.moves[-2:] == [("big", "offloaded"), ("other", "device")]
    with torch.no_grad():
        model(x)
    assert mm.block_loads == 3


def test_a_model_that_cannot_even_stream_is_refused_by_name():
    model = Stack(n_blocks=2, width=64)
    mm = ModelManager("cpu", budget=nbytes(model.blocks[0]), reserve=0, simulate=True)
    with pytest.raises(
        ModelTooLarge, match=r"^flux-ish needs .* GiB .* raise --vram-budget or store it in fp8"
    ):
        mm.use(model, "flux-ish")


def test_reserve_is_kept_for_activations_and_dead_models_leave_the_books():
    mm = ModelManager("cpu", budget=200 * KB, reserve=100 * KB, simulate=True)
    a, b = linear(64), linear(64)
    mm.use(a, "a")
    mm.use(b, "b")  # 128 KiB > 100 KiB of weight budget: a leaves
    assert mm.moves[-2:] == [("a", "offloaded"), ("b", "device")]
    del b
    gc.collect()
    assert [m["name"] for m in mm.state()["models"]] == ["a"] and mm.device_bytes() == 0


def test_cpu_manager_without_simulation_is_inert():
    mm = ModelManager("cpu")
    m = linear(4)
    assert mm.use(m) is m and not mm.active and mm.moves == [] and mm.state()["models"] == []


@pytest.mark.parametrize(
    "text, value",
    [
        ("12GiB", 12 << 30),
        ("24GB", 24 * 10**9),
        ("800MiB", 800 << 20),
        ("1.5g", 1_500_000_000),
        ("4096", 4096),
    ],
)
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value


def test_parse_bytes_refuses_garbage():
    with pytest.raises(ValueError, match="not a size"):
        parse_bytes("12 parsecs")


class MakeModel(Node):
    """A model of `kb` KiB."""

    inputs = (Input("kb", "INT", default=64, min=1, max=1024), Input("seed", "INT", default=0))
    outputs = (Output("model", "TEST_MODEL"),)

    def execute(self, ctx, kb, seed):
        return (linear(kb),)


class UseModel(Node):
    """Needs a model on the device."""

    is_output = True
    inputs = (Input("model", "TEST_MODEL"),)
    outputs = ()

    def execute(self, ctx, model):
        return ()


def test_executor_moves_input_models_as_progress_and_system_info_shows_them(tmp_path):
    registry = NodeRegistry()
    registry.register(MakeModel)
    registry.register(UseModel)
    mm = manager(100)
    executor = Executor(registry, tmp_path, tmp_path, tmp_path, "cpu", models=mm)
    workflow = {
        "version": 1,
        "nodes": {
            "a": {"type": "MakeModel", "inputs": {"kb": 64, "seed": 1}},
            "b": {"type": "MakeModel", "inputs": {"kb": 64, "seed": 2}},
            "ua": {"type": "UseModel", "inputs": {"model": {"node": "a", "output": "model"}}},
            "ub": {"type": "UseModel", "inputs": {"model": {"node": "b", "output": "model"}}},
        },
    }
    events = []
    result = executor.run(workflow, "p", lambda kind, data: events.append((kind, data)))
    assert result.status == "success", result.errors
    used_first = next(n for n in result.executed if n.startswith("u"))
    used_second = "ub" if used_first == "ua" else "ua"
    # Each model goes to the device when its user runs; the second pushes out the first.
    first, second = f"MakeModel {used_first[1]}", f"MakeModel {used_second[1]}"
    assert mm.moves == [(first, "device"), (first, "offloaded"), (second, "device")]
    progress_nodes = {d["node"] for k, d in events if k == "progress"}
    assert progress_nodes == {"ua", "ub"}
    info = system_info(executor)["memory"]["models"]
    assert info["budget"] == 100 * KB and info["device_bytes"] == 64 * KB
    assert [(m["name"], m["where"]) for m in info["models"]] == [(second, "device"), (first, "offloaded")]


class MetaManager(ModelManager):
    def _to(self, t, device):
        if t.device.type == "meta" and device.type == "cpu":
            return torch.empty(t.shape, dtype=t.dtype)  # meta holds no data to copy back
        return super()._to(t, device)


def test_real_moves_with_meta_as_the_device():
    """Without simulation tensors really move (here to `meta`, the only second device a CPU has)."""
    torch.manual_seed(0)
    model = Stack(n_blocks=4).eval()
    block = nbytes(model.blocks[0])
    resident = nbytes(model) - 4 * block
    mm = MetaManager("meta", budget=resident + 2 * block, reserve=0, offload_device="cpu", pin=False)
    streamed_before = [p.detach().clone() for b in model.blocks[1:] for p in b.parameters()]
    mm.use(model, "big")
    assert model.inp.weight.device.type == "meta" and model.table.device.type == "meta"
    assert all(p.device.type == "meta" for p in model.blocks[0].parameters())  # kept on the device
    assert all(p.device.type == "cpu" for b in model.blocks[1:] for p in b.parameters())
    assert all(t.device.type == "meta" for b in model.blocks[1:] for t in b.buffers())
    seen = []
    hook = model.blocks[2][0].register_forward_pre_hook(lambda m, a: seen.append(m.weight.device.type))
    with torch.no_grad():
        out = model(torch.randn(2, 8, device="meta"))
    hook.remove()
    assert out.device.type == "meta" and seen == ["meta"] and mm.block_loads == 3
    after = [p for b in model.blocks[1:] for p in b.parameters()]
    assert all(p.device.type == "cpu" for p in after)
    for a, b in zip(after, streamed_before):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # the offloaded copies are the originals
    small = linear(1)
    mm.use(small, "small")
    assert all(t.device.type == "cpu" for t in list(model.parameters()) + list(model.buffers()))
    assert small.weight.device.type == "meta"


def test_bench_tiny_mode_places_streams_and_refuses_within_budget():
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(root / "bench" / "model_manager.py"), "--tiny"],
        capture_output=True,
        text=True,
        env=env,
        cwd=root,
        check=True,
    )
    record = json.loads(done.stdout.strip().splitlines()[-1])
    rows = record["rows"]
    assert {r["format"] for r in rows} == {"float32", "fp8"}
    placements = [(r["format"], r["placement"]) for r in rows]
    assert placements == [
        ("float32", "device"),
        ("float32", "device"),
        ("float32", "streaming"),
        ("float32", "refused"),
        ("fp8", "device"),
        ("fp8", "device"),
        ("fp8", "device"),
        ("fp8", "streaming"),
    ]
    for r in rows:
        assert r["within_budget"] and (r["budget_bytes"] is None or r["peak_bytes"] <= r["budget_bytes"])
        if r["placement"] != "refused":
            assert r["max_abs_diff_vs_all_in_vram"] == 0 and r["s_per_step"] > 0
    fp8_bytes = next(r["weights_bytes"] for r in rows if r["format"] == "fp8")
    assert fp8_bytes < 0.35 * rows[0]["weights_bytes"]  # fp8 matrices are a quarter of fp32


def test_a_nodes_models_are_found_in_containers_and_never_evict_each_other():
    from dataclasses import dataclass

    @dataclass
    class TwoEncoders:  # the shape of a TEXT_ENCODER: (model, tokenizer) pairs in a dataclass
        clip: tuple
        t5: tuple

    mm = manager(2 * 64)
    old, clip, t5 = linear(64), linear(64), linear(64)
    mm.use(old, "old")
    mm.adopt([TwoEncoders((clip, "tokenizer"), (t5, "tokenizer"))], "encoders")  # made in RAM: nothing moves
    assert mm.moves == [("old", "device")]
    mm.use(t5)  # t5 was used more recently than clip...
    mm.use(old)
    mm.prepare([TwoEncoders((clip, "tokenizer"), (t5, "tokenizer")), 3, "text"])
    # ...yet bringing clip for this node evicts `old`, not t5, which the same node needs.
    assert mm.moves[-2:] == [("old", "offloaded"), ("encoders", "device")]
    assert sorted(m["where"] for m in mm.state()["models"]) == ["device", "device", "offloaded"]
    assert mm.device_bytes() == 2 * 64 * KB
    # Three models for one node when two fit: nothing it needs is evicted; the budget is exceeded instead.
    mm.prepare([(clip, t5, old)])
    assert mm.device_bytes() == 3 * 64 * KB and all(m["where"] == "device" for m in mm.state()["models"])


def test_a_model_loaded_onto_the_device_whole_is_streamed_when_larger_than_the_budget():
    with torch.device("meta"):
        model = Stack(n_blocks=4)
    block = nbytes(model.blocks[0])
    resident = nbytes(model) - 4 * block
    mm = MetaManager("meta", budget=resident + 2 * block, reserve=0, offload_device="cpu", pin=False)
    mm.adopt([model], "LoadDiffusionModel 1")
    assert mm.moves == [("LoadDiffusionModel 1", "streaming")]
    assert [p.device.type for b in model.blocks for p in b.parameters()][::2] == ["meta", "cpu", "cpu", "cpu"]
    assert mm.device_bytes() == resident + 2 * block


def test_the_cache_counts_a_model_where_the_manager_moved_it():
    model = Stack(n_blocks=2)
    size = nbytes(model)
    cache = OutputCache(cpu_bytes=10 * size, cuda_bytes=10 * size)
    cache.put("loader", (model,))
    assert cache.usage() == {"cpu": size}
    MetaManager("meta", budget=10 * size, reserve=0, offload_device="cpu", pin=False).use(model, "m")
    assert cache.usage() == {"meta": size}  # moved, not duplicated


def _stream_on_meta(model: nn.Module) -> MetaManager:
    blocks = stream_blocks(model)
    slot = max(nbytes(b) for b in blocks)
    resident = nbytes(model) - sum(nbytes(b) for b in blocks)
    mm = MetaManager("meta", budget=resident + 2 * slot, reserve=0, offload_device="cpu", pin=False)
    mm.use(model, type(model).__name__)
    assert mm.state()["models"][0]["where"] == "streaming"
    return mm


def test_flux_and_the_gpt_touch_streamed_weights_only_inside_their_blocks():
    """On meta, any op mixing a CPU-resident (offloaded) weight with device tensors raises."""
    from tessera.engines.flux import Flux, FluxConfig
    from tessera.engines.gpt import GPT, GPTConfig

    flux = Flux(
        FluxConfig(
            in_channels=4,
            out_channels=4,
            hidden_size=64,
            num_heads=4,
            depth=2,
            depth_single=4,
            context_dim=32,
            vec_dim=16,
            axes_dim=(4, 6, 6),
        )
    ).eval()
    mm = _stream_on_meta(flux)
    streamed = mm.state()["models"][0]["streamed_blocks"]
    with torch.inference_mode():
        out = flux(
            torch.randn(1, 4, 8, 8, device="meta"),
            torch.tensor([0.5], device="meta"),
            torch.randn(1, 5, 32, device="meta"),
            torch.randn(1, 16, device="meta"),
            torch.tensor([3.5], device="meta"),
        )
    assert out.shape == (1, 4, 8, 8) and mm.block_loads == streamed > 0

    gpt = GPT(
        GPTConfig(
            dim=64,
            n_layer=4,
            n_head=4,
            n_kv_head=4,
            ffn_hidden=128,
            vocab_size=32,
            num_classes=10,
            grid_size=2,
        )
    ).eval()
    mm = _stream_on_meta(gpt)
    streamed = mm.state()["models"][0]["streamed_blocks"]
    with torch.inference_mode():
        gpt.setup_caches(1, 2, 2)  # KV caches land on the device, beside the resident weights
        prefix = gpt.cls_embedding.embedding_table(torch.tensor([3], device="meta")).unsqueeze(1)
        logits = gpt(prefix, torch.arange(1, device="meta"))
        step = gpt(gpt.embed_tokens(torch.tensor([[5]], device="meta")), torch.tensor([1], device="meta"))
    assert logits.shape == (1, 1, 32) and step.shape == (1, 1, 32) and mm.block_loads == 2 * streamed > 0
