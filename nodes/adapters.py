"""Adapter nodes: LoRAs and ControlNets for either engine, control-image preprocessors, and
mask-driven token control for the AR engine.

Adapters never change the model they are given: `LoadLoRA` and `ApplyControlNet` output a new
model object that shares the base's tensors (see engines/lora.py), so the cached base stays
valid for every other branch of the graph and a strength change re-runs only what follows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tessera.engines.checkpoint import CheckpointError
from tessera.engines.controlnet import (
    ARControlNet,
    ControlHint,
    FluxControlNet,
    load_any_controlnet,
    with_ar_control,
    with_control,
)
from tessera.engines.flux import Flux
from tessera.engines.lora import load_lora, with_loras
from tessera.engines.preprocess import canny_image, scribble_image
from tessera.engines.tokens import TokenGrid
from tessera.node import ExecutionContext, Input, Node, NodeError, Output, Result


def _apply_lora(ctx: ExecutionContext, model, file: str, strength: float) -> Result:
    try:
        lora = load_lora(ctx.model_file("loras", file), model)
    except CheckpointError as e:
        raise NodeError(str(e), input="file") from None
    return Result(outputs=(with_loras(model, [(lora, strength)]),), ui={"text": [lora.summary()]})


_LORA_INPUTS = (
    Input("file", "STRING", model_folder="loras", link="widget"),
    Input("strength", "FLOAT", default=1.0, min=-4.0, max=4.0, step=0.05),
)


class LoadLoRA(Node):
    """Apply a LoRA (kohya, diffusers/PEFT or .diff file; BFL or diffusers names) to a DiT.

    The output is a new model sharing the input's weights; chain nodes to stack LoRAs.
    """

    category = "loaders"
    inputs = (Input("model", "DIT_MODEL"), *_LORA_INPUTS)
    outputs = (Output("model", "DIT_MODEL"),)

    def execute(self, ctx: ExecutionContext, model: Flux, file: str, strength: float):
        return _apply_lora(ctx, model, file, strength)


class LoadLoRAGPT(Node):
    """Apply a LoRA (kohya, PEFT or .diff file on LlamaGen names) to an autoregressive GPT.

    The output is a new model sharing the input's weights; chain nodes to stack LoRAs.
    """

    category = "loaders"
    inputs = (Input("model", "AR_MODEL"), *_LORA_INPUTS)
    outputs = (Output("model", "AR_MODEL"),)

    def execute(self, ctx: ExecutionContext, model, file: str, strength: float):
        return _apply_lora(ctx, model, file, strength)


class LoadControlNet(Node):
    """Load a ControlNet: for the DiT (diffusers FluxControlNetModel, BFL or XLabs-style keys) or the GPT."""

    category = "loaders"
    inputs = (Input("file", "STRING", model_folder="controlnet", link="widget"),)
    outputs = (Output("control_net", "CONTROL_NET"),)

    def execute(self, ctx: ExecutionContext, file: str):
        try:
            return (load_any_controlnet(ctx.model_file("controlnet", file), ctx.device, ctx.dtype),)
        except CheckpointError as e:
            raise NodeError(str(e), input="file") from None


class ApplyControlNet(Node):
    """Steer a DiT with a control image (edges, scribbles, …) through a ControlNet.

    The output is the DiT as a new model that adds the ControlNet's residuals while the run is
    between `start` and `end` (fractions of the steps of the "flux" schedule), scaled by
    `strength`; connect it to the sampler instead of the plain model. The control image is
    resized to the latent's size; latent ControlNets encode it with the VAE.
    """

    category = "conditioning"
    inputs = (
        Input("model", "DIT_MODEL"),
        Input("control_net", "CONTROL_NET"),
        Input("image", "IMAGE"),
        Input("vae", "VAE", optional=True),
        Input("strength", "FLOAT", default=1.0, min=0.0, max=10.0, step=0.05),
        Input("start", "FLOAT", default=0.0, min=0.0, max=1.0, step=0.01),
        Input("end", "FLOAT", default=1.0, min=0.0, max=1.0, step=0.01),
    )
    outputs = (Output("model", "DIT_MODEL"),)

    def execute(
        self,
        ctx: ExecutionContext,
        model: Flux,
        control_net: FluxControlNet,
        image: torch.Tensor,
        strength: float,
        start: float,
        end: float,
        vae=None,
    ):
        if not isinstance(control_net, FluxControlNet):
            raise NodeError(
                "this ControlNet is for the AR engine: use ApplyControlNetGPT", input="control_net"
            )
        if start > end:
            raise NodeError(f"start {start} is after end {end}", input="start")
        if not control_net.pixel_hint and vae is None:
            raise NodeError(
                "this ControlNet reads the control image as a latent: connect the model's VAE", input="vae"
            )
        if (
            vae is not None
            and not control_net.pixel_hint
            and vae.config.latent_channels != model.config.in_channels
        ):
            raise NodeError(
                f"the VAE makes {vae.config.latent_channels}-channel latents, the DiT takes "
                f"{model.config.in_channels}",
                input="vae",
            )
        try:
            return (
                with_control(model, control_net, ControlHint(image=image, vae=vae), strength, start, end),
            )
        except (TypeError, ValueError) as e:
            raise NodeError(str(e), input="control_net") from None


class ApplyControlNetGPT(Node):
    """Steer an autoregressive GPT with a control image through an AR ControlNet.

    Each token position gets an embedding of the control image under it, added where the GPT
    predicts that token (to its input, and to the chosen layers' inputs); connect the output to
    ARGenerateTokens instead of the plain model. A net trained with a LoRA on the GPT carries it
    and applies it too (whenever strength is not 0), or fails here if it does not fit the model;
    a net trained on another GPT of the same shape applies, and the node's text says so.
    """

    category = "conditioning"
    inputs = (
        Input("model", "AR_MODEL"),
        Input("control_net", "CONTROL_NET"),
        Input("image", "IMAGE"),
        Input("strength", "FLOAT", default=1.0, min=0.0, max=10.0, step=0.05),
    )
    outputs = (Output("model", "AR_MODEL"),)

    def execute(self, ctx: ExecutionContext, model, control_net, image: torch.Tensor, strength: float):
        if not isinstance(control_net, ARControlNet):
            raise NodeError("this ControlNet is for the DiT: use ApplyControlNet", input="control_net")
        try:
            controlled = with_ar_control(model, control_net, image, strength)
        except (TypeError, ValueError) as e:
            raise NodeError(str(e), input="control_net") from None
        return Result(outputs=(controlled,), ui={"text": [control_net.summary(model)]})


class CannyEdges(Node):
    """Canny edge map of an image (white edges on black), the input of edge ControlNets.

    Colour-aware, as OpenCV's Canny: each pixel takes the RGB channel with the strongest
    gradient, so borders between colours of equal brightness are edges too. Thresholds are
    shares of a sharp black-to-white step whatever the blur: `high` starts an edge, `low`
    continues one; `blur` is the Gaussian sigma applied first.
    """

    category = "image/preprocessors"
    version = 2  # 2: colour-aware, thresholds independent of the blur
    inputs = (
        Input("image", "IMAGE"),
        Input("low_threshold", "FLOAT", default=0.1, min=0.0, max=1.0, step=0.01),
        Input("high_threshold", "FLOAT", default=0.2, min=0.0, max=1.0, step=0.01),
        Input("blur", "FLOAT", default=1.4, min=0.0, max=10.0, step=0.1),
    )
    outputs = (Output("image", "IMAGE"),)

    def execute(
        self,
        ctx: ExecutionContext,
        image: torch.Tensor,
        low_threshold: float,
        high_threshold: float,
        blur: float,
    ):
        return (canny_image(image, low_threshold, high_threshold, blur),)


class Scribble(Node):
    """Scribble map of an image: pixels darker than `threshold` become white lines on black.

    `invert` off keeps the lighter pixels instead; `thickness` grows the lines by that many pixels.
    """

    category = "image/preprocessors"
    inputs = (
        Input("image", "IMAGE"),
        Input("threshold", "FLOAT", default=0.5, min=0.0, max=1.0, step=0.01),
        Input("invert", "BOOLEAN", default=True),
        Input("thickness", "INT", default=0, min=0, max=32),
    )
    outputs = (Output("image", "IMAGE"),)

    def execute(
        self, ctx: ExecutionContext, image: torch.Tensor, threshold: float, invert: bool, thickness: int
    ):
        return (scribble_image(image, threshold, invert, thickness),)


class MaskToTokens(Node):
    """Fix the tokens a mask leaves alone and free the ones it covers: in-painting for the AR engine.

    The mask (1 = regenerate, as SetLatentMask) is averaged over each token's pixels; a token
    whose coverage reaches `coverage` is generated anew, every other keeps its id.
    """

    category = "autoregressive"
    inputs = (
        Input("tokens", "TOKENS"),
        Input("mask", "MASK"),
        Input("coverage", "FLOAT", default=0.5, min=0.0, max=1.0, step=0.05),
    )
    outputs = (Output("tokens", "TOKENS"),)

    def execute(self, ctx: ExecutionContext, tokens: TokenGrid, mask: torch.Tensor, coverage: float):
        if mask.shape[0] not in (1, tokens.batch):
            raise NodeError(
                f"mask batch {mask.shape[0]} does not match token batch {tokens.batch}", input="mask"
            )
        cells = F.adaptive_avg_pool2d(mask.float()[:, None], (tokens.height, tokens.width))[:, 0]
        free = cells >= coverage if coverage > 0 else torch.ones_like(cells, dtype=torch.bool)
        return (tokens.with_fixed((~free).expand(tokens.batch, -1, -1)),)
