"""Next-scale (VAR) nodes: multi-scale tokenizer, scale-by-scale generation, variations.

MULTISCALE_TOKENS (`engines.multiscale_vq.MultiScaleTokens`, one id map per scale, coarse to
fine) is this paradigm's latent; it is a type of its own, so a raster TOKENS grid and a
multi-scale value are never wired into each other. MultiScaleTokenize / MultiScaleDecode cross
between pixels and scales (decode can stop after the first k scales); VARGenerate predicts
scale after scale, shows each one as a preview, and with `keep_scales` = k keeps a source
image's first k scales and samples the rest: variations with the source's composition.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tessera.engines.ar_decoding import SCHEDULES
from tessera.engines.checkpoint import CheckpointError
from tessera.engines.conditioning import Conditioning
from tessera.engines.generation import fhat_to_image, scales_to_image
from tessera.engines.layouts import header_weights
from tessera.engines.multiscale_vq import (
    MultiScaleTokens,
    MultiScaleVQ,
    infer_multiscale_vq_config,
    load_multiscale_vq,
)
from tessera.engines.var import VAR, condition_rows, infer_var_config, load_var, sample_scales
from tessera.images import tensor_to_pil
from tessera.node import MAX_SEED, ExecutionContext, Input, Node, NodeError, Output

MAX_SCALES = 64


class LoadVARModel(Node):
    """Load a next-scale (VAR) transformer: FoundationVision's (converted) or a Tessera-trained one."""

    category = "next_scale"
    inputs = (
        Input("file", "STRING", model_folder="ar_models", model_family="VAR transformer", link="widget"),
    )
    outputs = (Output("model", "VAR_MODEL"),)

    @classmethod
    def describe(cls, ctx: ExecutionContext, constants: dict, upstream: dict[str, dict]) -> dict[str, dict]:
        """Its condition (class count, caption widths) and scales, from the file header (Node.describe)."""
        path = ctx.model_file("ar_models", constants["file"], "file")
        try:
            sd, metadata, _ = header_weights(path)
            c = infer_var_config(sd, metadata)
        except (CheckpointError, KeyError, TypeError, ValueError):
            return {"model": {}}  # execute names what is wrong with the file
        facts = {"num_classes": c.num_classes, "caption_dim": c.caption_dim, "pooled_dim": c.pooled_dim}
        return {"model": {**facts, "patch_nums": list(c.patch_nums), "vocab_size": c.vocab_size}}

    def execute(self, ctx: ExecutionContext, file: str):
        try:
            return (load_var(ctx.model_file("ar_models", file, "file"), "cpu", ctx.dtype),)  # moved when used
        except CheckpointError as e:
            raise NodeError(str(e), input="file") from None


class LoadMultiScaleVQ(Node):
    """Load a multi-scale VQ tokenizer (VAR's VQVAE layout): images to one token map per scale and back."""

    category = "next_scale"
    inputs = (
        Input(
            "file", "STRING", model_folder="vq_models", model_family="multi-scale VQ tokenizer", link="widget"
        ),
    )
    outputs = (Output("vq", "MULTISCALE_VQ"),)

    @classmethod
    def describe(cls, ctx: ExecutionContext, constants: dict, upstream: dict[str, dict]) -> dict[str, dict]:
        path = ctx.model_file("vq_models", constants["file"], "file")
        try:
            sd, metadata, _ = header_weights(path)
            c = infer_multiscale_vq_config(sd, metadata)
        except (CheckpointError, KeyError, TypeError, ValueError):
            return {"vq": {}}
        return {"vq": {"patch_nums": list(c.patch_nums), "vocab_size": c.vocab_size}}

    def execute(self, ctx: ExecutionContext, file: str):
        try:
            return (load_multiscale_vq(ctx.model_file("vq_models", file, "file"), "cpu", ctx.dtype),)
        except CheckpointError as e:
            raise NodeError(str(e), input="file") from None


