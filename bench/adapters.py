"""What the shipped adapters do, measured in one run on the same prompts and seeds with and without them.

- LoRA (DiT and GPT): prompts using the new size word ("a giant red star on a blue
  background"): the rate of images showing a giant object (≥ 34 px of the 64) in the asked
  colour (`concept_rate`), base vs LoRA; plus the scorers' adherence on ordinary prompts, to
  show what the LoRA leaves alone.
- ControlNet (DiT and GPT): held-out synthetic scenes; the control image is the scene's Canny
  edges; the IoU (1 px tolerance) between those edges and the Canny edges of the output, for the
  un-controlled base and the controlled model, same caption and seed; once with the scene's
  caption (which already names the object, its place and its colour) and once with the empty
  caption, where only the control can say where things go; plus the scorers' adherence to the
  scene's attributes either way; and the edge IoU of the scenes themselves through the engine's
  autoencoder and back, the most a generator drawing through it could reach.

Prints a table, then one JSON line. `python bench/adapters.py [--n 32] [--models-dir models]`.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import torch

from tessera.engines.controlnet import (
    ARControlNet,
    ControlHint,
    load_any_controlnet,
    with_ar_control,
    with_control,
)
from tessera.engines.flux import load_dit
from tessera.engines.generation import generate_autoregressive, generate_diffusion, tokens_to_image
from tessera.engines.gpt import load_gpt
from tessera.engines.lora import load_lora, with_loras
from tessera.engines.preprocess import canny
from tessera.engines.text_encoder import load_text_encoder
from tessera.engines.vae import load_vae
from tessera.engines.vq import load_vq
from tessera.lab import scorers, synthetic
from tessera.lab.adapter_training import (
    CONCEPT,
    _only_file,
    concept_rate,
    edge_iou,
    edge_map,
    giant_caption,
)

ROOT = Path(__file__).resolve().parents[1]


def concept_prompts(n: int, seed: int = 123) -> tuple[list[str], list[str]]:
    """Giant-object prompts over held-out attribute combinations, and the colour each asks for."""
    rng = random.Random(seed)
    attrs = [synthetic.sample_attributes(rng, "shape", "heldout") for _ in range(n)]
    return [giant_caption(a) for a in attrs], [a["color"] for a in attrs]


def ordinary_scenes(n: int, seed: int = 321) -> list[synthetic.Sample]:
    return [synthetic.make_sample(seed, i, "heldout", kinds=("shape",), paraphrase=False) for i in range(n)]


# ---------------------------------------------------------------- generators (IMAGE [B, H, W, 3] 0..1 out)


class DiT:
    def __init__(self, md: Path, text, steps: int, cfg: float):
        self.model = load_dit(_only_file(md, "diffusion_models", None))
        self.vae = load_vae(_only_file(md, "vae", None))
        self.text, self.steps, self.cfg = text, steps, cfg

    def round_trip(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [-1, 1] through the VAE and back, as an IMAGE."""
        with torch.no_grad():
            return ((self.vae.decode(self.vae.encode(pixels)).float() + 1) / 2).clamp(0, 1).movedim(1, -1)

    def __call__(self, model, prompts: list[str], seed: int) -> torch.Tensor:
        pos, neg = self.text.encode(prompts), self.text.encode([""] * len(prompts))
        size = synthetic.IMAGE_SIZE
        return generate_diffusion(model, self.vae, pos, neg, height=size, width=size, seed=seed, steps=self.steps,
                                  cfg=self.cfg)  # fmt: skip


