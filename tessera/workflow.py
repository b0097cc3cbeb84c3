"""The one workflow format: parse, migrate and validate it.

A workflow maps node ids to `{type, inputs, ui?}`; a link is `{"node": id, "output": name}`.
Validation runs the published JSON Schema first, then the graph checks, and reports every
problem with the node id and input it concerns. An invalid workflow runs nothing.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import lru_cache
from importlib import resources

import jsonschema

from tessera.node import Input
from tessera.registry import NodeRegistry

CURRENT_VERSION = 2

# Inputs renamed in version 2 (node type -> {old: new}): every loader's file input is `file`,
# every batch input `batch_size`.
RENAMED_IN_V2 = {
    "LoadARModel": {"model_name": "file"},
    "LoadVQModel": {"model_name": "file"},
    "EmptyLatent": {"batch": "batch_size"},
    "SolidColor": {"batch": "batch_size"},
}


def _upgrade_v1(workflow: dict) -> dict:
    """Version 1 -> 2: the renamed inputs (RENAMED_IN_V2) move to their new names, and an
    ARGenerateTokens that relied on the old top_k default (1000, now the engine's 0) keeps 1000."""
    for node in workflow.get("nodes", {}).values():
        if not isinstance(node, dict) or not isinstance(node.get("inputs", {}), dict):
            continue
        inputs = node.get("inputs", {})
        for old, new in RENAMED_IN_V2.get(node.get("type"), {}).items():
            if old in inputs and new not in inputs:
                inputs[new] = inputs.pop(old)
        if node.get("type") == "ARGenerateTokens" and "top_k" not in inputs:
            node["inputs"] = {**inputs, "top_k": 1000}
    return workflow


# version -> function upgrading a workflow of that version by one version.
MIGRATIONS: dict[int, Callable[[dict], dict]] = {1: _upgrade_v1}


@dataclass(frozen=True)
class WorkflowIssue:
    node: str | None
    input: str | None
    reason: str

    def __str__(self) -> str:
        where = f"node {self.node}" if self.node is not None else "workflow"
        if self.input:
            where += f", input '{self.input}'"
        return f"{where}: {self.reason}"

    def to_json(self) -> dict:
        return asdict(self)


class InvalidWorkflow(ValueError):
    def __init__(self, issues: list[WorkflowIssue]):
        self.issues = issues
        super().__init__("invalid workflow:\n" + "\n".join(f"  - {i}" for i in issues))


@lru_cache(maxsize=1)
def workflow_schema() -> dict:
    return json.loads(resources.files("tessera").joinpath("workflow.schema.json").read_text())


def is_link(value: object) -> bool:
    return isinstance(value, dict) and set(value) == {"node", "output"}


def migrate(workflow: dict) -> dict:
    """Upgrade an older workflow to CURRENT_VERSION through the MIGRATIONS chain."""
    version = workflow.get("version")
    if not isinstance(version, int):
        return workflow  # the schema check reports it
    if version > CURRENT_VERSION:
        raise InvalidWorkflow(
            [
                WorkflowIssue(
                    None, None, f"workflow version {version} is newer than this Tessera ({CURRENT_VERSION})"
                )
            ]
        )
    while version < CURRENT_VERSION:
        if version not in MIGRATIONS:
            raise InvalidWorkflow(
                [WorkflowIssue(None, None, f"no migration from workflow version {version}")]
            )
        workflow = MIGRATIONS[version](workflow)
        version += 1
        workflow["version"] = version
    return workflow


@lru_cache(maxsize=1)
def _document_validator() -> jsonschema.Draft202012Validator:
    """The published schema with its (non-recursive) `$ref`s inlined: resolving them per node is slow."""
    schema = workflow_schema()

    def inline(value):
        if isinstance(value, dict):
            if set(value) == {"$ref"} and value["$ref"].startswith("#/$defs/"):
                return inline(schema["$defs"][value["$ref"].removeprefix("#/$defs/")])
            return {k: inline(v) for k, v in value.items() if k != "$defs"}
        if isinstance(value, list):
            return [inline(v) for v in value]
        return value

    return jsonschema.Draft202012Validator(inline(schema))


def schema_issues(workflow: object) -> list[WorkflowIssue]:
    validator = _document_validator()
    issues = []
    for error in sorted(validator.iter_errors(workflow), key=lambda e: list(e.path)):
        path = list(error.path)
        node = str(path[1]) if len(path) >= 2 and path[0] == "nodes" else None
        issues.append(WorkflowIssue(node, None, error.message))
    return issues


def validate(
    workflow: object, registry: NodeRegistry, model_files: Callable[[str], list[str]] | None = None
) -> dict:
    """Return the migrated workflow, or raise InvalidWorkflow listing every problem found."""
    issues = schema_issues(workflow)
    if issues:
        raise InvalidWorkflow(issues)
    workflow = migrate(json.loads(json.dumps(workflow)))
    nodes = workflow["nodes"]
    for node_id, node in nodes.items():
        if node.get("mode") == "mute":
            continue  # a muted node never runs: its inputs may be unfinished
        issues.extend(_node_issues(node_id, node, nodes, registry, model_files))
    issues.extend(_bypass_issues(nodes, registry))
    if not issues:
        issues.extend(_cycle_issues(nodes))
    if issues:
        raise InvalidWorkflow(issues)
    return workflow


def _node_issues(node_id, node, nodes, registry, model_files) -> list[WorkflowIssue]:
    cls = registry.get(node["type"])
    if cls is None:
        return [WorkflowIssue(node_id, None, f"unknown node type '{node['type']}'")]
    issues = []
    given = node.get("inputs", {})
    for name in given:
        if cls.input(name) is None:
            issues.append(WorkflowIssue(node_id, name, f"{cls.type_name} has no input '{name}'"))
    for spec in cls.inputs:
        if spec.name not in given:
            if spec.required:
                issues.append(WorkflowIssue(node_id, spec.name, "missing required input"))
            continue
        value = given[spec.name]
        if is_link(value):
            issues.extend(_link_issues(node_id, spec, value, nodes, registry))
        elif not spec.accepts_constant:
            issues.append(
                WorkflowIssue(node_id, spec.name, f"needs a link from a {spec.type} output, got a constant")
            )
        else:
            if isinstance(value, float) and not math.isfinite(value):  # NaN/±Infinity are not JSON
                issues.append(WorkflowIssue(node_id, spec.name, f"value {value!r} is not a finite number"))
                continue
            choices = model_files(spec.model_folder) if (spec.model_folder and model_files) else None
            for error in _value_validator(json.dumps(spec.value_schema(choices), sort_keys=True)).iter_errors(
                value
            ):
                issues.append(WorkflowIssue(node_id, spec.name, _value_reason(error, value)))
    if (
        not issues and node.get("mode") != "bypass"
    ):  # own checks: values that passed the schema, of a node that runs
        linked = frozenset(name for name, value in given.items() if is_link(value))
        constants = {i.name: given.get(i.name, i.default) for i in cls.inputs if i.name not in linked}
        issues.extend(WorkflowIssue(node_id, e.input, str(e)) for e in cls.check(constants, linked))
    return issues


# JSON Schema counts 3.0 as an integer, but an INT input must reach its node as a Python int.
_ValueValidator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator,
    type_checker=jsonschema.Draft202012Validator.TYPE_CHECKER.redefine(
        "integer", lambda checker, v: isinstance(v, int) and not isinstance(v, bool)
    ),
)


