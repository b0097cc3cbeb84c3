"""Compiling a validated workflow into an execution plan.

The plan holds only the nodes that some output needs, in topological order, each with
a cache key (a hash of its type, version, constant inputs, fingerprint and upstream
keys) and the step after which its outputs are no longer needed by this run.
"""

from __future__ import annotations

import hashlib
import heapq
import json
from collections.abc import Callable
from dataclasses import dataclass, field

from tessera.node import Node
from tessera.registry import NodeRegistry
from tessera.workflow import InvalidWorkflow, WorkflowIssue, is_link, passthrough_input, upstream_ids


@dataclass
class PlannedNode:
    node_id: str
    node_class: type[Node]
    constants: dict  # input name -> constant value (defaults filled in)
    links: dict  # input name -> (upstream node id, output name)
    cache_key: str = ""
    release_after: int = -1  # index of the last step that reads this node's outputs


@dataclass
class Plan:
    steps: list[PlannedNode] = field(default_factory=list)

    index: dict[str, int] = field(default_factory=dict)  # node id -> position in steps

    @property
    def order(self) -> list[str]:
        return [s.node_id for s in self.steps]


def _needed(nodes: dict, registry: NodeRegistry, targets: list[str] | None) -> set[str]:
    roots = targets if targets else [i for i, n in nodes.items() if registry.get(n["type"]).is_output]
    if not roots:
        raise InvalidWorkflow(
            [WorkflowIssue(None, None, "the workflow has no output node (e.g. SaveImage) to run")]
        )
    needed: set[str] = set()
    stack = list(roots)
    while stack:
        node_id = stack.pop()
        if node_id in needed:
            continue
        if node_id not in nodes:
            raise InvalidWorkflow([WorkflowIssue(node_id, None, "target node does not exist")])
        needed.add(node_id)
        stack.extend(upstream_ids(nodes[node_id]))
    return needed


def _topological(nodes: dict, needed: set[str]) -> list[str]:
    """Kahn's algorithm, ties broken by node id so the order is stable."""
    waiting = {i: len(set(upstream_ids(nodes[i]))) for i in needed}
    consumers: dict[str, set[str]] = {i: set() for i in needed}
    for i in needed:
        for up in upstream_ids(nodes[i]):
            consumers[up].add(i)
    ready = [(_id_sort_key(i), i) for i, n in waiting.items() if n == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        _, node_id = heapq.heappop(ready)
        order.append(node_id)
        for other in consumers[node_id]:
            waiting[other] -= 1
            if waiting[other] == 0:
                heapq.heappush(ready, (_id_sort_key(other), other))
    return order


def _id_sort_key(node_id: str):
    return (0, int(node_id), "") if node_id.isdigit() else (1, 0, node_id)


_GONE = object()  # what a link to a muted or skipped node resolves to


def apply_modes(nodes: dict, registry: NodeRegistry) -> dict:
    """The nodes that run, as ComfyUI treats its node modes.

    A muted node is left out, and so is every node with a required input that only a
    left-out node could feed (an optional one is just left unconnected). A bypassed node is
    left out and its readers take, in place of each of its outputs, what feeds its first
    input of that type (followed through chains of bypassed nodes).
    """
    if all(n.get("mode", "normal") == "normal" for n in nodes.values()):
        return nodes
    active: dict[str, dict] = {}

    def resolve(link: dict) -> object:
        node = nodes[link["node"]]
        if node.get("mode") == "bypass":
            cls = registry.get(node["type"])
            spec = passthrough_input(cls, link["output"])  # validation made sure there is one
            value = node.get("inputs", {}).get(spec.name, spec.default)
            if value is None:
                return _GONE
            return resolve(value) if is_link(value) else value
        return link if link["node"] in active else _GONE

    for node_id in _topological(nodes, set(nodes)):
        node = nodes[node_id]
        if node.get("mode", "normal") != "normal":
            continue
        cls = registry.get(node["type"])
        inputs, runnable = {}, True
        for name, value in node.get("inputs", {}).items():
            if is_link(value):
                value = resolve(value)
                if value is _GONE:
                    runnable = runnable and not cls.input(name).required
                    continue
            inputs[name] = value
        if runnable:
            active[node_id] = {**node, "inputs": inputs}
    if not any(registry.get(n["type"]).is_output for n in active.values()):
        raise InvalidWorkflow(
            [
                WorkflowIssue(
                    None, None, "nothing to run: every output node is muted, bypassed or needs a muted node"
                )
            ]
        )
    return active


def canonical_json(value: object) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def compile_plan(
    workflow: dict,
    registry: NodeRegistry,
    fingerprint: Callable[[type[Node], str, dict], str | None] | None = None,
    targets: list[str] | None = None,
    describe: Callable[[type[Node], str, dict, dict], dict] | None = None,
) -> Plan:
    """Compile a *validated* workflow. `fingerprint(cls, node_id, constants)` supplies node fingerprints;
    `describe(cls, node_id, constants, upstream)` what is known of a node's outputs (`Node.describe`),
    given what is known of its linked inputs, in topological order."""
    nodes = apply_modes(workflow["nodes"], registry)
    order = _topological(nodes, _needed(nodes, registry, targets))
    plan = Plan()
    keys: dict[str, str] = {}
    facts: dict[str, dict] = {}  # node id -> output name -> what `describe` knows of it
    for node_id in order:
        node = nodes[node_id]
        cls = registry.get(node["type"])
        given = node.get("inputs", {})
        constants, links = {}, {}
        for spec in cls.inputs:
            value = given.get(spec.name, spec.default)
            if is_link(value):
                links[spec.name] = (value["node"], value["output"])
            else:
                constants[spec.name] = value
        extra = fingerprint(cls, node_id, constants) if fingerprint else None
        if describe is not None:
            upstream = {name: facts[up].get(out, {}) for name, (up, out) in links.items()}
            facts[node_id] = describe(cls, node_id, constants, upstream) or {}
        material = [
            cls.type_name,
            cls.version,
            constants,
            extra,
            sorted((name, keys[up], out) for name, (up, out) in links.items()),
        ]
        keys[node_id] = hashlib.sha256(canonical_json(material).encode()).hexdigest()[:32]
        plan.steps.append(PlannedNode(node_id, cls, constants, links, keys[node_id]))
    plan.index = {s.node_id: i for i, s in enumerate(plan.steps)}
    for i, step in enumerate(plan.steps):
        for up, _ in step.links.values():
            upstream = plan.steps[plan.index[up]]
            upstream.release_after = max(upstream.release_after, i)
    return plan