class AR:
    def __init__(self, md: Path, text, cfg: float):
        self.model = load_gpt(_only_file(md, "ar_models", None))
        self.vq = load_vq(_only_file(md, "vq_models", None))
        self.text, self.cfg = text, cfg

    def round_trip(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [-1, 1] through the VQ tokens and back, as an IMAGE."""
        with torch.no_grad():
            return tokens_to_image(self.vq, self.vq.encode(pixels))

    def __call__(self, model, prompts: list[str], seed: int) -> torch.Tensor:
        return generate_autoregressive(model, self.vq, self.text.encode(prompts), seed=seed, cfg=self.cfg)


def batched(generate_fn, model, prompts: list[str], seed: int, batch: int = 16) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat(
            [generate_fn(model, prompts[i : i + batch], seed + i) for i in range(0, len(prompts), batch)]
        )


def adherence(images: torch.Tensor, scenes: list[synthetic.Sample]) -> float:
    """Mean share of a caption's attributes (colour, shape, position, …) the scorers find in the image."""
    results = scorers.score_batch([img.numpy() for img in images], [s.attributes for s in scenes])
    return float(np.mean([np.mean(list(r.values())) for r in results]))


def edge_ious(images: torch.Tensor, controls: torch.Tensor) -> float:
    return float(
        np.mean(
            [
                edge_iou(canny(img.numpy(), 0.1, 0.2, 1.4), ctl[..., 0].numpy() > 0.5)
                for img, ctl in zip(images, controls)
            ]
        )
    )


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models-dir", type=Path, default=ROOT / "models")
    p.add_argument("--n", type=int, default=32, help="prompts (and scenes) per measurement")
    p.add_argument("--steps", type=int, default=20, help="DiT sampling steps")
    p.add_argument("--cfg", type=float, default=4.0, help="DiT guidance scale (its workflows' default)")
    p.add_argument("--cfg-gpt", type=float, default=2.0, help="GPT guidance scale (its workflows' default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--which", default="dit,gpt", help="engines to measure")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    md = args.models_dir
    text = load_text_encoder(_only_file(md, "text_encoders", None), dtype=torch.float32)
    prompts, colors = concept_prompts(args.n)
    scenes = ordinary_scenes(args.n)
    held = [synthetic.make_sample(args.seed + 7, i, "heldout") for i in range(args.n)]
    controls = edge_map(np.stack([s.image for s in held]))
    which = args.which.split(",")
    engines = {}
    if "dit" in which:
        engines["dit"] = DiT(md, text, args.steps, args.cfg)
    if "gpt" in which:
        engines["gpt"] = AR(md, text, args.cfg_gpt)
    rows, record = [], {"bench": "adapters", "n": args.n, "concept": CONCEPT}
    for name, gen in engines.items():
        lora_file = md / "loras" / f"{name}_{CONCEPT}_lora.safetensors"
        if lora_file.is_file():
            lora = with_loras(gen.model, [(load_lora(lora_file, gen.model), 1.0)])
            started = time.perf_counter()
            base_rate = concept_rate(batched(gen, gen.model, prompts, args.seed), colors)
            lora_rate = concept_rate(batched(gen, lora, prompts, args.seed), colors)
            base_adh = adherence(batched(gen, gen.model, [s.caption for s in scenes], args.seed), scenes)
            lora_adh = adherence(batched(gen, lora, [s.caption for s in scenes], args.seed), scenes)
            rows.append((f"{name} LoRA", f"'{CONCEPT}' rate", base_rate, lora_rate))
            rows.append((f"{name} LoRA", "adherence, ordinary prompts", base_adh, lora_adh))
            record[f"{name}_lora"] = {
                "concept_rate": [base_rate, lora_rate],
                "adherence": [base_adh, lora_adh],
                "seconds": round(time.perf_counter() - started, 1),
            }
        cn_file = md / "controlnet" / f"{name}_canny_controlnet.safetensors"
        if cn_file.is_file():
            net = load_any_controlnet(cn_file)
            if isinstance(net, ARControlNet):
                controlled = with_ar_control(gen.model, net, controls)
            else:
                controlled = with_control(gen.model, net, ControlHint(image=controls, vae=gen.vae))
            captions = [s.caption for s in held]
            started = time.perf_counter()
            # the control image batch matches the prompts one to one: run it in one batch per chunk
            base = batched(gen, gen.model, captions, args.seed, batch=args.n)
            ctl = batched(gen, controlled, captions, args.seed, batch=args.n)
            # with the empty caption only the control can say where things go: the cleanest test
            free = batched(gen, gen.model, [""] * args.n, args.seed, batch=args.n)
            free_ctl = batched(gen, controlled, [""] * args.n, args.seed, batch=args.n)
            base_iou, ctl_iou = edge_ious(base, controls), edge_ious(ctl, controls)
            free_iou, free_ctl_iou = edge_ious(free, controls), edge_ious(free_ctl, controls)
            base_adh, ctl_adh = adherence(base, held), adherence(ctl, held)
            free_adh, free_ctl_adh = adherence(free, held), adherence(free_ctl, held)
            # what the best generator could reach: the held scenes through the autoencoder and back
            ceiling = edge_ious(
                gen.round_trip(synthetic.to_training_tensor(np.stack([s.image for s in held]))), controls
            )
            rows.append((f"{name} ControlNet", "edge IoU, scene caption", base_iou, ctl_iou))
            rows.append((f"{name} ControlNet", "edge IoU, empty caption", free_iou, free_ctl_iou))
            rows.append((f"{name} ControlNet", "adherence, scene caption", base_adh, ctl_adh))
            rows.append((f"{name} ControlNet", "adherence, empty caption", free_adh, free_ctl_adh))
            rows.append((f"{name} ControlNet", "edge IoU, round trip (ceiling)", ceiling, ceiling))
            record[f"{name}_controlnet"] = {
                "edge_iou": [base_iou, ctl_iou],
                "edge_iou_empty_caption": [free_iou, free_ctl_iou],
                "adherence": [base_adh, ctl_adh],
                "adherence_empty_caption": [free_adh, free_ctl_adh],
                "edge_iou_round_trip": ceiling,
                "seconds": round(time.perf_counter() - started, 1),
            }
    print(f"{'adapter':<16} {'measure':<30} {'without':>8} {'with':>8}")
    for adapter, measure, without, with_ in rows:
        print(f"{adapter:<16} {measure:<30} {without:>8.3f} {with_:>8.3f}")
    print(json.dumps(record))
    return record


if __name__ == "__main__":
    main()