class MultiScaleTokenize(Node):
    """Turn images into multi-scale token maps (center-cropped to a square and resized to the tokenizer's size)."""

    category = "next_scale"
    inputs = (Input("vq", "MULTISCALE_VQ"), Input("image", "IMAGE"))
    outputs = (Output("tokens", "MULTISCALE_TOKENS"),)

    def execute(self, ctx: ExecutionContext, vq: MultiScaleVQ, image: torch.Tensor):
        side = vq.config.image_size
        _, h, w, _ = image.shape
        s = min(h, w)
        top, left = (h - s) // 2, (w - s) // 2
        pixels = image[:, top : top + s, left : left + s].permute(0, 3, 1, 2).float()
        if s != side:
            pixels = F.interpolate(pixels, size=(side, side), mode="bicubic", antialias=True).clamp(0, 1)
        return (vq.encode((pixels * 2 - 1).to(ctx.device)).to("cpu"),)


class MultiScaleDecode(Node):
    """Turn multi-scale token maps back into images, from all scales or only the first `scales` (0 = all)."""

    category = "next_scale"
    inputs = (
        Input("vq", "MULTISCALE_VQ"),
        Input("tokens", "MULTISCALE_TOKENS"),
        Input("scales", "INT", default=0, min=0, max=MAX_SCALES),
    )
    outputs = (Output("image", "IMAGE"),)

    def execute(self, ctx: ExecutionContext, vq: MultiScaleVQ, tokens: MultiScaleTokens, scales: int):
        try:
            return (scales_to_image(vq, tokens, scales or None),)
        except ValueError as e:
            raise NodeError(str(e), input="tokens") from None


