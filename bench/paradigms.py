"""Diffusion vs raster autoregression vs next-scale autoregression, head to head on the shipped tiny
models, claim by claim, with a verdict or a needed sample size on every row.

`tessera bench paradigms` generates images from held-out captions (lab.training.heldout_scenes:
attribute combinations no generator saw in training) with fixed seeds, once per paradigm found in
the models folder:

- `dit`: the Flux-architecture DiT (tessera-dit-tiny, VAE f8), 20 Euler steps;
- `ar`: the LlamaGen-architecture GPT (tessera-ar-tiny, VQ f8), one token per pass in raster order;
- `var`: the next-scale (VAR) transformer with its multi-scale VQ, one token map per pass, coarse
  to fine. When the folder holds no next-scale model the column is left out and the report says
  "no next-scale model in <dir>".

It measures, per paradigm:

- prompt adherence with lab.scorers: word exact match (text rendering), single-object attribute
  accuracy, the two-object relation scenes' all-correct rate (multi-clause), texture-scene accuracy;
- texture/realism: the Fréchet distance between the penultimate features of a small scene
  classifier (lab.scene_features) of the generated images and of real renders of the same scenes,
  with a bootstrap standard error (`fd_floor`: what real renders score, a perfect generator's value);
- diversity: per caption, the mean pairwise distance between the images of several seeds;
- latency: milliseconds per image at batch 1 and 16 (mean and SE over timed repeats; end to end),
  forward passes per image (CFG's unconditional rows count), sequential passes per batch;
- early errors: one wrong early choice, then the rest generated as usual from the same random
  stream: raster AR gets one token forced to the farthest palette token; next-scale gets one token
  of an early scale's map forced the same way; the DiT gets the same cell of its clean estimate
  replaced by the farthest palette colour's latent at an early step. The same corruption applied to
  the finished image (no chance to react) is the yardstick: the accumulation is how much more the
  score drops when the model generates on after the error than when the error is pasted in at the end;
- a guidance sweep (each paradigm's default scale against cfg 1, on the same captions and seeds).

Verdicts. Each claim row is a set of comparisons "X beats Y on a metric". A comparison is decided
at 2 standard errors of the difference (paired over the same captions and seeds where the metric
has one value per caption); otherwise the row prints the sample size it would need (`needed_n`,
see `needed_n` for the power calculation) and the option that sets it. A row is confirmed when all
its comparisons are, refuted when any is refuted, and otherwise not measurable here (with the
largest needed n). Learning curves (`--budgets DIR …`) run the same bench on several models
folders (training-budget snapshots) and say, per row and per comparison, whether the verdict holds
at every budget or flips.

Usage:
    tessera bench paradigms                    # full: --n 32 captions per kind (about 10 CPU-minutes, DiT + GPT)
    tessera bench paradigms --n 128            # 128 captions per kind (about 4x that)
    tessera bench paradigms --quick            # CI mode: 2 captions per kind, about a minute of CPU
    tessera bench paradigms --paradigms dit,var --device cuda --json-out report.json --plot report.png
    tessera bench paradigms --budgets runs/0.25 runs/0.5 runs/1.0   # learning curves
    tessera bench paradigms --snapshots artifacts/train/snapshots   # the same on `train --snapshots` output

Options: --n (held-out captions per scene kind), --sweep-per-kind (captions per kind in the guidance
sweep), --diversity-per-kind, --latency-repeats B1,B16, --quick, --paradigms (default: every one
with a model in the folder), --device cpu|cuda, --models-dir, --budgets (learning curves: several
models folders, `LABEL=DIR` or DIR), --snapshots OUT (the folders OUT/<fraction>/ in fraction order),
--json-out (default artifacts/bench/paradigms.json), --plot (default artifacts/bench/paradigms.png;
with --budgets the learning-curve plot), --seed, --dit-steps, --dit-cfg, --ar-cfg, --var-cfg,
--threads (0: torch's default; use 1 on a machine whose cores are busy with other work).
The feature classifier ships as models/classifiers/tessera-scene-features.safetensors; when it is
missing from the models folder the shipped one is used, and when that is missing too it is trained
first (two to four minutes on CPU) and written there.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import re
import statistics
import textwrap
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from tessera.engines.ar_decoding import condition_prefix, generate
from tessera.engines.flux import guided_velocity, load_dit
from tessera.engines.generation import (
    diffusion_sigmas,
    generate_next_scale,
    latent_to_image,
    scales_to_image,
    tokens_to_image,
)
from tessera.engines.gpt import load_gpt
from tessera.engines.latent import seeded_noise
from tessera.engines.layouts import detect_family, stored_keys
from tessera.engines.multiscale_vq import MultiScaleTokens, load_multiscale_vq
from tessera.engines.samplers import SAMPLERS
from tessera.engines.text_encoder import load_text_encoder
from tessera.engines.tokens import TokenGrid
from tessera.engines.vae import load_vae
from tessera.engines.var import condition_rows, load_var, sample_scales
from tessera.engines.vq import load_vq
from tessera.lab import scene_features, synthetic
from tessera.lab.learning_curves import snapshot_folders
from tessera.lab.scorers import score
from tessera.lab.training import DEFAULT_FILES, heldout_scenes, sample_ar, sample_dit

ROOT = Path(__file__).resolve().parents[1]
CLASSIFIER_FILE = "classifiers/tessera-scene-features.safetensors"
VERDICTS = ("confirmed", "refuted", "not measurable here")
WORD_CHANCE = 1 / len(synthetic.WORDS)
PARADIGMS = ("dit", "ar", "var")  # the column order
ALIASES = {"diffusion": "dit", "raster": "ar", "next-scale": "var", "next_scale": "var", "gpt": "ar"}
LABELS = {"dit": "diffusion (DiT)", "ar": "raster AR (GPT)", "var": "next-scale (VAR)"}
NAMES = {"dit": "DiT", "ar": "raster AR", "var": "next-scale"}
MIN_N = 10  # fewer samples than this per side: no verdict
MIN_REPEATS = 5  # the same for timed repeats (latency)
Z_RULE = 2.0  # a difference is decided beyond this many standard errors
POWER = 0.8  # the chance the needed n gives of deciding a true difference of the measured size
MAX_NEEDED = 10**7  # a needed n beyond this is reported as "more than"


# ---------------------------------------------------------------- settings


@dataclass
class Settings:
    n: int = 32  # held-out captions per scene kind
    quick: bool = False
    seed: int = 0
    device: str = "cpu"
    batch: int = 32
    paradigms: tuple[str, ...] | None = None  # None: every paradigm with a model in the folder
    dit_steps: int = 20
    dit_cfg: float = 4.0
    ar_cfg: float = 2.0  # the shipped AR workflow's scale
    var_cfg: float = 2.0
    dit_sweep: tuple[float, ...] = (1.0, 2.0, 4.0, 6.0)
    ar_sweep: tuple[float, ...] = (1.0, 2.0, 3.0, 5.0)
    var_sweep: tuple[float, ...] = (1.0, 2.0, 3.0, 5.0)
    diversity_per_kind: int = 4  # captions per kind in the diversity set
    diversity_seeds: int = 4  # images per caption
    latency_repeats: tuple[int, int] = (
        5,
        5,
    )  # timed runs at batch 1 and batch 16 (MIN_REPEATS for a verdict)
    error_fraction: float = 0.15  # how early the error comes: share of the sequential passes
    real_per_scene: int = 8  # real renders per held-out scene for the reference statistics
    sweep_per_kind: int | None = 16  # captions per kind in the guidance sweep (None: all)
    bootstrap: int = 50

    @classmethod
    def quick_mode(cls, **kw) -> Settings:
        """Few images, a two-point sweep (no guidance vs the default scale), two latency repeats."""
        base = dict(n=2, quick=True, diversity_per_kind=1, diversity_seeds=2, latency_repeats=(2, 2),
                    real_per_scene=16, bootstrap=20, sweep_per_kind=None)  # fmt: skip
        settings = cls(**{**base, **kw})
        for name in PARADIGMS:
            if f"{name}_sweep" not in kw:
                setattr(settings, f"{name}_sweep", (1.0, settings.cfg(name)))
        settings.__post_init__()
        return settings

    def __post_init__(self) -> None:
        # the sweeps always hold cfg 1 and the default scale (whose point is the main run)
        for name in PARADIGMS:
            sweep = getattr(self, f"{name}_sweep")
            setattr(self, f"{name}_sweep", tuple(sorted({1.0, self.cfg(name), *sweep})))
        if self.paradigms is not None:
            self.paradigms = tuple(paradigm_name(p) for p in self.paradigms)

    def cfg(self, name: str) -> float:
        return getattr(self, f"{name}_cfg")

    def sweep(self, name: str) -> tuple[float, ...]:
        return getattr(self, f"{name}_sweep")

    @property
    def grid(self) -> int:
        """The 8x8 cell grid every paradigm's f8 tokenizer gives at the lab's image size."""
        return synthetic.IMAGE_SIZE // 8

    @property
    def error_step(self) -> int:
        return max(1, round(self.error_fraction * self.dit_steps))

    @property
    def error_position(self) -> int:
        n = self.grid * self.grid
        return max(1, round(self.error_fraction * n))  # ≥ 1: position 0 would shift the random stream


def paradigm_name(name: str) -> str:
    """`dit`, `ar` or `var` for a paradigm name or alias; a clear error otherwise."""
    key = ALIASES.get(name.strip().lower(), name.strip().lower())
    if key not in PARADIGMS:
        raise ValueError(f"unknown paradigm {name!r} (choose from dit, ar, var / next-scale)")
    return key


# ---------------------------------------------------------------- counting forward passes


class PassCounter:
    """Counts a module's forward calls, the rows they process and the image positions per row."""

    def __init__(self, module: torch.nn.Module, positions):
        self.positions = positions
        self.calls = self.rows = self.row_positions = 0
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module, args, output) -> None:
        x = args[0]
        self.calls += 1
        self.rows += x.shape[0]
        self.row_positions += x.shape[0] * self.positions(x)

    def reset(self) -> None:
        self.calls = self.rows = self.row_positions = 0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------- the generators


