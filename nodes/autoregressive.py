"""Autoregressive image nodes: VQ tokenizer, GPT token generation, token-space editing.

TOKENS (a TokenGrid) is the paradigm's latent: VQTokenize and VQDecode cross between
pixels and tokens, ARGenerateTokens fills a grid, and FixTokenRows / TokenRegion mark
which ids generation must keep, so a graph can outpaint or in-fill in token space.
"""

from __future__ import annotations

import torch
from PIL import ImageDraw

from tessera.compile import compiled_decode_step, compiled_sampler
from tessera.engines.ar_decoding import DECODINGS, SCHEDULES, condition_prefix, generate
from tessera.engines.checkpoint import CheckpointError
from tessera.engines.conditioning import Conditioning
from tessera.engines.generation import tokens_to_image
from tessera.engines.gpt import GPT, infer_gpt_config, load_gpt
from tessera.engines.layouts import header_weights
from tessera.engines.tokens import TokenGrid
from tessera.engines.vq import VQModel, load_vq
from tessera.images import tensor_to_pil
from tessera.node import MAX_SEED, ExecutionContext, Input, Node, NodeError, Output

MAX_GRID = 256


class LoadARModel(Node):
    """Load an autoregressive image GPT (LlamaGen layout, class- or caption-conditioned)."""

    category = "autoregressive"
    version = 2  # 2: the file input is `file`, as in every loader (was `model_name`)
    inputs = (Input("file", "STRING", model_folder="ar_models", model_family="LlamaGen GPT", link="widget"),)
    outputs = (Output("model", "AR_MODEL"),)

    @classmethod
    def describe(cls, ctx: ExecutionContext, constants: dict, upstream: dict[str, dict]) -> dict[str, dict]:
        """The caption width it takes (0: class-conditioned), from the file header (Node.describe)."""
        path = ctx.model_file("ar_models", constants["file"], "file")
        try:
            sd, metadata, _ = header_weights(path)
            return {"model": {"caption_dim": infer_gpt_config(sd, metadata).caption_dim}}
        except (CheckpointError, KeyError, TypeError, ValueError):
            return {"model": {}}  # execute names what is wrong with the file

    def execute(self, ctx: ExecutionContext, file: str):
        try:
            # into RAM, like every loader: the model manager moves it to the GPU when a node needs it
            return (load_gpt(ctx.model_file("ar_models", file, "file"), "cpu", ctx.dtype),)
        except CheckpointError as e:
            raise NodeError(str(e), input="file") from None


class LoadVQModel(Node):
    """Load a VQ image tokenizer (LlamaGen layout) that maps images to token grids and back."""

    category = "autoregressive"
    version = 2  # 2: the file input is `file`, as in every loader (was `model_name`)
    inputs = (Input("file", "STRING", model_folder="vq_models", model_family="VQ tokenizer", link="widget"),)
    outputs = (Output("vq", "VQ_MODEL"),)

    def execute(self, ctx: ExecutionContext, file: str):
        try:
            return (load_vq(ctx.model_file("vq_models", file, "file"), "cpu", ctx.dtype),)  # moved when used
        except CheckpointError as e:
            raise NodeError(str(e), input="file") from None


class VQTokenize(Node):
    """Turn images into token grids (center-cropped to a multiple of the tokenizer's stride)."""

    category = "autoregressive"
    inputs = (Input("vq", "VQ_MODEL"), Input("image", "IMAGE"))
    outputs = (Output("tokens", "TOKENS"),)

    def execute(self, ctx: ExecutionContext, vq: VQModel, image: torch.Tensor):
        f = vq.downsample
        _, h, w, _ = image.shape
        ch, cw = h // f * f, w // f * f
        if ch == 0 or cw == 0:
            raise NodeError(f"image {w}x{h} is smaller than one {f}x{f} token", input="image")
        top, left = (h - ch) // 2, (w - cw) // 2
        pixels = image[:, top : top + ch, left : left + cw].permute(0, 3, 1, 2) * 2 - 1
        return (TokenGrid(vq.encode(pixels.to(ctx.device)).cpu()),)


class VQDecode(Node):
    """Turn token grids back into images."""

    category = "autoregressive"
    inputs = (Input("vq", "VQ_MODEL"), Input("tokens", "TOKENS"))
    outputs = (Output("image", "IMAGE"),)

    def execute(self, ctx: ExecutionContext, vq: VQModel, tokens: TokenGrid):
        try:
            return (tokens_to_image(vq, tokens.ids),)
        except ValueError as e:
            raise NodeError(str(e), input="tokens") from None