class VARGenerate(Node):
    """Generate images with a next-scale (VAR) model, coarse to fine, one preview per scale.

    Conditioning is a class id (class models) or a caption (`positive`; caption models).
    Guidance mixes cond and uncond logits (the negative prompt if given, else the model's null
    caption or class); "linear" ramps it as VAR does, from none at the first scale to `cfg` at
    the last. With a `source` and `keep_scales` = k, the source's first k scales are kept and the
    rest sampled: variations that keep the composition and change the details. Image k of a
    batch is the image seed + k gives alone.
    """

    category = "next_scale"
    inputs = (
        Input("model", "VAR_MODEL"),
        Input("vq", "MULTISCALE_VQ"),
        Input("positive", "CONDITIONING", optional=True),
        Input("negative", "CONDITIONING", optional=True),
        Input("class_id", "INT", default=0, min=0, max=100_000),
        Input("batch_size", "INT", default=1, min=1, max=64),
        Input("cfg", "FLOAT", default=4.0, min=0.0, max=50.0, step=0.1),
        Input("guidance_schedule", "STRING", default="linear", choices=tuple(SCHEDULES)),
        Input("temperature", "FLOAT", default=1.0, min=0.0, max=5.0, step=0.05),
        Input("top_k", "INT", default=0, min=0, max=1_000_000),
        Input("top_p", "FLOAT", default=1.0, min=0.0, max=1.0, step=0.01),
        Input("seed", "INT", default=0, min=0, max=MAX_SEED, widget="seed"),
        Input("source", "MULTISCALE_TOKENS", optional=True),
        Input("keep_scales", "INT", default=0, min=0, max=MAX_SCALES),
        Input("preview", "BOOLEAN", default=True),
    )
    outputs = (Output("image", "IMAGE"), Output("tokens", "MULTISCALE_TOKENS"))

    @classmethod
    def check(cls, constants: dict, linked: frozenset[str]) -> list[NodeError]:
        if constants.get("keep_scales", 0) and "source" not in linked:
            return [NodeError("keep_scales > 0 keeps a source's scales: link source tokens", input="source")]
        return []

    @classmethod
    def describe(cls, ctx: ExecutionContext, constants: dict, upstream: dict[str, dict]) -> dict[str, dict]:
        """Refuse, before anything runs, a caption model without a positive or with text features of
        other widths, and a tokenizer whose scales or codebook are not the model's."""
        model, vq = upstream.get("model", {}), upstream.get("vq", {})
        if (
            "patch_nums" in model
            and "patch_nums" in vq
            and (model["patch_nums"] != vq["patch_nums"] or model["vocab_size"] != vq["vocab_size"])
        ):
            raise NodeError(
                f"this tokenizer (scales {vq['patch_nums']}, {vq['vocab_size']} codes) is not the VAR model's "
                f"(scales {model['patch_nums']}, {model['vocab_size']} codes)",
                input="vq",
            )
        if model.get("pooled_dim"):
            if "positive" not in upstream:
                raise NodeError(
                    "this VAR model is text-conditioned: link a positive CONDITIONING", input="positive"
                )
            for name in ("positive", "negative"):
                cond = upstream.get(name, {})
                for part, width in (("tokens", model.get("caption_dim")), ("pooled", model["pooled_dim"])):
                    if width and part in cond and cond[part] != width:
                        made_by = f" (made by {cond['source']})" if cond.get("source") else ""
                        raise NodeError(
                            f"{cls.type_name} {name}: {part} text features{made_by} are {cond[part]}-dim but this "
                            f"VAR model expects {width} (use the text encoder it was trained with)",
                            input=name,
                        )
        return {"image": {}, "tokens": {}}

    def execute(
        self,
        ctx: ExecutionContext,
        model: VAR,
        vq: MultiScaleVQ,
        class_id: int,
        batch_size: int,
        cfg: float,
        guidance_schedule: str,
        temperature: float,
        top_k: int,
        top_p: float,
        seed: int,
        keep_scales: int,
        preview: bool = True,
        positive: Conditioning | None = None,
        negative: Conditioning | None = None,
        source: MultiScaleTokens | None = None,
    ):
        mc = model.config
        if mc.is_caption and positive is None:
            raise NodeError(
                "this VAR model is text-conditioned: link a positive CONDITIONING", input="positive"
            )
        if not mc.is_caption and class_id >= mc.num_classes:
            raise NodeError(f"class_id must be below {mc.num_classes}", input="class_id")
        if keep_scales > len(mc.patch_nums):
            raise NodeError(
                f"this model has {len(mc.patch_nums)} scales; keep_scales is {keep_scales}",
                input="keep_scales",
            )
        if keep_scales and source is None:
            raise NodeError("keep_scales > 0 keeps a source's scales: link source tokens", input="source")
        if list(vq.patch_nums) != list(mc.patch_nums) or vq.config.vocab_size != mc.vocab_size:
            raise NodeError(
                f"this tokenizer (scales {vq.patch_nums}, {vq.config.vocab_size} codes) is not the VAR model's "
                f"(scales {mc.patch_nums}, {mc.vocab_size} codes)",
                input="vq",
            )
        texts = [c for c in (positive, negative) if c is not None] if mc.is_caption else []
        batches = [batch_size] + [c.batch for c in texts] + ([source.batch] if keep_scales else [])
        batch = max(batches)
        if any(b not in (1, batch) for b in batches):
            raise NodeError(
                f"batch sizes {batches} do not match (each must be 1 or {batch})", input="batch_size"
            )
        try:
            cond = condition_rows(
                model, batch, positive=positive, negative=negative, class_ids=[class_id], cfg=cfg != 1.0
            )
        except ValueError as e:
            raise NodeError(str(e), input="positive") from None
        total = len(mc.patch_nums)

        def on_scale(info: dict) -> None:
            picture = tensor_to_pil(fhat_to_image(vq, info["f_hat"][:1]))[0] if preview else None
            ctx.progress(info["i"] + 1, total, picture)

        try:
            tokens, f_hat = sample_scales(
                model,
                vq.quantize,
                cond,
                batch,
                cfg=cfg,
                schedule=guidance_schedule,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                seed=seed,
                source=source,
                keep_scales=keep_scales,
                callback=on_scale,
            )
        except ValueError as e:
            raise NodeError(str(e), input="source" if keep_scales else "model") from None
        return (fhat_to_image(vq, f_hat), tokens.to("cpu"))