def palette_images(device: torch.device) -> torch.Tensor:
    """A flat image of each palette colour at the synthetic scenes' size, as the models take them
    ([K, 3, S, S] in [-1, 1]): what each engine's palette is read from."""
    size = synthetic.IMAGE_SIZE
    flat = np.stack([np.full((size, size, 3), c, np.uint8) for c in synthetic.COLORS.values()])
    return synthetic.to_training_tensor(flat).to(device)


class DiTEngine:
    """The DiT through `engines.generation` (`sample`), and a sampler loop that can corrupt one
    latent cell at a chosen step (`sample_latents`; without a corruption it gives the same
    latents, which a test pins), with pass counters."""

    name, label = "dit", LABELS["dit"]
    files = ("dit", "vae")

    @property
    def model_files(self) -> dict[str, str]:
        return {k: DEFAULT_FILES[k] for k in self.files}

    def __init__(self, models_dir: Path, te, device: torch.device, steps: int, cfg: float):
        self.model = load_dit(models_dir / DEFAULT_FILES["dit"], device=device).eval()
        self.vae = load_vae(models_dir / DEFAULT_FILES["vae"]).to(device).eval()
        self.te, self.device, self.steps, self.cfg = te, device, steps, cfg
        self.sampler, self.schedule = "euler", "flux"
        self.counter = PassCounter(self.model, lambda x: x.shape[-1] * x.shape[-2])
        self._palette = None

    @classmethod
    def from_settings(cls, models_dir: Path, te, device: torch.device, s: Settings) -> DiTEngine:
        return cls(models_dir, te, device, s.dit_steps, s.dit_cfg)

    @property
    def palette(self) -> torch.Tensor:
        """Latent [K, C] of a flat image of each palette colour (centre cell)."""
        if self._palette is None:
            flat = palette_images(self.device)
            with torch.no_grad():
                z = self.vae.encode(flat).float()
            self._palette = z[:, :, 3:5, 3:5].mean((2, 3))
        return self._palette

    def sigmas(self) -> torch.Tensor:
        """The schedule of every run at the lab's image size."""
        h = w = synthetic.IMAGE_SIZE // self.vae.config.downscale
        return diffusion_sigmas(self.model, self.schedule, self.steps, 1.0, (h, w))

    @torch.no_grad()
    def sample_latents(
        self,
        captions: list[str],
        seed: int,
        cfg: float | None = None,
        batch: int = 32,
        corrupt: tuple | None = None,
    ) -> torch.Tensor:
        """Final latents [B, C, 8, 8] (CPU). `corrupt=(step, row, col)` overwrites that latent cell's clean
        estimate with the farthest palette colour once `step` steps are done, then denoising goes on."""
        cfg = self.cfg if cfg is None else cfg
        negative = self.te.encode([""])
        out = []
        h = w = synthetic.IMAGE_SIZE // self.vae.config.downscale
        sigmas = self.sigmas()
        for i in range(0, len(captions), batch):
            chunk = captions[i : i + batch]
            velocity = guided_velocity(self.model, self.te.encode(chunk), negative, cfg)
            c = self.model.config.in_channels
            x = (seeded_noise(seed + i, (len(chunk), c, h, w)) * sigmas[0]).to(self.device)
            run = SAMPLERS[self.sampler]
            if corrupt is None:
                x = run(velocity, x, sigmas)
            else:
                step, row, col = corrupt
                state: dict = {"total": self.steps}
                if step > 0:
                    x = run(velocity, x, sigmas[: step + 1], state=state)
                x = self.corrupt(x, float(sigmas[step]), velocity, row, col)
                if step < self.steps:
                    x = run(velocity, x, sigmas[step:], state=state)
            out.append(x.float().cpu())
        return torch.cat(out)

    generate = sample_latents

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, batch: int = 64) -> torch.Tensor:
        return torch.cat(
            [
                latent_to_image(self.vae, latents[i : i + batch].to(self.device))
                for i in range(0, len(latents), batch)
            ]
        )

    def sample(
        self, captions: list[str], seed: int, cfg: float | None = None, batch: int = 32, corrupt=None
    ) -> torch.Tensor:
        """IMAGE [B, H, W, 3] in 0..1 (CPU): `generate_diffusion` (through lab.training.sample_dit),
        or the corrupting loop when `corrupt` is given."""
        if corrupt is not None:
            return self.decode(self.sample_latents(captions, seed, cfg, batch, corrupt))
        cfg = self.cfg if cfg is None else cfg
        return sample_dit(self.model, self.vae, self.te, captions, seed=seed, steps=self.steps, cfg=cfg,
                          sampler=self.sampler, schedule=self.schedule, batch=batch)  # fmt: skip

    @torch.no_grad()
    def corrupt(self, x: torch.Tensor, sigma: float, velocity, row: int, col: int) -> torch.Tensor:
        """x = (1−σ)·x̂₀ + σ·ε̂ with x̂₀ at (row, col) replaced by the farthest palette latent
        (σ = 0: the finished latent itself, no model call)."""
        x = x.to(self.device)
        if sigma > 0:
            v = velocity(x, x.new_full((x.shape[0],), sigma))
            x0, eps = x - sigma * v, x + (1 - sigma) * v
        else:
            x0, eps = x, torch.zeros_like(x)
        cell = x0[:, :, row, col]  # [B, C]
        far = torch.cdist(cell.float(), self.palette).argmax(1)
        x0 = x0.clone()
        x0[:, :, row, col] = self.palette[far].to(x0)
        return (1 - sigma) * x0 + sigma * eps

    def early_error(
        self, captions: list[str], seed: int, batch: int, latents: torch.Tensor, s: Settings
    ) -> dict:
        """The early corruption (then denoising goes on) and the same corruption of the finished latent."""
        row, col = divmod(s.error_position, s.grid)
        err = self.sample(captions, seed, None, batch, corrupt=(s.error_step, row, col))
        finished = self.decode(self.corrupt(latents, 0.0, None, row, col).cpu())
        what = (f"latent cell (row {row}, col {col}) of the clean estimate set to the farthest palette colour after "
                f"step {s.error_step} of {self.steps} (sigma {float(self.sigmas()[s.error_step]):.3f})")  # fmt: skip
        return {"images": err, "finished": finished, "info": {"what": what}}

    def forward_passes(self, cfg: float) -> int:
        return self.steps * (2 if cfg != 1.0 else 1)

    def sequential_passes(self) -> int:
        return self.steps


class AREngine:
    """The GPT through `engines.generation` (`sample`), and token grids with forced tokens
    (`sample_ids`; without them the same tokens, which a test pins), with pass counters."""

    name, label = "ar", LABELS["ar"]
    files = ("ar", "vq")

    @property
    def model_files(self) -> dict[str, str]:
        return {k: DEFAULT_FILES[k] for k in self.files}

    def __init__(self, models_dir: Path, te, device: torch.device, cfg: float):
        self.model = load_gpt(models_dir / DEFAULT_FILES["ar"], device=device).eval()
        self.vq = load_vq(models_dir / DEFAULT_FILES["vq"], device=device).eval()
        self.te, self.device, self.cfg = te, device, cfg
        self.grid = self.model.config.grid_size
        self.counter = PassCounter(self.model, lambda x: x.shape[1])
        self._palette = None

    @classmethod
    def from_settings(cls, models_dir: Path, te, device: torch.device, s: Settings) -> AREngine:
        return cls(models_dir, te, device, s.ar_cfg)

    @property
    def palette(self) -> torch.Tensor:
        """Token id [K] of a flat image of each palette colour (the most common id of its grid)."""
        if self._palette is None:
            flat = palette_images(self.device)
            with torch.no_grad():
                ids = self.vq.encode(flat).flatten(1).cpu()
            self._palette = torch.mode(ids, dim=1).values
        return self._palette

    def wrong_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """For each token id [B], the palette token whose code vector is farthest from it."""
        book = self.vq.quantize.codebook().detach().float().cpu()
        pal = self.palette
        return pal[torch.cdist(book[ids.cpu()], book[pal]).argmax(1)]

    @torch.no_grad()
    def sample_ids(
        self,
        captions: list[str],
        seed: int,
        cfg: float | None = None,
        batch: int = 32,
        fixed: TokenGrid | None = None,
    ) -> torch.Tensor:
        cfg = self.cfg if cfg is None else cfg
        out = []
        for i in range(0, len(captions), batch):
            chunk = captions[i : i + batch]
            prefix = condition_prefix(self.model, len(chunk), positive=self.te.encode(chunk), cfg=cfg != 1.0)
            part = None
            if fixed is not None:
                part = TokenGrid(fixed.ids[i : i + batch], fixed.fixed_mask()[i : i + batch]).to(self.device)
            ids = generate(
                self.model,
                prefix,
                self.grid,
                self.grid,
                cfg_scale=cfg,
                temperature=1.0,
                seed=seed + i,
                fixed=part,
            )
            out.append(ids.cpu())
        return torch.cat(out)

    generate = sample_ids

    @torch.no_grad()
    def decode(self, ids: torch.Tensor, batch: int = 64) -> torch.Tensor:
        return torch.cat([tokens_to_image(self.vq, ids[i : i + batch]) for i in range(0, len(ids), batch)])

    def sample(
        self, captions: list[str], seed: int, cfg: float | None = None, batch: int = 32
    ) -> torch.Tensor:
        """IMAGE [B, H, W, 3] in 0..1 (CPU): `generate_autoregressive` (through lab.training.sample_ar)."""
        cfg = self.cfg if cfg is None else cfg
        return sample_ar(self.model, self.vq, self.te, captions, seed=seed, cfg=cfg, batch=batch)

    def early_error(self, captions: list[str], seed: int, batch: int, ids: torch.Tensor, s: Settings) -> dict:
        """Token `error_position` forced to the farthest palette token, the later tokens resampled from
        the same random stream; and the same token swapped into the finished grid."""
        pos = s.error_position
        n = len(captions)
        wrong = self.wrong_tokens(ids.flatten(1)[:, pos])
        forced = ids.clone()
        forced.view(n, -1)[:, pos] = wrong
        mask = torch.zeros_like(ids, dtype=torch.bool)
        mask.view(n, -1)[:, pos] = True
        out = self.sample_ids(captions, seed, None, batch, fixed=TokenGrid(forced, mask))
        flat, base = out.flatten(1), ids.flatten(1)
        row, col = divmod(pos, self.grid)
        info = {
            "what": f"token {pos} (row {row}, col {col}) of {self.grid**2} forced to the farthest palette token; "
            "later tokens resampled",
            "forced_token_in_place": bool((flat[:, pos] == wrong).all()),
            "prefix_unchanged": bool((flat[:, :pos] == base[:, :pos]).all()),
            "tokens_changed_after": round(
                float((flat[:, pos + 1 :] != base[:, pos + 1 :]).float().mean()), 4
            ),
        }
        return {"images": self.decode(out), "finished": self.decode(forced), "info": info}

    def forward_passes(self, cfg: float) -> int:
        return self.grid * self.grid * (2 if cfg != 1.0 else 1)

    def sequential_passes(self) -> int:
        return self.grid * self.grid


