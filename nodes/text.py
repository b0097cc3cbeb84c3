"""Text nodes: load a text encoder and turn a prompt into CONDITIONING.

One CONDITIONING type feeds both paradigms, so the same TextEncode output can go to a
DiT sampler or to AR token generation. Besides the built-in character-level encoder, the
real encoders load here in the spirit of ComfyUI's CLIPLoader / DualCLIPLoader: CLIP-L and
T5 (v1.1 XXL, FLAN-T5) from any layout `engines/layouts.py` knows, each with its tokenizer.
Each model family then has its encode node, doing exactly what its reference code does:
FluxTextEncode (T5 tokens + CLIP pooled + guidance), LlamaGenTextEncode (FLAN-T5, 120
tokens, left padding with the mask) and ImageNetClass (LlamaGen c2i class labels).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from tessera.engines.checkpoint import CheckpointError, metadata_config
from tessera.engines.clip import CLIPTextModel
from tessera.engines.conditioning import Conditioning
from tessera.engines.layouts import (
    detect_family,
    family_of,
    header_weights,
    locate,
    related_files,
    stored_keys,
    text_encoder_width,
    tokenizer_folders,
    tokenizer_for,
)
from tessera.engines.layouts import load_text_encoder as load_real_text_encoder
from tessera.engines.t5 import T5Encoder
from tessera.engines.text_encoder import TextEncoder, TextEncoderConfig, load_text_encoder
from tessera.engines.tokenization import TextTokenizer, TokenizerError, find_tokenizer
from tessera.node import ExecutionContext, Input, Node, NodeError, Output

FOLDER = "text_encoders"


class LoadTextEncoder(Node):
    """Load a character-level text encoder from the text_encoders folder."""

    category = "loaders"
    inputs = (
        Input(
            "file",
            "STRING",
            model_folder=FOLDER,
            model_family="Tessera character-level text encoder",
            link="widget",
        ),
    )
    outputs = (Output("text_encoder", "TEXT_ENCODER"),)

    @classmethod
    def describe(cls, ctx: ExecutionContext, constants: dict, upstream: dict[str, dict]) -> dict[str, dict]:
        path = ctx.model_file(FOLDER, constants["file"])
        try:
            c = TextEncoderConfig.from_dict(metadata_config(header_weights(path)[1], path))
        except (CheckpointError, TypeError, ValueError):
            return {"text_encoder": {}}  # execute names what is wrong with the file
        return {"text_encoder": {"character": {"tokens": c.context_dim, "pooled": c.pooled_dim}}}

    def execute(self, ctx: ExecutionContext, file: str):
        try:
            # kept in float32 whatever ctx.dtype is: it is small, and consumers cast its output; into
            # RAM like every loader (the model manager moves it when TextEncode runs)
            return (load_text_encoder(ctx.model_file(FOLDER, file), "cpu", torch.float32),)
        except CheckpointError as e:
            raise NodeError(str(e), input="file") from None


class TextEncode(Node):
    """Encode a prompt into CONDITIONING for a DiT or an autoregressive model.

    With the character-level encoder, prompts are lower-cased and read character by character
    (characters past its max_length are dropped). With real encoders it gives CLIP's hidden
    states and pooled vector, T5's masked features, or for CLIP + T5 Flux's 512-token recipe;
    FluxTextEncode and LlamaGenTextEncode give each family's exact input.
    """

    category = "conditioning"
    inputs = (
        Input("text_encoder", "TEXT_ENCODER"),
        Input("text", "STRING", default="", multiline=True),
    )
    outputs = (Output("conditioning", "CONDITIONING"),)

    @classmethod
    def describe(cls, ctx: ExecutionContext, constants: dict, upstream: dict[str, dict]) -> dict[str, dict]:
        enc = upstream.get("text_encoder", {})
        if "character" in enc:
            return {"conditioning": {**enc["character"], "source": CHARACTER}}
        parts = enc.get("encoders")
        if not parts:
            return {"conditioning": {}}
        source = " + ".join(NAMES[n] for n in NAMES if n in parts)
        # RealTextEncoder.encode: T5 tokens + CLIP pooled for both, else one encoder's width for both
        tokens, pooled = parts.get("t5") or parts["clip"], parts.get("clip") or parts["t5"]
        return {"conditioning": {"tokens": tokens, "pooled": pooled, "source": source}}

    def execute(self, ctx: ExecutionContext, text_encoder: TextEncoder, text: str) -> tuple[Conditioning]:
        with torch.no_grad():
            return (text_encoder.encode([text]),)


# ---------------------------------------------------------------- real text encoders (CLIP, T5)

CLIP_TOKENS = 77  # CLIP's positions; Flux and SD pad every prompt to them
LLAMAGEN_TOKENS = 120  # LlamaGen t2i's FLAN-T5 caption length
NAMES = {"clip": "CLIP", "t5": "T5"}
CHARACTER = "the character-level encoder"


@dataclass
class RealTextEncoder:
    """CLIP and/or T5, each with its tokenizer: the TEXT_ENCODER Flux and LlamaGen t2i take."""

    clip: tuple[CLIPTextModel, TextTokenizer] | None = None
    t5: tuple[T5Encoder, TextTokenizer] | None = None

    @property
    def source(self) -> str:
        return " + ".join(name for name, part in (("CLIP", self.clip), ("T5", self.t5)) if part is not None)

    @torch.no_grad()
    def clip_encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """CLIP hidden states [B, 77, D] and pooled vectors [B, D] (prompts padded to 77 with end-of-text)."""
        model, tok = self.clip
        ids, _ = tok(texts, CLIP_TOKENS)
        hidden, pooled = model(ids, eos_token_id=tok.token_id("<|endoftext|>"))
        return hidden.float().cpu(), pooled.float().cpu()

    @torch.no_grad()
    def t5_encode(self, texts: list[str], length: int, masked: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """T5 features [B, length, D] and the padding mask; `masked=False` lets padding attend, as Flux does."""
        model, tok = self.t5
        ids, mask = tok(texts, length)
        return model(ids, mask if masked else None).float().cpu(), mask

    def encode(self, texts: list[str]) -> Conditioning:
        """For the generic TextEncode node: Flux's recipe (512 T5 tokens) when both encoders are
        here, CLIP hidden states + pooled for CLIP alone, masked T5 features for T5 alone."""
        if self.clip is not None and self.t5 is not None:
            return flux_conditioning(self, texts, 512, None)
        if self.clip is not None:
            hidden, pooled = self.clip_encode(texts)
            return Conditioning(hidden, pooled, torch.ones(hidden.shape[:2], dtype=torch.bool), source="CLIP")
        feats, mask = self.t5_encode(texts, 512, masked=True)
        n = max(1, int(mask.sum(1).max()))
        return Conditioning(
            feats[:, :n], torch.zeros(feats.shape[0], feats.shape[-1]), mask[:, :n], source="T5"
        )


def flux_conditioning(
    enc: RealTextEncoder, texts: list[str], t5_tokens: int, guidance: float | None
) -> Conditioning:
    """Flux.1's text input as BFL and diffusers build it: T5 features over `t5_tokens` padded
    positions, all attended (no mask), and CLIP's pooled vector."""
    feats, _ = enc.t5_encode(texts, t5_tokens, masked=False)
    _, pooled = enc.clip_encode(texts)
    return Conditioning(feats, pooled, torch.ones(feats.shape[:2], dtype=torch.bool), guidance, "CLIP + T5")