class ARGenerateTokens(Node):
    """Generate a token grid with the GPT, token by token in raster order.

    Classifier-free guidance mixes cond and uncond logits (the uncond side is the
    negative prompt if given, else the model's learned null condition). Positions that
    `fixed` marks are kept, not sampled. A VQ model, if linked, gives live previews.
    Image k of a batch is the image seed + k gives alone, on any device (since version 2;
    version 1 drew one device generator for the whole batch, so old seeds give new images).
    `decoding` "jacobi" verifies `jacobi_window` drafted tokens per forward: the same tokens
    at temperature 0, the same distribution above it, in fewer forwards.
    """

    category = "autoregressive"
    version = 3  # 2: per-image device-independent seeds; 3: top_k defaults to the engine's 0 (was 1000)
    inputs = (
        Input("model", "AR_MODEL"),
        Input("positive", "CONDITIONING", optional=True),
        Input("negative", "CONDITIONING", optional=True),
        Input("class_id", "INT", default=0, min=0, max=100_000),
        Input("width", "INT", default=16, min=1, max=MAX_GRID),
        Input("height", "INT", default=16, min=1, max=MAX_GRID),
        Input("batch_size", "INT", default=1, min=1, max=64),
        Input("cfg", "FLOAT", default=4.0, min=0.0, max=50.0, step=0.1),
        Input("guidance_schedule", "STRING", default="constant", choices=tuple(SCHEDULES)),
        Input("temperature", "FLOAT", default=1.0, min=0.0, max=5.0, step=0.05),
        Input("top_k", "INT", default=0, min=0, max=1_000_000),
        Input("top_p", "FLOAT", default=1.0, min=0.0, max=1.0, step=0.01),
        Input("seed", "INT", default=0, min=0, max=MAX_SEED, widget="seed"),
        Input("fixed", "TOKENS", optional=True),
        Input("vq", "VQ_MODEL", optional=True),
        Input("preview_every", "INT", default=32, min=0, max=100_000),
        Input("decoding", "STRING", default="sequential", choices=DECODINGS),
        Input("jacobi_window", "INT", default=16, min=1, max=1024),
    )
    outputs = (Output("tokens", "TOKENS"),)

    @classmethod
    def describe(cls, ctx: ExecutionContext, constants: dict, upstream: dict[str, dict]) -> dict[str, dict]:
        """A caption model's text input, refused when the workflow is compiled: a positive must be
        linked, and its features must be as wide as the model's caption projection."""
        caption_dim = upstream.get("model", {}).get("caption_dim")
        if caption_dim:
            if "positive" not in upstream:
                raise NodeError(
                    "this AR model is text-conditioned: link a positive CONDITIONING", input="positive"
                )
            for name in ("positive", "negative"):
                cond = upstream.get(name, {})
                if "tokens" in cond and cond["tokens"] != caption_dim:
                    made_by = f" (made by {cond['source']})" if cond.get("source") else ""
                    raise NodeError(
                        f"{cls.type_name} {name}: text features{made_by} are {cond['tokens']}-dim but this AR "
                        f"model expects {caption_dim} (use the text encoder it was trained with: FLAN-T5-XL "
                        "through LlamaGenTextEncode for LlamaGen t2i)",
                        input=name,
                    )
        return {"tokens": {}}

    def execute(
        self,
        ctx: ExecutionContext,
        model: GPT,
        class_id: int,
        width: int,
        height: int,
        batch_size: int,
        cfg: float,
        guidance_schedule: str,
        temperature: float,
        top_k: int,
        top_p: float,
        seed: int,
        preview_every: int,
        decoding: str = "sequential",
        jacobi_window: int = 16,
        positive: Conditioning | None = None,
        negative: Conditioning | None = None,
        fixed: TokenGrid | None = None,
        vq: VQModel | None = None,
    ):
        if model.config.is_caption and positive is None:
            raise NodeError(
                "this AR model is text-conditioned: link a positive CONDITIONING", input="positive"
            )
        if not model.config.is_caption and class_id >= model.config.num_classes:
            raise NodeError(f"class_id must be below {model.config.num_classes}", input="class_id")
        grid = _fit_fixed(fixed, height, width) if fixed is not None else None
        batches = [batch_size] + [c.batch for c in (positive, negative, grid) if c is not None]
        batch = max(batches)
        if any(b not in (1, batch) for b in batches[1:]) or batch_size not in (1, batch):
            raise NodeError(
                f"batch sizes {batches} do not match (each must be 1 or {batch})", input="batch_size"
            )
        try:
            prefix = condition_prefix(
                model,
                batch,
                positive=positive,
                negative=negative,
                class_ids=torch.tensor([class_id]),
                cfg=cfg != 1.0,
            )
        except ValueError as e:
            raise NodeError(str(e), input="positive") from None
        total = height * width

        def on_token(info: dict) -> None:
            done = info["i"] + 1
            preview = None
            if vq is not None and preview_every > 0 and (done % preview_every == 0 or done == total):
                preview = _preview(vq, info["tokens"][:1], height, width)
            ctx.progress(done, total, preview)

        step = compiled_decode_step(ctx.device)  # None unless --compile is on
        compiled = {}
        if step is not None:
            compiled = {"decode_fn": step, "sample_fn": compiled_sampler(ctx.device), "keep_caches": True}
        ids = generate(
            model,
            prefix,
            height,
            width,
            cfg_scale=cfg,
            schedule=guidance_schedule,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            fixed=None if grid is None else grid.to(ctx.device),
            callback=on_token,
            decoding=decoding,
            jacobi_window=jacobi_window,
            **compiled,
        )
        return (TokenGrid(ids.cpu()),)


