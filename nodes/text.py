"""Text nodes: load a text encoder and turn a prompt into CONDITIONING.

One CONDITIONING type feeds both paradigms, so the same TextEncode output can go to a
DiT sampler or to AR token generation.
"""

from __future__ import annotations

import torch
from tessera.engines.checkpoint import CheckpointError
from tessera.engines.conditioning import Conditioning
from tessera.engines.text_encoder import TextEncoder, load_text_encoder

from tessera.node import ExecutionContext, Input, Node, NodeError, Output

FOLDER = "text_encoders"


class LoadTextEncoder(Node):
    """Load a character-level text encoder from the text_encoders folder."""

    category = "loaders"
    inputs = (Input("file", "STRING", model_folder=FOLDER, link="widget"),)
    outputs = (Output("text_encoder", "TEXT_ENCODER"),)

    def execute(self, ctx: ExecutionContext, file: str):
        try:
            # kept in float32 whatever ctx.dtype is: it is small, and consumers cast its output
            return (load_text_encoder(ctx.model_file(FOLDER, file), ctx.device, torch.float32),)
        except CheckpointError as e:
            raise NodeError(str(e), input="file") from None


class TextEncode(Node):
    """Encode a prompt into CONDITIONING for a DiT or an autoregressive model.

    Prompts are lower-cased and read character by character; characters past the
    encoder's max_length are dropped.
    """

    category = "conditioning"
    inputs = (
        Input("text_encoder", "TEXT_ENCODER"),
        Input("text", "STRING", default="", multiline=True),
    )
    outputs = (Output("conditioning", "CONDITIONING"),)

    def execute(self, ctx: ExecutionContext, text_encoder: TextEncoder, text: str) -> tuple[Conditioning]:
        with torch.no_grad():
            return (text_encoder.encode([text]),)