def _family(path: Path) -> str:
    try:
        return detect_family(stored_keys(path))
    except Exception:  # an unreadable file is simply not a candidate
        return "unknown model"


def next_scale_files(models_dir: Path) -> dict[str, Path] | None:
    """The next-scale pair in `models_dir`: the built-in names (lab.training.DEFAULT_FILES "var" and
    "msvq") where present, else the first file of each family in ar_models/ and vq_models/ (told
    apart from the GPT and the VQ by their tensor names); None when either is missing."""
    models_dir = Path(models_dir)
    out = {}
    for key, folder, family in (
        ("var", "ar_models", "VAR transformer"),
        ("msvq", "vq_models", "multi-scale VQ tokenizer"),
    ):
        default = DEFAULT_FILES.get(key)
        if default and (models_dir / default).is_file():
            out[key] = models_dir / default
            continue
        found = [p for p in sorted((models_dir / folder).glob("*.safetensors")) if _family(p) == family]
        if not found:
            return None
        out[key] = found[0]
    return out


class VAREngine:
    """The next-scale (VAR) transformer and its multi-scale VQ through `engines.generation`
    (`sample`: generate_next_scale), and token maps with one forced token at an early scale
    (`sample_maps` with kept scales: the same random stream, which a test pins), with pass counters."""

    name, label = "var", LABELS["var"]
    files = ("var", "msvq")

    def __init__(self, models_dir: Path, te, device: torch.device, cfg: float):
        models_dir = Path(models_dir)
        files = next_scale_files(models_dir)
        if files is None:
            raise FileNotFoundError(f"no next-scale model in {models_dir}")
        self.model = load_var(files["var"], device=device).eval()
        self.vq = load_multiscale_vq(files["msvq"], device=device).eval()
        if self.vq.config.image_size != synthetic.IMAGE_SIZE:
            raise ValueError(f"{files['msvq']}: the tokenizer makes {self.vq.config.image_size}px images, "
                             f"the lab's scenes are {synthetic.IMAGE_SIZE}px")  # fmt: skip
        self.model_files = {k: str(p.relative_to(models_dir)) for k, p in files.items()}
        self.te, self.device, self.cfg = te, device, cfg
        self.patch_nums = list(self.model.config.patch_nums)
        self.counter = PassCounter(self.model.blocks[0], lambda x: x.shape[1])
        self._palette: dict[int, torch.Tensor] = {}

    @classmethod
    def from_settings(cls, models_dir: Path, te, device: torch.device, s: Settings) -> VAREngine:
        return cls(models_dir, te, device, s.var_cfg)

    def palette(self, si: int) -> torch.Tensor:
        """Token id [K] of a flat image of each palette colour at scale `si` (the most common id of its map)."""
        if si not in self._palette:
            with torch.no_grad():
                maps = self.vq.encode(palette_images(self.device)).maps
            self._palette = {k: torch.mode(m.flatten(1).cpu(), dim=1).values for k, m in enumerate(maps)}
        return self._palette[si]

    def wrong_tokens(self, ids: torch.Tensor, si: int) -> torch.Tensor:
        """For each token id [B] of scale `si`, the palette token (at that scale) whose code is farthest."""
        book = self.vq.quantize.codebook().detach().float().cpu()
        pal = self.palette(si)
        return pal[torch.cdist(book[ids.cpu()], book[pal]).argmax(1)]

    @torch.no_grad()
    def sample_maps(
        self,
        captions: list[str],
        seed: int,
        cfg: float | None = None,
        batch: int = 32,
        source: MultiScaleTokens | None = None,
        keep: int = 0,
    ) -> MultiScaleTokens:
        """Token maps (CPU) of every scale; the first `keep` scales come from `source` (one row per caption)."""
        cfg = self.cfg if cfg is None else cfg
        parts = []
        for i in range(0, len(captions), batch):
            chunk = captions[i : i + batch]
            cond = condition_rows(self.model, len(chunk), positive=self.te.encode(chunk), cfg=cfg != 1.0)
            src = None if source is None else MultiScaleTokens(tuple(m[i : i + batch] for m in source.maps))
            tokens, _ = sample_scales(self.model, self.vq.quantize, cond, len(chunk), cfg=cfg, seed=seed + i,
                                      source=src, keep_scales=keep)  # fmt: skip
            parts.append(tokens.to("cpu"))
        return MultiScaleTokens(
            tuple(torch.cat([p.maps[k] for p in parts]) for k in range(len(self.patch_nums)))
        )

    generate = sample_maps

    @torch.no_grad()
    def decode(self, tokens: MultiScaleTokens, batch: int = 64) -> torch.Tensor:
        n = tokens.batch
        return torch.cat([scales_to_image(self.vq, MultiScaleTokens(tuple(m[i : i + batch] for m in tokens.maps)))
                          for i in range(0, n, batch)])  # fmt: skip

    @torch.no_grad()
    def sample(
        self, captions: list[str], seed: int, cfg: float | None = None, batch: int = 32
    ) -> torch.Tensor:
        """IMAGE [B, H, W, 3] in 0..1 (CPU): `generate_next_scale`, batch by batch (image k from seed + k)."""
        cfg = self.cfg if cfg is None else cfg
        return torch.cat([generate_next_scale(self.model, self.vq, self.te.encode(captions[i : i + batch]),
                                              seed=seed + i, cfg=cfg)
                          for i in range(0, len(captions), batch)])  # fmt: skip

    def error_scale(self, s: Settings) -> int:
        """The early scale that gets the error: `error_fraction` of the scales in (never the 1x1 first)."""
        k = len(self.patch_nums)
        return min(k - 1, max(1, round(s.error_fraction * k)))

    def early_error(
        self, captions: list[str], seed: int, batch: int, tokens: MultiScaleTokens, s: Settings
    ) -> dict:
        """One token of an early scale's map forced to the farthest palette token, the finer scales
        resampled from the same random stream; and the same token swapped into the finished maps."""
        si = self.error_scale(s)
        pn = self.patch_nums[si]
        row, col = divmod(s.error_position, s.grid)
        r, c = row * pn // s.grid, col * pn // s.grid
        maps = list(tokens.maps)
        wrong = self.wrong_tokens(maps[si][:, r, c], si)
        forced = maps[si].clone()
        forced[:, r, c] = wrong
        source = MultiScaleTokens((*maps[:si], forced))
        out = self.sample_maps(captions, seed, None, batch, source=source, keep=si + 1)
        finished = MultiScaleTokens((*maps[:si], forced, *maps[si + 1 :]))
        later_new = torch.cat([m.flatten(1) for m in out.maps[si + 1 :]], 1)
        later_old = torch.cat([m.flatten(1) for m in maps[si + 1 :]], 1)
        info = {
            "what": f"scale {si + 1} of {len(self.patch_nums)} ({pn}x{pn}): token (row {r}, col {c}) forced to the "
            "farthest palette token; the finer scales resampled",
            "forced_token_in_place": bool((out.maps[si][:, r, c] == wrong).all()),
            "prefix_unchanged": all(torch.equal(a, b) for a, b in zip(out.maps[:si], maps[:si])),
            "tokens_changed_after": round(float((later_new != later_old).float().mean()), 4),
        }
        return {"images": self.decode(out), "finished": self.decode(finished), "info": info}

    def forward_passes(self, cfg: float) -> int:
        return len(self.patch_nums) * (2 if cfg != 1.0 else 1)

    def sequential_passes(self) -> int:
        return len(self.patch_nums)


ENGINES = {"dit": DiTEngine, "ar": AREngine, "var": VAREngine}


# ---------------------------------------------------------------- statistics


def per_image_scores(images: torch.Tensor, scenes: list[dict]) -> list[dict[str, bool]]:
    return [score(img.numpy(), a) for img, a in zip(images, scenes)]


def rate(values) -> dict:
    """Mean of 0/1 (or fractional) values with its standard error (binomial for 0/1)."""
    v = np.asarray(list(values), dtype=np.float64)
    if len(v) == 0:
        return {"value": None, "se": None, "n": 0}
    m = float(v.mean())
    binary = bool(np.isin(v, (0.0, 1.0)).all())
    se = (
        math.sqrt(m * (1 - m) / len(v))
        if binary
        else float(v.std(ddof=1) / math.sqrt(len(v)))
        if len(v) > 1
        else 0.0
    )
    return {"value": round(m, 4), "se": round(se, 4), "n": len(v)}


def kind_items(results: list[dict[str, bool]], scenes: list[dict]) -> dict[str, np.ndarray]:
    """Per-caption values of each adherence metric (each over the captions of its scene kind)."""
    by = lambda kind: [r for r, a in zip(results, scenes) if a["kind"] == kind]  # noqa: E731
    frac = lambda rs: np.array([float(np.mean(list(r.values()))) for r in rs])  # noqa: E731
    allc = lambda rs: np.array([float(all(r.values())) for r in rs])  # noqa: E731
    return {
        "word_exact": np.array([float(r["word"]) for r in by("word")]),
        "word_all": allc(by("word")),
        "single_object_attribute_accuracy": frac(by("shape")),
        "single_object_all": allc(by("shape")),
        "relation_all": allc(by("relation")),
        "relation_attribute_accuracy": frac(by("relation")),
        "relation_correct": np.array([float(r["relation"]) for r in by("relation")]),
        "texture_accuracy": frac(by("texture")),
        "texture_all": allc(by("texture")),
        "attribute_accuracy": frac(results),
        "all_correct": allc(results),
    }