def _fit_fixed(fixed: TokenGrid, height: int, width: int) -> TokenGrid:
    """Fixed tokens at the top-left of the grid. A grid without a mask keeps all its ids
    (a tokenized image fed straight in); a smaller grid leaves the new area free."""
    if fixed.fixed is None:
        fixed = fixed.with_fixed(torch.ones(fixed.height, fixed.width, dtype=torch.bool))
    if (fixed.height, fixed.width) == (height, width):
        return fixed
    try:
        return fixed.placed(height, width)
    except ValueError as e:
        raise NodeError(str(e), input="fixed") from None


def _preview(vq: VQModel, tokens: torch.Tensor, height: int, width: int):
    """Decode the tokens so far of the first image; the rest shows grey, and a cursor frames
    the cell the next token fills (raster order)."""
    n = tokens.shape[1]
    ids = torch.zeros(1, height * width, dtype=torch.long, device=tokens.device)
    ids[:, :n] = tokens
    known = torch.zeros_like(ids, dtype=torch.bool)
    known[:, :n] = True
    pixels = vq.decode_partial(ids.view(1, height, width), known.view(1, height, width))
    picture = tensor_to_pil(((pixels + 1) / 2).permute(0, 2, 3, 1))[0]
    if n < height * width:
        cw, ch = picture.width // width, picture.height // height
        x, y = (n % width) * cw, (n // width) * ch
        ImageDraw.Draw(picture).rectangle((x, y, x + cw - 1, y + ch - 1), outline=(255, 220, 0))
    return picture


class FixTokenRows(Node):
    """Keep the top rows of a token grid and free the rest: continue or outpaint below."""

    category = "autoregressive"
    inputs = (Input("tokens", "TOKENS"), Input("rows", "INT", default=8, min=0, max=MAX_GRID))
    outputs = (Output("tokens", "TOKENS"),)

    def execute(self, ctx: ExecutionContext, tokens: TokenGrid, rows: int):
        return (tokens.fix_rows(rows),)


class TokenRegion(Node):
    """Keep a rectangle of a token grid (or everything outside it) and free the rest."""

    category = "autoregressive"
    inputs = (
        Input("tokens", "TOKENS"),
        Input("x", "INT", default=0, min=0, max=MAX_GRID),
        Input("y", "INT", default=0, min=0, max=MAX_GRID),
        Input("width", "INT", default=8, min=0, max=MAX_GRID),
        Input("height", "INT", default=8, min=0, max=MAX_GRID),
        Input("keep", "STRING", default="inside", choices=("inside", "outside")),
    )
    outputs = (Output("tokens", "TOKENS"),)

    def execute(
        self, ctx: ExecutionContext, tokens: TokenGrid, x: int, y: int, width: int, height: int, keep: str
    ):
        return (tokens.fix_region(y, x, height, width, inside=keep == "inside"),)