@lru_cache(maxsize=4096)
def _value_validator(schema_json: str) -> jsonschema.Draft202012Validator:
    """Validators are costly to build and inputs share few schemas, so keep them."""
    return _ValueValidator(json.loads(schema_json))


def _value_reason(error: jsonschema.ValidationError, value: object) -> str:
    if error.validator == "enum":
        return f"value {value!r} is not one of the choices"
    if error.validator in ("minimum", "maximum"):
        bound = "at least" if error.validator == "minimum" else "at most"
        return f"value {value!r} is out of range (must be {bound} {error.validator_value})"
    if error.validator == "type":
        return f"value {value!r} has the wrong JSON type (expected {error.validator_value})"
    return error.message


def _link_issues(node_id, spec, link, nodes, registry) -> list[WorkflowIssue]:
    if not spec.accepts_link:
        return [WorkflowIssue(node_id, spec.name, "is a widget value and cannot take a link")]
    upstream = nodes.get(link["node"])
    if upstream is None:
        return [WorkflowIssue(node_id, spec.name, f"dangling link to missing node '{link['node']}'")]
    upstream_cls = registry.get(upstream["type"])
    if upstream_cls is None:
        return []  # reported on the upstream node itself
    output_type = upstream_cls.output_type(link["output"])
    if output_type is None:
        return [
            WorkflowIssue(
                node_id,
                spec.name,
                f"dangling link: {upstream['type']} (node {link['node']}) has no output '{link['output']}'",
            )
        ]
    if output_type != spec.type and "*" not in (output_type, spec.type):
        return [
            WorkflowIssue(
                node_id,
                spec.name,
                f"type mismatch: {upstream['type']}.{link['output']} is {output_type}, input needs {spec.type}",
            )
        ]
    return []


def passthrough_input(cls: type, output: str) -> Input | None:
    """The input a bypassed node hands on in place of `output`: the first of the same type."""
    kind = cls.output_type(output)
    return next((i for i in cls.inputs if i.type == kind), None)


def _bypass_issues(nodes: dict, registry: NodeRegistry) -> list[WorkflowIssue]:
    """A bypassed node must have an input to pass on for every output that something reads."""
    issues = []
    read = {
        (v["node"], v["output"])
        for n in nodes.values()
        if n.get("mode") != "mute"
        for v in n.get("inputs", {}).values()
        if is_link(v)
    }
    for node_id, node in nodes.items():
        cls = registry.get(node["type"]) if node.get("mode") == "bypass" else None
        if cls is None:
            continue
        for out in cls.outputs:
            if (node_id, out.name) in read and passthrough_input(cls, out.name) is None:
                issues.append(
                    WorkflowIssue(
                        node_id,
                        None,
                        f"{cls.type_name} is bypassed but has no {out.type} input to pass on as its output '{out.name}'",
                    )
                )
    return issues


def upstream_ids(node: dict) -> list[str]:
    return [v["node"] for v in node.get("inputs", {}).values() if is_link(v)]


def _cycle_issues(nodes: dict) -> list[WorkflowIssue]:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(start: str) -> str | None:
        stack = [(start, iter(upstream_ids(nodes[start])))]
        state[start] = 1
        while stack:
            node_id, children = stack[-1]
            child = next(children, None)
            if child is None:
                state[node_id] = 2
                stack.pop()
            elif state.get(child) == 1:
                return child
            elif child not in state:
                state[child] = 1
                stack.append((child, iter(upstream_ids(nodes[child]))))
        return None

    for node_id in nodes:
        if node_id not in state:
            looped = visit(node_id)
            if looped is not None:
                return [WorkflowIssue(looped, None, "cycle: this node depends on its own output")]
    return []