def adherence_metrics(results: list[dict[str, bool]], scenes: list[dict]) -> dict:
    return {k: rate(v) for k, v in kind_items(results, scenes).items()}


def fd_with_se(feats: np.ndarray, real_mu, real_cov, bootstrap: int, seed: int) -> tuple[float, float]:
    """Fréchet distance to the real statistics, and a bootstrap standard error over the generated set."""
    fd = scene_features.frechet_distance(*scene_features.feature_stats(feats), real_mu, real_cov)
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(bootstrap):
        pick = rng.integers(0, len(feats), len(feats))
        boots.append(
            scene_features.frechet_distance(*scene_features.feature_stats(feats[pick]), real_mu, real_cov)
        )
    return fd, float(np.std(boots, ddof=1)) if len(boots) > 1 else 0.0


def pairwise_diversity(groups: list[np.ndarray]) -> tuple[dict, np.ndarray]:
    """Mean pairwise L2 distance within each group (one group per caption): the summary (mean and SE
    over groups, with the per-caption values) and the per-caption values."""
    per = []
    for g in groups:
        d = [np.linalg.norm(a - b) for a, b in itertools.combinations(g, 2)]
        if d:
            per.append(float(np.mean(d)))
    return rate(per) | {"per_caption": [round(p, 4) for p in per]}, np.array(per)


def needed_n(
    diff: float, sd: float, z: float = Z_RULE, power: float = POWER, min_n: int = MIN_N
) -> int | None:
    """Samples (per side, or pairs) at which a true difference `diff` between two means, with
    per-sample standard deviation `sd` of the difference, passes the `z`-standard-error rule with
    probability `power`; None when `diff` is 0 (no n is enough).

    With n samples the estimated difference d̂ is about normal with mean d and standard error
    s/√n, where s is the per-sample standard deviation of the difference: for paired samples
    (the same captions and seeds on both sides) the SD of the per-caption differences, for two
    independent samples √(s_a² + s_b²). The rule decides when |d̂| > z·s/√n, which happens with
    probability ≈ Φ(|d|·√n/s − z) (the other tail is negligible). Setting that to `power` and
    solving: √n = (z + z_power)·s/|d|, so

        n = ⌈((z + z_power) · s / |d|)²⌉,   z_power = Φ⁻¹(power) (0.84 for 80%),

    at least `min_n`. With z = 2 and 80% power, n ≈ 8.1·s²/d². The measured d and s stand in for the
    true ones, so it is a guide (an undecided measured d is itself noisy), not a promise.
    """
    if not math.isfinite(diff) or not math.isfinite(sd) or diff == 0:
        return None
    if sd == 0:
        return min_n
    z_power = statistics.NormalDist().inv_cdf(power)
    n = math.ceil(((z + z_power) * sd / abs(diff)) ** 2)
    return max(min_n, min(n, MAX_NEEDED))


def decide(diff: float, se: float, n: int, sd: float, min_n: int = MIN_N) -> dict:
    """The 2-SE rule on a difference already oriented so that positive means the claim holds:
    the verdict, why, and (when undecided) the sample size it would need."""
    out = {"diff": _round(diff), "se": _round(se), "n": n, "sd": _round(sd), "needed_n": None}
    if not math.isfinite(diff):
        return out | {"verdict": VERDICTS[2], "why": "no data"}
    need = needed_n(diff, sd, min_n=min_n)
    if n < min_n:
        return out | {"verdict": VERDICTS[2], "why": f"too few samples (n < {min_n})",
                      "needed_n": max(min_n, need) if need is not None else None}  # fmt: skip
    if diff > Z_RULE * se:
        return out | {"verdict": VERDICTS[0], "why": "difference beyond 2 SE"}
    if -diff > Z_RULE * se:
        return out | {"verdict": VERDICTS[1], "why": "difference beyond 2 SE, the other way"}
    return out | {"verdict": VERDICTS[2], "why": "within 2 SE", "needed_n": need}


def paired(claimed: np.ndarray, other: np.ndarray, higher_is_better: bool = True) -> dict:
    """`decide` on per-sample values of the same captions and seeds: the mean per-caption difference
    and the SE from the SD of the differences."""
    a, b = np.asarray(claimed, np.float64), np.asarray(other, np.float64)
    if len(a) != len(b):
        raise ValueError(f"paired samples differ in length: {len(a)} vs {len(b)}")
    if len(a) == 0:
        return decide(float("nan"), float("nan"), 0, float("nan"))
    d = (a - b) if higher_is_better else (b - a)
    sd = float(d.std(ddof=1)) if len(d) > 1 else float("nan")
    se = sd / math.sqrt(len(d)) if len(d) > 1 else float("nan")
    return decide(float(d.mean()), se, len(d), sd)


def unpaired(claimed: dict, other: dict, higher_is_better: bool = True, min_n: int = MIN_N) -> dict:
    """`decide` on two independent summaries {"value", "se", "n"} (per-sample SD = se·√n)."""
    a, b = claimed["value"], other["value"]
    if a is None or b is None:
        return decide(float("nan"), float("nan"), 0, float("nan"))
    n = min(claimed["n"], other["n"])
    d = (a - b) if higher_is_better else (b - a)
    se = math.hypot(claimed["se"] or 0.0, other["se"] or 0.0)
    if n < 2:
        return decide(d, float("nan"), n, float("nan"), min_n)
    sd = math.sqrt((claimed["se"] or 0.0) ** 2 * claimed["n"] + (other["se"] or 0.0) ** 2 * other["n"])
    return decide(d, se, n, sd, min_n)


def exact(claimed: float, other: float, higher_is_better: bool = True) -> dict:
    """Counts with no sampling error (sequential passes): the sign decides."""
    d = (claimed - other) if higher_is_better else (other - claimed)
    v = VERDICTS[0] if d > 0 else VERDICTS[1] if d < 0 else VERDICTS[2]
    why = "exact counts" if d else "equal counts"
    return {"diff": d, "se": 0.0, "n": None, "sd": 0.0, "needed_n": None, "verdict": v, "why": why}


def compare(claimed: dict, other: dict, higher_is_better: bool = True) -> tuple[str, float, float, str]:
    """Verdict on 'claimed beats other' from two summaries: (word, difference, its SE, why)."""
    c = unpaired(claimed, other, higher_is_better)
    return c["verdict"], c["diff"] if c["diff"] is not None else float("nan"), c["se"], c["why"]


def _round(x: float, digits: int = 4):
    return round(x, digits) if isinstance(x, (int, float)) and math.isfinite(x) else None


def fmt(m: dict | None, digits: int = 3) -> str:
    if not m or m.get("value") is None:
        return "-"
    if m.get("se") is None:
        return f"{m['value']:.{digits}f}"
    return f"{m['value']:.{digits}f}±{m['se']:.{digits}f}"


def timed(fn, device: torch.device, repeats: int) -> list[float]:
    """Seconds of each of `repeats` calls."""
    out = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - t)
    return out


# ---------------------------------------------------------------- the claims


@dataclass(frozen=True)
class Claim:
    """A usual claim, as comparisons "claimed beats other" on measured quantities.

    `kind` says where the numbers come from: "paired" (one value per caption in each paradigm's
    items, the same captions and seeds), "summary" (a value with a bootstrap SE: the Fréchet
    distance), "repeats" (timed repeats), "exact" (counts) or "guidance" (each paradigm's default
    scale against cfg 1 on the same captions). `flag` is the option that sets the sample size and
    `per_flag` how many samples one unit of it gives."""

    row: int
    claim: str
    metrics: tuple[str, ...]
    label: str
    pairs: tuple[tuple[str, str], ...] = ()  # (claimed better, other)
    higher_is_better: bool = True
    kind: str = "paired"
    flag: str = "--n"
    per_flag: int = 1
    digits: int = 3
    also: tuple[str, ...] = ()  # measurements shown alongside
    reference: tuple[str, ...] | None = None  # a value for real renders, at r[reference[0]][reference[1]]


AR_FAMILY = (("ar", "dit"), ("var", "dit"))
KINDS_N = len(synthetic.KINDS)
CLAIMS = (
    Claim(1, "text rendering: autoregressive spells words better than diffusion (word exact match)",
          ("word_exact",), "word exact match", AR_FAMILY),
    Claim(2, "prompt adherence: autoregressive follows multi-object (relation) prompts better",
          ("relation_all",), "relation scenes all correct", AR_FAMILY,
          also=("relation_attribute_accuracy", "single_object_attribute_accuracy", "single_object_all")),
    Claim(3, "texture/realism: diffusion gives more realistic images (Frechet distance in classifier features, "
             "lower is better)", ("fd",), "Frechet distance", (("dit", "ar"), ("dit", "var")),
          higher_is_better=False, kind="summary", per_flag=KINDS_N, digits=2, also=("texture_accuracy",),
          reference=("realism_reference", "fd_floor")),
    Claim(4, "latency: diffusion is faster per image than autoregression (AR is slow), at batch 1 and 16",
          ("ms_per_image_batch1", "ms_per_image_batch16"), "ms per image", (("dit", "ar"), ("dit", "var")),
          higher_is_better=False, kind="repeats", flag="--latency-repeats", digits=1),
    Claim(5, "diversity: diffusion gives more varied images per caption than autoregressive sampling",
          ("diversity_features",), "mean pairwise feature distance per caption", (("dit", "ar"), ("dit", "var")),
          flag="--diversity-per-kind", per_flag=KINDS_N, also=("diversity_pixels",),
          reference=("diversity_reference", "real_features")),
    Claim(6, "error accumulation: after one forced early error, raster AR's images get worse beyond the error "
             "itself more than diffusion's and next-scale's",
          ("accumulation",), "accumulation (extra attribute-accuracy drop over the same error pasted into the "
          "finished image)", (("ar", "dit"), ("ar", "var")), per_flag=KINDS_N, also=("drop", "drop_no_reaction")),
    Claim(7, "guidance: every paradigm needs classifier-free guidance (its default scale beats cfg 1)",
          ("attribute_accuracy",), "attribute accuracy, default scale vs cfg 1", kind="guidance",
          flag="--sweep-per-kind", per_flag=KINDS_N),
    Claim(8, "tooling: diffusion has the richer adapter ecosystem (LoRA, ControlNet)", (), "", kind="none"),
    Claim(9, "sequential passes: raster AR needs one per token, diffusion one per step, next-scale one per scale "
             "(the fewest)", ("sequential_passes_per_batch",), "sequential passes per batch",
          (("dit", "ar"), ("var", "ar"), ("var", "dit")), higher_is_better=False, kind="exact", flag="", digits=0),
)  # fmt: skip
ROWS = tuple(c.row for c in CLAIMS)