def llamagen_conditioning(enc: RealTextEncoder, texts: list[str], tokens: int) -> Conditioning:
    """LlamaGen t2i's caption input: the lower-cased caption's FLAN-T5 features over `tokens`
    positions under the padding mask, then each row rotated so the padding comes first (left
    padding) with the mask flipped.

    LlamaGen lower-cases every caption (T5's vocabulary is cased); its further PixArt caption
    clean-up (URLs, HTML, CJK and punctuation rules) is not repeated here: write plain prompts.
    """
    feats, mask = enc.t5_encode([t.lower().strip() for t in texts], tokens, masked=True)
    rows = []
    for f, m in zip(feats, mask):
        valid = int(m.sum())
        rows.append(torch.cat([f[valid:], f[:valid]]))
    return Conditioning(
        torch.stack(rows), torch.zeros(feats.shape[0], feats.shape[-1]), mask.flip(-1), source="T5"
    )


def _identity(paths: list[Path]) -> list:
    return [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in paths if p.is_file()]


def check_real_encoder(
    ctx: ExecutionContext, node_name: str, file: str, input_name: str, want: str | None
) -> list:
    """What a loader checks when the workflow is compiled, from file headers alone: the file is a
    CLIP or T5 encoder (the one `want`s) and a tokenizer is there. Returns the identity (size,
    mtime) of every file it reads, shards, configs and tokenizer included, for the cache key."""
    path = ctx.model_file(FOLDER, file, input_name)
    try:
        family = detect_family(stored_keys(path))
        kind = {"CLIP text encoder": "clip", "T5 text encoder": "t5"}.get(family)
        if kind is None:
            raise NodeError(
                f"{node_name}: {path.name}: this is {_a(family)}, not a CLIP or T5 text encoder",
                input=input_name,
            )
        if want is not None and kind != want:
            raise NodeError(
                f"{node_name}: {path.name} holds a {NAMES[kind]} text encoder; {input_name} takes a {NAMES[want]} one",
                input=input_name,
            )
        folders = tokenizer_folders(locate(path), kind, Path(ctx.models_dir))
        tokenizer = find_tokenizer(kind, folders).source
    except (CheckpointError, TokenizerError) as e:
        raise NodeError(f"{node_name}: {path.name}: {e}", input=input_name) from None
    return _identity([*related_files(path), *sorted(tokenizer.iterdir())])


