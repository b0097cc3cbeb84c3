"""The executor: cache keys, re-execution of only what changed, liveness, budgets, interruption."""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch

from tessera.cache import OutputCache, memory_footprint
from tessera.executor import Executor
from tessera.node import Input, Interrupted, Node, NodeError, Output, Result
from tessera.registry import NodeRegistry

CALLS: Counter = Counter()


class LoadModel(Node):
    """Stands in for an expensive model loader."""

    inputs = (Input("name", "STRING", default="tiny"),)
    outputs = (Output("model", "MODEL"),)

    def execute(self, ctx, name):
        CALLS["LoadModel"] += 1
        return (torch.ones(4),)


class Encode(Node):
    inputs = (Input("model", "MODEL"), Input("text", "STRING", default=""))
    outputs = (Output("cond", "COND"),)

    def execute(self, ctx, model, text):
        CALLS["Encode"] += 1
        return (model * len(text),)


class Sample(Node):
    inputs = (
        Input("model", "MODEL"),
        Input("cond", "COND"),
        Input("seed", "INT", default=0, min=0),
        Input("steps", "INT", default=3, min=1, max=100),
    )
    outputs = (Output("x", "X"),)

    def execute(self, ctx, model, cond, seed, steps):
        CALLS["Sample"] += 1
        for i in range(steps):
            ctx.progress(i + 1, steps)
        g = torch.Generator().manual_seed(seed)
        return (cond + torch.randn(4, generator=g),)


class Decode(Node):
    inputs = (Input("x", "X"),)
    outputs = (Output("image", "IMAGE"),)

    def execute(self, ctx, x):
        CALLS["Decode"] += 1
        return (x * 2,)


class Sink(Node):
    is_output = True
    inputs = (Input("image", "IMAGE"),)
    outputs = ()

    def execute(self, ctx, image):
        CALLS["Sink"] += 1
        return Result(ui={"value": [float(image.sum())]})


class Fails(Node):
    inputs = (Input("x", "X"), Input("threshold", "FLOAT", default=1.0))
    outputs = (Output("image", "IMAGE"),)

    def execute(self, ctx, x, threshold):
        raise NodeError("threshold too small", input="threshold")


@pytest.fixture
def executor(tmp_path):
    CALLS.clear()
    registry = NodeRegistry()
    for cls in (LoadModel, Encode, Sample, Decode, Sink, Fails):
        registry.register(cls)
    return Executor(registry, tmp_path / "models", tmp_path / "in", tmp_path / "out", "cpu")


def link(node, output):
    return {"node": node, "output": output}


def two_branch_workflow(seed_a=1, seed_b=2) -> dict:
    """One model and prompt feeding two sampler branches."""
    return {
        "version": 1,
        "nodes": {
            "model": {"type": "LoadModel"},
            "text": {"type": "Encode", "inputs": {"model": link("model", "model"), "text": "a cat"}},
            "sample_a": {
                "type": "Sample",
                "inputs": {"model": link("model", "model"), "cond": link("text", "cond"), "seed": seed_a},
            },
            "decode_a": {"type": "Decode", "inputs": {"x": link("sample_a", "x")}},
            "out_a": {"type": "Sink", "inputs": {"image": link("decode_a", "image")}},
            "sample_b": {
                "type": "Sample",
                "inputs": {"model": link("model", "model"), "cond": link("text", "cond"), "seed": seed_b},
            },
            "decode_b": {"type": "Decode", "inputs": {"x": link("sample_b", "x")}},
            "out_b": {"type": "Sink", "inputs": {"image": link("decode_b", "image")}},
        },
    }


