"""Diffusion vs autoregressive, head to head on the shipped tiny models, claim by claim.

`tessera bench paradigms` generates images from held-out captions (lab.training.heldout_scenes:
attribute combinations neither generator saw in training) with fixed seeds, once with the
Flux-architecture DiT (tessera-dit-tiny, VAE f8) and once with the LlamaGen-architecture GPT
(tessera-ar-tiny, VQ f8), and measures:

- prompt adherence with lab.scorers: word exact match (text rendering), single-object attribute
  accuracy, the two-object relation scenes' all-correct rate (multi-clause), texture-scene accuracy;
- a texture/realism score: the Fréchet distance between the penultimate features of a small scene
  classifier (lab.scene_features, trained on synthetic renders) of the generated images and of
  real renders of the same held-out scenes (lower is better; `fd_floor` is what real renders of
  those scenes score against them with the same number of images: a perfect generator's value);
- diversity: per caption, the mean pairwise distance between the images of several seeds
  (classifier features and pixels), next to the same measure on real renders;
- latency: milliseconds per image at batch 1 and 16 (end to end: text encoding, sampling, decoding),
  network forward passes per image (CFG's unconditional rows count), sequential passes per batch;
- early errors: the AR model gets one wrong early token (the palette-colour token farthest in the
  codebook from the one it drew, forced at one early raster position; the random stream is
  unchanged), the DiT gets the same cell of its clean estimate replaced by the farthest palette
  colour's latent at an early denoising step; same seeds; the score drop against the unperturbed
  images is compared with the drop of the same corruption applied to the finished image (no chance
  to react);
- a guidance sweep for both (DiT cfg 1, 2, 4, 6; GPT cfg 1, 2, 3, 5); the main runs use the shipped
  workflows' scales (DiT 4, GPT 2).

It prints a metrics table, then a verdict per row of the usual claimed comparison (confirmed,
refuted, or not measurable here, with the numbers: differences within 2 standard errors are
"not measurable here"), writes a JSON report and a PNG plot, and prints one JSON line.

Usage:
    tessera bench paradigms                    # full: --n 32 captions per kind, about 5-10 min on 2 CPU cores
    tessera bench paradigms --quick            # CI mode: 2 captions per kind, small sweep, under a minute
    tessera bench paradigms --device cuda --n 128 --json-out report.json --plot report.png

Options: --n (held-out captions per scene kind), --sweep-per-kind (of those, how many the guidance
sweep uses; default 16), --quick, --device cpu|cuda, --models-dir, --json-out (default
artifacts/bench/paradigms.json), --plot (default artifacts/bench/paradigms.png), --seed, --dit-steps,
--dit-cfg, --ar-cfg, --threads (0: torch's default; use 1 on a machine whose cores are busy with other
work, where OpenMP threads waiting for each other can make a run many times slower). The feature
classifier ships as models/classifiers/tessera-scene-features.safetensors; when it is missing it is
trained first (1500 steps, two to four minutes on CPU) and written there.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from tessera.engines.ar_decoding import condition_prefix, generate
from tessera.engines.flux import guided_velocity, load_dit
from tessera.engines.generation import diffusion_sigmas, latent_to_image, tokens_to_image
from tessera.engines.gpt import load_gpt
from tessera.engines.latent import seeded_noise
from tessera.engines.samplers import SAMPLERS
from tessera.engines.text_encoder import load_text_encoder
from tessera.engines.tokens import TokenGrid
from tessera.engines.vae import load_vae
from tessera.engines.vq import load_vq
from tessera.lab import scene_features, synthetic
from tessera.lab.scorers import score
from tessera.lab.training import DEFAULT_FILES, heldout_scenes, sample_ar, sample_dit

ROOT = Path(__file__).resolve().parents[1]
CLASSIFIER_FILE = "classifiers/tessera-scene-features.safetensors"
VERDICTS = ("confirmed", "refuted", "not measurable here")
WORD_CHANCE = 1 / len(synthetic.WORDS)


# ---------------------------------------------------------------- settings


@dataclass
class Settings:
    n: int = 32  # held-out captions per scene kind
    quick: bool = False
    seed: int = 0
    device: str = "cpu"
    batch: int = 32
    dit_steps: int = 20
    dit_cfg: float = 4.0
    ar_cfg: float = 2.0  # the shipped AR workflow's scale
    dit_sweep: tuple[float, ...] = (1.0, 2.0, 4.0, 6.0)
    ar_sweep: tuple[float, ...] = (1.0, 2.0, 3.0, 5.0)
    diversity_per_kind: int = 4  # captions per kind in the diversity set
    diversity_seeds: int = 4  # images per caption
    latency_repeats: tuple[int, int] = (3, 2)  # timed runs at batch 1 and batch 16 (the best counts)
    error_fraction: float = 0.15  # how early the error comes: share of tokens / of denoising steps
    real_per_scene: int = 8  # real renders per held-out scene for the reference statistics
    sweep_per_kind: int | None = 16  # captions per kind in the guidance sweep (None: all)
    bootstrap: int = 50

    @classmethod
    def quick_mode(cls, **kw) -> Settings:
        """Few images, a two-point sweep (no guidance vs the default scale), one latency repeat."""
        base = dict(n=2, quick=True, diversity_per_kind=1, diversity_seeds=2, latency_repeats=(1, 1),
                    real_per_scene=16, bootstrap=20, sweep_per_kind=None)  # fmt: skip
        settings = cls(**{**base, **kw})
        if "dit_sweep" not in kw:
            settings.dit_sweep = tuple(sorted({1.0, settings.dit_cfg}))
        if "ar_sweep" not in kw:
            settings.ar_sweep = tuple(sorted({1.0, settings.ar_cfg}))
        return settings

    def __post_init__(self) -> None:
        # the sweeps always hold cfg 1 and the default scale (whose point is the main run)
        self.dit_sweep = tuple(sorted({1.0, self.dit_cfg, *self.dit_sweep}))
        self.ar_sweep = tuple(sorted({1.0, self.ar_cfg, *self.ar_sweep}))

    @property
    def error_step(self) -> int:
        return max(1, round(self.error_fraction * self.dit_steps))

    @property
    def error_position(self) -> int:
        return max(1, round(self.error_fraction * 64))  # ≥ 1: position 0 would shift the random stream


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


# ---------------------------------------------------------------- the two generators


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

    name, label = "dit", "diffusion (DiT)"

    def __init__(self, models_dir: Path, te, device: torch.device, steps: int, cfg: float):
        self.model = load_dit(models_dir / DEFAULT_FILES["dit"], device=device).eval()
        self.vae = load_vae(models_dir / DEFAULT_FILES["vae"]).to(device).eval()
        self.te, self.device, self.steps, self.cfg = te, device, steps, cfg
        self.sampler, self.schedule = "euler", "flux"
        self.counter = PassCounter(self.model, lambda x: x.shape[-1] * x.shape[-2])
        self._palette = None

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

    def forward_passes(self, cfg: float) -> int:
        return self.steps * (2 if cfg != 1.0 else 1)

    def sequential_passes(self) -> int:
        return self.steps


class AREngine:
    """The GPT through `engines.generation` (`sample`), and token grids with forced tokens
    (`sample_ids`; without them the same tokens, which a test pins), with pass counters."""

    name, label = "ar", "autoregressive (GPT)"

    def __init__(self, models_dir: Path, te, device: torch.device, cfg: float):
        self.model = load_gpt(models_dir / DEFAULT_FILES["ar"], device=device).eval()
        self.vq = load_vq(models_dir / DEFAULT_FILES["vq"], device=device).eval()
        self.te, self.device, self.cfg = te, device, cfg
        self.grid = self.model.config.grid_size
        self.counter = PassCounter(self.model, lambda x: x.shape[1])
        self._palette = None

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

    @torch.no_grad()
    def decode(self, ids: torch.Tensor, batch: int = 64) -> torch.Tensor:
        return torch.cat([tokens_to_image(self.vq, ids[i : i + batch]) for i in range(0, len(ids), batch)])

    def sample(
        self, captions: list[str], seed: int, cfg: float | None = None, batch: int = 32
    ) -> torch.Tensor:
        """IMAGE [B, H, W, 3] in 0..1 (CPU): `generate_autoregressive` (through lab.training.sample_ar)."""
        cfg = self.cfg if cfg is None else cfg
        return sample_ar(self.model, self.vq, self.te, captions, seed=seed, cfg=cfg, batch=batch)

    def forward_passes(self, cfg: float) -> int:
        return self.grid * self.grid * (2 if cfg != 1.0 else 1)

    def sequential_passes(self) -> int:
        return self.grid * self.grid


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


def adherence_metrics(results: list[dict[str, bool]], scenes: list[dict]) -> dict:
    by = lambda kind: [r for r, a in zip(results, scenes) if a["kind"] == kind]  # noqa: E731
    frac = lambda rs: [float(np.mean(list(r.values()))) for r in rs]  # noqa: E731
    return {
        "word_exact": rate(r["word"] for r in by("word")),
        "word_all": rate(all(r.values()) for r in by("word")),
        "single_object_attribute_accuracy": rate(frac(by("shape"))),
        "single_object_all": rate(all(r.values()) for r in by("shape")),
        "relation_all": rate(all(r.values()) for r in by("relation")),
        "relation_attribute_accuracy": rate(frac(by("relation"))),
        "relation_correct": rate(r["relation"] for r in by("relation")),
        "texture_accuracy": rate(frac(by("texture"))),
        "texture_all": rate(all(r.values()) for r in by("texture")),
        "attribute_accuracy": rate(frac(results)),
        "all_correct": rate(all(r.values()) for r in results),
    }


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


def pairwise_diversity(groups: list[np.ndarray]) -> dict:
    """Mean pairwise L2 distance within each group (one group per caption); mean and SE over groups."""
    per = []
    for g in groups:
        d = [np.linalg.norm(a - b) for a, b in itertools.combinations(g, 2)]
        if d:
            per.append(float(np.mean(d)))
    return rate(per) | {"per_caption": [round(p, 4) for p in per]}


MIN_N = 10  # fewer samples than this per side: no verdict


def compare(claimed: dict, other: dict, higher_is_better: bool = True) -> tuple[str, float, float, str]:
    """Verdict on 'claimed beats other': (word, difference, its SE, why). Confirmed or refuted only when
    the difference exceeds 2 standard errors and both sides have at least MIN_N samples."""
    a, b = claimed["value"], other["value"]
    if a is None or b is None:
        return VERDICTS[2], float("nan"), float("nan"), "no data"
    diff = (a - b) if higher_is_better else (b - a)
    se = math.sqrt((claimed["se"] or 0) ** 2 + (other["se"] or 0) ** 2)
    if min(claimed["n"], other["n"]) < MIN_N:
        return VERDICTS[2], diff, se, f"too few samples (n < {MIN_N})"
    if diff > 2 * se and diff > 0:
        return VERDICTS[0], diff, se, "difference beyond 2 SE"
    if -diff > 2 * se and diff < 0:
        return VERDICTS[1], diff, se, "difference beyond 2 SE, the other way"
    return VERDICTS[2], diff, se, "within 2 SE"


def fmt(m: dict | None, digits: int = 3) -> str:
    if not m or m.get("value") is None:
        return "-"
    return f"{m['value']:.{digits}f}±{m['se']:.{digits}f}"


# ---------------------------------------------------------------- the benchmark


def timed(fn, device: torch.device, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return best


def run(settings: Settings, models_dir: Path, classifier_path: Path | None = None, log=print) -> dict:
    s = settings
    device = torch.device(s.device)
    started = time.time()
    models_dir = Path(models_dir)
    te = load_text_encoder(
        models_dir / DEFAULT_FILES["text_encoder"], device=device, dtype=torch.float32
    ).eval()
    engines = {
        "dit": DiTEngine(models_dir, te, device, s.dit_steps, s.dit_cfg),
        "ar": AREngine(models_dir, te, device, s.ar_cfg),
    }
    net = scene_features.load_or_train(classifier_path or models_dir / CLASSIFIER_FILE).to(device)

    # kinds interleaved (shape, relation, word, texture, shape, …): every prefix of the list is balanced,
    # and a prefix generates exactly as it does inside the full list (noise and AR streams follow the index)
    blocks = [heldout_scenes(s.n, kinds=(k,)) for k in synthetic.KINDS]
    scenes = [block[i] for i in range(s.n) for block in blocks]
    captions = [synthetic.caption(a) for a in scenes]
    log(f"[paradigms] models and classifier loaded ({time.time() - started:.0f}s)")
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
        "settings": asdict(s) | {"error_step": s.error_step, "error_position": s.error_position},
        "models": {k: DEFAULT_FILES[k] for k in ("dit", "vae", "ar", "vq", "text_encoder")},
        "captions": len(captions),
        "realism_reference": {
            "real_images": len(real),
            "fd_floor": round(floor_fd, 3),
            "fd_floor_se": round(floor_se, 3),
        },
    }
    main_images, main_results = {}, {}
    for name, eng in engines.items():
        t0 = time.time()
        cfg = eng.cfg
        eng.counter.reset()
        if name == "ar":
            ids = eng.sample_ids(captions, s.seed, cfg, s.batch)
            images = eng.decode(ids)
            main_ids = ids
        else:
            main_latents = eng.sample_latents(captions, s.seed, cfg, s.batch)
            images = eng.decode(main_latents)
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
        feats = scene_features.extract_features(net, images)
        fd, fd_se = fd_with_se(feats, real_mu, real_cov, s.bootstrap, s.seed)
        report[name] = {
            "label": eng.label,
            "cfg": cfg,
            **adherence_metrics(results, scenes),
            "fd": {"value": round(fd, 3), "se": round(fd_se, 3), "n": len(images)},
            **passes,
            "seconds": round(time.time() - t0, 1),
        }
        log(f"[paradigms] {name}: {len(images)} images in {time.time() - t0:.1f}s")

    # ---- diversity: several seeds per caption
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
    report["diversity_reference"] = {"real_features": pairwise_diversity(real_groups)}
    for name, eng in engines.items():
        sets = [main_images[name][div_idx]]
        for k in range(1, s.diversity_seeds):
            sets.append(eng.sample(div_caps, s.seed + 1000 * k, None, s.batch))
        stack = torch.stack(sets, 1)  # [captions, seeds, H, W, 3]
        f = [scene_features.extract_features(net, g) for g in stack]
        px = [g.flatten(1).numpy() / math.sqrt(g[0].numel()) for g in stack]  # RMS pixel distance
        report[name]["diversity_features"] = pairwise_diversity(f)
        report[name]["diversity_pixels"] = pairwise_diversity(px)
    log(f"[paradigms] diversity runs done ({time.time() - started:.0f}s)")

    # ---- early errors, same seeds
    pos = s.error_position
    row, col = divmod(pos, engines["ar"].grid)
    base_frac = {n: np.array([np.mean(list(r.values())) for r in main_results[n]]) for n in engines}

    def drop(name: str, results: list[dict]) -> dict:
        after = np.array([np.mean(list(r.values())) for r in results])
        return rate(base_frac[name] - after)

    ar = engines["ar"]
    wrong = ar.wrong_tokens(main_ids.flatten(1)[:, pos])
    forced_ids = main_ids.clone()
    forced_ids.view(len(captions), -1)[:, pos] = wrong
    fixed = torch.zeros_like(main_ids, dtype=torch.bool)
    fixed.view(len(captions), -1)[:, pos] = True
    ar_ids = ar.sample_ids(captions, s.seed, None, s.batch, fixed=TokenGrid(forced_ids, fixed))
    ar_flat, base_flat = ar_ids.flatten(1), main_ids.flatten(1)
    ar_err = per_image_scores(ar.decode(ar_ids), scenes)
    ar_swap = per_image_scores(ar.decode(forced_ids), scenes)  # the same wrong token, nothing regenerated
    report["ar"]["early_error"] = {
        "what": f"token {pos} (row {row}, col {col}) of 64 forced to the farthest palette token; later tokens resampled",
        "drop": drop("ar", ar_err),
        "drop_no_reaction": drop("ar", ar_swap),
        "forced_token_in_place": bool((ar_flat[:, pos] == wrong).all()),
        "prefix_unchanged": bool((ar_flat[:, :pos] == base_flat[:, :pos]).all()),
        "tokens_changed_after": round(
            float((ar_flat[:, pos + 1 :] != base_flat[:, pos + 1 :]).float().mean()), 4
        ),
        "score_after": rate(np.mean(list(r.values())) for r in ar_err),
    }
    dit = engines["dit"]
    dit_err = dit.sample(captions, s.seed, None, s.batch, corrupt=(s.error_step, row, col))
    dit_late = dit.decode(
        dit.corrupt(main_latents, 0.0, None, row, col).cpu()
    )  # the finished image, corrupted
    dit_err_res = per_image_scores(dit_err, scenes)
    report["dit"]["early_error"] = {
        "what": f"latent cell (row {row}, col {col}) of the clean estimate set to the farthest palette colour after "
        f"step {s.error_step} of {s.dit_steps} (sigma {float(dit.sigmas()[s.error_step]):.3f})",
        "drop": drop("dit", dit_err_res),
        "drop_no_reaction": drop("dit", per_image_scores(dit_late, scenes)),
        "pixels_changed": round(float((dit_err - main_images["dit"]).abs().mean()), 5),
        "score_after": rate(np.mean(list(r.values())) for r in dit_err_res),
    }
    log(f"[paradigms] early-error runs done ({time.time() - started:.0f}s)")

    # ---- guidance sweep on the first sweep_per_kind captions of each kind (the main run gives the
    # default scale's point: a prefix of the caption list generates exactly as in the full list)
    m_sweep = len(synthetic.KINDS) * min(s.n, s.sweep_per_kind or s.n)
    sweep_scenes, sweep_captions = scenes[:m_sweep], captions[:m_sweep]
    report["guidance_sweep_captions"] = m_sweep
    for name, eng, values in (("dit", dit, s.dit_sweep), ("ar", ar, s.ar_sweep)):
        points = []
        for cfg in values:
            results = (
                main_results[name][:m_sweep]
                if cfg == eng.cfg
                else per_image_scores(eng.sample(sweep_captions, s.seed, cfg, s.batch), sweep_scenes)
            )
            m = adherence_metrics(results, sweep_scenes)
            points.append(
                {"cfg": cfg, "attribute_accuracy": m["attribute_accuracy"], "all_correct": m["all_correct"]}
            )
        report[name]["guidance_sweep"] = points
    log(f"[paradigms] guidance sweeps done ({time.time() - started:.0f}s)")

    # ---- latency, batch 1 and 16
    for name, eng in engines.items():
        lat = {}
        for b, repeats in zip((1, 16), s.latency_repeats):
            caps = (captions * math.ceil(b / len(captions)))[:b]
            fn = lambda eng=eng, caps=caps, b=b: eng.sample(caps, s.seed, None, b)  # noqa: E731
            if b == 1:
                fn()  # warm-up
            lat[f"ms_per_image_batch{b}"] = round(1000 * timed(fn, device, repeats) / b, 2)
        report[name]["latency"] = lat
    log(f"[paradigms] latency done ({time.time() - started:.0f}s)")

    report["verdicts"] = verdicts(report)
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


# ---------------------------------------------------------------- verdicts


def _n(m: dict) -> str:
    return f"{m['value']:.3f}±{m['se']:.3f} (n={m['n']})"


@dataclass(frozen=True)
class Claim:
    """A usual claim that one paradigm beats the other on a measured quantity (a `compare` verdict)."""

    row: int
    claim: str
    key: tuple[str, ...]  # where the measurement sits in each paradigm's report
    label: str
    better: str  # the paradigm the claim says wins: "dit" or "ar"
    higher_is_better: bool = True
    digits: int = 3
    also: tuple[tuple[str, ...], ...] = ()  # measurements shown alongside (each with its own verdict)
    reference: tuple[str, ...] | None = None  # a value for real renders, in r[reference[0]][reference[1]]…


CLAIMS = (
    Claim(1, "text rendering: autoregressive spells words better than diffusion (word exact match)",
          ("word_exact",), "word exact match", "ar"),
    Claim(2, "prompt adherence: autoregressive follows multi-object (relation) prompts better",
          ("relation_all",), "relation scenes all correct", "ar",
          also=(("relation_attribute_accuracy",), ("single_object_attribute_accuracy",))),
    Claim(3, "texture/realism: diffusion gives more realistic images (Frechet distance in classifier features, "
             "lower is better)", ("fd",), "Frechet distance", "dit", higher_is_better=False, digits=2,
          also=(("texture_accuracy",),), reference=("realism_reference", "fd_floor")),
    Claim(5, "diversity: diffusion gives more varied images per caption than autoregressive sampling",
          ("diversity_features",), "mean pairwise feature distance per caption", "dit",
          also=(("diversity_pixels",),), reference=("diversity_reference", "real_features")),
    Claim(6, "error accumulation: an early wrong token hurts AR more than an early perturbation hurts diffusion",
          ("early_error", "drop"), "score drop (attribute accuracy, same seeds)", "ar",
          also=(("early_error", "drop_no_reaction"),)),
)  # fmt: skip
NAMES = {"dit": "DiT", "ar": "AR"}


def _at(m: dict, key: tuple[str, ...]):
    for k in key:
        m = m[k]
    return m


def _verdict_on(c: Claim, r: dict) -> dict:
    """The verdict on one row of CLAIMS, with its evidence and numbers."""
    win, lose = c.better, "ar" if c.better == "dit" else "dit"
    a, b = _at(r[win], c.key), _at(r[lose], c.key)
    v, d, se, why = compare(a, b, c.higher_is_better)
    if (
        c.row == 1
        and v != VERDICTS[1]
        and max(a["value"], b["value"]) <= WORD_CHANCE + 2 * max(a["se"], b["se"])
    ):
        v, why = VERDICTS[2], "both at chance"
    f = f"{{:.{c.digits}f}}"
    pair = f"{NAMES[win]} {_n(a)} vs {NAMES[lose]} {_n(b)}"
    evidence = [f"{c.label} {pair}; advantage of {NAMES[win]} {d:+.3f}±{se:.3f}"]
    numbers = {win: _strip(a), lose: _strip(b), "diff": round(d, 4), "se": round(se, 4)}
    if c.row == 1:
        evidence.append(f"chance {WORD_CHANCE:.3f}")
        numbers["chance"] = round(WORD_CHANCE, 4)
    if c.reference is not None:
        ref = _at(r, c.reference)
        evidence.append(f"real renders {f.format(ref) if not isinstance(ref, dict) else _n(ref)}")
        numbers["reference"] = ref if not isinstance(ref, dict) else _strip(ref)
    for key in c.also:
        x, y = _at(r[win], key), _at(r[lose], key)
        vx, dx, sx, _ = compare(x, y, True)
        evidence.append(f"{' '.join(key).replace('_', ' ')} {NAMES[win]} {_n(x)} vs {NAMES[lose]} {_n(y)} "
                        f"({dx:+.3f}±{sx:.3f}: {vx})")  # fmt: skip
        numbers["/".join(key)] = {win: _strip(x), lose: _strip(y), "diff": round(dx, 4), "se": round(sx, 4),
                                  "verdict": vx}  # fmt: skip
    short = f"{c.label.split(' (')[0]} {NAMES[win]} {f.format(a['value'])} vs {NAMES[lose]} {f.format(b['value'])}"
    return {"row": c.row, "claim": c.claim, "verdict": v, "why": why, "evidence": "; ".join(evidence),
            "short": short, "numbers": numbers}  # fmt: skip


def verdicts(r: dict) -> list[dict]:
    """One verdict per row of the claimed comparison, each with its evidence and numbers: the rows
    of CLAIMS by one rule, then latency, guidance and tooling, which need their own."""
    dit, ar = r["dit"], r["ar"]
    out = [_verdict_on(c, r) for c in CLAIMS]

    def add(row: int, claim: str, verdict: str, why: str, evidence: str, short: str, numbers: dict) -> None:
        assert verdict in VERDICTS
        out.append({"row": row, "claim": claim, "verdict": verdict, "why": why, "evidence": evidence,
                    "short": short, "numbers": numbers})  # fmt: skip

    # 4 latency
    b1 = dit["latency"]["ms_per_image_batch1"], ar["latency"]["ms_per_image_batch1"]
    b16 = dit["latency"]["ms_per_image_batch16"], ar["latency"]["ms_per_image_batch16"]
    faster = [d_ < a_ / 1.1 for d_, a_ in (b1, b16)]  # 10% margin for timing noise
    slower = [d_ > a_ * 1.1 for d_, a_ in (b1, b16)]
    # confirmed: DiT faster at one batch size and slower at none; refuted: the other way round
    if any(faster) and not any(slower):
        v = VERDICTS[0]
    elif any(slower) and not any(faster):
        v = VERDICTS[1]
    else:
        v = VERDICTS[2]

    def winner(i: int) -> str:
        return "DiT" if faster[i] else "AR" if slower[i] else "neither (within 10%)"

    why = f"faster at batch 1: {winner(0)}; at batch 16: {winner(1)}"
    seq_dit, seq_ar = dit["sequential_passes_per_batch"], ar["sequential_passes_per_batch"]
    why += f"; sequential passes AR {seq_ar:.0f} vs DiT {seq_dit:.0f}" + (
        " (that part holds)" if seq_ar > seq_dit else " (that part does not hold)"
    )
    add(4, "latency: diffusion is faster per image; autoregressive needs many sequential passes", v, why,
        f"ms/image at batch 1: DiT {b1[0]:.1f} vs AR {b1[1]:.1f}; at batch 16: DiT {b16[0]:.1f} vs AR {b16[1]:.1f}; "
        f"sequential passes per batch DiT {dit['sequential_passes_per_batch']:.0f} vs AR {ar['sequential_passes_per_batch']:.0f}; "
        f"forward passes per image DiT {dit['forward_passes_per_image']:.0f} vs AR {ar['forward_passes_per_image']:.0f}; "
        f"image positions processed per image DiT {dit['image_positions_per_image']:.0f} vs AR "
        f"{ar['image_positions_per_image']:.0f}; device {r['settings']['device']}",
        f"ms/img batch 1 DiT {b1[0]:.0f} vs AR {b1[1]:.0f}, batch 16 DiT {b16[0]:.0f} vs AR {b16[1]:.0f}",
        {"ms_per_image": {"dit": {"batch1": b1[0], "batch16": b16[0]}, "ar": {"batch1": b1[1], "batch16": b16[1]}},
         "sequential_passes_per_batch": {"dit": dit["sequential_passes_per_batch"], "ar": ar["sequential_passes_per_batch"]},
         "forward_passes_per_image": {"dit": dit["forward_passes_per_image"], "ar": ar["forward_passes_per_image"]}})  # fmt: skip

    # 7 guidance
    need, nums, small = {}, {}, False
    for name, m in (("dit", dit), ("ar", ar)):
        pts = m["guidance_sweep"]
        one = next((p for p in pts if p["cfg"] == 1.0), None)
        best = max(
            (p for p in pts if p["cfg"] != 1.0), key=lambda p: p["attribute_accuracy"]["value"], default=None
        )
        vals = [p["attribute_accuracy"]["value"] for p in pts]
        if one is None or best is None:
            need[name] = "unclear"
            continue
        small |= min(one["attribute_accuracy"]["n"], best["attribute_accuracy"]["n"]) < MIN_N
        a1, ab = one["attribute_accuracy"], best["attribute_accuracy"]
        gain, gse = ab["value"] - a1["value"], math.hypot(ab["se"], a1["se"])
        need[name] = "needs" if gain > 2 * gse else "does not need" if gain <= 0 else "unclear"
        nums[name] = {"cfg1": a1["value"], "best_cfg": best["cfg"], "best": ab["value"], "gain": round(gain, 4),
                      "se": round(gse, 4), "range": round(max(vals) - min(vals), 4), "needs_cfg": need[name]}  # fmt: skip
    if small:
        v, why = VERDICTS[2], f"too few samples (n < {MIN_N})"
    elif all(x == "needs" for x in need.values()):
        v, why = VERDICTS[0], "guidance beats cfg 1 by more than 2 SE for both"
    elif any(x == "does not need" for x in need.values()):
        v, why = (
            VERDICTS[1],
            "for "
            + " and ".join(k.upper() for k, x in need.items() if x == "does not need")
            + " cfg 1 is best",
        )
    else:
        v, why = (
            VERDICTS[2],
            "the gain over cfg 1 is within 2 SE for "
            + " and ".join(k.upper() for k, x in need.items() if x != "needs"),
        )
    ranges = {k: x["range"] for k, x in nums.items()}
    more = max(ranges, key=ranges.get).upper() if ranges else "-"
    add(7, "guidance: both paradigms need classifier-free guidance", v, why,
        "; ".join(f"{k.upper()}: cfg 1 {x['cfg1']:.3f} -> best cfg {x['best_cfg']:g} {x['best']:.3f} "
                  f"(gain {x['gain']:+.3f}±{x['se']:.3f}, {need[k]}), accuracy range over the sweep {x['range']:.3f}"
                  for k, x in nums.items())
        + f"; more sensitive to the scale: {more}",
        "; ".join(f"{k.upper()} gain {x['gain']:+.3f} (cfg {x['best_cfg']:g})" for k, x in nums.items())
        + f"; more sensitive: {more}",
        {**nums, "more_sensitive": more.lower()})  # fmt: skip

    # 8 tooling
    add(8, "tooling: diffusion has the richer adapter ecosystem (LoRA, ControlNet)", VERDICTS[2],
        "not a property of generated images",
        "an ecosystem is not something this benchmark measures; what the shipped LoRA and ControlNet adapters do for "
        "each paradigm is measured by `tessera bench adapters` (bench/adapters.py)",
        "see tessera bench adapters", {})  # fmt: skip
    return sorted(out, key=lambda v: v["row"])


def _strip(m: dict) -> dict:
    return {k: v for k, v in m.items() if k != "per_caption"}


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
)


def _get(m: dict, key):
    if isinstance(key, tuple):
        for k in key:
            m = m[k]
        return m
    return m[key]


def table(r: dict) -> str:
    dit, ar = r["dit"], r["ar"]
    lines = [f"{'metric':<36} {'diffusion (DiT)':>18} {'autoregressive':>18}"]
    for label, key in METRIC_ROWS:
        lines.append(f"{label:<36} {fmt(_get(dit, key)):>18} {fmt(_get(ar, key)):>18}")
    lines.append(f"{'  real-render FD floor':<36} {r['realism_reference']['fd_floor']:>18.3f} {'':>18}")
    lines.append(
        f"{'  real-render diversity, features':<36} {fmt(r['diversity_reference']['real_features']):>18}"
    )
    for b in (1, 16):
        k = f"ms_per_image_batch{b}"
        lines.append(
            f"{'ms per image, batch ' + str(b):<36} {dit['latency'][k]:>18.1f} {ar['latency'][k]:>18.1f}"
        )
    lines.append(
        f"{'forward passes per image':<36} {dit['forward_passes_per_image']:>18.0f} {ar['forward_passes_per_image']:>18.0f}"
    )
    lines.append(
        f"{'sequential passes per batch':<36} {dit['sequential_passes_per_batch']:>18.0f} {ar['sequential_passes_per_batch']:>18.0f}"
    )
    lines.append(
        f"{'image positions per image':<36} {dit['image_positions_per_image']:>18.0f} {ar['image_positions_per_image']:>18.0f}"
    )
    for name in ("dit", "ar"):
        pts = "  ".join(
            f"cfg {p['cfg']:g}: {fmt(p['attribute_accuracy'])}" for p in r[name]["guidance_sweep"]
        )
        lines.append(f"guidance sweep {name.upper():<4} {pts}")
    return "\n".join(lines)


def verdict_table(r: dict) -> str:
    lines = []
    for v in r["verdicts"]:
        lines.append(f"{v['row']}. {v['claim']}\n   -> {v['verdict'].upper()} ({v['why']}): {v['evidence']}")
    return "\n".join(lines)


# ---------------------------------------------------------------- the PNG (Pillow only)

COLORS = {"dit": (52, 101, 164), "ar": (214, 110, 40)}


def _value(m) -> tuple[float, float]:
    return (m.get("value") or 0.0, m.get("se") or 0.0) if isinstance(m, dict) else (float(m), 0.0)


def _bars(
    ax, title: str, groups: list, fmt_value: str = "{:.2f}", ymax: float | None = None, note: str = ""
) -> None:
    """Grouped DiT/AR bars with ±1 SE: groups = [(label, {"dit": m, "ar": m})], m = {"value", "se"} or a number."""
    import numpy as np

    x = np.arange(len(groups))
    for j, name in enumerate(("dit", "ar")):
        vals = [_value(pair[name]) for _, pair in groups]
        bars = ax.bar(x + (j - 0.5) * 0.38, [v for v, _ in vals], 0.36, yerr=[se for _, se in vals],
                      color=np.array(COLORS[name]) / 255, capsize=4, antialiased=False)  # fmt: skip
        ax.bar_label(bars, labels=[fmt_value.format(v) for v, _ in vals], fontsize=8, padding=2)
    ax.set_xticks(x, [label for label, _ in groups], fontsize=9)
    ax.axhline(0, color="0.2", lw=0.8)
    if ymax is not None:
        ax.set_ylim(top=ymax)
    ax.set_title(title, fontsize=10, loc="left")
    ax.grid(axis="y", color="0.85")
    if note:
        ax.set_xlabel(note, fontsize=8, color="0.35")


def plot(report: dict, path: Path) -> None:
    """Six panels (adherence, realism, diversity, latency, early errors, guidance sweep), then the verdicts.

    Needs matplotlib (`pip install 'tessera[lab]'`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dit, ar = report["dit"], report["ar"]
    pick = lambda key: {"dit": dit[key], "ar": ar[key]}  # noqa: E731
    fig = plt.figure(figsize=(15, 10.6), dpi=100)
    grid = fig.add_gridspec(3, 3, height_ratios=(1, 1, 0.62), hspace=0.45, wspace=0.22)
    axes = [fig.add_subplot(grid[r, c]) for r in range(2) for c in range(3)]
    fig.suptitle(f"tessera bench paradigms ({report['mode']}): {report['captions']} held-out captions, "
                 f"DiT {dit['cfg']:g} cfg / {report['settings']['dit_steps']} steps vs GPT {ar['cfg']:g} cfg, "
                 f"device {report['settings']['device']}", x=0.01, ha="left", fontsize=13)  # fmt: skip
    _bars(axes[0], "Prompt adherence (higher is better, ±1 SE)",
          [("word exact", pick("word_exact")), ("1-object attr.", pick("single_object_attribute_accuracy")),
           ("relation all", pick("relation_all")), ("texture acc.", pick("texture_accuracy"))],
          ymax=1.05, note=f"word chance {WORD_CHANCE:.3f}")  # fmt: skip
    floor = report["realism_reference"]["fd_floor"]
    _bars(axes[1], "Realism: Fréchet distance to real renders (lower is better)",
          [("FD", pick("fd")), ("real floor", {"dit": floor, "ar": floor})], fmt_value="{:.0f}",
          note="classifier features; floor = real renders of the same scenes")  # fmt: skip
    ref = report["diversity_reference"]["real_features"]
    _bars(axes[2], "Diversity per caption across seeds",
          [("features", pick("diversity_features")), ("real renders", {"dit": ref, "ar": ref}),
           ("pixels x10", {n: {"value": report[n]["diversity_pixels"]["value"] * 10,
                               "se": report[n]["diversity_pixels"]["se"] * 10} for n in ("dit", "ar")})],
          note="mean pairwise distance")  # fmt: skip
    _bars(axes[3], f"Latency: ms per image ({report['settings']['device']})",
          [(f"batch {b}", {n: report[n]["latency"][f"ms_per_image_batch{b}"] for n in ("dit", "ar")}) for b in (1, 16)],
          fmt_value="{:.0f}",
          note=f"forward passes/image DiT {dit['forward_passes_per_image']:.0f}, AR {ar['forward_passes_per_image']:.0f}; "
               f"sequential DiT {dit['sequential_passes_per_batch']:.0f}, AR {ar['sequential_passes_per_batch']:.0f}")  # fmt: skip
    _bars(axes[4], "Early error: drop in attribute accuracy",
          [("early", {n: report[n]["early_error"]["drop"] for n in ("dit", "ar")}),
           ("finished image", {n: report[n]["early_error"]["drop_no_reaction"] for n in ("dit", "ar")})],
          fmt_value="{:.3f}", note="AR: one wrong token; DiT: one wrong latent cell")  # fmt: skip
    sweep = axes[5]
    for name in ("dit", "ar"):
        pts = report[name]["guidance_sweep"]
        sweep.errorbar([p["cfg"] for p in pts], [p["attribute_accuracy"]["value"] for p in pts],
                       yerr=[p["attribute_accuracy"]["se"] for p in pts], color=[c / 255 for c in COLORS[name]],
                       marker="o", lw=2, capsize=3, label=report[name]["label"])  # fmt: skip
    sweep.set_title("Guidance sweep: attribute accuracy", fontsize=10, loc="left")
    sweep.set_xlabel("guidance scale", fontsize=8, color="0.35")
    sweep.grid(color="0.85")
    sweep.legend(fontsize=9)
    text = fig.add_subplot(grid[2, :])
    text.axis("off")
    lines = ["Verdicts on the claimed comparison (2 SE rule):"] + [
        f"{v['row']}. {v['claim'].split(':')[0]}: {v['verdict'].upper()} — {v['short']}  [{v['why']}]"
        for v in report["verdicts"]
    ]
    text.text(0, 1, "\n".join(lines), va="top", fontsize=9, family="DejaVu Sans")
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
        help="reduced CI mode: few images, two-point sweeps, one latency repeat",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N)")
    p.add_argument("--models-dir", type=Path, default=ROOT / "models")
    p.add_argument(
        "--classifier",
        type=Path,
        default=None,
        help="feature classifier file (default: MODELS_DIR/" + CLASSIFIER_FILE + ")",
    )
    p.add_argument("--json-out", type=Path, default=Path("artifacts/bench/paradigms.json"))
    p.add_argument("--plot", type=Path, default=Path("artifacts/bench/paradigms.png"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--dit-steps", type=int, default=20)
    p.add_argument("--dit-cfg", type=float, default=4.0)
    p.add_argument("--ar-cfg", type=float, default=2.0)
    p.add_argument(
        "--sweep-per-kind",
        type=int,
        default=None,
        help="captions per kind in the guidance sweep (default 16; all with --quick)",
    )
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    kw = dict(
        seed=args.seed, device=args.device, dit_steps=args.dit_steps, dit_cfg=args.dit_cfg, ar_cfg=args.ar_cfg
    )
    if args.n is not None:
        kw["n"] = args.n
    if args.sweep_per_kind is not None:
        kw["sweep_per_kind"] = args.sweep_per_kind
    settings = Settings.quick_mode(**kw) if args.quick else Settings(**kw)
    report = run(settings, args.models_dir, args.classifier)
    report["json_out"], report["plot"] = str(args.json_out), str(args.plot)
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    plot(report, args.plot)
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(report, indent=1, allow_nan=False))
    print(table(report))
    print()
    print(verdict_table(report))
    print(json.dumps(report, separators=(",", ":"), allow_nan=False))
    return report


if __name__ == "__main__":
    main()