def _a(noun: str) -> str:
    return ("an " if noun[0] in "AEIOUaeiou" else "a ") + noun


def encoder_widths(ctx: ExecutionContext, node_name: str, file: str, input_name: str) -> dict[str, int]:
    """{"clip" or "t5": width of its features} of one encoder file, from its headers alone."""
    path = ctx.model_file(FOLDER, file, input_name)
    try:
        family, width = text_encoder_width(header_weights(path)[0], path)
    except CheckpointError as e:
        raise NodeError(f"{node_name}: {path.name}: {e}", input=input_name) from None
    return {family: width}


def load_real_encoder(ctx: ExecutionContext, node: Node, file: str, input_name: str, want: str | None = None):
    """(family, (model, tokenizer)) for one file; every failure is a NodeError on `input_name` naming the file."""
    path = ctx.model_file(FOLDER, file, input_name)
    try:
        # into RAM, like the DiT: the model manager puts it on the GPU when an encode node runs
        model, where = load_real_text_encoder(path, "cpu", ctx.dtype)
        family = family_of(model)
        if want is not None and family != want:
            raise NodeError(
                f"{node.type_name}: {path.name} holds a {NAMES[family]} text encoder; {input_name} takes a "
                f"{NAMES[want]} one",
                input=input_name,
            )
        return family, (model, tokenizer_for(model, where, Path(ctx.models_dir)))
    except (CheckpointError, TokenizerError) as e:
        raise NodeError(f"{node.type_name}: {path.name}: {e}", input=input_name) from None


class CLIPLoader(Node):
    """Load one real text encoder, CLIP or T5 (told from the file), with its tokenizer.

    The file may be a single file (ComfyUI's clip_l.safetensors, t5xxl_fp16.safetensors), a
    Hugging Face folder's model.safetensors (or any shard of a sharded one) or a diffusers
    text_encoder(_2) component. The tokenizer is looked for beside the weights, in the diffusers
    tokenizer(_2) folder, then in models/tokenizers/.
    """

    category = "loaders"
    inputs = (Input("file", "STRING", model_folder=FOLDER, link="widget"),)
    outputs = (Output("text_encoder", "TEXT_ENCODER"),)

    @classmethod
    def fingerprint(cls, ctx: ExecutionContext, inputs: dict) -> str | None:
        return json.dumps(check_real_encoder(ctx, cls.type_name, inputs["file"], "file", None))

    @classmethod
    def describe(cls, ctx: ExecutionContext, constants: dict, upstream: dict[str, dict]) -> dict[str, dict]:
        return {"text_encoder": {"encoders": encoder_widths(ctx, cls.type_name, constants["file"], "file")}}

    def execute(self, ctx: ExecutionContext, file: str):
        family, part = load_real_encoder(ctx, self, file, "file")
        return (RealTextEncoder(**{family: part}),)


class DualCLIPLoader(Node):
    """Load CLIP-L and T5-XXL together, the text encoders Flux.1 needs (each file checked for its family)."""

    category = "loaders"
    inputs = (
        Input("clip_file", "STRING", model_folder=FOLDER, model_family="CLIP text encoder", link="widget"),
        Input("t5_file", "STRING", model_folder=FOLDER, model_family="T5 text encoder", link="widget"),
    )
    outputs = (Output("text_encoder", "TEXT_ENCODER"),)

    @classmethod
    def fingerprint(cls, ctx: ExecutionContext, inputs: dict) -> str | None:
        return json.dumps(
            [
                check_real_encoder(ctx, cls.type_name, inputs[name], name, want)
                for name, want in (("clip_file", "clip"), ("t5_file", "t5"))
            ]
        )

    @classmethod
    def describe(cls, ctx: ExecutionContext, constants: dict, upstream: dict[str, dict]) -> dict[str, dict]:
        widths = {
            **encoder_widths(ctx, cls.type_name, constants["clip_file"], "clip_file"),
            **encoder_widths(ctx, cls.type_name, constants["t5_file"], "t5_file"),
        }
        return {"text_encoder": {"encoders": widths}}

    def execute(self, ctx: ExecutionContext, clip_file: str, t5_file: str):
        _, clip = load_real_encoder(ctx, self, clip_file, "clip_file", "clip")
        _, t5 = load_real_encoder(ctx, self, t5_file, "t5_file", "t5")
        return (RealTextEncoder(clip=clip, t5=t5),)