def test_changing_seed_reruns_only_that_sampler_and_downstream(executor):
    first = executor.run(two_branch_workflow())
    assert first.status == "success"
    assert CALLS == Counter(LoadModel=1, Encode=1, Sample=2, Decode=2, Sink=2)

    CALLS.clear()
    second = executor.run(two_branch_workflow(seed_a=99))
    assert second.status == "success"
    assert sorted(second.executed) == ["decode_a", "out_a", "sample_a"]
    assert CALLS == Counter(Sample=1, Decode=1, Sink=1)
    assert set(second.cached) == {"model", "text", "sample_b", "decode_b", "out_b"}
    assert second.outputs["out_a"] != first.outputs["out_a"]
    assert second.outputs["out_b"] == first.outputs["out_b"]


def test_fully_cached_rerun_executes_nothing_and_keeps_outputs(executor):
    first = executor.run(two_branch_workflow())
    CALLS.clear()
    again = executor.run(two_branch_workflow())
    assert again.executed == [] and CALLS == Counter()
    assert again.outputs == first.outputs


def test_identical_subgraphs_share_cache_entries(executor):
    result = executor.run(two_branch_workflow(seed_a=5, seed_b=5))
    assert result.status == "success"
    # Branch b has the same keys as branch a, so it is served from a's entries.
    assert CALLS["Sample"] == 1 and CALLS["Decode"] == 1
    assert {"sample_b", "decode_b"} <= set(result.cached)


def test_layout_changes_do_not_invalidate_the_cache(executor):
    executor.run(two_branch_workflow())
    moved = two_branch_workflow()
    moved["nodes"]["sample_a"]["ui"] = {"pos": [10, 20], "title": "renamed"}
    moved["ui"] = {"viewport": {"scale": 2}}
    CALLS.clear()
    assert executor.run(moved).executed == []


def test_plan_contains_only_nodes_outputs_need_in_dependency_order(executor):
    workflow = two_branch_workflow()
    workflow["nodes"]["orphan"] = {
        "type": "Sample",
        "inputs": {"model": link("model", "model"), "cond": link("text", "cond")},
    }
    plan = executor.compile(executor.validate(workflow))
    assert "orphan" not in plan.order
    position = {n: i for i, n in enumerate(plan.order)}
    for step in plan.steps:
        for upstream, _ in step.links.values():
            assert position[upstream] < position[step.node_id]


def test_liveness_releases_each_intermediate_after_its_last_reader(executor):
    plan = executor.compile(executor.validate(two_branch_workflow()))
    position = {n: i for i, n in enumerate(plan.order)}
    readers: dict[str, list[int]] = {}
    for step in plan.steps:
        for upstream, _ in step.links.values():
            readers.setdefault(upstream, []).append(position[step.node_id])
    for step in plan.steps:
        assert step.release_after == max(readers.get(step.node_id, [-1]))


def test_cache_key_changes_with_constants_and_upstream(executor):
    keys = lambda wf: {s.node_id: s.cache_key for s in executor.compile(executor.validate(wf)).steps}  # noqa: E731
    base = keys(two_branch_workflow())
    changed_text = copy.deepcopy(two_branch_workflow())
    changed_text["nodes"]["text"]["inputs"]["text"] = "a dog"
    other = keys(changed_text)
    assert other["model"] == base["model"]
    assert all(other[n] != base[n] for n in ("text", "sample_a", "decode_a", "out_a", "sample_b"))


def test_node_error_names_node_and_input_and_stops_the_run(executor):
    workflow = two_branch_workflow()
    workflow["nodes"]["bad"] = {"type": "Fails", "inputs": {"x": link("sample_a", "x")}}
    workflow["nodes"]["out_bad"] = {"type": "Sink", "inputs": {"image": link("bad", "image")}}
    events = []
    result = executor.run(workflow, "p", emit=lambda kind, data: events.append((kind, data)))
    assert result.status == "error"
    assert result.errors[0]["node"] == "bad" and result.errors[0]["input"] == "threshold"
    assert "threshold too small" in result.errors[0]["message"]
    assert (
        "execution_error",
        {
            "prompt_id": "p",
            "node": "bad",
            "node_type": "Fails",
            "input": "threshold",
            "message": "threshold too small",
        },
    ) in events


