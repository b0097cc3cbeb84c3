"""Workflow validation: every problem is reported with its node, input and reason."""

from __future__ import annotations

import json

import jsonschema
import pytest

from tessera import workflow as wf
from tessera.node import Input, Node, Output
from tessera.paths import SOURCE_ROOT
from tessera.registry import NodeRegistry, default_registry


class Number(Node):
    inputs = (
        Input("value", "INT", default=1, min=0, max=10),
        Input("mode", "STRING", default="a", choices=("a", "b")),
        Input("flag", "BOOLEAN", default=False),
    )
    outputs = (Output("value", "INT"), Output("text", "STRING"))

    def execute(self, ctx, value, mode, flag):
        return value, mode


class Needs(Node):
    is_output = True
    inputs = (
        Input("value", "INT"),
        Input("image", "IMAGE", optional=True),
        Input("file", "STRING", model_folder="vae"),
    )
    outputs = ()

    def execute(self, ctx, value, image, file):
        return ()


@pytest.fixture
def registry():
    r = NodeRegistry()
    r.register(Number)
    r.register(Needs)
    return r


def files(folder):
    return {"vae": ["ae.safetensors"]}.get(folder, [])


def issues_of(workflow, registry):
    with pytest.raises(wf.InvalidWorkflow) as info:
        wf.validate(workflow, registry, files)
    return [(i.node, i.input, i.reason) for i in info.value.issues]


def doc(nodes):
    return {"version": 1, "nodes": nodes}


def test_a_valid_workflow_passes_and_is_returned(registry):
    w = doc(
        {
            "1": {"type": "Number", "inputs": {"value": 3}},
            "2": {
                "type": "Needs",
                "inputs": {"value": {"node": "1", "output": "value"}, "file": "ae.safetensors"},
            },
        }
    )
    assert wf.validate(w, registry, files)["nodes"]["1"]["inputs"]["value"] == 3


@pytest.mark.parametrize(
    "node, expected_input, reason_part",
    [
        ({"type": "Nope"}, None, "unknown node type 'Nope'"),
        ({"type": "Needs", "inputs": {"file": "ae.safetensors"}}, "value", "missing required input"),
        (
            {
                "type": "Needs",
                "inputs": {"value": {"node": "9", "output": "value"}, "file": "ae.safetensors"},
            },
            "value",
            "dangling link to missing node '9'",
        ),
        (
            {"type": "Needs", "inputs": {"value": {"node": "1", "output": "nope"}, "file": "ae.safetensors"}},
            "value",
            "has no output 'nope'",
        ),
        (
            {"type": "Needs", "inputs": {"value": {"node": "1", "output": "text"}, "file": "ae.safetensors"}},
            "value",
            "type mismatch: Number.text is STRING, input needs INT",
        ),
        (
            {"type": "Needs", "inputs": {"value": 1, "image": 5, "file": "ae.safetensors"}},
            "image",
            "needs a link from a IMAGE output",
        ),
        (
            {"type": "Needs", "inputs": {"value": 1, "file": "missing.safetensors"}},
            "file",
            "not one of the choices",
        ),
        ({"type": "Number", "inputs": {"value": 11}}, "value", "out of range (must be at most 10)"),
        ({"type": "Number", "inputs": {"value": -1}}, "value", "out of range (must be at least 0)"),
        ({"type": "Number", "inputs": {"mode": "c"}}, "mode", "not one of the choices"),
        ({"type": "Number", "inputs": {"value": "3"}}, "value", "wrong JSON type (expected integer)"),
        ({"type": "Number", "inputs": {"value": 2.5}}, "value", "wrong JSON type"),
        ({"type": "Number", "inputs": {"flag": 1}}, "flag", "wrong JSON type (expected boolean)"),
        ({"type": "Number", "inputs": {"extra": 1}}, "extra", "has no input 'extra'"),
    ],
)
def test_each_problem_names_node_input_and_reason(registry, node, expected_input, reason_part):
    found = issues_of(doc({"1": {"type": "Number"}, "2": node}), registry)
    assert len(found) == 1
    node_id, input_name, reason = found[0]
    assert node_id == "2" and input_name == expected_input and reason_part in reason