def _at(m: dict, key: tuple[str, ...]):
    for k in key:
        m = m[k]
    return m


def _strip(m):
    return {k: v for k, v in m.items() if k != "per_caption"} if isinstance(m, dict) else m


def _n(m: dict) -> str:
    if m.get("se") is None:
        return f"{m['value']:.3f} (n={m['n']})"
    return f"{m['value']:.3f}±{m['se']:.3f} (n={m['n']})"


def _flag_value(c: Claim, need: int | None, metric: str) -> str:
    """The option setting that gives `need` samples for this claim's metric."""
    if need is None or not c.flag:
        return ""
    value = math.ceil(need / c.per_flag)
    if c.flag == "--latency-repeats":
        return f"{c.flag} {value},B16" if metric.endswith("batch1") else f"{c.flag} B1,{value}"
    return f"{c.flag} {value}"


def comparisons(c: Claim, r: dict, items: dict | None) -> list[dict]:
    """Every comparison of a claim among the paradigms in the report (`items`: per-caption values,
    present in a live run; without them paired metrics fall back to their summaries)."""
    present = r["paradigms"]
    out = []
    if c.kind == "guidance":
        for name in present:
            pts = {p["cfg"]: p for p in r[name]["guidance_sweep"]}
            default = r[name]["cfg"]
            if default == 1.0 or 1.0 not in pts:
                continue
            if items is not None:
                res = paired(items[name]["guidance"][default], items[name]["guidance"][1.0])
            else:
                res = unpaired(pts[default]["attribute_accuracy"], pts[1.0]["attribute_accuracy"])
            out.append({"metric": c.metrics[0], "claimed": f"{name}@cfg{default:g}", "other": f"{name}@cfg1",
                        "pair": [name, name], **res})  # fmt: skip
    for win, lose in c.pairs if c.kind != "guidance" else ():
        if win not in present or lose not in present:
            continue
        for metric in c.metrics:
            if c.kind == "exact":
                res = exact(r[win][metric], r[lose][metric], c.higher_is_better)
            elif c.kind == "repeats":
                lat = r[win]["latency"][metric], r[lose]["latency"][metric]
                res = unpaired(*lat, c.higher_is_better, min_n=MIN_REPEATS)
            elif c.kind == "paired" and items is not None:
                res = paired(items[win][metric], items[lose][metric], c.higher_is_better)
            else:
                res = unpaired(_metric(r[win], metric), _metric(r[lose], metric), c.higher_is_better)
            out.append({"metric": metric, "claimed": win, "other": lose, "pair": [win, lose], **res})
    for x in out:
        x["flag"] = _flag_value(c, x["needed_n"], x["metric"])
    return out


def _metric(m: dict, metric: str):
    if metric in ("accumulation", "drop", "drop_no_reaction"):
        return m["early_error"][metric]
    return m[metric]


def row_verdict(comps: list[dict]) -> tuple[str, str, int | None]:
    """(verdict, why, needed n) of a row from its comparisons: confirmed when all are, refuted
    when any is, otherwise not measurable here with the largest needed n of the undecided ones."""
    if not comps:
        return VERDICTS[2], "no comparison", None
    words = [x["verdict"] for x in comps]
    refuted = [x for x in comps if x["verdict"] == VERDICTS[1]]
    if refuted:
        return VERDICTS[1], "refuted for " + ", ".join(_pair_name(x) for x in refuted), None
    if all(w == VERDICTS[0] for w in words):
        return VERDICTS[0], "every comparison beyond 2 SE" if comps[0]["se"] else "exact counts", None
    open_ = [x for x in comps if x["verdict"] == VERDICTS[2]]
    needs = [x["needed_n"] for x in open_]
    need = None if any(n is None for n in needs) else max(needs)
    return VERDICTS[2], "undecided for " + ", ".join(f"{_pair_name(x)} ({x['why']})" for x in open_), need


def _side(key: str) -> str:
    """'ar' -> 'raster AR'; 'var@cfg2' -> 'next-scale cfg2'."""
    name, _, cfg = key.partition("@")
    return f"{NAMES[name]} {cfg}" if cfg else NAMES[name]


HEADLINE = {c.metrics[0] for c in CLAIMS if len(c.metrics) == 1}


def _pair_name(x: dict) -> str:
    metric = "" if x["metric"] in HEADLINE else f" {x['metric']}"
    return f"{_side(x['claimed'])} vs {_side(x['other'])}{metric}"


def _need_text(x: dict) -> str:
    if x["verdict"] != VERDICTS[2]:
        return ""
    if x["needed_n"] is None:
        if not x.get("n"):
            return "no data"
        return f"needs more than n={x['n']} (no difference measured yet)"
    if x["needed_n"] >= MAX_NEEDED:
        return f"needs n > {MAX_NEEDED} (a difference of {x['diff']:+.4f} is about none)"
    return f"needs n ≈ {x['needed_n']}" + (f" ({x['flag']})" if x.get("flag") else "")


def verdicts(r: dict, items: dict | None = None) -> list[dict]:
    """One verdict per claim row with its comparisons, evidence and numbers."""
    out = []
    for c in CLAIMS:
        if c.kind == "none":
            out.append({"row": c.row, "claim": c.claim, "verdict": VERDICTS[2], "why": "not a property of generated images",
                        "evidence": "an ecosystem is not something this benchmark measures; what the shipped LoRA and "
                        "ControlNet adapters do for each paradigm is measured by `tessera bench adapters` (bench/adapters.py)",
                        "short": "see tessera bench adapters", "numbers": {}, "comparisons": [], "needed_n": None})  # fmt: skip
            continue
        comps = comparisons(c, r, items)
        v, why, need = row_verdict(comps)
        missing = [p for pair in c.pairs for p in pair if p not in r["paradigms"]]
        if missing and r.get("absent"):
            why += "; " + "; ".join(sorted({r["absent"][p] for p in missing if p in r["absent"]}))
        f = f"{{:.{c.digits}f}}"
        evidence, shorts = [], []
        for x in comps:
            vals = _values(c, r, x)
            evidence.append(f"{_pair_name(x)}: {vals}; advantage {x['diff']:+.3f}±{x['se']:.3f}"
                            if x["diff"] is not None and x["se"] is not None else f"{_pair_name(x)}: {vals}")  # fmt: skip
            if x["verdict"] == VERDICTS[2]:
                evidence[-1] += f" -> {x['why']}; {_need_text(x)}"
            else:
                evidence[-1] += f" -> {x['verdict']}"
        for name in r["paradigms"]:
            if c.kind in ("paired", "summary", "exact"):
                shorts.append(f"{NAMES[name]} {f.format(_value_of(r[name], c.metrics[0]))}")
        if c.row == 1:
            evidence.append(f"chance {WORD_CHANCE:.3f}")
        if c.reference is not None:
            ref = _at(r, c.reference)
            evidence.append(f"real renders {f.format(ref) if not isinstance(ref, dict) else _n(ref)}")
        for key in c.also:
            evidence.append(key.replace("_", " ") + " " + ", ".join(
                f"{NAMES[n]} {_n(_metric(r[n], key))}" for n in r["paradigms"]))  # fmt: skip
        # what each image cost, on every measured row (CFG's unconditional rows count)
        evidence.append("forward passes per image " + ", ".join(
            f"{NAMES[n]} {r[n]['forward_passes_per_image']:.0f}" for n in r["paradigms"]))  # fmt: skip
        if c.kind == "repeats":
            shorts = [f"{NAMES[n]} b1 {r[n]['latency']['ms_per_image_batch1']['value']:.0f} / b16 "
                      f"{r[n]['latency']['ms_per_image_batch16']['value']:.0f} ms" for n in r["paradigms"]]  # fmt: skip
            evidence.append(f"device {r['settings']['device']}")
        if c.kind == "guidance":
            shorts = [
                f"{_pair_name(x).split(' vs')[0]} gain {x['diff']:+.3f}"
                for x in comps
                if x["diff"] is not None
            ]
        if c.row == 1 and v != VERDICTS[1] and comps:
            best = max(r[n]["word_exact"]["value"] + 2 * r[n]["word_exact"]["se"] for n in r["paradigms"])
            if best <= WORD_CHANCE:
                why += "; every paradigm at chance"
        if need is not None:
            why += f"; the row needs n ≈ {need}" if need < MAX_NEEDED else f"; the row needs n > {MAX_NEEDED}"
        numbers = {"comparisons": comps}
        for name in r["paradigms"]:
            if c.kind in ("paired", "summary"):
                numbers[name] = _strip(_metric(r[name], c.metrics[0]))
        out.append({"row": c.row, "claim": c.claim, "verdict": v, "why": why, "evidence": "; ".join(evidence),
                    "short": (c.label.split(" (")[0] + ": " if c.label else "") + ", ".join(shorts),
                    "numbers": numbers, "comparisons": comps, "needed_n": need})  # fmt: skip
    return sorted(out, key=lambda v: v["row"])


def _value_of(m: dict, metric: str) -> float:
    x = _metric(m, metric)
    return x["value"] if isinstance(x, dict) else float(x)


def _values(c: Claim, r: dict, x: dict) -> str:
    if c.kind == "guidance":
        name = x["pair"][0]
        pts = {p["cfg"]: p["attribute_accuracy"] for p in r[name]["guidance_sweep"]}
        return f"cfg {r[name]['cfg']:g} {_n(pts[r[name]['cfg']])} vs cfg 1 {_n(pts[1.0])}"
    a, b = x["claimed"], x["other"]
    if c.kind == "exact":
        return f"{NAMES[a]} {r[a][x['metric']]:.0f} vs {NAMES[b]} {r[b][x['metric']]:.0f}"
    if c.kind == "repeats":
        return (
            f"{NAMES[a]} {_n(r[a]['latency'][x['metric']])} vs {NAMES[b]} {_n(r[b]['latency'][x['metric']])}"
        )
    return f"{NAMES[a]} {_n(_metric(r[a], x['metric']))} vs {NAMES[b]} {_n(_metric(r[b], x['metric']))}"