def test_interrupt_stops_inside_a_running_node(executor):
    seen = []

    def emit(kind, data):
        seen.append(kind)

    flag = {"stop": False}

    def stop_after_progress(kind, data):
        emit(kind, data)
        if kind == "progress" and data["value"] == 2:
            flag["stop"] = True

    workflow = two_branch_workflow()
    workflow["nodes"]["sample_a"]["inputs"]["steps"] = 50
    result = executor.run(workflow, "p", emit=stop_after_progress, is_interrupted=lambda: flag["stop"])
    assert result.status == "interrupted"
    assert seen.count("progress") == 2  # stopped at the next step, not at the end of 50
    assert "execution_interrupted" in seen


def test_progress_events_report_steps(executor):
    events = []
    executor.run(two_branch_workflow(), "p", emit=lambda kind, data: events.append((kind, data)))
    steps = [d for k, d in events if k == "progress" and d["node"] == "sample_a"]
    assert [(d["value"], d["max"]) for d in steps] == [(1, 3), (2, 3), (3, 3)]


def test_cache_evicts_least_recently_used_within_its_byte_budget():
    cache = OutputCache(cpu_bytes=3 * 400)
    for key in "abc":
        cache.put(key, (torch.zeros(100),))  # 400 bytes each
    assert cache.get("a") is not None  # a is now the most recent
    cache.put("d", (torch.zeros(100),))
    assert cache.get("b") is None and cache.get("a") is not None and cache.get("d") is not None
    assert cache.usage()["cpu"] == 3 * 400
    cache.put("huge", (torch.zeros(1000),))  # bigger than the whole budget: not cached, nothing evicted
    assert cache.get("huge") is None and len(cache.entries) == 3


def test_memory_footprint_counts_shared_storage_once():
    t = torch.zeros(10)
    module = torch.nn.Linear(4, 4)
    assert memory_footprint((t, t[:5], {"m": module})) == {"cpu": 40 + (16 + 4) * 4}


def test_interrupted_is_raised_by_progress_when_flagged(executor):
    ctx = executor.context("n", is_interrupted=lambda: True)
    with pytest.raises(Interrupted):
        ctx.progress(1, 2)


class LoadWeights(Node):
    inputs = (Input("file", "STRING", model_folder="vae"),)
    outputs = (Output("x", "X"),)

    def execute(self, ctx, file):
        CALLS["LoadWeights"] += 1
        return (torch.tensor(float(ctx.model_file("vae", file).stat().st_size)),)


def test_replacing_a_model_file_reruns_its_loader(executor, tmp_path):
    executor.registry.register(LoadWeights)
    folder = tmp_path / "models" / "vae"
    folder.mkdir(parents=True)
    (folder / "a.safetensors").write_bytes(b"x" * 10)
    workflow = {
        "version": 1,
        "nodes": {
            "w": {"type": "LoadWeights", "inputs": {"file": "a.safetensors"}},
            "d": {"type": "Decode", "inputs": {"x": link("w", "x")}},
            "o": {"type": "Sink", "inputs": {"image": link("d", "image")}},
        },
    }
    first = executor.run(workflow)
    assert first.status == "success", first.errors
    assert first.outputs["o"] == {"value": [20.0]}
    assert executor.run(workflow).executed == []
    (folder / "a.safetensors").write_bytes(b"y" * 30)
    again = executor.run(workflow)
    assert again.executed == ["w", "d", "o"] and again.outputs["o"] == {"value": [60.0]}


class Split(Node):
    """Two outputs of the same type: which one a link uses must be part of the cache key."""

    inputs = (Input("x", "MODEL"),)
    outputs = (Output("low", "X"), Output("high", "X"))

    def execute(self, ctx, x):
        CALLS["Split"] += 1
        return (x - 1, x + 1)


