"""Constant values as nodes, so one value can feed several inputs."""

from __future__ import annotations

import random
import secrets

from tessera.node import MAX_SEED, ExecutionContext, Input, Node, Output


class Int(Node):
    """An integer constant."""

    category = "primitives"
    inputs = (Input("value", "INT", default=0, link="widget"),)
    outputs = (Output("value", "INT"),)

    def execute(self, ctx: ExecutionContext, value: int):
        return (value,)


class Float(Node):
    """A floating-point constant."""

    category = "primitives"
    inputs = (Input("value", "FLOAT", default=0.0, link="widget"),)
    outputs = (Output("value", "FLOAT"),)

    def execute(self, ctx: ExecutionContext, value: float):
        return (value,)


class String(Node):
    """A text constant (prompts, file name prefixes)."""

    category = "primitives"
    inputs = (Input("value", "STRING", default="", multiline=True, link="widget"),)
    outputs = (Output("value", "STRING"),)

    def execute(self, ctx: ExecutionContext, value: str):
        return (value,)


class Boolean(Node):
    """A true/false constant."""

    category = "primitives"
    inputs = (Input("value", "BOOLEAN", default=False, link="widget"),)
    outputs = (Output("value", "BOOLEAN"),)

    def execute(self, ctx: ExecutionContext, value: bool):
        return (value,)


class Seed(Node):
    """A seed that is either fixed or drawn fresh on every run.

    The 'random' policy lives outside the graph, so it is expressed as a fingerprint:
    a new fingerprint each run makes this node and everything after it run again.
    """

    category = "primitives"
    inputs = (
        Input("seed", "INT", default=0, min=0, max=MAX_SEED, widget="seed", link="widget"),
        Input("policy", "STRING", default="fixed", choices=("fixed", "random"), link="widget"),
    )
    outputs = (Output("seed", "INT"),)

    @classmethod
    def fingerprint(cls, ctx: ExecutionContext, inputs: dict) -> str | None:
        return secrets.token_hex(8) if inputs.get("policy") == "random" else None

    def execute(self, ctx: ExecutionContext, seed: int, policy: str):
        return (random.SystemRandom().randint(0, MAX_SEED) if policy == "random" else seed,)
