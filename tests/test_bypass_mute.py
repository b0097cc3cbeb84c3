"""Node modes as ComfyUI has them: a muted node is skipped with what cannot run without it;
a bypassed node hands its first input of each output's type straight on."""

from __future__ import annotations

import pytest
import torch

from tessera.executor import Executor
from tessera.node import Input, Node, NodeError, Output, Result
from tessera.registry import NodeRegistry
from tessera.workflow import InvalidWorkflow

RAN: list[str] = []


class Number(Node):
    inputs = (Input("value", "FLOAT", default=1.0),)
    outputs = (Output("x", "X"),)

    def execute(self, ctx, value):
        RAN.append(ctx.node_id)
        return (torch.tensor([value]),)


class Double(Node):
    """One X in, one X out: bypassing it passes its input on."""

    inputs = (Input("x", "X"), Input("extra", "X", optional=True))
    outputs = (Output("x", "X"),)

    def execute(self, ctx, x, extra=None):
        RAN.append(ctx.node_id)
        return (x * 2 + (0 if extra is None else extra),)


class ToImage(Node):
    """Has no X output of its own type to match: bypassing it with a reader is an error."""

    inputs = (Input("x", "X"),)
    outputs = (Output("image", "IMAGE"),)

    def execute(self, ctx, x):
        RAN.append(ctx.node_id)
        return (x,)


class Sink(Node):
    is_output = True
    inputs = (Input("x", "*"),)

    def execute(self, ctx, x):
        RAN.append(ctx.node_id)
        return Result(ui={"value": [float(x.sum())]})


@pytest.fixture
def executor(tmp_path):
    RAN.clear()
    registry = NodeRegistry()
    for cls in (Number, Double, ToImage, Sink):
        registry.register(cls)
    return Executor(registry, tmp_path / "models", tmp_path / "in", tmp_path / "out", "cpu")


def link(node, output="x"):
    return {"node": node, "output": output}


def chain(**modes) -> dict:
    """n(3) -> d1 -> d2 -> out, plus a second sink `side` reading n directly."""
    nodes = {
        "n": {"type": "Number", "inputs": {"value": 3.0}},
        "d1": {"type": "Double", "inputs": {"x": link("n")}},
        "d2": {"type": "Double", "inputs": {"x": link("d1")}},
        "out": {"type": "Sink", "inputs": {"x": link("d2")}},
        "side": {"type": "Sink", "inputs": {"x": link("n")}},
    }
    for node_id, mode in modes.items():
        nodes[node_id]["mode"] = mode
    return {"version": 1, "nodes": nodes}


def test_normal_chain_doubles_twice(executor):
    result = executor.run(chain())
    assert result.status == "success"
    assert result.outputs["out"] == {"value": [12.0]}


def test_bypassed_node_passes_its_input_through(executor):
    result = executor.run(chain(d1="bypass"))
    assert result.status == "success", result.errors
    assert result.outputs["out"] == {"value": [6.0]}
    assert "d1" not in RAN


def test_chained_bypasses_reach_the_first_live_node(executor):
    result = executor.run(chain(d1="bypass", d2="bypass"))
    assert result.outputs["out"] == {"value": [3.0]}
    assert "d1" not in RAN and "d2" not in RAN


def test_muted_node_and_what_depends_only_on_it_are_skipped(executor):
    result = executor.run(chain(d1="mute"))
    assert result.status == "success", result.errors
    assert sorted(RAN) == ["n", "side"]  # d2 and out needed d1; the side branch still runs
    assert set(result.outputs) == {"side"}


def test_muted_optional_input_is_left_unconnected(executor):
    workflow = chain()
    workflow["nodes"]["m"] = {"type": "Number", "inputs": {"value": 100.0}, "mode": "mute"}
    workflow["nodes"]["d1"]["inputs"]["extra"] = link("m")
    result = executor.run(workflow)
    assert result.status == "success", result.errors
    assert result.outputs["out"] == {"value": [12.0]}
    assert "m" not in RAN


def test_muted_output_node_does_not_run(executor):
    result = executor.run(chain(side="mute"))
    assert set(result.outputs) == {"out"}
    assert "side" not in RAN


def test_muting_every_output_is_refused_before_running(executor):
    result = executor.run(chain(n="mute"))
    assert result.status == "error"
    assert "every output node is muted" in result.errors[0]["message"]
    assert RAN == []


def test_bypassed_node_without_a_matching_input_is_an_error_naming_it(executor):
    workflow = chain()
    workflow["nodes"]["img"] = {"type": "ToImage", "inputs": {"x": link("n")}, "mode": "bypass"}
    workflow["nodes"]["show"] = {"type": "Sink", "inputs": {"x": link("img", "image")}}
    with pytest.raises(InvalidWorkflow) as caught:
        executor.validate(workflow)
    (issue,) = caught.value.issues
    assert issue.node == "img"
    assert "ToImage is bypassed but has no IMAGE input" in issue.reason
    assert RAN == []


def test_a_bypassed_node_nobody_reads_is_fine(executor):
    workflow = chain()
    workflow["nodes"]["img"] = {"type": "ToImage", "inputs": {"x": link("n")}, "mode": "bypass"}
    assert executor.run(workflow).status == "success"


def test_muted_node_with_unfinished_inputs_still_validates(executor):
    workflow = chain()
    workflow["nodes"]["draft"] = {"type": "Double", "inputs": {}, "mode": "mute"}
    assert executor.run(workflow).status == "success"


def test_unknown_mode_is_rejected_by_the_schema(executor):
    with pytest.raises(InvalidWorkflow) as caught:
        executor.validate(chain(d1="sleep"))
    assert caught.value.issues[0].node == "d1"


def test_mode_changes_the_cache_key_of_downstream_nodes(executor):
    executor.run(chain())
    RAN.clear()
    result = executor.run(chain(d2="bypass"))
    assert result.outputs["out"] == {"value": [6.0]}
    assert "out" in RAN  # its input now comes from d1, a different upstream key


class Strict(Node):
    """Refuses a negative value at validation (Node.check)."""

    inputs = (Input("x", "X"), Input("gain", "FLOAT", default=1.0))
    outputs = (Output("x", "X"),)

    @classmethod
    def check(cls, constants, linked):
        return [NodeError("gain must not be negative", input="gain")] if constants["gain"] < 0 else []

    def execute(self, ctx, x, gain):
        return (x * gain,)


def test_a_bypassed_nodes_own_checks_do_not_block_the_run(executor):
    executor.registry.register(Strict)
    workflow = chain()
    workflow["nodes"]["d1"] = {"type": "Strict", "inputs": {"x": link("n"), "gain": -1.0}}
    with pytest.raises(InvalidWorkflow) as caught:
        executor.validate(workflow)
    assert (caught.value.issues[0].node, caught.value.issues[0].input) == ("d1", "gain")
    workflow["nodes"]["d1"]["mode"] = "bypass"
    result = executor.run(workflow)
    assert result.status == "success" and result.outputs["out"] == {"value": [6.0]}