def test_cache_key_names_the_upstream_output_a_link_uses(executor):
    executor.registry.register(Split)

    def workflow(output):
        return {
            "version": 1,
            "nodes": {
                "model": {"type": "LoadModel"},
                "split": {"type": "Split", "inputs": {"x": link("model", "model")}},
                "d": {"type": "Decode", "inputs": {"x": link("split", output)}},
                "o": {"type": "Sink", "inputs": {"image": link("d", "image")}},
            },
        }

    low = executor.run(workflow("low"))
    assert low.status == "success" and low.outputs["o"] == {"value": [0.0]}  # (1 - 1) * 2 * 4
    high = executor.run(workflow("high"))
    assert high.executed == ["d", "o"] and set(high.cached) == {"model", "split"}
    assert high.outputs["o"] == {"value": [16.0]}  # (1 + 1) * 2 * 4
    assert executor.run(workflow("low")).outputs["o"] == low.outputs["o"]


def test_replacing_an_input_image_reruns_only_its_loader_and_what_follows(tmp_path):
    from PIL import Image

    import tessera.nodes.image as image_nodes

    registry = NodeRegistry()
    registry.register_module(image_nodes)
    registry.register(Sink)
    executor = Executor(registry, tmp_path / "models", tmp_path / "in", tmp_path / "out", "cpu")
    (tmp_path / "in").mkdir()
    Image.new("RGB", (4, 4), (255, 0, 0)).save(tmp_path / "in" / "photo.png")
    workflow = {
        "version": 1,
        "nodes": {
            "load": {"type": "LoadImage", "inputs": {"image": "photo.png"}},
            "invert": {"type": "ImageInvert", "inputs": {"image": link("load", "image")}},
            "out": {"type": "Sink", "inputs": {"image": link("invert", "image")}},
            "solid": {"type": "SolidColor", "inputs": {"width": 4, "height": 4}},
            "other": {"type": "Sink", "inputs": {"image": link("solid", "image")}},
        },
    }
    first = executor.run(workflow)
    assert first.status == "success", first.errors
    assert first.outputs["out"] == {"value": [32.0]}  # 16 pixels inverted to (0, 1, 1)
    Image.new("RGB", (4, 4), (0, 0, 0)).save(tmp_path / "in" / "photo.png")
    again = executor.run(workflow)
    assert again.executed == ["load", "invert", "out"]
    assert set(again.cached) == {"solid", "other"}
    assert again.outputs["out"] == {"value": [48.0]}


ALIVE: dict = {}  # node id -> weak reference to the tensor it produced
SEEN: dict = {}  # node id -> ids of earlier values still alive when it ran


class Track(Node):
    """Records which earlier outputs still exist when it runs, then adds one to its inputs."""

    inputs = (
        Input("tag", "STRING", default=""),
        Input("x", "X", optional=True),
        Input("y", "X", optional=True),
    )
    outputs = (Output("x", "X"),)

    def execute(self, ctx, tag, x=None, y=None):
        import gc
        import weakref

        gc.collect()
        SEEN[ctx.node_id] = {n for n, ref in ALIVE.items() if ref() is not None}
        value = sum(v for v in (x, y) if v is not None) + torch.ones(8)
        ALIVE[ctx.node_id] = weakref.ref(value)
        return (value,)


def test_working_set_shrinks_after_each_values_last_consumer(tmp_path):
    """Observed through the executor: with a cache that keeps nothing, a value must be gone
    once every node that reads it has run, and still there while a reader is pending."""
    ALIVE.clear()
    SEEN.clear()
    registry = NodeRegistry()
    registry.register(Track)
    executor = Executor(
        registry, tmp_path / "m", tmp_path / "i", tmp_path / "o", "cpu", cache=OutputCache(cpu_bytes=0)
    )
    t = lambda tag, **links: {
        "type": "Track",
        "inputs": {"tag": tag, **{k: link(v, "x") for k, v in links.items()}},
    }  # noqa: E731
    workflow = {
        "version": 1,
        "nodes": {
            "1": t("a"),
            "2": t("b", x="1"),
            "3": t("c", x="2", y="1"),  # last reader of 1 and 2
            "4": t("d", x="3"),  # last reader of 3
            "5": t("e", x="4"),
        },
    }
    result = executor.run(workflow, targets=["5"])
    assert result.status == "success", result.errors
    assert result.executed == ["1", "2", "3", "4", "5"]
    assert SEEN == {"1": set(), "2": {"1"}, "3": {"1", "2"}, "4": {"3"}, "5": {"4"}}


