"""Training adapters on the built-in models: `tessera train lora …` and `tessera train controlnet …`.

- LoRA on the DiT or the GPT teaches a concept the base never saw: a new size word ("giant"),
  drawn as synthetic shape scenes (lab/synthetic.py) with a 40–48 px object, mixed with ordinary scenes
  so the rest of what the model knows stays put. The DiT learns with the flow-matching loss
  (velocity ε − x₀ at σ ~ logit-normal), the GPT with next-token cross-entropy over VQ tokens;
  both with 10% caption dropout so classifier-free guidance keeps working. Only the low-rank
  factors train: the model runs through `with_loras`, exactly as the LoadLoRA node applies it.
- ControlNet on the DiT learns edges → scene: the hint is the VAE latent of the scene's Canny
  edges (engines/preprocess.py), the net starts as a copy of the DiT's first blocks with zeroed
  heads (diffusers' `from_transformer`), the DiT stays frozen, and the net is driven through
  `with_control` as the ApplyControlNet node drives it.

Everything runs on CPU in minutes at the built-in models' 64×64 scale.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tessera.engines.checkpoint import read_safetensors, write_safetensors
from tessera.engines.conditioning import Conditioning
from tessera.engines.controlnet import (
    LOGITS,
    ARControlConfig,
    ARControlNet,
    ControlHint,
    FluxControlNet,
    controlnet_from_dit,
    gpt_fingerprint,
    load_any_controlnet,
    save_ar_controlnet,
    save_controlnet,
    with_ar_control,
    with_control,
)
from tessera.engines.flux import Flux, load_dit
from tessera.engines.gpt import GPT, load_gpt
from tessera.engines.layouts import detect_family, stored_keys
from tessera.engines.lora import Lora, Update, load_lora, with_loras
from tessera.engines.preprocess import canny_image, component_labels
from tessera.engines.text_encoder import TextEncoder, load_text_encoder
from tessera.engines.vae import AutoencoderKL, load_vae
from tessera.engines.vq import VQModel, load_vq

from . import synthetic
from .objectives import drop_captions, flow_matching_loss, step_generator, teacher_forced_logits, token_loss
from .training import _trainable_flux, bf16_is_fast, fit, hardware, step_numbers

# A size word the built-in models never saw: every object they were shown is 17–22 px wide.
# (A new colour word was tried first and dropped: the built-in VAE and VQ, trained on eight
# colours, cannot reproduce a ninth — a pink scene survives their round trip in 44% / 19% of
# images — so no generator adapter can draw it.)
CONCEPT = "giant"
GIANT_SIZES = (40, 48)  # px, on the 64 px canvas
GIANT_EXTENT = 34  # px: the least extent that counts as giant, well clear of the 22 px of ordinary objects
# ControlNets: half the captions empty (the ControlNet paper's recipe), so the net must learn to
# read the scene from the control image alone rather than lean on the caption.
CONTROL_CAPTION_DROPOUT = 0.5
# GPT control: up to this share of each image's teacher-forced input tokens is replaced by random
# ids (targets unchanged). Without it the GPT predicts from its true context and barely reads the
# control (teacher-forced accuracy 0.36 -> 0.54, yet free decoding ignores the edges).
CONTEXT_CORRUPTION = 0.5
HEAD_SHARE = 0.5  # of a deadline run's time, at most, for the GPT control's head-only stage


# ---------------------------------------------------------------- data


def giant_caption(attributes: dict, variant: int = 0) -> str:
    """The caption of a giant-object scene, in the two phrasings of ordinary shape captions."""
    obj, bg = f"a giant {attributes['color']} {attributes['shape']}", attributes["background"]
    return f"{obj} on {synthetic._a(bg)} background" if variant % 2 == 0 else f"{obj}, {bg} background"


def concept_sample(seed: int, index: int) -> synthetic.Sample:
    """A shape scene whose object is drawn giant (40–48 px, near the centre), captioned with the new word."""
    rng = random.Random(seed * 1_000_003 + index)
    attrs = synthetic.sample_attributes(rng, "shape")
    attrs = {k: attrs[k] for k in ("kind", "shape", "color", "background")} | {"size": CONCEPT}
    size = rng.randint(*GIANT_SIZES)
    cx, cy = (synthetic.IMAGE_SIZE / 2 + rng.uniform(-4, 4) for _ in range(2))
    image = synthetic.render_shape(attrs["shape"], attrs["color"], attrs["background"], size, cx, cy)
    return synthetic.Sample(image, giant_caption(attrs, rng.randrange(2)), attrs)


def concept_batch(batch_size: int, seed: int, step: int, fraction: float = 0.5) -> synthetic.Batch:
    """`fraction` new-concept scenes, the rest ordinary synthetic scenes (what keeps the base's skills)."""
    rng = random.Random(seed * 7919 + step)
    samples = []
    for i in range(batch_size):
        index = step * batch_size + i
        if rng.random() < fraction:
            samples.append(concept_sample(seed, index))
        else:
            samples.append(synthetic.make_sample(seed + 1, index))
    images = np.stack([s.image for s in samples])
    return synthetic.Batch(
        synthetic.to_training_tensor(images), [s.caption for s in samples], [s.attributes for s in samples]
    )


def largest_object(image: np.ndarray, distance: float = 60.0) -> np.ndarray:
    """Mask [H, W] of the largest connected region that differs from the background (the border's median colour)."""
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    differs = np.linalg.norm(image - np.median(border, axis=0), axis=-1) > distance
    if not differs.any():
        return differs
    labels = component_labels(differs)
    return labels == np.bincount(labels[differs]).argmax()


def shows_concept(image: np.ndarray, color: str) -> bool:
    """Whether an image [H, W, 3] (0..1) shows a giant object of `color`.

    Giant: the largest object spans at least GIANT_EXTENT px; its colour: the palette colour
    nearest the object's median pixel (the scorers' test).
    """
    img = image.astype(np.float32) * 255
    mask = largest_object(img)
    ys, xs = np.nonzero(mask)
    if not len(ys) or max(ys.max() - ys.min(), xs.max() - xs.min()) + 1 < GIANT_EXTENT:
        return False
    palette = np.array(list(synthetic.COLORS.values()), np.float32)
    median = np.median(img[mask], axis=0)
    return list(synthetic.COLORS)[int(np.linalg.norm(palette - median, axis=-1).argmin())] == color


def concept_rate(images: torch.Tensor, colors: Sequence[str]) -> float:
    """Share of images [B, H, W, 3] (0..1) that show a giant object in the colour their prompt asked for."""
    return float(np.mean([shows_concept(img, c) for img, c in zip(images.float().numpy(), colors)]))


def edge_map(images_uint8: np.ndarray, sigma: float = 1.4) -> torch.Tensor:
    """Canny edges of uint8 [B, H, W, 3] scenes as IMAGE values [B, H, W, 3] (white on black)."""
    return canny_image(torch.from_numpy(images_uint8).float() / 255, sigma=sigma)


def edge_iou(a: np.ndarray, b: np.ndarray, tolerance: int = 1) -> float:
    """IoU of two edge maps [H, W] bool, each dilated by `tolerance` px (edges a pixel off still agree)."""

    def grow(m: np.ndarray) -> np.ndarray:
        for _ in range(tolerance):
            p = np.pad(m, 1)
            h, w = m.shape
            m = np.logical_or.reduce([p[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)])
        return m

    ga, gb = grow(a), grow(b)
    union = (ga | gb).sum()
    return float((ga & gb).sum() / union) if union else 1.0


# ---------------------------------------------------------------- LoRA factors to train


def trainable_lora(
    model: nn.Module, rank: int, alpha: float, target: Callable[[str], bool], seed: int = 0
) -> Lora:
    """Zero-effect LoRA factors (down random, up zero) on every linear whose name `target` accepts."""
    g = torch.Generator().manual_seed(seed)
    updates = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and target(name):
            w = module.weight
            down = torch.randn(rank, w.shape[1], generator=g) / math.sqrt(w.shape[1])
            down = nn.Parameter(down.to(w.device, w.dtype))
            up = nn.Parameter(torch.zeros(w.shape[0], rank, device=w.device, dtype=w.dtype))
            updates.append(Update(name + ".weight", None, alpha / rank, down=down, up=up, source=name))
    if not updates:
        raise ValueError("no linear layer matches the LoRA targets")
    return Lora("training", updates, 2 * len(updates))


def continue_lora(lora: Lora, path: str | Path, model: nn.Module) -> None:
    """Start trainable factors from a saved LoRA of the same targets (its scale folded into `up`)."""
    saved = {u.target: u for u in load_lora(path, model).updates}
    missing = [u.target for u in lora.updates if u.target not in saved]
    if missing:
        raise ValueError(f"{Path(path).name} has no factors for {len(missing)} targets, e.g. {missing[0]}")
    with torch.no_grad():
        for u in lora.updates:
            s = saved[u.target]
            if s.down.shape != u.down.shape:
                raise ValueError(
                    f"{Path(path).name}: rank {s.down.shape[0]} for {u.target}, training rank {u.down.shape[0]}"
                )
            u.down.copy_(s.down)
            u.up.copy_(s.up * (s.scale / u.scale))


def lora_parameters(lora: Lora) -> list[nn.Parameter]:
    return [t for u in lora.updates for t in (u.down, u.up)]


def lora_tensors(lora: Lora, style: str) -> dict[str, torch.Tensor]:
    """Trained factors as file tensors: "kohya" (`lora_unet_…` with alpha) or "peft" (`…lora_A/B`,
    scale folded in)."""
    tensors = {}
    for u in lora.updates:
        module = u.target.rsplit(".", 1)[0]
        down, up = u.down.detach().float().cpu().contiguous(), u.up.detach().float().cpu()
        if style == "kohya":
            stem = "lora_unet_" + module.replace(".", "_")
            tensors[stem + ".lora_down.weight"] = down
            tensors[stem + ".lora_up.weight"] = up.contiguous()
            tensors[stem + ".alpha"] = torch.tensor(u.scale * down.shape[0])
        else:
            tensors[f"base_model.model.{module}.lora_A.weight"] = down
            tensors[f"base_model.model.{module}.lora_B.weight"] = (up * u.scale).contiguous()
    return tensors


def save_lora(lora: Lora, path: str | Path, style: str, card: str = "", config: dict | None = None) -> None:
    """Write trained factors in `style` (see `lora_tensors`) with a card and config."""
    metadata = {"tessera.card": card, "tessera.config": json.dumps(config or {})}
    write_safetensors(path, lora_tensors(lora, style), metadata)


# DiT: attention (fused qkv and output projection) and MLP linears of every block
DIT_TARGETS = re.compile(
    r"^(double_blocks\.\d+\.(img|txt)_(attn\.(qkv|proj)|mlp\.[02])|single_blocks\.\d+\.linear[12])$"
)
# GPT: attention wqkv/wo and feed-forward w1/w2/w3 of every layer
GPT_TARGETS = re.compile(r"^layers\.\d+\.(attention\.(wqkv|wo)|feed_forward\.w[123])$")


# ---------------------------------------------------------------- losses


# ---------------------------------------------------------------- training loops


@dataclass
class TrainSettings:
    steps: int = 400
    batch: int = 16
    lr: float = 2e-3
    rank: int = 8
    alpha: float = 8.0
    seed: int = 0
    fraction: float = 0.5  # share of new-concept scenes in a batch
    log_every: int = 25
    bf16: bool = True  # autocast: 2-3x faster on CPUs with bf16 matrix units, and on GPUs
    device: str = "cpu"
    deadline: float | None = None  # wall-clock time (epoch s) by which training ends; steps become a cap
    state: Path | None = None  # where the resumable state goes (every `ckpt_every` steps and at the end)
    resume_from: Path | None = None  # a state an earlier run wrote: continue it
    ckpt_every: int = 200
    log: Path | None = None  # JSON-lines log (None: progress is printed only)
    warmup: int | None = None  # None: the first 5% of the steps
    extra: dict = field(default_factory=dict)  # what `training.fit` carries across a resume
    snapshots: tuple[float, ...] = ()  # `training.fit`'s learning-curve snapshots: adapters write none


LossAt = Callable[[int, torch.Generator], torch.Tensor]


class _Trained(nn.Module):
    """The trained tensors under one module, so the training state stores them by position."""

    def __init__(self, params: list[torch.Tensor]):
        super().__init__()
        self.params = nn.ParameterList(params)


def _fit(settings: TrainSettings, kind: str, params: list[nn.Parameter], loss_at: LossAt) -> None:
    """Train `params` through `training.fit` (AdamW, warmup over the first 5% then cosine to 0, state
    every `ckpt_every` steps); `loss_at(step, generator)` makes its own batch and the step's loss."""

    def adapter_step(step: int, _batch: None) -> tuple[torch.Tensor, Callable[[], dict]]:
        with torch.autocast(torch.device(settings.device).type, dtype=torch.bfloat16, enabled=settings.bf16):
            return loss_at(step, step_generator(settings.seed, step)), dict

    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    fit(settings, kind, {"adapter": _Trained(params)}, opt, params, adapter_step, lr=settings.lr,
        warmup_divisor=20, floor=0.0, batches=partial(step_numbers, settings))  # fmt: skip


def _lora_on(
    base: nn.Module, targets: re.Pattern, settings: TrainSettings, init_from: Path | None
) -> tuple[Lora, nn.Module]:
    """Fresh (or `init_from`'s) trainable factors on the `targets` linears of the frozen `base`, and
    the base running them through `with_loras`, as the LoadLoRA node applies them."""
    base.requires_grad_(False)
    lora = trainable_lora(
        base, settings.rank, settings.alpha, lambda n: bool(targets.match(n)), settings.seed
    )
    if init_from:
        continue_lora(lora, init_from, base)
    return lora, with_loras(base, [(lora, 1.0)])


def train_dit_lora(
    dit: Flux,
    vae: AutoencoderKL,
    text: TextEncoder,
    settings: TrainSettings,
    init_from: Path | None = None,
) -> Lora:
    """LoRA factors teaching the DiT the word CONCEPT; the DiT itself is not changed."""
    lora, model = _lora_on(dit, DIT_TARGETS, settings, init_from)

    def loss_at(step: int, g: torch.Generator) -> torch.Tensor:
        batch = concept_batch(settings.batch, settings.seed, step, settings.fraction)
        with torch.no_grad():
            latents = vae.encode(batch.images).float()
            cond = text.encode(drop_captions(batch.captions, g)[0])
        return flow_matching_loss(model, latents, cond, g)

    with _trainable_flux():  # flux.apply_rope writes into out= buffers, which autograd refuses
        _fit(settings, "lora-dit", lora_parameters(lora), loss_at)
    return lora


def train_gpt_lora(
    gpt: GPT,
    vq: VQModel,
    text: TextEncoder,
    settings: TrainSettings,
    init_from: Path | None = None,
) -> Lora:
    """LoRA factors teaching the (caption-conditioned) GPT the word CONCEPT."""
    if not gpt.config.is_caption:
        raise ValueError("a new word can only be taught to a caption-conditioned GPT")
    lora, model = _lora_on(gpt, GPT_TARGETS, settings, init_from)

    def loss_at(step: int, g: torch.Generator) -> torch.Tensor:
        batch = concept_batch(settings.batch, settings.seed, step, settings.fraction)
        with torch.no_grad():
            ids = vq.encode(batch.images)
            cond = text.encode(batch.captions)
        return token_loss(model, cond, ids, drop_captions(batch.captions, g)[1])

    _fit(settings, "lora-gpt", lora_parameters(lora), loss_at)
    return lora


def train_dit_controlnet(
    dit: Flux,
    vae: AutoencoderKL,
    text: TextEncoder,
    settings: TrainSettings,
    depth: int = 2,
    depth_single: int = 0,
    init_from: Path | None = None,
    pixel_hint: bool = True,
) -> FluxControlNet:
    """A ControlNet steering the DiT from Canny edges of the scene to the scene (`init_from`: continue a saved one).

    With `pixel_hint` the net reads the edge map itself through a convolutional hint encoder
    (XLabs-style `input_hint_block`), else the VAE latent of the edge map (InstantX-style),
    which loses thin edges: the built-in VAE keeps 0.33 edge IoU on a round trip of edge maps.
    """
    dit.requires_grad_(False)
    torch.manual_seed(settings.seed)
    hint_channels = dit.config.in_channels if pixel_hint else 0
    net = controlnet_from_dit(dit, depth, depth_single, hint_channels).train().requires_grad_(True)
    if init_from:
        saved = load_any_controlnet(init_from)
        if not isinstance(saved, FluxControlNet) or saved.pixel_hint != pixel_hint:
            kind = "a DiT ControlNet reading " + ("the edge map" if pixel_hint else "its VAE latent")
            raise ValueError(f"{Path(init_from).name} is not {kind} (see --hint)")
        net.load_state_dict(saved.state_dict())

    def loss_at(step: int, g: torch.Generator) -> torch.Tensor:
        batch = synthetic.make_batch(settings.batch, settings.seed, step)
        with torch.no_grad():
            latents = vae.encode(batch.images).float()
            uint8 = ((batch.images.permute(0, 2, 3, 1) + 1) * 127.5).round().clamp(0, 255).byte().numpy()
            hint = ControlHint(image=edge_map(uint8), vae=vae)
            cond = text.encode(drop_captions(batch.captions, g, CONTROL_CAPTION_DROPOUT)[0])
        controlled = with_control(dit, net, hint)
        return flow_matching_loss(controlled, latents, cond, g)

    with _trainable_flux():
        _fit(settings, "controlnet-dit", list(net.parameters()), loss_at)
    return net.eval().requires_grad_(False)


def corrupted_token_loss(
    model: GPT,
    cond: Conditioning,
    ids: torch.Tensor,
    drop: torch.Tensor,
    g: torch.Generator,
    max_rate: float,
) -> torch.Tensor:
    """`objectives.token_loss` with a share of the teacher-forced *inputs* replaced by random ids (per
    image a rate uniform in [0, max_rate], drawn from `g`); the targets stay the true ids, so the model
    must take the structure from the control whenever its context is wrong."""
    if max_rate <= 0:
        return token_loss(model, cond, ids, drop)
    rate = torch.rand(ids.shape[0], 1, 1, generator=g) * max_rate
    swap = torch.rand(ids.shape, generator=g) < rate
    inputs = torch.where(swap, torch.randint(0, model.config.vocab_size, ids.shape, generator=g), ids.cpu())
    features, valid = model.caption_features(cond)
    null = model.cls_embedding.uncond_embedding
    features = torch.where(drop.to(features.device)[:, None, None], null[None].float(), features.float())
    logits = teacher_forced_logits(model, features, valid, inputs.to(ids.device)).float()
    return F.cross_entropy(logits.flatten(0, 1), ids.flatten())


def train_gpt_controlnet(
    gpt: GPT,
    vq: VQModel,
    text: TextEncoder,
    settings: TrainSettings,
    width: int = 64,
    layers: Sequence[int] | None = None,
    logit_bias: bool = True,
    corruption: float = CONTEXT_CORRUPTION,
    head_steps: int = 0,
) -> ARControlNet:
    """An AR ControlNet steering the GPT from Canny edges of the scene to the scene's tokens.

    The control encoder feeds the GPT's input and the input of each of `layers` (default: every
    layer) through zero-initialised projections, and with `logit_bias` adds a per-token bias to its
    logits (the most direct path from the edges to the token); the loss is `corrupted_token_loss`
    (up to `corruption` of the input tokens random), so the GPT learns to follow the control when its
    own context disagrees, as it does in free decoding; with `settings.rank` > 0 a LoRA on the GPT
    (`GPT_TARGETS`) trains jointly with it, as ControlAR fine-tunes its generator, and ends up in the
    net's `lora` (saved in the same file). Half the batches have empty captions (the control must
    carry the scene; a whole batch at a time, so its prefix is one token and the step about half the
    cost); 10% of all captions become the null caption, as for the base, so guidance keeps working.

    With `head_steps` and `logit_bias`, the encoder and the logit head first train alone for that many
    steps as a classifier of the scene's VQ ids from its edges (no GPT in the loop, about a tenth of a
    joint step), so the joint stage starts from a head that already reads the edges; the joint loss
    keeps that classifier's cross-entropy as a second term. A resumed run (`settings.resume_from`, a
    joint-stage state holding every tensor) skips the head stage.
    """
    gpt.requires_grad_(False)
    torch.manual_seed(settings.seed)
    layers = tuple(range(1, gpt.config.n_layer)) if layers is None else tuple(layers)
    config = ARControlConfig(
        gpt.config.dim, vq.downsample, width, layers, gpt.config.vocab_size if logit_bias else 0
    )
    net = ARControlNet(config).to(gpt.output.weight.device)
    net.zero_init_heads()
    net.train()
    params = list(net.parameters())
    model: nn.Module = gpt
    lora = None
    if settings.rank > 0:
        lora, model = _lora_on(gpt, GPT_TARGETS, settings, None)
        params += lora_parameters(lora)

    def scenes(seed: int, step: int) -> tuple[synthetic.Batch, torch.Tensor, torch.Tensor]:
        batch = synthetic.make_batch(settings.batch, seed, step)
        with torch.no_grad():
            ids = vq.encode(batch.images)
            uint8 = ((batch.images.permute(0, 2, 3, 1) + 1) * 127.5).round().clamp(0, 255).byte().numpy()
            edges = edge_map(uint8).to(gpt.output.weight.device)
        return batch, ids, edges

    def head_loss(ids: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
        logits = net.embeddings(edges, *ids.shape[1:])[LOGITS].float()
        return F.cross_entropy(logits.flatten(0, 1), ids.flatten())

    if head_steps and net.controlnet_logits is not None and settings.resume_from is None:
        # with a deadline, the head stage may take HEAD_SHARE of what is left, the joint stage the rest
        head_deadline = (
            None
            if settings.deadline is None
            else time.time() + HEAD_SHARE * (settings.deadline - time.time())
        )
        head = replace(settings, steps=head_steps, deadline=head_deadline, state=None, log=None, warmup=None)
        head_params = [*net.input_hint_block.parameters(), *net.controlnet_logits.parameters()]
        _fit(
            head,
            "controlnet-gpt-head",
            head_params,
            lambda step, _g: head_loss(*scenes(settings.seed + 1, step)[1:]),
        )

    def loss_at(step: int, g: torch.Generator) -> torch.Tensor:
        batch, ids, edges = scenes(settings.seed, step)
        with torch.no_grad():
            empty = bool(torch.rand(1, generator=g) < CONTROL_CAPTION_DROPOUT)
            cond = text.encode([""] * len(batch.captions) if empty else batch.captions)
        drop = drop_captions(batch.captions, g)[1]
        loss = corrupted_token_loss(with_ar_control(model, net, edges), cond, ids, drop, g, corruption)
        return loss if net.controlnet_logits is None else loss + head_loss(ids, edges)

    _fit(settings, "controlnet-gpt", params, loss_at)
    net.eval().requires_grad_(False)
    if lora is not None:
        net.lora = lora_tensors(lora, "peft")
    net.base = {"fingerprint": gpt_fingerprint(gpt)}
    return net


# ---------------------------------------------------------------- command line


# The family an adapter's base file must hold, in folders the next-scale pair shares (tessera-msvq-f8
# sorts before tessera-vq-f8, tessera-var-tiny after tessera-ar-tiny).
_FOLDER_FAMILY = {"vq_models": "VQ tokenizer", "ar_models": "LlamaGen GPT"}


def _only_file(models_dir: Path, folder: str, given: str | None) -> Path:
    """The file named, or the one built-in file in models/<folder> of the family the adapters build on
    (preferring names with 'tessera'), told by its tensor names alone."""
    if given:
        path = Path(given)
        return path if path.is_file() else models_dir / folder / given
    files = sorted((models_dir / folder).glob("*.safetensors"))
    if folder in _FOLDER_FAMILY:
        files = [f for f in files if detect_family(stored_keys(f)) == _FOLDER_FAMILY[folder]]
    preferred = [f for f in files if "tessera" in f.name] or files
    if not preferred:
        raise SystemExit(
            f"no model in {models_dir / folder}; give one with --{folder.rstrip('s').replace('_', '-')}"
        )
    return preferred[0]


def _settings(args: argparse.Namespace, **extra) -> TrainSettings:
    torch.set_num_threads(args.threads)
    return TrainSettings(
        steps=args.steps,
        batch=args.batch,
        lr=args.lr,
        seed=args.seed,
        bf16=bf16_is_fast(args.device) if args.autocast is None else args.autocast,
        device=args.device,
        deadline=args.deadline,
        state=args.state,
        resume_from=args.resume_from,
        ckpt_every=args.ckpt_every,
        log=args.log,
        log_every=args.log_every,
        warmup=args.warmup,
        **extra,
    )


def _adapter_arguments(p: argparse.ArgumentParser) -> None:
    """What both adapter kinds take besides `tessera train`'s common arguments."""
    p.add_argument("--engine", choices=("dit", "gpt"), default="dit")
    p.add_argument("--text-encoder", help="text encoder file (default: the built-in one)")
    p.add_argument("--model", help="DiT or GPT file (default: the built-in one)")
    p.add_argument("--vae", help="VAE file for the DiT (default: the built-in one)")
    p.add_argument("--vq", help="VQ tokenizer file for the GPT (default: the built-in one)")


def lora_arguments(p: argparse.ArgumentParser) -> None:
    """`tessera train lora`'s own arguments (the common ones come from `lab.cli`)."""
    d = TrainSettings()
    _adapter_arguments(p)
    p.add_argument("--rank", type=int, default=d.rank)
    p.add_argument("--alpha", type=float, default=d.alpha)
    p.add_argument("--init-from", type=Path, help="continue training this LoRA file (same rank)")


def main_lora(argv: Sequence[str] | None = None) -> Path:
    """`tessera train lora …` with these arguments (see `run_lora`)."""
    from .cli import build_parser

    return run_lora(build_parser().parse_args(["lora", *(argv or [])]))


def run_lora(args: argparse.Namespace) -> Path:
    """`tessera train lora --engine dit|gpt …`: train and save the demo LoRA teaching "giant"."""
    s = _settings(args, rank=args.rank, alpha=args.alpha)
    previous = ""
    if args.init_from:  # read now: --out may overwrite it
        previous = read_safetensors(args.init_from)[1].get("tessera.card", "")
    md, dev = args.models_dir, s.device
    text = load_text_encoder(
        _only_file(md, "text_encoders", args.text_encoder), dev, dtype=torch.float32
    ).requires_grad_(False)
    started = time.perf_counter()
    if args.engine == "dit":
        base_path = _only_file(md, "diffusion_models", args.model)
        vae = load_vae(_only_file(md, "vae", args.vae), dev)
        lora = train_dit_lora(load_dit(base_path, dev), vae, text, s, init_from=args.init_from)
        style = "kohya"
    else:
        base_path = _only_file(md, "ar_models", args.model)
        vq = load_vq(_only_file(md, "vq_models", args.vq), dev)
        lora = train_gpt_lora(load_gpt(base_path, dev), vq, text, s, init_from=args.init_from)
        style = "peft"
    out = args.out or md / "loras" / f"{args.engine}_{CONCEPT}_lora.safetensors"
    out.parent.mkdir(parents=True, exist_ok=True)
    card = (
        f"Demo LoRA for {base_path.name}: teaches the size word '{CONCEPT}' (objects {GIANT_SIZES[0]}-{GIANT_SIZES[1]} px "
        "on the 64 px canvas), never seen by the base, whose objects are 17-22 px. "
        f"Trained {s.steps} steps x {s.batch} on synthetic scenes ({s.fraction:.0%} of them giant shapes), "
        f"rank {s.rank}, alpha {s.alpha}, "
        f"{time.perf_counter() - started:.0f}s on {hardware(dev)} by `tessera train lora --engine {args.engine}`."
        + (f" Continued from {args.init_from.name}, whose card reads: {previous}" if args.init_from else "")
    )
    save_lora(
        lora,
        out,
        style,
        card,
        {
            "base": base_path.name,
            "engine": args.engine,
            "concept": CONCEPT,
            "rank": s.rank,
            "alpha": s.alpha,
            "steps": s.steps,
            "batch": s.batch,
        },
    )
    print(f"saved {out}")
    return out


def controlnet_arguments(p: argparse.ArgumentParser) -> None:
    """`tessera train controlnet`'s own arguments (the common ones come from `lab.cli`)."""
    _adapter_arguments(p)
    p.add_argument("--depth", type=int, default=2, help="DiT: double blocks copied from the DiT")
    p.add_argument("--depth-single", type=int, default=0, help="DiT: single blocks copied from the DiT")
    p.add_argument(
        "--hint",
        choices=("pixels", "latent"),
        default="pixels",
        help="DiT: read the edge map through a hint encoder (XLabs layout, default) or its VAE latent (InstantX)",
    )
    p.add_argument("--width", type=int, default=64, help="GPT: channels of the control image encoder")
    p.add_argument(
        "--layers",
        type=lambda v: [int(i) for i in v.split(",") if i],
        default=None,
        help="GPT: comma-separated layers (from 1) whose input also takes the control (default: every layer)",
    )
    p.add_argument(
        "--head-steps",
        type=int,
        default=0,
        help="GPT: steps training the encoder and logit head alone as an edges -> VQ id classifier first",
    )
    p.add_argument(
        "--corrupt",
        type=float,
        default=CONTEXT_CORRUPTION,
        help="GPT: most share of teacher-forced input tokens made random per image (default %(default)s)",
    )
    p.add_argument(
        "--logit-bias",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="GPT: a control head biasing the GPT's token logits (default: on)",
    )
    p.add_argument(
        "--lora-rank",
        type=int,
        default=16,
        help="GPT: rank of the LoRA trained with the control and saved in its file (0: frozen GPT)",
    )
    p.add_argument("--init-from", type=Path, help="DiT: continue training this ControlNet file")


def main_controlnet(argv: Sequence[str] | None = None) -> Path:
    """`tessera train controlnet …` with these arguments (see `run_controlnet`)."""
    from .cli import build_parser

    return run_controlnet(build_parser().parse_args(["controlnet", *(argv or [])]))


def run_controlnet(args: argparse.Namespace) -> Path:
    """`tessera train controlnet --engine dit|gpt …`: train and save a demo edges → scene ControlNet."""
    s = _settings(args, rank=args.lora_rank, alpha=float(args.lora_rank))
    if args.init_from and args.engine != "dit":
        raise SystemExit("tessera train controlnet: --init-from continues a DiT ControlNet (--engine dit)")
    previous = read_safetensors(args.init_from)[1].get("tessera.card", "") if args.init_from else ""
    md, dev = args.models_dir, s.device
    text = load_text_encoder(
        _only_file(md, "text_encoders", args.text_encoder), dev, dtype=torch.float32
    ).requires_grad_(False)
    started = time.perf_counter()
    how = "the scene's Canny edges (CannyEdges node, defaults)"
    if args.engine == "dit":
        base_path = _only_file(md, "diffusion_models", args.model)
        net = train_dit_controlnet(
            load_dit(base_path, dev),
            load_vae(_only_file(md, "vae", args.vae), dev),
            text,
            s,
            args.depth,
            args.depth_single,
            init_from=args.init_from,
            pixel_hint=args.hint == "pixels",
        )
        what = f"{args.depth} double, {args.depth_single} single blocks copied from it; hint: {how}, " + (
            "through a hint encoder" if args.hint == "pixels" else "VAE-encoded"
        )
        save = save_controlnet
    else:
        base_path = _only_file(md, "ar_models", args.model)
        net = train_gpt_controlnet(
            load_gpt(base_path, dev),
            load_vq(_only_file(md, "vq_models", args.vq), dev),
            text,
            s,
            args.width,
            args.layers,
            args.logit_bias,
            args.corrupt,
            args.head_steps,
        )
        net.base["name"] = base_path.name
        layers = ", ".join(map(str, net.config.layers)) or "none"
        what = (
            f"per-token embeddings of the control image, {how}, added where each token is predicted "
            f"to the input and to layers {layers}"
            + (", and a bias on its token logits" if net.config.vocab else "")
            + f"; up to {args.corrupt:.0%} of the teacher-forced input tokens random"
            + (
                f"; encoder and logit head first trained alone for {args.head_steps} steps"
                if args.head_steps
                else ""
            )
            + (
                f"; with a rank-{s.rank} LoRA on the GPT trained jointly, in the same file"
                if net.lora
                else ""
            )
        )
        save = save_ar_controlnet
    out = args.out or md / "controlnet" / f"{args.engine}_canny_controlnet.safetensors"
    out.parent.mkdir(parents=True, exist_ok=True)
    card = (
        f"Demo edges -> scene ControlNet for {base_path.name} ({what}). Trained {s.steps} steps x "
        f"{s.batch} on synthetic scenes ({CONTROL_CAPTION_DROPOUT:.0%} with the empty caption), "
        f"{time.perf_counter() - started:.0f}s on {hardware(dev)} by "
        f"`tessera train controlnet --engine {args.engine}`."
        + (f" Continued from {args.init_from.name}, whose card reads: {previous}" if args.init_from else "")
    )
    save(net.to("cpu", torch.float16), out, card)  # shipped in fp16, as the base models are
    print(f"saved {out}")
    return out
