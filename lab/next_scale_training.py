"""Training recipes of the built-in next-scale (VAR) pair: a multi-scale residual VQ tokenizer and
the VAR transformer that predicts its token maps coarse to fine.

Both run through `lab.training.fit` (the one loop: resume, pacing, lr, EMA, state, log) on the
same `lab.synthetic` train stream as the other built-ins. The tokenizer (`train_msvq`) learns
VAR's way: the encoder's features are quantised over the scale list (1x1 ... 8x8 for a 64x64
image, one map per scale), with VAR's loss β·|sg(f̂) − f|² + |f̂ − sg(f)|² averaged over the
scales, a straight-through gradient to the encoder and the lab's reconstruction loss; codes
unused for a while are re-seeded from residuals the quantiser had to explain. The transformer
(`train_var`) reads the same frozen text encoder as the DiT and the GPT, sees the same examples
in the same order (same stream, seed, batch and caption-dropout draw) and is sized to their
parameter count; its loss is cross-entropy over every scale's tokens at once, teacher-forced
from the ground-truth coarser scales (VAR's trainer, uniform weight per token).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from tessera.engines.conditioning import Conditioning
from tessera.engines.generation import generate_next_scale
from tessera.engines.multiscale_vq import (
    MultiScaleQuantizer,
    MultiScaleVQ,
    MultiScaleVQConfig,
    load_multiscale_vq,
    save_multiscale_vq,
)
from tessera.engines.text_encoder import TextEncoder, load_text_encoder
from tessera.engines.var import VAR, VARConfig, load_var, save_var, teacher_forced_logits

from . import synthetic
from .objectives import drop_captions, step_generator
from .training import (
    EMA,
    TRAIN_KINDS,
    RunOptions,
    _adamw,
    _autocast,
    _card,
    _continued,
    _decoder_side,
    _frozen,
    _generator_card_fields,
    _heldout_reconstruction,
    _recon_loss,
    _setup,
    _stage_fields,
    _stored,
    count_params,
    fit,
    psnr,
)

# The 64x64 tokenizer: f8 like the raster VQ (an 8x8 top grid, as the GPT's), six scales.
MSVQ_CONFIG = MultiScaleVQConfig(
    channels=32,
    ch_mult=[1, 2, 2, 2],
    num_res_blocks=1,
    attn_deepest=False,
    mid_attn=True,
    z_channels=64,  # as the raster VQ's, so its trained convolutions can start this one (raster_vq_convs)
    vocab_size=1024,
    patch_nums=[1, 2, 3, 4, 6, 8],
    quant_resi=0.5,
    share_quant_resi=4,
    norm_groups=4,
)


# ---------------------------------------------------------------- multi-scale VQ


def raster_vq_convs(model: MultiScaleVQ, path: Path) -> dict:
    """Copy a trained raster VQ's encoder and decoder convolutions (LlamaGen layout, `tessera train
    vq`) into `model` (VAR layout) by name: a warm start whose conv stacks already see and paint the
    scenes. Quantiser, codebook and the 3x3 quant convs stay fresh. Refuses a raster VQ of other
    sizes, naming the first tensor that does not fit; returns card fields naming the source file."""
    from tessera.engines.checkpoint import CheckpointError, read_safetensors

    from .training import file_digest

    sd, _ = read_safetensors(path)
    levels = len(model.config.ch_mult)
    renamed: dict[str, Tensor] = {}
    for key, value in sd.items():
        parts = key.split(".")
        if parts[0] not in ("encoder", "decoder"):
            continue
        if parts[1] == "conv_blocks":
            level = int(parts[2]) if parts[0] == "encoder" else levels - 1 - int(parts[2])
            inner = parts[3:]
            if inner[0] == "res":
                inner = ["block", *inner[1:]]
            renamed[".".join([parts[0], "down" if parts[0] == "encoder" else "up", str(level), *inner])] = (
                value
            )
        elif parts[1] == "mid":
            block = {"0": "block_1", "1": "attn_1", "2": "block_2"}[parts[2]]
            renamed[".".join([parts[0], "mid", block, *parts[3:]])] = value
        else:
            renamed[key] = value
    for side in ("encoder", "decoder"):  # the raster VQ's separate q, k, v 1x1 convs -> one fused qkv
        for what in ("weight", "bias"):
            qkv = [renamed.pop(f"{side}.mid.attn_1.{n}.{what}", None) for n in "qkv"]
            if all(t is not None for t in qkv):
                renamed[f"{side}.mid.attn_1.qkv.{what}"] = torch.cat(qkv)
    own = model.state_dict()
    for key, value in renamed.items():
        if key not in own or own[key].shape != value.shape:
            raise CheckpointError(
                path,
                f"its convolutions do not fit this multi-scale VQ ({key}: "
                f"{tuple(value.shape)} vs {tuple(own[key].shape) if key in own else 'absent'})",
            )
    missing = [k for k in own if k.startswith(("encoder.", "decoder.")) and k not in renamed]
    if missing:
        raise CheckpointError(path, f"lacks convolutions this multi-scale VQ needs, e.g. {missing[0]}")
    model.load_state_dict(renamed, strict=False)
    return {"convolutions_from": {"file": Path(path).name, "sha256_16": file_digest(path)}}


@torch.no_grad()
def scale_residuals(quantize: MultiScaleQuantizer, f: Tensor) -> tuple[list[Tensor], Tensor]:
    """The ids each scale takes for features `f` and the residual vectors it quantised ([N, Cvae],
    every scale's cells), by the quantiser's own nearest/add_scale (what `tokenize` does)."""
    f = f.float()
    f_hat = torch.zeros_like(f)
    maps, rests = [], []
    last = len(quantize.patch_nums) - 1
    for si, pn in enumerate(quantize.patch_nums):
        rest = f - f_hat
        rest = rest if si == last else F.interpolate(rest, size=(pn, pn), mode="area")
        ids = quantize.nearest(rest)
        maps.append(ids)
        rests.append(rest.permute(0, 2, 3, 1).reshape(-1, rest.shape[1]))
        f_hat = quantize.add_scale(f_hat, ids, si)
    return maps, torch.cat(rests)


@torch.no_grad()
def reseed_dead_codes(
    quantize: MultiScaleQuantizer, usage: Tensor, pool: Tensor, gen: torch.Generator
) -> int:
    """Point every code unused since the last check at a random residual from `pool` (plus a little noise)."""
    dead = (usage == 0).nonzero().flatten()
    if len(dead) == 0:
        return 0
    pick = torch.randint(0, pool.shape[0], (len(dead),), generator=gen).to(pool.device)
    scale = pool.std() * 0.01
    noise = torch.randn(len(dead), pool.shape[1], generator=gen).to(pool.device) * scale
    weight = quantize.embedding.weight
    weight[dead] = (pool[pick] + noise).to(weight.dtype)
    return len(dead)


@torch.no_grad()
def msvq_codebook_usage(model: MultiScaleVQ, options: RunOptions, batches: int = 4) -> float:
    """Share of the codebook used by 512 training images over all scales."""
    used = torch.zeros(model.config.vocab_size, dtype=torch.bool)
    for i in range(batches):
        images = synthetic.make_batch(128, options.seed + 7, i, "train", TRAIN_KINDS).images
        for ids in model.encode(images).maps:
            used[ids.flatten().cpu()] = True
    return round(float(used.float().mean()), 3)


@torch.no_grad()
def psnr_by_scales(model: MultiScaleVQ, n: int = 64, seed: int = 1) -> dict[str, float]:
    """Held-out PSNR (dB) decoding only the first k scales, k = 1 … all: how much each scale adds."""
    images = synthetic.make_batch(n, seed, 0, "heldout").images
    tokens = model.encode(images)
    return {
        f"{k}:{pn}x{pn}": round(psnr(model.decode(tokens, k), images), 2)
        for k, pn in enumerate(model.patch_nums, start=1)
    }


def msvq_loss(
    model: MultiScaleVQ,
    x: Tensor,
    decoder_only: bool = False,
    forward_context: Callable[[], AbstractContextManager] = contextlib.nullcontext,
) -> tuple[Tensor, dict]:
    """The tokenizer's training loss on images x [B, 3, 64, 64] in [-1, 1]: the lab's reconstruction
    loss plus VAR's VQ loss (reconstruction alone for `decoder_only`); with the pieces the step logs
    (features, reconstruction, vq, l1, the id maps)."""
    with forward_context(), torch.set_grad_enabled(torch.is_grad_enabled() and not decoder_only):
        f = model.features(x).float()
    f_hat, vq_loss, maps = model.quantize(f)
    with forward_context():
        y = model.decoder(model.post_quant_conv(f_hat)).float()
    recon, l1 = _recon_loss(y, x)
    loss = recon if decoder_only else recon + vq_loss
    return loss, {"features": f, "reconstruction": y, "vq": vq_loss, "l1": l1, "maps": maps}


def train_msvq(
    options: RunOptions,
    config: MultiScaleVQConfig = MSVQ_CONFIG,
    reinit_every: int = 50,
    init_from: Path | None = None,
    decoder_only: bool = False,
    convs_from: Path | None = None,
) -> dict:
    """The multi-scale residual VQ tokenizer (VAR's VQVAE) on 64x64 synthetic scenes.

    Loss: the lab's reconstruction loss (L1 + 0.5 L2 + 0.5 image-gradient L1) plus VAR's VQ loss;
    codes unused for `reinit_every` steps are re-seeded from the batch's residuals (until 90% of
    the run). `decoder_only` (with `init_from`) keeps encoder, codebook and φ, so every image keeps
    its tokens (a VAR trained on them stays valid), and trains the decoder alone. `convs_from` (a
    trained raster VQ) starts the encoder and decoder from its convolutions (`raster_vq_convs`).
    """
    _setup(options)
    lr = options.lr or 1e-3
    if decoder_only and not init_from:
        raise ValueError("decoder-only training continues a trained multi-scale VQ: pass init_from")
    if init_from and convs_from:
        raise ValueError(
            "pass init_from (a multi-scale VQ to continue) or convs_from (a raster VQ), not both"
        )
    model = load_multiscale_vq(init_from) if init_from else MultiScaleVQ(config)
    warm = raster_vq_convs(model, convs_from) if convs_from else {}
    config = model.config
    if config.patch_nums[-1] * config.downsample != synthetic.IMAGE_SIZE:
        raise ValueError(
            f"the tokenizer's last scale {config.patch_nums[-1]} x {config.downsample} does not make "
            f"the {synthetic.IMAGE_SIZE}x{synthetic.IMAGE_SIZE} training images"
        )
    model = model.to(options.device).requires_grad_(not decoder_only)
    trainable = _decoder_side(model, decoder_only)
    opt = _adamw(trainable, options, lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    usage = torch.zeros(config.vocab_size, device=options.device)
    model.train()

    def msvq_step(step: int, batch: synthetic.Batch) -> tuple[Tensor, Callable[[], dict]]:
        x = batch.images
        loss, parts = msvq_loss(model, x, decoder_only, lambda: _autocast(options))
        f, y, vq_loss, l1, maps = (parts[k] for k in ("features", "reconstruction", "vq", "l1", "maps"))

        def after_update() -> dict:  # usage and dead codes are counted against the updated codebook
            nonlocal usage
            ids = torch.cat([m.flatten() for m in maps])
            counts = torch.bincount(ids, minlength=config.vocab_size).float()
            usage += counts
            if not decoder_only and (step + 1) % reinit_every == 0 and step + 1 < options.steps * 0.9:
                _, pool = scale_residuals(model.quantize, f.detach())
                reseed_dead_codes(model.quantize, usage, pool, step_generator(options.seed + 23, step))
                usage.zero_()
            p = counts / counts.sum()
            perplexity = float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum()))
            return {
                "l1": l1.item(),
                "vq": vq_loss.item(),
                "perplexity": perplexity,
                "psnr": psnr(y.detach(), x),
            }

        return loss, after_update

    log = fit(options, "var-vq", {"model": model}, opt, trainable, msvq_step, lr=lr, warmup_divisor=50)
    model.eval()
    stored = _stored(model).float()
    evaluation = _heldout_reconstruction(lambda x: stored.decode(stored.encode(x)))
    evaluation["codebook_usage"] = msvq_codebook_usage(stored, options)
    evaluation["psnr_db_by_scales"] = psnr_by_scales(stored)
    log.write({"event": "heldout_reconstruction", **evaluation})
    print(f"[var-vq] held-out {evaluation}", flush=True)
    card = _card(
        "msvq",
        options,
        log,
        model,
        options.steps,
        heldout_reconstruction=evaluation,
        **warm,
        **_stage_fields(init_from, decoder_only, model.encoder, model.quant_conv, model.quantize),
        losses=f"L1 + 0.5 L2 + 0.5 image-gradient L1 + VAR's VQ loss ({config.beta} |sg(f_hat) - f|^2 + "
        f"|f_hat - sg(f)|^2, averaged over the scales; straight-through); unused codes re-seeded from "
        f"residuals every {reinit_every} steps",
        tokens=f"{len(config.patch_nums)} scales {config.patch_nums} of {config.vocab_size} codes "
        f"({sum(p * p for p in config.patch_nums)} tokens) for {config.image_size}x{config.image_size}x3",
    )
    options.out.parent.mkdir(parents=True, exist_ok=True)
    save_multiscale_vq(_stored(model), options.out, card)
    log.close()
    return json.loads(card)


# ---------------------------------------------------------------- VAR transformer


def var_config(vocab_size: int, cvae: int, patch_nums: list[int], pooled_dim: int) -> VARConfig:
    """The tiny caption VAR: 7 AdaLN blocks of width 256 (FFN 896), sized to the DiT's and the GPT's
    parameter count (8.37 M against 8.09 M and 8.30 M). The caption enters as VAR's class vector
    does (the pooled text vector: AdaLN condition and start token), so its sequence is the 130 image
    tokens alone."""
    return VARConfig(
        depth=7,
        width=256,
        heads=4,
        ffn_hidden=896,
        vocab_size=vocab_size,
        cvae=cvae,
        patch_nums=list(patch_nums),
        num_classes=0,
        caption_dim=0,
        pooled_dim=pooled_dim,
    )


def next_scale_loss(
    model: VAR,
    msvq: MultiScaleVQ,
    cond: Conditioning,
    images: Tensor,
    drop: Tensor,
    forward_context: Callable[[], AbstractContextManager] = contextlib.nullcontext,
) -> tuple[Tensor, Tensor, Tensor]:
    """VAR's training loss on images [B, 3, 64, 64] in [-1, 1]: (mean cross-entropy over every token
    of every scale, the logits [B, L, V], the target ids [B, L]). The tokenizer encodes under
    `forward_context()` (autocast) without gradients; captions where `drop` [B] is set take the
    model's learned null caption, which is the uncond row CFG uses at sampling."""
    with torch.no_grad(), forward_context():
        tokens = msvq.encode(images)
    with forward_context():
        logits = teacher_forced_logits(model, msvq.quantize, model.caption_condition(cond, drop), tokens)
    target = tokens.flat().to(logits.device)
    return F.cross_entropy(logits.float().flatten(0, 1), target.flatten()), logits, target


def train_var(
    options: RunOptions,
    text_encoder_path: Path,
    msvq_path: Path,
    config: VARConfig | None = None,
    ema_decay: float = 0.999,
    init_from: Path | None = None,
) -> dict:
    """Next-scale cross-entropy over every scale's tokens, teacher-forced from the true coarser scales;
    10% of captions become the learned null caption (the same draw as the DiT's and the GPT's).

    `init_from` (a trained file) continues its weights with a fresh optimizer and schedule.
    """
    _setup(options)
    lr = options.lr or 1e-3
    dev = options.device
    te = _frozen(load_text_encoder(text_encoder_path)).to(dev)
    msvq = _frozen(load_multiscale_vq(msvq_path)).to(dev)
    if init_from:
        model = load_var(init_from).requires_grad_(True)
        config = model.config
    else:
        mc = msvq.config
        config = config or var_config(mc.vocab_size, mc.z_channels, mc.patch_nums, te.config.pooled_dim)
        model = VAR(config).init_weights(seed=options.seed)
    if list(config.patch_nums) != list(msvq.patch_nums) or config.cvae != msvq.config.z_channels:
        raise ValueError(
            f"VAR scales {config.patch_nums} / dim {config.cvae} do not fit the tokenizer {msvq_path} "
            f"(scales {msvq.patch_nums}, dim {msvq.config.z_channels})"
        )
    model.to(dev)
    ema = EMA(model, ema_decay)
    opt = _adamw(model.parameters(), options, lr=lr, betas=(0.9, 0.95), weight_decay=0.05)
    model.train()
    last = config.patch_nums[-1] ** 2

    def var_step(step: int, batch: synthetic.Batch) -> tuple[Tensor, Callable[[], dict]]:
        gen = step_generator(options.seed, step)
        # the same draw as the DiT's and the GPT's, so all three generators drop the same captions
        _, drop = drop_captions(batch.captions, gen)
        with torch.no_grad():
            cond = te.encode(batch.captions)  # fp32, as the nodes run it
        loss, logits, target = next_scale_loss(
            model, msvq, cond, batch.images, drop, lambda: _autocast(options)
        )

        def stats() -> dict:
            hit = logits.detach().argmax(-1) == target
            return {"acc": float(hit.float().mean()), "acc_last_scale": float(hit[:, -last:].float().mean())}

        return loss, stats

    shape = f"[var] {count_params(model) / 1e6:.2f}M parameters, config {json.dumps(asdict(config))}"
    log = fit(options, "var", {"model": model, "ema": ema.shadow}, opt, list(model.parameters()), var_step,
              lr=lr, warmup_divisor=25, ema=(ema, model), before=lambda _: print(shape, flush=True))  # fmt: skip
    card = _card(
        "var",
        options,
        log,
        model,
        options.steps,
        ema_decay=ema_decay,
        objective=f"next-scale cross-entropy over all {config.seq_len} tokens of the {len(config.patch_nums)} "
        f"scales {config.patch_nums}, each scale teacher-forced from the true coarser ones (block-causal), "
        "uniform weight per token; dropped captions use the learned null caption (null_pooled); "
        "weights are the EMA",
        sequential_passes=len(config.patch_nums),
        **_generator_card_fields(
            text_encoder_path, msvq_path, "msvq", msvq.encoder, msvq.quant_conv, msvq.quantize
        ),
        **_continued(init_from),
    )
    options.out.parent.mkdir(parents=True, exist_ok=True)
    save_var(_stored(ema.shadow), options.out, card)
    log.close()
    return json.loads(card)


# ---------------------------------------------------------------- evaluation on held-out captions


@torch.no_grad()
def sample_var(
    model: VAR,
    msvq: MultiScaleVQ,
    te: TextEncoder,
    captions: list[str],
    *,
    seed: int = 0,
    cfg: float = 2.0,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    batch: int = 32,
) -> Tensor:
    """Images [B, 64, 64, 3] in 0..1 (CPU) for `captions` through `generate_next_scale`, `batch` at a
    time (image k from seed + k), CFG against the learned null caption ramped over the scales."""
    return torch.cat([
        generate_next_scale(model, msvq, te.encode(captions[i : i + batch]), seed=seed + i, cfg=cfg,
                            temperature=temperature, top_k=top_k, top_p=top_p).cpu()
        for i in range(0, len(captions), batch)
    ])  # fmt: skip