class Record(Node):
    """An output that keeps the values it was given."""

    is_output = True
    inputs = (
        Input("i", "INT", default=0),
        Input("f", "FLOAT", default=0.0),
        Input("s", "STRING", default=""),
        Input("b", "BOOLEAN", default=False),
    )
    outputs = ()

    def execute(self, ctx, i, f, s, b):
        return Result(ui={"values": [i, f, s, b]})


def test_primitive_nodes_feed_their_constants_through_links(tmp_path):
    import tessera.nodes.primitives as primitives

    registry = NodeRegistry()
    registry.register_module(primitives)
    registry.register(Record)
    executor = Executor(registry, tmp_path / "m", tmp_path / "i", tmp_path / "o", "cpu")
    workflow = {
        "version": 1,
        "nodes": {
            "i": {"type": "Int", "inputs": {"value": 7}},
            "seed": {"type": "Seed", "inputs": {"seed": 2**63 + 5}},
            "f": {"type": "Float", "inputs": {"value": 0.25}},
            "s": {"type": "String", "inputs": {"value": "a red cube"}},
            "b": {"type": "Boolean", "inputs": {"value": True}},
            "r1": {
                "type": "Record",
                "inputs": {
                    "i": link("i", "value"),
                    "f": link("f", "value"),
                    "s": link("s", "value"),
                    "b": link("b", "value"),
                },
            },
            "r2": {"type": "Record", "inputs": {"i": link("seed", "seed")}},
        },
    }
    result = executor.run(workflow)
    assert result.status == "success", result.errors
    assert result.outputs["r1"] == {"values": [7, 0.25, "a red cube", True]}
    assert result.outputs["r2"] == {"values": [2**63 + 5, 0.0, "", False]}


def test_interrupt_between_nodes_runs_no_further_node(executor):
    """Encode reports no progress, so only the executor's own check before each node can stop
    the run there; the sampler must never start."""
    result = executor.run(two_branch_workflow(), "p", is_interrupted=lambda: CALLS["LoadModel"] >= 1)
    assert result.status == "interrupted"
    assert result.executed == ["model"] and CALLS == Counter(LoadModel=1)


def test_a_loaders_dropdown_lists_its_own_family_first(tmp_path):
    """Where families share a folder (raster and multi-scale VQs in vq_models), each loader's first
    choice, which the editor and ComfyUI's frontend take as a new node's default, is a file it loads."""
    from safetensors.torch import save_file

    from tessera.registry import default_registry

    folder = tmp_path / "models" / "vq_models"
    folder.mkdir(parents=True)
    save_file(
        {"quantize.quant_resi.qresi_ls.0.weight": torch.zeros(1)}, str(folder / "a_multiscale.safetensors")
    )
    save_file({"quantize.embedding.weight": torch.zeros(1)}, str(folder / "b_raster.safetensors"))
    (folder / "c_broken.safetensors").write_bytes(b"not a safetensors file")
    registry = default_registry()
    executor = Executor(registry, tmp_path / "models", tmp_path / "in", tmp_path / "out", "cpu")

    def choices(node_type: str) -> list[str]:
        (file_input,) = registry.get(node_type).info(executor.model_files)["inputs"]
        return file_input["choices"]

    assert choices("LoadVQModel") == [
        "b_raster.safetensors",
        "a_multiscale.safetensors",
        "c_broken.safetensors",
    ]
    assert choices("LoadMultiScaleVQ") == [
        "a_multiscale.safetensors",
        "b_raster.safetensors",
        "c_broken.safetensors",
    ]
    assert executor.model_files("vq_models") == sorted(
        p.name for p in folder.iterdir()
    )  # validation: all of them
