"""Conditioning edits that ComfyUI workflows use and Tessera had no node for.

They carry ComfyUI's names and inputs, so the workflow importer (`tessera.comfy`) maps
`FluxGuidance` and `ConditioningZeroOut` one to one, and they are usable in our own graphs.
"""

from __future__ import annotations

import dataclasses

import torch

from tessera.engines.conditioning import Conditioning
from tessera.node import ExecutionContext, Input, Node, Output


class FluxGuidance(Node):
    """Set Flux dev's distilled-guidance strength on a conditioning (it replaces the sampler's `guidance`)."""

    category = "conditioning"
    inputs = (
        Input("conditioning", "CONDITIONING"),
        Input("guidance", "FLOAT", default=3.5, min=0.0, max=100.0, step=0.1),
    )
    outputs = (Output("conditioning", "CONDITIONING"),)

    def execute(self, ctx: ExecutionContext, conditioning: Conditioning, guidance: float):
        return (dataclasses.replace(conditioning, guidance=float(guidance)),)


class ConditioningZeroOut(Node):
    """Zero a conditioning's token features and pooled vector, keeping its shape and mask (an empty negative)."""

    category = "conditioning"
    inputs = (Input("conditioning", "CONDITIONING"),)
    outputs = (Output("conditioning", "CONDITIONING"),)

    def execute(self, ctx: ExecutionContext, conditioning: Conditioning):
        zeroed = dataclasses.replace(
            conditioning,
            tokens=torch.zeros_like(conditioning.tokens),
            pooled=torch.zeros_like(conditioning.pooled),
        )
        return (zeroed,)