# ---------------------------------------------------------------- the benchmark


def available(models_dir: Path) -> tuple[list[str], dict[str, str]]:
    """The paradigms whose files are in `models_dir`, and for the others why not."""
    models_dir = Path(models_dir)
    found, absent = [], {}
    for name in PARADIGMS:
        if name == "var":
            files = next_scale_files(models_dir)
            if files is None:
                absent[name] = f"no next-scale model in {models_dir}"
                continue
        else:
            missing = [
                DEFAULT_FILES[k] for k in ENGINES[name].files if not (models_dir / DEFAULT_FILES[k]).is_file()
            ]
            if missing:
                absent[name] = f"no {NAMES[name]} model in {models_dir} (missing {', '.join(missing)})"
                continue
        found.append(name)
    return found, absent


def classifier_for(models_dir: Path, classifier_path: Path | None) -> Path:
    """The given classifier, else the models folder's, else the shipped one (which load_or_train
    trains and writes when it is missing)."""
    if classifier_path is not None:
        return Path(classifier_path)
    own = Path(models_dir) / CLASSIFIER_FILE
    return own if own.is_file() else ROOT / "models" / CLASSIFIER_FILE


def run(settings: Settings, models_dir: Path, classifier_path: Path | None = None, log=print) -> dict:
    s = settings
    device = torch.device(s.device)
    started = time.time()
    models_dir = Path(models_dir)
    found, absent = available(models_dir)
    names = [p for p in found if s.paradigms is None or p in s.paradigms]
    for p in s.paradigms or ():
        if p not in found:
            raise FileNotFoundError(absent[p])
    for p, why in absent.items():
        log(f"[paradigms] {why}: leaving the {NAMES[p]} column out")
    if not names:
        raise FileNotFoundError(f"no paradigm's model files in {models_dir}")
    te = load_text_encoder(
        models_dir / DEFAULT_FILES["text_encoder"], device=device, dtype=torch.float32
    ).eval()
    engines = {name: ENGINES[name].from_settings(models_dir, te, device, s) for name in names}
    net = scene_features.load_or_train(classifier_for(models_dir, classifier_path)).to(device)

    # kinds interleaved (shape, relation, word, texture, shape, …): every prefix of the list is balanced,
    # and a prefix generates exactly as it does inside the full list (noise and AR streams follow the index)
    blocks = [heldout_scenes(s.n, kinds=(k,)) for k in synthetic.KINDS]
    scenes = [block[i] for i in range(s.n) for block in blocks]
    captions = [synthetic.caption(a) for a in scenes]
    log(f"[paradigms] {', '.join(LABELS[n] for n in names)} loaded ({time.time() - started:.0f}s)")
    log(f"[paradigms] {len(captions)} held-out captions ({s.n} per kind), seed {s.seed}, device {device}")

    # real renders of the same scenes: reference statistics, and a same-size real set for the floor
    real = np.stack(
        [
            synthetic.render(a, 10_000 + 97 * i + k)
            for i, a in enumerate(scenes)
            for k in range(s.real_per_scene)
        ]
    )
    real_feats = scene_features.extract_features(net, real)
    real_mu, real_cov = scene_features.feature_stats(real_feats)
    floor_imgs = np.stack([synthetic.render(a, 555_555 + i) for i, a in enumerate(scenes)])
    floor_fd, floor_se = fd_with_se(
        scene_features.extract_features(net, floor_imgs), real_mu, real_cov, s.bootstrap, s.seed
    )

    report: dict = {
        "bench": "paradigms",
        "mode": "quick" if s.quick else "full",
        "models_dir": str(models_dir),
        "paradigms": names,
        "absent": absent,
        "settings": asdict(s) | {"error_step": s.error_step, "error_position": s.error_position},
        "models": {n: engines[n].model_files for n in names},
        "captions": len(captions),
        "realism_reference": {
            "real_images": len(real),
            "fd_floor": round(floor_fd, 3),
            "fd_floor_se": round(floor_se, 3),
        },
    }
    states, main_images, main_results, items = {}, {}, {}, {}
    for name, eng in engines.items():
        t0 = time.time()
        cfg = eng.cfg
        eng.counter.reset()
        states[name] = eng.generate(captions, s.seed, cfg, s.batch)
        images = eng.decode(states[name])
        chunks = math.ceil(len(captions) / s.batch)
        passes = {
            "forward_passes_per_image": eng.counter.rows / len(captions),
            "sequential_passes_per_batch": eng.counter.calls / chunks,
            "image_positions_per_image": eng.counter.row_positions / len(captions),
            "implied_forward_passes_per_image": eng.forward_passes(cfg),
            "implied_sequential_passes": eng.sequential_passes(),
        }
        results = per_image_scores(images, scenes)
        main_images[name], main_results[name] = images, results
        items[name] = kind_items(results, scenes)
        feats = scene_features.extract_features(net, images)
        fd, fd_se = fd_with_se(feats, real_mu, real_cov, s.bootstrap, s.seed)
        report[name] = {
            "label": eng.label,
            "cfg": cfg,
            **{k: rate(v) for k, v in items[name].items()},
            "fd": {"value": round(fd, 3), "se": round(fd_se, 3), "n": len(images)},
            **passes,
            "seconds": round(time.time() - t0, 1),
        }
        log(f"[paradigms] {name}: {len(images)} images in {time.time() - t0:.1f}s")

    # ---- diversity: several seeds per caption (the same captions for every paradigm)
    div_idx = [
        i
        for k in synthetic.KINDS
        for i in [j for j, a in enumerate(scenes) if a["kind"] == k][: s.diversity_per_kind]
    ]
    div_caps = [captions[i] for i in div_idx]
    real_groups = [
        scene_features.extract_features(
            net, np.stack([synthetic.render(scenes[i], 77 + 13 * k) for k in range(s.diversity_seeds)])
        )
        for i in div_idx
    ]
    report["diversity_reference"] = {"real_features": pairwise_diversity(real_groups)[0]}
    for name, eng in engines.items():
        sets = [main_images[name][div_idx]]
        for k in range(1, s.diversity_seeds):
            sets.append(eng.sample(div_caps, s.seed + 1000 * k, None, s.batch))
        stack = torch.stack(sets, 1)  # [captions, seeds, H, W, 3]
        f = [scene_features.extract_features(net, g) for g in stack]
        px = [g.flatten(1).numpy() / math.sqrt(g[0].numel()) for g in stack]  # RMS pixel distance
        report[name]["diversity_features"], items[name]["diversity_features"] = pairwise_diversity(f)
        report[name]["diversity_pixels"], items[name]["diversity_pixels"] = pairwise_diversity(px)
    log(f"[paradigms] diversity runs done ({time.time() - started:.0f}s)")

    # ---- early errors, same seeds: the score drop after the error, and after the same error pasted
    # into the finished image; the accumulation is their difference, per caption
    for name, eng in engines.items():
        err = eng.early_error(captions, s.seed, s.batch, states[name], s)
        base = items[name]["attribute_accuracy"]
        after = kind_items(per_image_scores(err["images"], scenes), scenes)["attribute_accuracy"]
        pasted = kind_items(per_image_scores(err["finished"], scenes), scenes)["attribute_accuracy"]
        items[name] |= {
            "drop": base - after,
            "drop_no_reaction": base - pasted,
            "accumulation": pasted - after,
        }
        report[name]["early_error"] = {
            **err["info"],
            "drop": rate(base - after),
            "drop_no_reaction": rate(base - pasted),
            "accumulation": rate(pasted - after),
            "score_after": rate(after),
            "pixels_changed": round(float((err["images"] - main_images[name]).abs().mean()), 5),
        }
    log(f"[paradigms] early-error runs done ({time.time() - started:.0f}s)")

    # ---- guidance sweep on the first sweep_per_kind captions of each kind (the main run gives the
    # default scale's point: a prefix of the caption list generates exactly as in the full list)
    m_sweep = len(synthetic.KINDS) * min(s.n, s.sweep_per_kind or s.n)
    sweep_scenes, sweep_captions = scenes[:m_sweep], captions[:m_sweep]
    report["guidance_sweep_captions"] = m_sweep
    for name, eng in engines.items():
        points, items[name]["guidance"] = [], {}
        for cfg in s.sweep(name):
            results = (
                main_results[name][:m_sweep]
                if cfg == eng.cfg
                else per_image_scores(eng.sample(sweep_captions, s.seed, cfg, s.batch), sweep_scenes)
            )
            per = kind_items(results, sweep_scenes)
            items[name]["guidance"][cfg] = per["attribute_accuracy"]
            points.append(
                {
                    "cfg": cfg,
                    "attribute_accuracy": rate(per["attribute_accuracy"]),
                    "all_correct": rate(per["all_correct"]),
                }
            )
        report[name]["guidance_sweep"] = points
    log(f"[paradigms] guidance sweeps done ({time.time() - started:.0f}s)")

    # ---- latency, batch 1 and 16: mean and SE over the timed repeats
    for name, eng in engines.items():
        lat = {}
        for b, repeats in zip((1, 16), s.latency_repeats):
            caps = (captions * math.ceil(b / len(captions)))[:b]
            fn = lambda eng=eng, caps=caps, b=b: eng.sample(caps, s.seed, None, b)  # noqa: E731
            if b == 1:
                fn()  # warm-up
            ms = [1000 * t / b for t in timed(fn, device, repeats)]
            lat[f"ms_per_image_batch{b}"] = rate(ms) | {"runs": [round(x, 2) for x in ms]}
        report[name]["latency"] = lat
    log(f"[paradigms] latency done ({time.time() - started:.0f}s)")

    report["verdicts"] = verdicts(report, items)
    report["seconds"] = round(time.time() - started, 1)
    return _finite(report)


def _finite(x):
    """NaN/inf → None everywhere, so the report is strict JSON."""
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


# ---------------------------------------------------------------- learning curves