def _lacking(node_name: str, needs: tuple[str, ...], have: str, hint: str) -> NodeError:
    wanted = " and ".join(NAMES[n] for n in needs)
    return NodeError(
        f"{node_name} needs {wanted} but the text encoder has {have or 'none'}; {hint}", input="text_encoder"
    )


def _real(node: Node, text_encoder, needs: tuple[str, ...], hint: str) -> RealTextEncoder:
    have = text_encoder.source if isinstance(text_encoder, RealTextEncoder) else CHARACTER
    if not isinstance(text_encoder, RealTextEncoder) or any(getattr(text_encoder, n) is None for n in needs):
        raise _lacking(node.type_name, needs, have, hint)
    return text_encoder


def _real_widths(node_name: str, enc: dict, needs: tuple[str, ...], hint: str) -> dict[str, int] | None:
    """`_real` on what validation knows of the text encoder: its encoders' widths (None if unknown)."""
    if "character" in enc:
        raise _lacking(node_name, needs, CHARACTER, hint)
    parts = enc.get("encoders")
    if parts is None:
        return None
    if any(n not in parts for n in needs):
        raise _lacking(node_name, needs, " + ".join(NAMES[n] for n in NAMES if n in parts), hint)
    return parts


class FluxTextEncode(Node):
    """Encode a prompt for Flux.1: T5-XXL tokens (256 for schnell, 512 for dev), CLIP-L pooled, guidance.

    `guidance` is Flux dev's distilled-guidance strength; it replaces the sampler's `guidance`
    (schnell has no guidance input and ignores it).
    """

    category = "conditioning"
    inputs = (
        Input("text_encoder", "TEXT_ENCODER"),
        Input("text", "STRING", default="", multiline=True),
        Input("t5_tokens", "INT", default=512, min=1, max=512),
        Input("guidance", "FLOAT", default=3.5, min=0.0, max=100.0, step=0.1),
    )
    outputs = (Output("conditioning", "CONDITIONING"),)

    HINT = "load CLIP-L and T5-XXL with DualCLIPLoader"

    @classmethod
    def describe(cls, ctx: ExecutionContext, constants: dict, upstream: dict[str, dict]) -> dict[str, dict]:
        parts = _real_widths(cls.type_name, upstream.get("text_encoder", {}), ("clip", "t5"), cls.HINT)
        if parts is None:
            return {"conditioning": {}}
        return {"conditioning": {"tokens": parts["t5"], "pooled": parts["clip"], "source": "CLIP + T5"}}

    def execute(self, ctx: ExecutionContext, text_encoder, text: str, t5_tokens: int, guidance: float):
        enc = _real(self, text_encoder, ("clip", "t5"), self.HINT)
        return (flux_conditioning(enc, [text], t5_tokens, guidance),)


class LlamaGenTextEncode(Node):
    """Encode a caption for LlamaGen t2i: FLAN-T5 features over 120 tokens, left-padded with the mask."""

    category = "conditioning"
    inputs = (
        Input("text_encoder", "TEXT_ENCODER"),
        Input("text", "STRING", default="", multiline=True),
        Input("max_tokens", "INT", default=LLAMAGEN_TOKENS, min=1, max=512),
    )
    outputs = (Output("conditioning", "CONDITIONING"),)

    HINT = "load FLAN-T5-XL with CLIPLoader"

    @classmethod
    def describe(cls, ctx: ExecutionContext, constants: dict, upstream: dict[str, dict]) -> dict[str, dict]:
        parts = _real_widths(cls.type_name, upstream.get("text_encoder", {}), ("t5",), cls.HINT)
        if parts is None:
            return {"conditioning": {}}
        return {"conditioning": {"tokens": parts["t5"], "pooled": parts["t5"], "source": "T5"}}

    def execute(self, ctx: ExecutionContext, text_encoder, text: str, max_tokens: int):
        enc = _real(self, text_encoder, ("t5",), self.HINT)
        return (llamagen_conditioning(enc, [text], max_tokens),)


def _imagenet_classes() -> tuple[str, ...]:
    lines = (Path(__file__).with_name("imagenet_classes.txt")).read_text(encoding="utf-8").splitlines()
    names = [line for line in lines if line and not line.startswith("#")]
    return tuple(f"{i}: {name}" for i, name in enumerate(names))


IMAGENET_CLASSES = _imagenet_classes()


class ImageNetClass(Node):
    """Pick one of the 1,000 ImageNet classes by name (type to search); outputs its id for a class-conditioned AR model."""

    category = "conditioning"
    inputs = (
        Input("class_name", "STRING", default=IMAGENET_CLASSES[207], choices=IMAGENET_CLASSES, link="widget"),
    )
    outputs = (Output("class_id", "INT"),)

    def execute(self, ctx: ExecutionContext, class_name: str):
        return (IMAGENET_CLASSES.index(class_name),)