def test_cycle_is_reported_on_a_node_in_the_cycle(registry):
    loop = doc(
        {
            "1": {
                "type": "Needs",
                "inputs": {"value": {"node": "2", "output": "value"}, "file": "ae.safetensors"},
            },
            "2": {"type": "Number", "inputs": {"value": {"node": "3", "output": "value"}}},
            "3": {"type": "Number", "inputs": {"value": {"node": "2", "output": "value"}}},
        }
    )
    found = issues_of(loop, registry)
    assert found[0][0] in ("2", "3") and "cycle" in found[0][2]


def test_all_problems_are_reported_at_once(registry):
    found = issues_of(
        doc({"1": {"type": "Number", "inputs": {"value": 99, "mode": "z"}}, "2": {"type": "Nope"}}), registry
    )
    assert {(n, i) for n, i, _ in found} == {("1", "value"), ("1", "mode"), ("2", None)}


@pytest.mark.parametrize(
    "document",
    [
        [],
        {"nodes": {"1": {"type": "Number"}}},
        {"version": 1, "nodes": {}},
        {"version": 1, "nodes": {"1": {"inputs": {}}}},
        {"version": 1, "nodes": {"1": {"type": "Number", "colour": "red"}}},
        {"version": "1", "nodes": {"1": {"type": "Number"}}},
    ],
)
def test_malformed_documents_fail_the_published_schema(registry, document):
    with pytest.raises(wf.InvalidWorkflow):
        wf.validate(document, registry, files)


def test_newer_version_is_refused_and_migrations_upgrade_older_ones(registry, monkeypatch):
    assert (
        "newer than this Tessera"
        in issues_of({"version": 99, "nodes": {"1": {"type": "Number"}}}, registry)[0][2]
    )
    monkeypatch.setattr(wf, "CURRENT_VERSION", 2)

    def rename_type(old):
        for node in old["nodes"].values():
            node["type"] = {"OldNumber": "Number"}.get(node["type"], node["type"])
        return old

    monkeypatch.setitem(wf.MIGRATIONS, 1, rename_type)
    upgraded = wf.validate({"version": 1, "nodes": {"1": {"type": "OldNumber"}}}, registry, files)
    assert upgraded["version"] == 2 and upgraded["nodes"]["1"]["type"] == "Number"


def test_published_schema_file_is_valid_json_schema():
    schema = json.loads((SOURCE_ROOT / "tessera" / "workflow.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)


def test_input_schema_is_derived_from_the_declaration():
    schema = Number.input_schema()
    assert schema["properties"]["value"]["anyOf"][0] == {
        "type": "integer",
        "minimum": 0,
        "maximum": 10,
        "default": 1,
    }
    assert schema["required"] == []
    assert Needs.input_schema(files)["properties"]["file"]["anyOf"][0]["enum"] == ["ae.safetensors"]
    assert Needs.input_schema()["required"] == ["value", "file"]


def test_shipped_templates_validate_structurally():
    for path in (SOURCE_ROOT / "workflows").glob("*.json"):
        assert wf.schema_issues(json.loads(path.read_text())) == [], path.name


def test_broken_custom_node_pack_is_reported_by_name_and_skipped(tmp_path):
    (tmp_path / "good.py").write_text(
        "from tessera.node import Node, Output\n"
        "class Answer(Node):\n    outputs = (Output('value', 'INT'),)\n    def execute(self, ctx):\n        return (42,)\n"
    )
    (tmp_path / "broken.py").write_text("raise RuntimeError('this pack is broken')\n")
    (tmp_path / "exits.py").write_text("import sys\nsys.exit(3)\n")
    pack = tmp_path / "folder_pack"
    pack.mkdir()
    (pack / "__init__.py").write_text("from .impl import *\n")
    (pack / "impl.py").write_text(
        "from tessera.node import Node, Output\n"
        "class Other(Node):\n    outputs = (Output('value', 'INT'),)\n    def execute(self, ctx):\n        return (1,)\n"
    )
    registry = default_registry(tmp_path)
    assert "Answer" in registry.nodes and "Other" in registry.nodes and "SaveImage" in registry.nodes
    assert sorted(registry.failed_packs) == ["custom_nodes/broken.py", "custom_nodes/exits.py"]
    assert "this pack is broken" in registry.failed_packs["custom_nodes/broken.py"]


def test_every_builtin_node_module_loads():
    registry = default_registry()
    assert registry.failed_packs == {}
    for cls in registry.nodes.values():
        jsonschema.Draft202012Validator.check_schema(cls.input_schema())