def stability(words: list[str]) -> str:
    """Across budgets: 'holds at every budget' (the same decided verdict everywhere), 'flips'
    (confirmed at one budget, refuted at another), else 'undecided at some budget'."""
    decided = {w for w in words if w != VERDICTS[2]}
    if decided == {VERDICTS[0], VERDICTS[1]}:
        return "flips"
    if words and len(decided) == 1 and VERDICTS[2] not in words:
        return "holds at every budget"
    return "undecided at some budget"


def curves(budgets: list[tuple[str, dict]]) -> list[dict]:
    """Per claim row, and per comparison in it, the verdict at each budget and its stability."""
    rows = []
    for c in CLAIMS:
        per = [next(v for v in rep["verdicts"] if v["row"] == c.row) for _, rep in budgets]
        words = [v["verdict"] for v in per]
        keys: list[tuple] = []
        for v in per:
            for x in v["comparisons"]:
                k = (x["claimed"], x["other"], x["metric"])
                if k not in keys:
                    keys.append(k)
        comps = []
        for k in keys:
            at = []
            for v in per:
                x = next((x for x in v["comparisons"] if (x["claimed"], x["other"], x["metric"]) == k), None)
                at.append(x)
            cw = [x["verdict"] if x else "absent" for x in at]
            comps.append({"claimed": k[0], "other": k[1], "metric": k[2], "verdicts": cw,
                          "diffs": [x["diff"] if x else None for x in at],
                          "needed_n": [x["needed_n"] if x else None for x in at],
                          "stability": stability([w for w in cw if w != "absent"]) if "absent" not in cw
                          else "not measured at every budget"})  # fmt: skip
        steady = stability(words) if keys else "not measured here"
        rows.append({"row": c.row, "claim": c.claim, "verdicts": words, "stability": steady,
                     "needed_n": [v["needed_n"] for v in per], "comparisons": comps})  # fmt: skip
    return rows


def budget_dirs(specs: list[str]) -> list[tuple[str, Path]]:
    """`LABEL=DIR` or DIR (labelled by its folder name) for each budget, in the order given."""
    out = []
    for spec in specs:
        label, sep, path = spec.partition("=")
        if not sep:
            label, path = Path(spec).name, spec
        if not Path(path).is_dir():
            raise FileNotFoundError(f"--budgets: {path} is not a folder")
        out.append((label, Path(path)))
    return out


def snapshot_dirs(out: Path) -> list[tuple[str, Path]]:
    """The budget snapshots OUT/<fraction>/ that lab.training's --snapshots wrote, smallest first,
    labelled by their folder names (lab.learning_curves.snapshot_folders finds them)."""
    return [(folder.name, folder) for _, folder in snapshot_folders(Path(out))]


