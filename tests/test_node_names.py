"""Consistent names across the paradigms, and the migration that upgrades workflows saved before
them: every loader's file input is `file`, every batch input `batch_size`, and node defaults equal
the engine's (ARGenerateTokens' top_k)."""

from __future__ import annotations

import inspect
import json

import pytest

from tessera import workflow as wf
from tessera.engines.ar_decoding import generate
from tessera.paths import SOURCE_ROOT
from tessera.registry import default_registry


@pytest.fixture(scope="module")
def registry():
    return default_registry(custom_nodes_dir=None)


def test_every_loader_names_its_file_input_file(registry):
    for name, cls in registry.nodes.items():
        for spec in cls.inputs:
            if spec.model_folder:  # a loader with two files (DualCLIPLoader) names each `<kind>_file`
                assert spec.name == "file" or spec.name.endswith("_file"), f"{name}.{spec.name}"


def test_every_batch_input_is_batch_size(registry):
    for name, cls in registry.nodes.items():
        assert not any(spec.name == "batch" for spec in cls.inputs), name


def test_ar_node_defaults_equal_the_engine_defaults(registry):
    node = registry.nodes["ARGenerateTokens"]
    engine = inspect.signature(generate).parameters
    for node_input, engine_arg in (
        ("top_k", "top_k"),
        ("top_p", "top_p"),
        ("temperature", "temperature"),
        ("guidance_schedule", "schedule"),
        ("decoding", "decoding"),
        ("jacobi_window", "jacobi_window"),
    ):
        assert node.input(node_input).default == engine[engine_arg].default, node_input


def v1_workflow() -> dict:
    return {
        "version": 1,
        "nodes": {
            "gpt": {"type": "LoadARModel", "inputs": {"model_name": "a.safetensors"}},
            "vq": {"type": "LoadVQModel", "inputs": {"model_name": "b.safetensors"}},
            "gen": {"type": "ARGenerateTokens", "inputs": {"model": {"node": "gpt", "output": "model"}}},
            "cut": {
                "type": "ARGenerateTokens",
                "inputs": {"model": {"node": "gpt", "output": "model"}, "top_k": 7},
            },
            "latent": {"type": "EmptyLatent", "inputs": {"width": 64, "height": 64, "batch": 3}},
            "solid": {"type": "SolidColor", "inputs": {"batch": {"node": "n", "output": "value"}}},
            "n": {"type": "Int", "inputs": {"value": 2}},
        },
    }


def test_a_version_1_workflow_is_upgraded_to_the_new_names(registry):
    files = {"ar_models": ["a.safetensors"], "vq_models": ["b.safetensors"]}
    upgraded = wf.validate(v1_workflow(), registry, lambda folder: files.get(folder, []))
    nodes = upgraded["nodes"]
    assert upgraded["version"] == wf.CURRENT_VERSION == 2
    assert nodes["gpt"]["inputs"] == {"file": "a.safetensors"} and nodes["vq"]["inputs"] == {
        "file": "b.safetensors"
    }
    assert nodes["latent"]["inputs"] == {"width": 64, "height": 64, "batch_size": 3}
    assert nodes["solid"]["inputs"] == {"batch_size": {"node": "n", "output": "value"}}  # links move too
    # a v1 workflow that left top_k at its old default (1000) keeps sampling with it
    assert nodes["gen"]["inputs"]["top_k"] == 1000 and nodes["cut"]["inputs"]["top_k"] == 7


def test_version_2_workflows_are_left_as_they_are(registry):
    current = {
        "version": 2,
        "nodes": {
            "gen": {"type": "ARGenerateTokens", "inputs": {"model": {"node": "g", "output": "model"}}},
            "g": {"type": "LoadARModel", "inputs": {"file": "a.safetensors"}},
        },
    }
    upgraded = wf.validate(current, registry, lambda folder: ["a.safetensors"])
    assert "top_k" not in upgraded["nodes"]["gen"]["inputs"]  # the node default (0) applies


@pytest.mark.parametrize("path", sorted((SOURCE_ROOT / "workflows").glob("*.json")), ids=lambda p: p.stem)
def test_shipped_workflows_are_saved_at_the_current_version(path):
    document = json.loads(path.read_text())
    assert document["version"] == wf.CURRENT_VERSION
