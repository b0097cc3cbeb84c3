"""A small scene classifier whose penultimate features measure how real a generated image looks.

`SceneNet` is a four-stage CNN (about 0.3M parameters) trained on rendered `lab.synthetic`
scenes (train split) to predict every attribute the caption states (`synthetic.ATTRIBUTE_CLASSES`:
kind, shape, colours, position, relation, word, texture, orientation). Its 64-dim penultimate
features play the role Inception features play in FID: `frechet_distance` between the feature
statistics of generated images and of real renders is the texture/realism score of
`tessera bench paradigms` (lower is better).

`train_scene_net` is deterministic (fixed seed, data stream indexed by step) and short (1500 steps
of 64 renders, two to four minutes on two CPU cores). `load_or_train` reads the cached weights (safetensors, config in the
metadata) or trains and writes them when the file is missing.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

from tessera.engines.checkpoint import write_safetensors

from . import synthetic

CONFIG_KEY = "tessera.config"
CARD_KEY = "tessera.card"
# shipped next to the default models; `load_or_train` rebuilds it there when it is missing
DEFAULT_PATH = (
    Path(__file__).resolve().parents[1] / "models" / "classifiers" / "tessera-scene-features.safetensors"
)


@dataclass(frozen=True)
class SceneNetConfig:
    channels: tuple[int, ...] = (24, 48, 64, 96)
    feature_dim: int = 64


class SceneNet(nn.Module):
    """64×64 RGB in [-1, 1] → `features` [B, feature_dim] and one logit head per attribute field."""

    def __init__(self, config: SceneNetConfig = SceneNetConfig()):
        super().__init__()
        self.config = config
        layers: list[nn.Module] = []
        cin = 3
        for c in config.channels:  # each stage halves the side: 64 → 32 → 16 → 8 → 4
            layers += [nn.Conv2d(cin, c, 3, stride=2, padding=1), nn.GroupNorm(4, c), nn.SiLU()]
            layers += [nn.Conv2d(c, c, 3, padding=1), nn.SiLU()]
            cin = c
        self.trunk = nn.Sequential(*layers)
        side = synthetic.IMAGE_SIZE // 2 ** len(config.channels)
        self.project = nn.Linear(cin * side * side, config.feature_dim)
        self.heads = nn.ModuleDict(
            {
                name: nn.Linear(config.feature_dim, len(classes))
                for name, classes in synthetic.ATTRIBUTE_CLASSES.items()
            }
        )

    def features(self, images: Tensor) -> Tensor:
        """Penultimate features [B, feature_dim] (after the nonlinearity) of images [B, 3, 64, 64] in [-1, 1]."""
        return F.silu(self.project(self.trunk(images).flatten(1)))

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        f = self.features(images)
        return {name: head(f) for name, head in self.heads.items()}


def as_net_input(images: Tensor | np.ndarray) -> Tensor:
    """IMAGE [B, H, W, 3] in 0..1 (float) or uint8 [B, H, W, 3] → float32 [B, 3, H, W] in [-1, 1]."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    images = images.detach().cpu()
    if images.dtype == torch.uint8:
        return images.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    return images.float().clamp(0, 1).permute(0, 3, 1, 2).mul(2.0).sub(1.0)


@torch.no_grad()
def extract_features(net: SceneNet, images: Tensor | np.ndarray, batch: int = 256) -> np.ndarray:
    """Features [N, D] as float64 numpy for IMAGE tensors or uint8 renders."""
    x = as_net_input(images)
    device = next(net.parameters()).device
    out = [net.features(x[i : i + batch].to(device)).double().cpu() for i in range(0, len(x), batch)]
    return torch.cat(out).numpy() if out else np.zeros((0, net.config.feature_dim))