def training_cost(models_dir: Path) -> dict:
    """What a budget snapshot had cost (its `snapshot-<kind>.json` files, written by lab.training's
    snapshots: steps, examples seen, CPU seconds, training FLOPs), by kind; {} for other folders."""
    out = {}
    for f in sorted(Path(models_dir).glob("snapshot-*.json")):
        try:
            info = json.loads(f.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{f}: not a readable snapshot record ({e})") from None
        out[f.stem.removeprefix("snapshot-")] = info
    return out


def run_curves(
    settings: Settings, dirs: list[tuple[str, Path]], classifier: Path | None = None, log=print
) -> dict:
    """The bench at each budget, then the verdict per budget and its stability."""
    started = time.time()
    budgets = []
    for label, d in dirs:
        log(f"[paradigms] budget {label}: {d}")
        budgets.append((label, run(settings, d, classifier, log=log)))
    return {"bench": "paradigms", "mode": "curves" + (" quick" if settings.quick else ""),
            "budgets": [{"label": label, "models_dir": str(d), "training": training_cost(d), "report": rep}
                        for (label, d), (_, rep) in zip(dirs, budgets)],
            "curves": curves(budgets), "seconds": round(time.time() - started, 1)}  # fmt: skip


# ---------------------------------------------------------------- output


METRIC_ROWS = (
    ("word exact match", "word_exact"),
    ("single-object attribute acc.", "single_object_attribute_accuracy"),
    ("single-object all correct", "single_object_all"),
    ("relation all correct", "relation_all"),
    ("relation attribute acc.", "relation_attribute_accuracy"),
    ("texture-scene accuracy", "texture_accuracy"),
    ("attribute accuracy (all kinds)", "attribute_accuracy"),
    ("FD to real renders (lower better)", "fd"),
    ("diversity, features", "diversity_features"),
    ("diversity, pixels (RMS)", "diversity_pixels"),
    ("early-error score drop", ("early_error", "drop")),
    ("same error, finished image", ("early_error", "drop_no_reaction")),
    ("error accumulation (drop - same)", ("early_error", "accumulation")),
    ("ms per image, batch 1", ("latency", "ms_per_image_batch1")),
    ("ms per image, batch 16", ("latency", "ms_per_image_batch16")),
)


def _get(m: dict, key):
    return _at(m, key) if isinstance(key, tuple) else m[key]


def table(r: dict) -> str:
    names = r["paradigms"]
    w = 20
    lines = [f"{'metric':<36} " + " ".join(f"{LABELS[n]:>{w}}" for n in names)]
    for label, key in METRIC_ROWS:
        digits = 1 if isinstance(key, tuple) and key[0] == "latency" else 3
        lines.append(f"{label:<36} " + " ".join(f"{fmt(_get(r[n], key), digits):>{w}}" for n in names))
    lines.append(f"{'  real-render FD floor':<36} {r['realism_reference']['fd_floor']:>{w}.3f}")
    lines.append(
        f"{'  real-render diversity, features':<36} {fmt(r['diversity_reference']['real_features']):>{w}}"
    )
    for label, key in (("forward passes per image", "forward_passes_per_image"),
                       ("sequential passes per batch", "sequential_passes_per_batch"),
                       ("image positions per image", "image_positions_per_image")):  # fmt: skip
        lines.append(f"{label:<36} " + " ".join(f"{r[n][key]:>{w}.0f}" for n in names))
    for name in names:
        pts = "  ".join(
            f"cfg {p['cfg']:g}: {fmt(p['attribute_accuracy'])}" for p in r[name]["guidance_sweep"]
        )
        lines.append(f"guidance sweep {NAMES[name]:<11} {pts}")
    for why in r.get("absent", {}).values():
        lines.append(f"({why})")
    return "\n".join(lines)


def verdict_table(r: dict) -> str:
    lines = []
    for v in r["verdicts"]:
        lines.append(f"{v['row']}. {v['claim']}\n   -> {v['verdict'].upper()} ({v['why']}): {v['evidence']}")
    return "\n".join(lines)


def compact_verdicts(r: dict) -> str:
    """One line per row: the row verdict, then each comparison's verdict or needed n."""
    lines = []
    for v in r["verdicts"]:
        parts = []
        for x in v["comparisons"]:
            word = x["verdict"] if x["verdict"] != VERDICTS[2] else _need_text(x) or "undecided"
            parts.append(f"{_pair_name(x)}: {word}")
        lines.append(
            f"{v['row']}. {v['claim'].split(':')[0]:<18} {v['verdict'].upper():<20} " + "; ".join(parts)
        )
    return "\n".join(lines)


def curves_table(rep: dict) -> str:
    labels = [b["label"] for b in rep["budgets"]]
    costs = []
    for b in rep["budgets"]:
        spent = [f"{NAMES.get(k, k)} {v.get('examples_seen', '?')} examples, {v.get('cpu_time_s', '?')} CPU-s"
                 for k, v in b.get("training", {}).items()]  # fmt: skip
        if spent:
            costs.append(f"budget {b['label']}: " + "; ".join(spent))
    short = {VERDICTS[0]: "confirmed", VERDICTS[1]: "refuted", "absent": "-"}

    def cells(words: list[str], needs: list) -> str:
        # an undecided budget shows the n it would need (n/m: nothing to size from)
        return " ".join(f"{short.get(w) or (f'n≈{n}' if n else 'n/m'):>10}" for w, n in zip(words, needs))

    lines = [f"{'claim':<40} " + " ".join(f"{lb:>10}" for lb in labels) + "  across budgets"]
    for row in rep["curves"]:
        lines.append(f"{str(row['row']) + '. ' + row['claim'].split(':')[0]:<40} "
                     + cells(row["verdicts"], row["needed_n"]) + f"  {row['stability']}")  # fmt: skip
        for x in row["comparisons"]:
            name = _pair_name({"claimed": x["claimed"], "other": x["other"], "metric": x["metric"]})
            lines.append(f"{'   ' + name:<40} " + cells(x["verdicts"], x["needed_n"]) + f"  {x['stability']}")
    return "\n".join(costs + lines)


# ---------------------------------------------------------------- the PNGs (matplotlib)

COLORS = {"dit": (52, 101, 164), "ar": (214, 110, 40), "var": (78, 154, 6)}


def _value(m) -> tuple[float, float]:
    return (m.get("value") or 0.0, m.get("se") or 0.0) if isinstance(m, dict) else (float(m), 0.0)


def _bars(ax, title: str, groups: list, names: list[str], fmt_value: str = "{:.2f}", ymax: float | None = None,
          note: str = "") -> None:  # fmt: skip
    """Grouped bars with ±1 SE, one per paradigm: groups = [(label, {name: m})], m = {"value", "se"} or a number."""
    x = np.arange(len(groups))
    width = 0.8 / len(names)
    for j, name in enumerate(names):
        vals = [_value(pair[name]) for _, pair in groups]
        bars = ax.bar(x + (j - (len(names) - 1) / 2) * width, [v for v, _ in vals], width * 0.95,
                      yerr=[se for _, se in vals], color=np.array(COLORS[name]) / 255, capsize=3,
                      antialiased=False, label=LABELS[name])  # fmt: skip
        ax.bar_label(bars, labels=[fmt_value.format(v) for v, _ in vals], fontsize=7, padding=2)
    ax.set_xticks(x, [label for label, _ in groups], fontsize=9)
    ax.axhline(0, color="0.2", lw=0.8)
    if ymax is not None:
        ax.set_ylim(top=ymax)
    ax.set_title(title, fontsize=10, loc="left")
    ax.grid(axis="y", color="0.85")
    if note:
        ax.set_xlabel(note, fontsize=8, color="0.35")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot(report: dict, path: Path) -> None:
    """Six panels (adherence, realism, diversity, latency, early errors, guidance sweep), then the verdicts.

    Needs matplotlib (`pip install 'tessera[lab]'`)."""
    plt = _pyplot()
    names = report["paradigms"]
    pick = lambda key: {n: _get(report[n], key) for n in names}  # noqa: E731
    fig = plt.figure(figsize=(15, 11.5), dpi=100)
    grid = fig.add_gridspec(3, 3, height_ratios=(1, 1, 0.8), hspace=0.45, wspace=0.22)
    axes = [fig.add_subplot(grid[r, c]) for r in range(2) for c in range(3)]
    fig.suptitle(f"tessera bench paradigms ({report['mode']}): {report['captions']} held-out captions, "
                 + ", ".join(f"{NAMES[n]} cfg {report[n]['cfg']:g}" for n in names)
                 + f", DiT {report['settings']['dit_steps']} steps, device {report['settings']['device']}",
                 x=0.01, ha="left", fontsize=12)  # fmt: skip
    _bars(axes[0], "Prompt adherence (higher is better, ±1 SE)",
          [("word exact", pick("word_exact")), ("1-object attr.", pick("single_object_attribute_accuracy")),
           ("relation all", pick("relation_all")), ("texture acc.", pick("texture_accuracy"))],
          names, ymax=1.1, note=f"word chance {WORD_CHANCE:.3f}")  # fmt: skip
    floor = report["realism_reference"]["fd_floor"]
    _bars(axes[1], "Realism: Fréchet distance to real renders (lower is better)",
          [("FD", pick("fd")), ("real floor", dict.fromkeys(names, floor))], names, fmt_value="{:.0f}",
          note="classifier features; floor = real renders of the same scenes")  # fmt: skip
    ref = report["diversity_reference"]["real_features"]
    _bars(axes[2], "Diversity per caption across seeds",
          [("features", pick("diversity_features")), ("real renders", dict.fromkeys(names, ref)),
           ("pixels x10", {n: {"value": report[n]["diversity_pixels"]["value"] * 10,
                               "se": report[n]["diversity_pixels"]["se"] * 10} for n in names})],
          names, note="mean pairwise distance")  # fmt: skip
    _bars(axes[3], f"Latency: ms per image ({report['settings']['device']})",
          [(f"batch {b}", pick(("latency", f"ms_per_image_batch{b}"))) for b in (1, 16)], names, fmt_value="{:.0f}",
          note="sequential passes " + ", ".join(f"{NAMES[n]} {report[n]['sequential_passes_per_batch']:.0f}" for n in names))  # fmt: skip
    _bars(axes[4], "Early error: drop in attribute accuracy",
          [("early", pick(("early_error", "drop"))), ("finished image", pick(("early_error", "drop_no_reaction"))),
           ("accumulation", pick(("early_error", "accumulation")))],
          names, fmt_value="{:.3f}", note="one wrong token / latent cell; accumulation = early - finished")  # fmt: skip
    sweep = axes[5]
    for name in names:
        pts = report[name]["guidance_sweep"]
        sweep.errorbar([p["cfg"] for p in pts], [p["attribute_accuracy"]["value"] for p in pts],
                       yerr=[p["attribute_accuracy"]["se"] for p in pts], color=[c / 255 for c in COLORS[name]],
                       marker="o", lw=2, capsize=3, label=LABELS[name])  # fmt: skip
    sweep.set_title("Guidance sweep: attribute accuracy", fontsize=10, loc="left")
    sweep.set_xlabel("guidance scale", fontsize=8, color="0.35")
    sweep.grid(color="0.85")
    sweep.legend(fontsize=9)
    text = fig.add_subplot(grid[2, :])
    text.axis("off")
    lines = ["Verdicts on the claimed comparison (2 SE rule; undecided rows give the n they would need):"]
    lines += [
        textwrap.fill(line, 170, subsequent_indent=" " * 41) for line in compact_verdicts(report).splitlines()
    ]
    lines += [f"({why})" for why in report.get("absent", {}).values()]
    text.text(0, 1, "\n".join(lines), va="top", fontsize=7.5, family="DejaVu Sans Mono")
    fig.savefig(path, format="png", facecolor="white")
    plt.close(fig)


CURVE_PANELS = (
    ("word exact match", "word_exact"),
    ("relation all correct", "relation_all"),
    ("single-object attribute acc.", "single_object_attribute_accuracy"),
    ("FD to real renders (lower better)", "fd"),
    ("diversity, features", "diversity_features"),
    ("error accumulation", ("early_error", "accumulation")),
    ("ms per image, batch 1", ("latency", "ms_per_image_batch1")),
    ("ms per image, batch 16", ("latency", "ms_per_image_batch16")),
)


def plot_curves(rep: dict, path: Path) -> None:
    """Learning curves: each metric against the training budget, one line per paradigm (±1 SE), then
    each row's verdict per budget and whether it holds or flips."""
    plt = _pyplot()
    labels = [b["label"] for b in rep["budgets"]]
    try:
        xs = [float(lb) for lb in labels]
    except ValueError:
        xs = list(range(len(labels)))
    fig = plt.figure(figsize=(16, 11), dpi=100)
    grid = fig.add_gridspec(3, 4, height_ratios=(1, 1, 0.9), hspace=0.5, wspace=0.25)
    for i, (title, key) in enumerate(CURVE_PANELS):
        ax = fig.add_subplot(grid[i // 4, i % 4])
        for name in PARADIGMS:
            pts = [
                (x, _get(b["report"][name], key))
                for x, b in zip(xs, rep["budgets"])
                if name in b["report"]["paradigms"]
            ]
            if not pts:
                continue
            ax.errorbar([x for x, _ in pts], [_value(m)[0] for _, m in pts], yerr=[_value(m)[1] for _, m in pts],
                        color=[c / 255 for c in COLORS[name]], marker="o", lw=2, capsize=3, label=LABELS[name])  # fmt: skip
        ax.set_title(title, fontsize=10, loc="left")
        ax.set_xticks(xs, labels, fontsize=8)
        ax.grid(color="0.85")
        if i == 0:
            ax.legend(fontsize=8)
    fig.suptitle(f"tessera bench paradigms: learning curves over {len(labels)} training budgets ({', '.join(labels)})",
                 x=0.01, ha="left", fontsize=12)  # fmt: skip
    text = fig.add_subplot(grid[2, :])
    text.axis("off")
    text.text(0, 1, curves_table(rep), va="top", fontsize=7.5, family="DejaVu Sans Mono")
    fig.savefig(path, format="png", facecolor="white")
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--n", type=int, default=None, help="held-out captions per scene kind (default 32; 2 with --quick)"
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="reduced CI mode: few images, two-point sweeps, two latency repeats",
    )
    p.add_argument(
        "--paradigms",
        default=None,
        help="comma-separated: dit, ar, var (next-scale); default every one found",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N)")
    p.add_argument("--models-dir", type=Path, default=ROOT / "models")
    p.add_argument("--budgets", nargs="+", default=None, metavar="[LABEL=]DIR",
                   help="learning curves: run on each models folder (a training-budget snapshot) and compare the verdicts")  # fmt: skip
    p.add_argument("--snapshots", type=Path, default=None,
                   help="learning curves on the snapshot folders OUT/<fraction>/ (smallest fraction first)")  # fmt: skip
    p.add_argument("--classifier", type=Path, default=None,
                   help="feature classifier file (default: MODELS_DIR/" + CLASSIFIER_FILE + ", else the shipped one)")  # fmt: skip
    p.add_argument("--json-out", type=Path, default=Path("artifacts/bench/paradigms.json"))
    p.add_argument("--plot", type=Path, default=Path("artifacts/bench/paradigms.png"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--dit-steps", type=int, default=20)
    p.add_argument("--dit-cfg", type=float, default=4.0)
    p.add_argument("--ar-cfg", type=float, default=2.0)
    p.add_argument("--var-cfg", type=float, default=Settings.var_cfg)
    p.add_argument("--sweep-per-kind", type=int, default=None,
                   help="captions per kind in the guidance sweep (default 16; all with --quick)")  # fmt: skip
    p.add_argument(
        "--diversity-per-kind", type=int, default=None, help="captions per kind in the diversity set"
    )
    p.add_argument(
        "--latency-repeats", default=None, metavar="B1,B16", help="timed repeats at batch 1 and 16"
    )
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    kw = dict(seed=args.seed, device=args.device, dit_steps=args.dit_steps, dit_cfg=args.dit_cfg,
              ar_cfg=args.ar_cfg, var_cfg=args.var_cfg)  # fmt: skip
    for key in ("n", "sweep_per_kind", "diversity_per_kind"):
        if getattr(args, key) is not None:
            kw[key] = getattr(args, key)
    if args.paradigms:
        kw["paradigms"] = tuple(x for x in args.paradigms.split(",") if x.strip())
    if args.latency_repeats:
        if not re.fullmatch(r"\d+,\d+", args.latency_repeats):
            p.error(f"--latency-repeats takes two counts, B1,B16 (got {args.latency_repeats!r})")
        kw["latency_repeats"] = tuple(int(x) for x in args.latency_repeats.split(","))
    try:
        settings = Settings.quick_mode(**kw) if args.quick else Settings(**kw)
    except ValueError as e:
        p.error(str(e))
    try:
        if args.budgets or args.snapshots:
            dirs = budget_dirs(args.budgets or []) + (snapshot_dirs(args.snapshots) if args.snapshots else [])
            report = run_curves(settings, dirs, args.classifier)
            text = curves_table(report)
            draw = plot_curves
        else:
            report = run(settings, args.models_dir, args.classifier)
            text = table(report) + "\n\n" + verdict_table(report) + "\n\n" + compact_verdicts(report)
            draw = plot
    except FileNotFoundError as e:
        p.error(str(e))
    report["json_out"], report["plot"] = str(args.json_out), str(args.plot)
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    draw(report, args.plot)
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(report, indent=1, allow_nan=False))
    print(text)
    print(json.dumps(report, separators=(",", ":"), allow_nan=False))
    return report


if __name__ == "__main__":
    main()