def train_scene_net(
    steps: int = 1500,
    batch: int = 64,
    seed: int = 7,
    lr: float = 3e-3,
    log_every: int = 100,
    verbose: bool = True,
) -> tuple[SceneNet, dict]:
    """Train on the train split of every scene kind (deterministic: torch seed + indexed data stream)."""
    torch.manual_seed(seed)
    net = SceneNet()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    start = time.time()
    net.train()
    losses: list[float] = []
    for step in range(steps):
        for group in opt.param_groups:  # short warmup, then cosine to 5%
            warm = min(1.0, (step + 1) / 25)
            group["lr"] = lr * warm * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        b = synthetic.make_batch(batch, seed, step)
        labels = synthetic.attribute_labels(b.attributes)
        logits = net(b.images)
        loss = sum(
            F.cross_entropy(logits[k], labels[k], ignore_index=synthetic.IGNORE_LABEL)
            for k in logits
            if bool((labels[k] != synthetic.IGNORE_LABEL).any())
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if verbose and (step % log_every == 0 or step == steps - 1):
            print(
                f"[scene-features] {step + 1}/{steps} loss={loss.item():.3f} ({time.time() - start:.0f}s)",
                flush=True,
            )
    net.eval()
    tail = losses[-50:]
    card = {
        "name": "tessera-scene-features",
        "kind": "scene attribute classifier (feature extractor for a Fréchet distance)",
        "data": f"lab.synthetic train split, all kinds, stream seed {seed}",
        "steps": steps,
        "batch": batch,
        "examples_seen": steps * batch,
        "final_loss": round(sum(tail) / len(tail), 4) if tail else None,
        "wall_time_s": round(time.time() - start, 1),
        "parameters": sum(p.numel() for p in net.parameters()),
    }
    return net, card


@torch.no_grad()
def heldout_accuracy(net: SceneNet, n: int = 256, seed: int = 99) -> dict[str, float]:
    """Per-field accuracy on held-out renders (a sanity check that the features mean something)."""
    b = synthetic.make_batch(n, seed, 0, split="heldout")
    labels = synthetic.attribute_labels(b.attributes)
    logits = net(b.images)
    out = {}
    for k, y in labels.items():
        keep = y != synthetic.IGNORE_LABEL
        if bool(keep.any()):
            out[k] = round(float((logits[k].argmax(-1)[keep] == y[keep]).float().mean()), 3)
    return out


def save_scene_net(
    net: SceneNet, path: str | Path, card: dict | None = None, dtype: torch.dtype = torch.float16
) -> None:
    """Weights as safetensors (fp16 by default: the shipped file stays under 1 MB), config in the metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().to(dtype).contiguous() for k, v in net.state_dict().items()}
    meta = {CONFIG_KEY: json.dumps(asdict(net.config))}
    if card:
        meta[CARD_KEY] = json.dumps(card)
    write_safetensors(path, tensors, meta)


def load_scene_net(path: str | Path) -> SceneNet:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    raw = json.loads(meta.get(CONFIG_KEY, "{}"))
    config = SceneNetConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
    net = SceneNet(config)
    net.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    return net.eval()


def load_or_train(path: str | Path = DEFAULT_PATH, verbose: bool = True, **train_kwargs) -> SceneNet:
    """The cached classifier at `path`, trained (and written there) first if the file is missing."""
    path = Path(path)
    if path.is_file():
        return load_scene_net(path)
    if verbose:
        print(
            f"[scene-features] {path} not found: training the feature classifier (1500 steps, a few minutes on CPU)",
            flush=True,
        )
    with torch.random.fork_rng():
        net, card = train_scene_net(verbose=verbose, **train_kwargs)
    card["heldout_accuracy"] = heldout_accuracy(net)
    save_scene_net(net, path, card)
    if verbose:
        print(f"[scene-features] wrote {path}; held-out accuracy {card['heldout_accuracy']}", flush=True)
    return net


# ---------------------------------------------------------------- statistics


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and covariance [D, D] (float64)."""
    f = np.asarray(features, dtype=np.float64)
    return f.mean(0), np.cov(f, rowvar=False)


def _sqrtm_psd(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    """‖μ₁−μ₂‖² + tr(Σ₁ + Σ₂ − 2(Σ₁^½ Σ₂ Σ₁^½)^½), by symmetric eigendecompositions (no scipy)."""
    r1 = _sqrtm_psd(s1)
    middle = r1 @ s2 @ r1
    w = np.linalg.eigvalsh((middle + middle.T) / 2)
    cross = float(np.sqrt(np.clip(w, 0, None)).sum())
    d = mu1 - mu2
    return float(d @ d + np.trace(s1) + np.trace(s2) - 2 * cross)
