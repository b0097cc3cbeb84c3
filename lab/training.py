"""Training recipes for the built-in default models, one function per model kind.

All five models learn from `lab.synthetic` scenes (train split only; held-out attribute
combinations are never seen): a character-level text encoder, an f8 KL autoencoder and an f8
VQ tokenizer first, then a Flux-architecture DiT on the VAE's latents and a LlamaGen-architecture
GPT on the VQ tokens. Both generators read the same frozen text encoder, see the same images
and captions in the same order (same seed, batch and steps), and are sized to about the same
parameter count, so what differs between them is the paradigm.

The four image models train through one loop, `fit()`: a deterministic data stream indexed by
step (so `resume_from` continues the same stream), bf16 autocast on CPU, AdamW with warmup and
cosine decay (`objectives.lr_at`), EMA where asked, deadline pacing, a resumable state file every
`ckpt_every` steps, and one JSON line per logged step; each model gives only its step's loss. The
result is written in fp16 as `.safetensors` with `tessera.config` (what the engine loaders
read) and `tessera.card` (data, steps, examples seen, wall time, hardware, final loss).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import itertools
import json
import math
import os
import platform
import random
import resource
import shutil
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tessera.engines.checkpoint import CheckpointError, read_safetensors, write_safetensors
from tessera.engines.flux import Flux, FluxConfig, default_axes_dim, load_dit, save_dit
from tessera.engines.generation import generate_autoregressive, generate_diffusion
from tessera.engines.gpt import GPT, GPTConfig, load_gpt, save_gpt
from tessera.engines.multiscale_vq import load_multiscale_vq
from tessera.engines.text_encoder import (
    TextEncoder,
    TextEncoderConfig,
    load_text_encoder,
    save_text_encoder,
)
from tessera.engines.vae import AutoencoderKL, VAEConfig, load_vae, save_vae
from tessera.engines.var import load_var
from tessera.engines.vq import VQConfig, VQModel, load_vq, save_vq

from . import synthetic
from .objectives import CAPTION_DROPOUT, drop_captions, flow_matching_loss, lr_at, step_generator, token_loss
from .text_encoder_training import PretrainingHeads, attribute_accuracy, pretraining_loss

STATE_KEY = "tessera.train_state"  # metadata of a resumable training state file

# GroupNorm with few channels per group normalises away the absolute colour of flat regions
# (a solid background becomes zeros); 4 groups keep 8-16 channels per group, and learned ~5x faster
# than 16 groups in a 240-step comparison (20.1 vs 14.3 dB).

# Scene kinds drawn for training, with repeats as weights: single objects and words are what
# the defaults are judged on (and words need the most detail), relations and textures ride along.
TRAIN_KINDS = ("shape", "shape", "word", "word", "relation", "texture")
STORE_DTYPE = torch.float16


# ---------------------------------------------------------------- default sizes

TEXT_ENCODER_CONFIG = TextEncoderConfig(
    max_length=80, width=128, depth=3, heads=4, mlp_ratio=4.0, context_dim=128, pooled_dim=128
)
VAE_CONFIG = VAEConfig(
    latent_channels=8,
    block_out_channels=(32, 64, 64, 64),
    layers_per_block=1,
    norm_groups=4,
    mid_attention=True,
    scaling_factor=1.0,
    shift_factor=0.0,
)
VQ_CONFIG = VQConfig(
    channels=32,
    ch_mult=[1, 2, 2, 2],
    decoder_ch_mult=[1, 2, 2, 2],
    num_res_blocks=1,
    attn_deepest=False,
    z_channels=64,
    codebook_size=1024,
    codebook_dim=8,
    codebook_l2_norm=True,
    norm_groups=4,
)


def dit_config(latent_channels: int, context_dim: int, vec_dim: int) -> FluxConfig:
    """The tiny Flux: patch 1 over the 8×8 latent (64 image tokens, like the GPT's 64 VQ tokens)."""
    hidden, heads = 256, 4
    return FluxConfig(
        in_channels=latent_channels,
        out_channels=latent_channels,
        patch_size=1,
        hidden_size=hidden,
        num_heads=heads,
        depth=2,
        depth_single=3,
        mlp_ratio=4.0,
        context_dim=context_dim,
        vec_dim=vec_dim,
        axes_dim=default_axes_dim(hidden // heads),
        qkv_bias=True,
        guidance_embed=False,
    )


def gpt_config(codebook_size: int, caption_dim: int, max_caption: int, grid: int = 8) -> GPTConfig:
    """The tiny LlamaGen t2i GPT, with as many layers as bring it to the DiT's parameter count."""
    return GPTConfig(
        dim=256,
        n_layer=9,
        n_head=4,
        n_kv_head=4,
        ffn_hidden=768,  # LlamaGen's find_multiple(int(8 * dim / 3), 256)
        vocab_size=codebook_size,
        num_classes=0,
        caption_dim=caption_dim,
        cls_token_num=max_caption,
        grid_size=grid,
    )


# ---------------------------------------------------------------- run options and bookkeeping


@dataclass
class RunOptions:
    """What every `tessera train KIND` takes."""

    out: Path
    steps: int
    batch: int
    seed: int = 0
    threads: int = 2
    lr: float | None = None  # None: the kind's default
    warmup: int | None = None
    resume_from: Path | None = None
    state: Path | None = None  # resumable state file (default: artifacts/train/<out stem>.state.safetensors)
    log: Path | None = None  # JSON-lines log (default: artifacts/train/<out stem>.jsonl)
    ckpt_every: int = 200
    log_every: int = 10
    autocast: bool = True
    command: str = ""
    device: str = "cpu"  # "cuda" trains on a GPU (bf16 autocast there too)
    workers: int = 0  # processes rendering batches ahead of the loop (0: render in the loop)
    deadline: float | None = None  # wall-clock time (epoch s) by which the loop must end
    pace_dir: Path | None = None  # runs that must see the same examples publish their speed here
    pace_peers: int = 1  # how many runs publish there (the pair DiT + GPT: 2)
    snapshots: tuple[float, ...] = ()  # fractions of the step budget at which to save a snapshot
    snapshot_dir: Path | None = None  # where: <snapshot_dir>/<f:.2f>/<models-folder layout>
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        work = Path("artifacts") / "train"
        self.state = Path(self.state) if self.state else work / f"{self.out.stem}.state.safetensors"
        self.log = Path(self.log) if self.log else work / f"{self.out.stem}.jsonl"
        if self.steps < 0 or self.batch < 1:
            raise ValueError("steps must be ≥ 0 and batch ≥ 1")
        self.snapshots = tuple(sorted({float(f) for f in self.snapshots}))
        if any(not 0 < f <= 1 for f in self.snapshots):
            raise ValueError(f"snapshot fractions must lie in (0, 1], got {list(self.snapshots)}")
        self.snapshot_dir = Path(self.snapshot_dir) if self.snapshot_dir else work / "snapshots"


class TrainLog:
    """Prints progress and appends one JSON object per logged step (to `path`, if any); keeps the loss
    tail for the card."""

    def __init__(self, path: Path | None, kind: str, options: RunOptions, append: bool):
        self.path, self.kind, self.options = path, kind, options
        self.file = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.file = path.open("a" if append else "w")
        self.start_wall, self.start_cpu = time.time(), _cpu_seconds()
        self.tail: dict[str, list[float]] = {}
        self.write({"event": "start", "kind": kind, "options": _jsonable(asdict(options))})

    def write(self, record: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def step(self, i: int, total: int, stats: dict, every: int) -> None:
        for k, v in stats.items():
            self.tail.setdefault(k, []).append(float(v))
            del self.tail[k][:-100]
        if i % every == 0 or i == total - 1:
            wall = time.time() - self.start_wall
            rec = {
                "step": i,
                "total": total,
                **{k: round(float(v), 5) for k, v in stats.items()},
                "wall_s": round(wall, 1),
            }
            self.write(rec)
            shown = " ".join(f"{k}={v:.4f}" for k, v in stats.items())
            print(f"[{self.kind}] {i + 1}/{total} {shown} ({wall:.0f}s)", flush=True)

    def commands(self) -> list[str]:
        """Every command that wrote to this log (a resumed run appends its own)."""
        self.file.flush()
        out = []
        for line in self.path.read_text().splitlines():
            record = json.loads(line)
            if record.get("event") == "start" and record["options"].get("command"):
                out.append(record["options"]["command"])
        return out

    def final(self, key: str = "loss") -> float | None:
        """Mean of the last 100 steps' `key`; after a resume with nothing left to run, of the last
        logged values (up to 4 records) before the run's final step, read back from the log."""
        values = self.tail.get(key)
        if not values:
            self.file.flush()
            records = [json.loads(line) for line in self.path.read_text().splitlines()]
            values = [r[key] for r in records if key in r and r.get("step", 1 << 62) < self.options.steps][
                -4:
            ]
        return sum(values) / len(values) if values else None

    def times(self) -> tuple[float, float]:
        return time.time() - self.start_wall, _cpu_seconds() - self.start_cpu

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _jsonable(d: dict) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}


def hardware(device: str = "cpu") -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    threads = torch.get_num_threads()
    host = f"{cpu}; {threads} thread{'s' * (threads > 1)}; torch {torch.__version__}; {platform.system()}"
    return f"{torch.cuda.get_device_name(device)} ({host})" if device.startswith("cuda") else host


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            check=False,
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def file_digest(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _card(kind: str, options: RunOptions, log: TrainLog, model: nn.Module, step: int, **more) -> str:
    wall, cpu = log.times()
    prior = options.extra.get("prior_time", {"wall_s": 0.0, "cpu_s": 0.0})
    card = {
        "name": options.out.name,
        "kind": kind,
        "data": (
            "lab.synthetic 64x64 captioned scenes, train split only (held-out attribute combinations "
            f"never seen), kinds drawn with weights { {k: TRAIN_KINDS.count(k) for k in synthetic.KINDS} }, "
            f"stream seed {options.seed}"
        ),
        "steps": step,
        "batch": options.batch,
        "examples_seen": step * options.batch,
        "wall_time_s": round(wall + prior["wall_s"], 1),
        "cpu_time_s": round(cpu + prior["cpu_s"], 1),
        "hardware": hardware(options.device),
        "final_loss": None if log.final() is None else round(log.final(), 5),
        "parameters": count_params(model),
        "stored_dtype": str(STORE_DTYPE).replace("torch.", ""),
        "command": " && ".join(log.commands()) or options.command,
        "code_commit": _git_commit(),
        "license": "Apache-2.0 (trained from scratch on procedurally generated data)",
    }
    card.update(more)
    previous = more.get("continued_from", {}).get("card")
    if previous:  # totals over every stage that led to this file
        for key, prev_key in (
            ("steps", "steps"),
            ("examples_seen", "examples_seen"),
            ("wall_time_s", "wall_time_s"),
            ("cpu_time_s", "cpu_time_s"),
        ):
            total = previous.get(f"{key}_all_stages", previous.get(prev_key, 0)) + card[key]
            card[f"{key}_all_stages"] = round(total, 1) if isinstance(total, float) else total
    return json.dumps(card)


def _save_state(
    path: Path,
    step: int,
    modules: dict[str, nn.Module],
    opt: torch.optim.Optimizer,
    log: TrainLog,
    extra: dict | None = None,
) -> None:
    """Write a resumable state as safetensors: tensors flat by name, everything else as JSON metadata."""
    path.parent.mkdir(parents=True, exist_ok=True)
    wall, cpu = log.times()
    prior = log.options.extra.get("prior_time", {"wall_s": 0.0, "cpu_s": 0.0})
    wall, cpu = wall + prior["wall_s"], cpu + prior["cpu_s"]  # cumulative over resumes
    tensors = {
        f"modules/{k}/{name}": t.detach().cpu().clone(memory_format=torch.contiguous_format)
        for k, m in modules.items()
        for name, t in m.state_dict().items()
    }
    optimizer = opt.state_dict()
    scalars = {}
    for index, entry in optimizer["state"].items():
        for name, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"optimizer/{index}/{name}"] = (
                    value.detach().cpu().clone(memory_format=torch.contiguous_format)
                )
            else:
                scalars[f"{index}/{name}"] = value
    info = {
        "step": step,
        "time": {"wall_s": wall, "cpu_s": cpu},
        "extra": extra or {},
        "param_groups": optimizer["param_groups"],
        "scalars": scalars,
    }
    write_safetensors(path, tensors, {STATE_KEY: json.dumps(info)})


def _load_state(
    path: Path, modules: dict[str, nn.Module], opt: torch.optim.Optimizer, options: RunOptions
) -> tuple[int, dict]:
    tensors, metadata = read_safetensors(path)
    if STATE_KEY not in metadata:
        raise CheckpointError(path, f"not a training state (no '{STATE_KEY}' metadata)")
    info = json.loads(metadata[STATE_KEY])
    for k, m in modules.items():
        prefix = f"modules/{k}/"
        m.load_state_dict({n.removeprefix(prefix): t for n, t in tensors.items() if n.startswith(prefix)})
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer/"):
            _, index, key = name.split("/", 2)
            state.setdefault(int(index), {})[key] = value
    for name, value in info["scalars"].items():
        index, key = name.split("/", 1)
        state.setdefault(int(index), {})[key] = value
    opt.load_state_dict({"state": state, "param_groups": info["param_groups"]})
    options.extra["prior_time"] = dict(info["time"])
    print(f"resumed from {path} at step {info['step']}", flush=True)
    return info["step"], info["extra"]


def _setup(options: RunOptions) -> None:
    torch.set_num_threads(options.threads)
    torch.manual_seed(options.seed)
    random.seed(options.seed)
    if options.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True


def bf16_is_fast(device: str = "cpu") -> bool:
    """Whether bf16 autocast speeds training up on `device`: on a GPU, and on a CPU with bf16 matrix
    units (AMX or AVX512-BF16). Elsewhere bf16 is emulated: on an AVX512 Xeon without them a
    256x1024 linear ran 3.1x and the VQ 2.8x slower under autocast than in fp32."""
    if not device.startswith("cpu"):
        return True
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def _autocast(options: RunOptions):
    return torch.autocast(torch.device(options.device).type, dtype=torch.bfloat16, enabled=options.autocast)


def _adamw(params, options: RunOptions, **kw) -> torch.optim.AdamW:
    """AdamW, fused into one kernel per step on a GPU (tiny models are launch-bound there)."""
    return torch.optim.AdamW(params, fused=options.device.startswith("cuda") or None, **kw)


def _stored(module: nn.Module) -> nn.Module:
    """A CPU copy of the module in the shipping dtype."""
    return copy.deepcopy(module).to("cpu", STORE_DTYPE).eval()


def _batch(options: RunOptions, step: int, kinds: Sequence[str] = TRAIN_KINDS) -> synthetic.Batch:
    return synthetic.make_batch(options.batch, options.seed, step, "train", kinds)


class _StreamBatches(torch.utils.data.Dataset):
    """Batch `step` of the training stream, picklable so DataLoader workers can render ahead."""

    def __init__(self, options: RunOptions, kinds: Sequence[str]):
        self.batch, self.seed, self.kinds = options.batch, options.seed, tuple(kinds)

    def __len__(self) -> int:
        return 1 << 62

    def __getitem__(self, step: int) -> tuple[int, synthetic.Batch]:
        return step, synthetic.make_batch(self.batch, self.seed, step, "train", self.kinds)


def _as_is(item):
    return item


def _one_thread(_worker: int) -> None:
    torch.set_num_threads(1)


def _stream(options: RunOptions, start: int, kinds: Sequence[str] = TRAIN_KINDS):
    """(step, batch) from `start` up to `options.steps` (read at every step: pacing may shorten a run),
    with the images already on the training device."""
    steps = range(start, options.steps)
    if options.workers > 0:
        source = iter(
            torch.utils.data.DataLoader(
                _StreamBatches(options, kinds),
                batch_size=None,
                sampler=steps,
                num_workers=options.workers,
                collate_fn=_as_is,
                prefetch_factor=4,
                pin_memory=options.device.startswith("cuda"),
                worker_init_fn=_one_thread,
            )
        )
    else:
        source = ((i, _batch(options, i, kinds)) for i in steps)
    for step, batch in source:
        if step >= options.steps:
            return
        yield step, replace(batch, images=batch.images.to(options.device, non_blocking=True))


def _warmup(options: RunOptions, divisor: int) -> int:
    return options.warmup if options.warmup is not None else max(1, options.steps // divisor)


PACE_FROM = 2  # steps before this (start-up, autotuning) are not timed
PACE_STEPS, PACE_SHARE = 3, 0.05  # then time at least this many steps and this share of the budget
PEER_TIMEOUT_S = 300.0  # a paired run whose peer shows no progress for this long gives up


def pace_to_deadline(options, kind: str, step: int, clock: dict) -> bool:
    """Whether to run `step`: fits a run with a deadline into it; False once it has passed.

    `options` is a RunOptions or the adapters' TrainSettings (`.steps`, `.deadline`, optional
    `.pace_dir`/`.pace_peers`). Once the run has timed PACE_STEPS steps and PACE_SHARE of its
    budget from step PACE_FROM on, it shortens `options.steps` to what ends by the deadline.

    Runs that must see the same examples (the DiT and the GPT) share `pace_dir` and go in
    lockstep: none starts step k before every peer has; each publishes its timing and all
    compute one step count from the same records (the furthest step, the latest time, the
    slowest speed); and the first to stop publishes where, so all end after the same steps.
    """
    if options.deadline is None:
        return True
    paired = bool(getattr(options, "pace_dir", None)) and getattr(options, "pace_peers", 1) > 1
    pace_dir = Path(options.pace_dir) if paired else None
    if paired and (stop := _peer_stop(pace_dir)) is not None and stop <= step:
        options.steps = stop
        print(f"[{kind}] a paired run stopped: stopping at step {stop}", flush=True)
        return False
    now = time.time()
    if step == PACE_FROM:
        clock["from"], clock["budget"] = now, options.deadline - now
    if "from" in clock and "timed" not in clock:
        if step - PACE_FROM >= PACE_STEPS and now - clock["from"] >= PACE_SHARE * clock["budget"]:
            clock["timed"] = {"step": step, "t": now, "rate": (step - PACE_FROM) / (now - clock["from"])}
            if paired:
                _publish(pace_dir, f"{kind}.rate", clock["timed"])
    if "timed" in clock and "paced" not in clock:
        records = _read_all(pace_dir, "*.rate") if paired else [clock["timed"]]
        if len(records) >= getattr(options, "pace_peers", 1):
            clock["paced"] = True
            rate = min(r["rate"] for r in records)
            budget = int((options.deadline - max(r["t"] for r in records)) * rate * 0.93)
            options.steps = min(options.steps, max(r["step"] for r in records) + max(0, budget))
            print(f"[{kind}] paced to {options.steps} steps ({rate:.1f} steps/s)", flush=True)
    if now > options.deadline or step >= options.steps:
        if now > options.deadline:
            print(f"[{kind}] deadline reached: stopping at step {step}", flush=True)
        options.steps = step
        if paired:
            _publish(pace_dir, f"{kind}.final", {"step": step})
        return False
    if paired:
        _publish(pace_dir, f"{kind}.step", {"step": step})
        _wait_for_peers(options, pace_dir, step)
        if (stop := _peer_stop(pace_dir)) is not None and stop <= step:
            options.steps = stop
            print(f"[{kind}] a paired run stopped: stopping at step {stop}", flush=True)
            return False
    return True


def _publish(folder: Path, name: str, record: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{name}.tmp"
    tmp.write_text(json.dumps(record))
    os.replace(tmp, folder / name)


def _read_all(folder: Path, pattern: str) -> list[dict]:
    records = []
    for f in sorted(folder.glob(pattern)):
        try:
            records.append(json.loads(f.read_text()))
        except (OSError, ValueError):  # a file replaced while read is read again next time
            continue
    return records


def _peer_stop(folder: Path) -> int | None:
    finals = [r["step"] for r in _read_all(folder, "*.final")]
    return min(finals) if finals else None


def _wait_for_peers(options, folder: Path, step: int) -> None:
    """Until every peer has reached `step` (or one has stopped)."""
    waited = time.time()
    while True:
        steps = [r["step"] for r in _read_all(folder, "*.step")]
        if (len(steps) >= options.pace_peers and min(steps) >= step) or _peer_stop(folder) is not None:
            return
        if time.time() - waited > PEER_TIMEOUT_S:
            raise RuntimeError(f"paired training: no peer reached step {step} in {PEER_TIMEOUT_S:.0f} s")
        time.sleep(0.001)


StepFn = Callable[[int, synthetic.Batch], tuple[Tensor, Callable[[], dict]]]
SnapshotFn = Callable[[Path, int, TrainLog], dict]


def snapshot_folder(options: RunOptions, fraction: float) -> Path:
    """The models folder of one learning-curve snapshot: `<snapshot_dir>/<fraction:.2f>`."""
    return Path(options.snapshot_dir) / f"{fraction:.2f}"


def snapshot_step(fraction: float, steps: int) -> int:
    """After how many steps of `steps` the snapshot at `fraction` is taken (at least one)."""
    return max(1, math.ceil(fraction * steps - 1e-9))


def _write_snapshot(options: RunOptions, kind: str, fraction: float, step: int, log: TrainLog,
                    write: SnapshotFn) -> None:  # fmt: skip
    """Write one snapshot through the kind's `write(folder, step, log)` (which returns facts such as
    parameters and FLOPs), then `snapshot-<kind>.json` beside the model files."""
    folder = snapshot_folder(options, fraction)
    facts = write(folder, step, log)
    wall, cpu = log.times()
    prior = options.extra.get("prior_time", {"wall_s": 0.0, "cpu_s": 0.0})
    record = {"kind": kind, "fraction": fraction, "step": step, "of_steps": options.steps,
              "examples_seen": step * options.batch, "cpu_time_s": round(cpu + prior["cpu_s"], 1),
              "wall_time_s": round(wall + prior["wall_s"], 1), **facts}  # fmt: skip
    _publish(folder, f"snapshot-{kind}.json", record)
    log.write({"event": "snapshot", **record})
    print(f"[{kind}] snapshot {fraction:.2f} (step {step}) -> {folder}", flush=True)


def fit(
    options: RunOptions,
    kind: str,
    modules: dict[str, nn.Module],
    opt: torch.optim.Optimizer,
    params: Sequence[Tensor],
    step_fn: StepFn,
    *,
    lr: float,
    warmup_divisor: int,
    floor: float = 0.1,
    ema: tuple[EMA, nn.Module] | None = None,
    before: Callable[[TrainLog], None] | None = None,
    batches: Callable[[int], Iterable[tuple[int, Any]]] | None = None,
    snapshot: SnapshotFn | None = None,
) -> TrainLog:
    """The one training loop of every kind (text encoder, VAE, VQ, DiT, GPT and their adapters):
    resume, pacing, learning rate, step, EMA, logging, state.

    `batches(start)` yields (step, batch) from `start` (default: the synthetic image stream);
    `step_fn(step, batch)` returns the loss and a function giving the step's statistics, called
    after the optimizer step (so a step may also act on the updated weights). The learning rate
    is `lr * lr_at(step, options.steps, warmup, floor)`, gradients are clipped to norm 1, `ema` is
    (average, the module it follows), and `modules` (with the optimizer) make the resumable state,
    written to `options.state` (if set) every `options.ckpt_every` steps and at the end. Returns
    the run's log (`options.log`; None: printed only).

    With `options.snapshots` (fractions of the step budget) and `snapshot(folder, step, log)` (the
    kind's writer of a complete models folder), the model is also written after
    `snapshot_step(f, steps)` steps for each fraction f (f = 1 and any not reached: after the last
    step), into `snapshot_folder(options, f)`; a resumed run skips the snapshots it already passed.
    """
    start = 0
    if options.resume_from:
        start, _ = _load_state(options.resume_from, modules, opt, options)
    log = TrainLog(options.log, kind, options, append=start > 0)
    if before is not None:
        before(log)
    if options.snapshots and snapshot is None:
        raise ValueError(f"tessera train {kind}: this kind cannot write snapshots")
    pending = [f for f in options.snapshots if f == 1.0 or snapshot_step(f, options.steps) > start]
    clock: dict = {}
    for step, batch in (batches or partial(_stream, options))(start):
        if not pace_to_deadline(options, kind, step, clock):
            break
        for group in opt.param_groups:
            group["lr"] = lr * lr_at(step, options.steps, _warmup(options, warmup_divisor), floor)
        loss, stats = step_fn(step, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if ema is not None:
            ema[0].update(ema[1], step)
        log.step(
            step,
            options.steps,
            {"loss": loss.item(), **stats(), "grad_norm": float(gnorm)},
            options.log_every,
        )
        while pending and pending[0] < 1.0 and step + 1 >= snapshot_step(pending[0], options.steps):
            if step + 1 < options.steps:  # the last step's snapshots come after the loop
                _write_snapshot(options, kind, pending[0], step + 1, log, snapshot)
            else:
                break
            pending.pop(0)
        if options.state and (step + 1) % options.ckpt_every == 0 and step + 1 < options.steps:
            _save_state(options.state, step + 1, modules, opt, log)
    for fraction in pending:
        _write_snapshot(options, kind, fraction, options.steps, log, snapshot)
    if options.state:
        _save_state(options.state, options.steps, modules, opt, log)
    return log


def step_numbers(options: RunOptions, start: int) -> Iterator[tuple[int, None]]:
    """(step, None) from `start` up to `options.steps` (read at every step), for kinds that make
    their own batch from the step number."""
    step = start
    while step < options.steps:
        yield step, None
        step += 1


class EMA:
    """Exponential moving average of a module's parameters, warming up from a short horizon."""

    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        self.shadow = copy.deepcopy(module).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, module: nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for s, p in zip(self.shadow.parameters(), module.parameters()):
            s.lerp_(p.detach(), 1 - d)


# ---------------------------------------------------------------- text encoder


def pretrain_text_encoder(
    options: RunOptions,
    model: TextEncoder,
    batches: Iterator[tuple[Sequence[str], Mapping[str, Tensor]]],
    attribute_classes: Mapping[str, int],
    lr: float,
    mask_prob: float = 0.15,
) -> tuple[PretrainingHeads, TrainLog]:
    """Train `model` in place through `fit` on `batches` of (captions, attribute labels), from the
    first (a resumed run skips those before its step); returns the heads (for evaluation) and the log.

    Labels are class indices per attribute field with -100 where a caption lacks the field
    (`lab.synthetic.caption_batches` and `ATTRIBUTE_CLASSES` give both). The learning rate warms
    up over the first 5%, then stays constant.
    """
    heads = PretrainingHeads(model.config, attribute_classes).to(model.device)
    model.train().requires_grad_(True)
    params = [*model.parameters(), *heads.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))

    def numbered(start: int) -> Iterator[tuple[int, tuple]]:
        for (step, _), batch in zip(step_numbers(options, 0), batches):
            if step >= start:  # the batches already seen are captions only: cheap to skip
                yield step, batch

    def text_step(step: int, batch: tuple) -> tuple[Tensor, Callable[[], dict]]:
        captions, labels = batch
        with _autocast(options):
            loss, stats = pretraining_loss(
                model, heads, captions, labels, mask_prob, step_generator(options.seed, step)
            )
        return loss, lambda: stats

    log = fit(options, "text-encoder", {"model": model, "heads": heads}, opt, params, text_step, lr=lr,
              warmup_divisor=20, floor=1.0, batches=numbered)  # fmt: skip
    model.eval()
    return heads, log


def train_text_encoder(options: RunOptions, config: TextEncoderConfig = TEXT_ENCODER_CONFIG) -> dict:
    """Pre-train the shared character-level encoder (masked characters + scene attributes), then freeze it."""
    _setup(options)
    model = TextEncoder(config)
    classes = {k: len(v) for k, v in synthetic.ATTRIBUTE_CLASSES.items()}
    batches = synthetic.caption_batches(options.batch, seed=options.seed, split="train", kinds=TRAIN_KINDS)
    heads, log = pretrain_text_encoder(options, model, batches, classes, lr=options.lr or 1e-3)

    heldout = synthetic.caption_batches(256, seed=options.seed + 1, split="heldout")
    accuracy = attribute_accuracy(model, heads, heldout, steps=4)
    log.write({"event": "heldout_attribute_accuracy", **accuracy})
    print(
        f"[text-encoder] held-out attribute accuracy {json.dumps({k: round(v, 3) for k, v in accuracy.items()})}"
    )
    card = _card(
        "text_encoder",
        options,
        log,
        model,
        options.steps,
        heldout_attribute_accuracy={k: round(v, 4) for k, v in accuracy.items()},
        objective="masked-character reconstruction + scene-attribute classification from the pooled vector",
    )
    options.out.parent.mkdir(parents=True, exist_ok=True)
    save_text_encoder(_stored(model), options.out, card)
    log.close()
    return json.loads(card)


# ---------------------------------------------------------------- autoencoders


def _image_grad_l1(y: Tensor, x: Tensor) -> Tensor:
    """L1 between horizontal and vertical finite differences: keeps edges (letters) sharp."""
    dx = (y[..., :, 1:] - y[..., :, :-1]) - (x[..., :, 1:] - x[..., :, :-1])
    dy = (y[..., 1:, :] - y[..., :-1, :]) - (x[..., 1:, :] - x[..., :-1, :])
    return dx.abs().mean() + dy.abs().mean()


def _recon_loss(y: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    l1 = (y - x).abs().mean()
    return l1 + 0.5 * F.mse_loss(y, x) + 0.5 * _image_grad_l1(y, x), l1


def psnr(y: Tensor, x: Tensor) -> float:
    """PSNR in dB of images in [-1, 1] (as 0..1), averaged over the batch."""
    mse = ((y.clamp(-1, 1) - x) / 2).pow(2).flatten(1).mean(1)
    return float((10 * torch.log10(1 / mse.clamp_min(1e-10))).mean())


@torch.no_grad()
def _heldout_reconstruction(encode_decode: Callable[[Tensor], Tensor], n: int = 256, seed: int = 1) -> dict:
    """PSNR on held-out scenes, and how many words still read right after the round trip."""
    from .scorers import as_rgb_array, read_word

    batch = synthetic.make_batch(n, seed, 0, "heldout")
    y = torch.cat([encode_decode(batch.images[i : i + 64]) for i in range(0, n, 64)])
    words = [(i, a) for i, a in enumerate(batch.attributes) if a["kind"] == "word"]
    read = sum(read_word(as_rgb_array(y[i]), a["color"], a["background"])[0] == a["word"] for i, a in words)
    return {
        "psnr_db": round(psnr(y, batch.images), 2),
        "word_ocr": round(read / max(1, len(words)), 3),
        "n_images": n,
        "n_words": len(words),
    }


def train_vae(
    options: RunOptions,
    config: VAEConfig = VAE_CONFIG,
    kl_weight: float = 1e-5,
    init_from: Path | None = None,
    decoder_only: bool = False,
) -> dict:
    """f8 KL autoencoder: L1 + L2 + image-gradient loss, tiny KL; latent scale/shift fitted at the end.

    `decoder_only` (with `init_from`, a trained file) keeps the encoder, and so the latent space
    and its scale/shift, exactly as they are and trains the decoder alone: a DiT trained on the
    earlier file's latents stays valid while its images get sharper.
    """
    _setup(options)
    lr = options.lr or 1e-3
    if decoder_only and not init_from:
        raise ValueError("decoder-only training continues a trained VAE: pass init_from")
    model = load_vae(init_from) if init_from else AutoencoderKL(config)
    model = model.to(options.device, memory_format=torch.channels_last).requires_grad_(not decoder_only)
    trainable = _decoder_side(model, decoder_only)
    opt = _adamw(trainable, options, lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    model.train()

    def vae_step(step: int, batch: synthetic.Batch) -> tuple[Tensor, Callable[[], dict]]:
        x = batch.images.contiguous(memory_format=torch.channels_last)
        with _autocast(options), torch.set_grad_enabled(not decoder_only):
            mean, logvar = model.encode_moments(x)
        with _autocast(options):
            eps = torch.randn(mean.shape, generator=step_generator(options.seed + 17, step)).to(mean.device)
            z = mean + torch.exp(0.5 * logvar) * eps
            if model.post_quant_conv is not None:
                z = model.post_quant_conv(z.to(x.dtype))
            y = model.decoder(z.to(x.dtype)).float()
        recon, l1 = _recon_loss(y, x)
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()
        stats = lambda: {"l1": l1.item(), "kl": kl.item(), "psnr": psnr(y.detach(), x)}  # noqa: E731
        return recon + kl_weight * kl, stats

    def save(path: Path, step: int, log: TrainLog) -> dict:
        """Write the VAE as it is after `step` steps (the training copy is left as it is)."""
        final = copy.deepcopy(model).eval().to(memory_format=torch.contiguous_format)
        if not decoder_only:
            scale, shift = _fit_latent_normalisation(final, options)
            final.config = VAEConfig.from_dict(
                {**asdict(final.config), "scaling_factor": scale, "shift_factor": shift}
            )
        stored = _stored(final)
        evaluation = _heldout_reconstruction(lambda x: stored.float().decode(stored.float().encode(x)))
        log.write({"event": "heldout_reconstruction", "step": step, **evaluation})
        print(f"[vae] held-out {evaluation}", flush=True)
        card = _card(
            "vae",
            options,
            log,
            final,
            step,
            heldout_reconstruction=evaluation,
            **_stage_fields(init_from, decoder_only, final.encoder),
            losses=f"L1 + 0.5 L2 + 0.5 image-gradient L1 + {kl_weight} KL (per element)",
            latent=f"8x8x{final.config.latent_channels} for 64x64x3 (f8); scale/shift fitted to unit variance",
        )
        save_vae(_stored(final), path, card)
        return json.loads(card)

    log = fit(options, "vae", {"model": model}, opt, trainable, vae_step, lr=lr, warmup_divisor=50,
              snapshot=partial(_codec_snapshot, save, "vae"))  # fmt: skip
    card = save(options.out, options.steps, log)
    log.close()
    return card


def _codec_snapshot(save: Callable[[Path, int, TrainLog], dict], key: str, folder: Path, step: int,
                    log: TrainLog) -> dict:  # fmt: skip
    """A VAE's or VQ's snapshot: its file in `folder`'s models layout; facts for snapshot-<kind>.json."""
    card = save(folder / DEFAULT_FILES[key], step, log)
    return {"parameters": card["parameters"], "heldout_reconstruction": card["heldout_reconstruction"]}


def _decoder_side(model: nn.Module, decoder_only: bool) -> list[nn.Parameter]:
    """The parameters to train: all of them, or the decoder and its input conv when the encoder stays frozen."""
    if not decoder_only:
        return list(model.parameters())
    modules = [model.decoder] + ([model.post_quant_conv] if model.post_quant_conv is not None else [])
    params = [p for m in modules for p in m.parameters()]
    for p in params:
        p.requires_grad_(True)
    return params


def module_digest(*modules: nn.Module) -> str:
    """A hash of the weights (as stored, fp16) of some modules: names which latent space or token map a file has."""
    h = hashlib.sha256()
    for m in modules:
        for k, v in sorted(m.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().to(STORE_DTYPE).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _stage_fields(init_from: Path | None, decoder_only: bool, *frozen: nn.Module) -> dict:
    """Card fields that chain a continued run to the file it started from."""
    out = {"encoder_sha256_16": module_digest(*frozen)}
    if init_from:
        previous = json.loads(read_safetensors(init_from)[1].get("tessera.card", "{}"))
        out["continued_from"] = {
            "file": Path(init_from).name,
            "sha256_16": file_digest(init_from),
            "decoder_only": decoder_only,
            "card": previous,
        }
    return out


@torch.no_grad()
def _fit_latent_normalisation(
    model: AutoencoderKL, options: RunOptions, batches: int = 8
) -> tuple[float, float]:
    """(scale, shift) that give the training latents zero mean and unit variance."""
    zs = [
        model.encode_moments(
            synthetic.make_batch(64, options.seed + 99, i, "train", TRAIN_KINDS).images.to(options.device)
        )[0]
        for i in range(batches)
    ]
    z = torch.cat(zs)
    return float(1.0 / z.std()), float(z.mean())


def train_vq(
    options: RunOptions,
    config: VQConfig = VQ_CONFIG,
    beta: float = 0.25,
    reinit_every: int = 50,
    init_from: Path | None = None,
    decoder_only: bool = False,
) -> dict:
    """f8 VQ tokenizer: l2-normalised codebook, codebook + commitment losses, dead codes re-seeded from the batch.

    `decoder_only` (with `init_from`) freezes the encoder and the codebook, so every image keeps
    its tokens (a GPT trained on them stays valid), and trains the decoder alone.
    """
    _setup(options)
    lr = options.lr or 1e-3
    if decoder_only and not init_from:
        raise ValueError("decoder-only training continues a trained VQ model: pass init_from")
    model = load_vq(init_from) if init_from else VQModel(config)
    config = model.config
    model = model.to(options.device, memory_format=torch.channels_last).requires_grad_(not decoder_only)
    trainable = _decoder_side(model, decoder_only)
    opt = _adamw(trainable, options, lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    usage = torch.zeros(config.codebook_size, device=options.device)
    model.train()

    def vq_step(step: int, batch: synthetic.Batch) -> tuple[Tensor, Callable[[], dict]]:
        x = batch.images.contiguous(memory_format=torch.channels_last)
        with _autocast(options), torch.set_grad_enabled(not decoder_only):
            h = model.quant_conv(model.encoder(x))
        z = F.normalize(h.float(), dim=1)  # [B, D, h, w]
        ids = model.quantize.ids(z.detach())
        e = model.quantize.codebook()[ids].permute(0, 3, 1, 2)
        codebook_loss = F.mse_loss(e, z.detach())
        commit_loss = F.mse_loss(z, e.detach())
        zq = z + (e - z).detach()  # straight-through
        with _autocast(options):
            y = model.decoder(model.post_quant_conv(zq.to(x.dtype))).float()
        recon, l1 = _recon_loss(y, x)
        loss = recon if decoder_only else recon + codebook_loss + beta * commit_loss

        def after_update() -> dict:  # usage and dead codes are counted against the updated codebook
            nonlocal usage
            usage += torch.bincount(ids.flatten(), minlength=config.codebook_size).float()
            if not decoder_only and (step + 1) % reinit_every == 0 and step + 1 < options.steps * 0.9:
                _reseed_dead_codes(model, usage, z.detach(), step_generator(options.seed + 23, step))
                usage.zero_()
            counts = torch.bincount(ids.flatten(), minlength=config.codebook_size).float()
            p = counts / counts.sum()
            perplexity = float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum()))
            return {"l1": l1.item(), "commit": commit_loss.item(), "perplexity": perplexity,
                    "psnr": psnr(y.detach(), x)}  # fmt: skip

        return loss, after_update

    def save(path: Path, step: int, log: TrainLog) -> dict:
        """Write the VQ model as it is after `step` steps (the training copy is left as it is)."""
        final = copy.deepcopy(model).eval().to(memory_format=torch.contiguous_format)
        stored = _stored(final).float()
        evaluation = _heldout_reconstruction(lambda x: stored.decode(stored.encode(x)))
        evaluation["codebook_usage"] = _codebook_usage(stored, options)
        log.write({"event": "heldout_reconstruction", "step": step, **evaluation})
        print(f"[vq] held-out {evaluation}", flush=True)
        card = _card(
            "vq",
            options,
            log,
            final,
            step,
            heldout_reconstruction=evaluation,
            **_stage_fields(init_from, decoder_only, final.encoder, final.quant_conv, final.quantize),
            losses=f"L1 + 0.5 L2 + 0.5 image-gradient L1 + codebook MSE + {beta} commitment MSE "
            f"(l2-normalised, straight-through); unused codes re-seeded from batch encodings "
            f"every {reinit_every} steps",
            tokens=f"8x8 grid of {config.codebook_size} codes for 64x64x3 (f8)",
        )
        save_vq(_stored(final), path, card)
        return json.loads(card)

    log = fit(options, "vq", {"model": model}, opt, trainable, vq_step, lr=lr, warmup_divisor=50,
              snapshot=partial(_codec_snapshot, save, "vq"))  # fmt: skip
    card = save(options.out, options.steps, log)
    log.close()
    return card


@torch.no_grad()
def _reseed_dead_codes(model: VQModel, usage: Tensor, z: Tensor, gen: torch.Generator) -> int:
    """Point every code unused since the last check at a random current encoding (plus a little noise)."""
    dead = (usage == 0).nonzero().flatten()
    if len(dead) == 0:
        return 0
    pool = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    pick = torch.randint(0, pool.shape[0], (len(dead),), generator=gen).to(pool.device)
    noise = 0.01 * torch.randn(len(dead), pool.shape[1], generator=gen).to(pool.device)
    model.quantize.embedding.weight[dead] = F.normalize(pool[pick] + noise, dim=-1).to(
        model.quantize.embedding.weight.dtype
    )
    return len(dead)


@torch.no_grad()
def _codebook_usage(model: VQModel, options: RunOptions) -> float:
    used = torch.zeros(model.config.codebook_size, dtype=torch.bool)
    for i in range(4):
        used[
            model.encode(
                synthetic.make_batch(128, options.seed + 7, i, "train", TRAIN_KINDS).images
            ).flatten()
        ] = True
    return round(float(used.float().mean()), 3)


# ---------------------------------------------------------------- shared for the generators


def _frozen(module: nn.Module) -> nn.Module:
    return module.float().eval().requires_grad_(False)


def _generator_card_fields(
    text_encoder_path: Path, codec_path: Path, codec: str, *encoder: nn.Module
) -> dict:
    """Which text encoder and which latent space / token map (encoder weights) a generator was trained on."""
    return {
        "text_encoder": {"file": Path(text_encoder_path).name, "sha256_16": file_digest(text_encoder_path)},
        codec: {
            "file": Path(codec_path).name,
            "sha256_16": file_digest(codec_path),
            "encoder_sha256_16": module_digest(*encoder),
        },
        "caption_dropout": CAPTION_DROPOUT,
    }


def train_flops(model: nn.Module, examples: int, image_tokens: int, options: RunOptions) -> dict:
    """Training compute, estimated as 6 x trainable parameters x tokens (forward + backward, the
    frozen text encoder and autoencoder not counted); tokens per example are the image tokens plus
    the caption prefix, whose length is the batch's longest caption (+ BOS), averaged over the
    stream's first 64 caption batches."""
    longest = [
        max(len(c) for c in captions) + 1
        for captions, _ in itertools.islice(
            synthetic.caption_batches(options.batch, options.seed, "train", TRAIN_KINDS), 64
        )
    ]
    per_example = image_tokens + sum(longest) / len(longest)
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "flops": float(f"{6 * params * examples * per_example:.4g}"),
        "tokens_per_example": round(per_example, 1),
        "method": "6 x trainable parameters x tokens (image tokens + caption prefix); frozen encoders excluded",
    }


def _copy_input(source: Path, destination: Path) -> None:
    """Copy a frozen input file into a snapshot folder (atomically; skipped when already there)."""
    if destination.exists() and file_digest(destination) == file_digest(source):
        return
    destination.parent.mkdir(parents=True, exist_ok=True)
    tmp = destination.with_name(f".{destination.name}.{os.getpid()}.tmp")
    shutil.copyfile(source, tmp)
    os.replace(tmp, destination)


def _generator_snapshot(save: Callable[[Path, int, TrainLog], dict], kind: str, inputs: dict[str, Path],
                        folder: Path, step: int, log: TrainLog) -> dict:  # fmt: skip
    """A DiT's or GPT's snapshot: a models folder with the generator and the frozen files it reads."""
    card = save(folder / DEFAULT_FILES[kind], step, log)
    for key, source in inputs.items():
        _copy_input(Path(source), folder / DEFAULT_FILES[key])
    return {"parameters": card["parameters"], "train_flops": card["train_flops"]}


def _continued(init_from: Path | None) -> dict:
    """Card fields chaining a continued generator run to the file it started from."""
    if not init_from:
        return {}
    previous = json.loads(read_safetensors(init_from)[1].get("tessera.card", "{}"))
    return {
        "continued_from": {
            "file": Path(init_from).name,
            "sha256_16": file_digest(init_from),
            "card": previous,
        }
    }


# ---------------------------------------------------------------- DiT


def train_dit(
    options: RunOptions,
    text_encoder_path: Path,
    vae_path: Path,
    config: FluxConfig | None = None,
    ema_decay: float = 0.999,
    init_from: Path | None = None,
) -> dict:
    """Rectified flow on VAE latents: x_t = (1−t)·x0 + t·ε, target ε − x0, logit-normal t, 10% empty captions.

    `init_from` (a trained file) continues its weights with a fresh optimizer and schedule.
    """
    _setup(options)
    lr = options.lr or 1e-3
    dev = options.device
    te = _frozen(load_text_encoder(text_encoder_path)).to(dev)
    vae = _frozen(load_vae(vae_path)).to(dev)
    if init_from:
        model = load_dit(init_from).requires_grad_(True)
        config = model.config
    else:
        config = config or dit_config(vae.config.latent_channels, te.config.context_dim, te.config.pooled_dim)
        model = Flux(config)
        _init_flux(model)
    model.to(dev)
    ema = EMA(model, ema_decay)
    opt = _adamw(model.parameters(), options, lr=lr, betas=(0.9, 0.99), weight_decay=0.01)
    model.train()

    def dit_step(step: int, batch: synthetic.Batch) -> tuple[Tensor, Callable[[], dict]]:
        gen = step_generator(options.seed, step)
        captions, _ = drop_captions(batch.captions, gen)
        with torch.no_grad():
            cond = te.encode(captions)  # fp32, as the nodes run it
            with _autocast(options):
                x0 = vae.encode(batch.images).float()
        loss = flow_matching_loss(model, x0, cond, gen, forward_context=lambda: _training_forward(options))
        return loss, dict

    def save(path: Path, step: int, log: TrainLog) -> dict:
        """Write the EMA weights as they are after `step` steps."""
        card = _card(
            "dit",
            options,
            log,
            model,
            step,
            ema_decay=ema_decay,
            objective="rectified flow, velocity target noise - x0, logit-normal(0, 1) t; weights are the EMA",
            train_flops=train_flops(model, step * options.batch, vae_tokens, options),
            **_generator_card_fields(text_encoder_path, vae_path, "vae", vae.encoder),
            **_continued(init_from),
        )
        save_dit(_stored(ema.shadow), path, card)
        return json.loads(card)

    vae_tokens = (
        synthetic.IMAGE_SIZE // 2 ** (len(vae.config.block_out_channels) - 1) // config.patch_size
    ) ** 2
    shape = f"[dit] {count_params(model) / 1e6:.2f}M parameters, config {json.dumps(asdict(config))}"
    snapshot = partial(_generator_snapshot, save, "dit", {"text_encoder": text_encoder_path, "vae": vae_path})
    log = fit(options, "dit", {"model": model, "ema": ema.shadow}, opt, list(model.parameters()), dit_step,
              lr=lr, warmup_divisor=25, ema=(ema, model), before=lambda _: print(shape, flush=True),
              snapshot=snapshot)  # fmt: skip
    card = save(options.out, options.steps, log)
    log.close()
    return card


def _rope_with_autograd(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """`flux.apply_rope` without its `out=` buffers (which autograd refuses): same numbers, trainable."""
    pairs = x.float().unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2).to(x.dtype)


@contextlib.contextmanager
def _training_forward(options: RunOptions):
    """How a DiT's training forward runs: under the run's autocast, with the trainable RoPE."""
    with _autocast(options), _trainable_flux():
        yield


@contextlib.contextmanager
def _trainable_flux():
    """Swap in the autograd-friendly RoPE while a DiT trains (the inference one writes into out= buffers)."""
    from tessera.engines import flux

    original = flux.apply_rope
    flux.apply_rope = _rope_with_autograd
    try:
        yield
    finally:
        flux.apply_rope = original


def _init_flux(model: Flux) -> None:
    """DiT-style init: zero the adaLN modulations' and the final layer's outputs so every block starts as identity."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and (
            name.endswith(("mod.lin", "modulation.lin")) or name.startswith("final_layer")
        ):
            nn.init.zeros_(module.weight)
            nn.init.zeros_(module.bias)


# ---------------------------------------------------------------- GPT


def train_ar(
    options: RunOptions,
    text_encoder_path: Path,
    vq_path: Path,
    config: GPTConfig | None = None,
    ema_decay: float = 0.999,
    init_from: Path | None = None,
) -> dict:
    """Next-token cross-entropy over the 64 VQ tokens after the caption prefix; 10% null captions.

    `init_from` (a trained file) continues its weights, null caption included, with a fresh
    optimizer and schedule.
    """
    _setup(options)
    lr = options.lr or 1e-3
    dev = options.device
    te = _frozen(load_text_encoder(text_encoder_path)).to(dev)
    vq = _frozen(load_vq(vq_path)).to(dev)
    grid = synthetic.IMAGE_SIZE // vq.downsample
    if init_from:
        model = load_gpt(init_from).requires_grad_(True)
        config = model.config
        uncond = nn.Parameter(model.cls_embedding.uncond_embedding.detach().clone().to(dev))
    else:
        config = config or gpt_config(
            vq.config.codebook_size, te.config.context_dim, te.config.max_length, grid
        )
        model = GPT(config)
        _init_gpt(model)
        uncond = nn.Parameter((torch.randn(config.cls_token_num, config.caption_dim) * 0.02).to(dev))
    model.to(dev)
    ema = EMA(model, ema_decay)
    opt = _adamw([*model.parameters(), uncond], options, lr=lr, betas=(0.9, 0.95), weight_decay=0.05)
    holder = nn.ParameterDict({"uncond": uncond})
    model.train()

    def ar_step(step: int, batch: synthetic.Batch) -> tuple[Tensor, Callable[[], dict]]:
        gen = step_generator(options.seed, step)
        # the same draw as the DiT's, so both generators drop the same captions
        _, drop = drop_captions(batch.captions, gen)
        with torch.no_grad():
            cond = te.encode(batch.captions)  # fp32, as the nodes run it
            with _autocast(options):
                ids = vq.encode(batch.images)
        return token_loss(model, cond, ids, drop, uncond, lambda: _autocast(options)), dict

    def save(path: Path, step: int, log: TrainLog) -> dict:
        """Write the EMA weights as they are after `step` steps, with the learned null caption."""
        card = _card(
            "ar",
            options,
            log,
            model,
            step,
            ema_decay=ema_decay,
            objective=f"next-token cross-entropy over the {config.grid_size}x{config.grid_size} VQ tokens in "
            "raster order after the caption prefix; dropped captions use the learned null caption "
            "(uncond_embedding); weights are the EMA",
            train_flops=train_flops(model, step * options.batch, config.grid_size**2, options),
            **_generator_card_fields(
                text_encoder_path, vq_path, "vq", vq.encoder, vq.quant_conv, vq.quantize
            ),
            **_continued(init_from),
        )
        final = _stored(ema.shadow)
        with torch.no_grad():
            final.cls_embedding.uncond_embedding.copy_(uncond.detach())
        save_gpt(final, path, card)
        return json.loads(card)

    shape = f"[ar] {count_params(model) / 1e6:.2f}M parameters, config {json.dumps(asdict(config))}"
    snapshot = partial(_generator_snapshot, save, "ar", {"text_encoder": text_encoder_path, "vq": vq_path})
    log = fit(options, "ar", {"model": model, "ema": ema.shadow, "uncond": holder}, opt,
              [*model.parameters(), uncond], ar_step, lr=lr, warmup_divisor=25, ema=(ema, model),
              before=lambda _: print(shape, flush=True), snapshot=snapshot)  # fmt: skip
    card = save(options.out, options.steps, log)
    log.close()
    return card


def _init_gpt(model: GPT) -> None:
    """LlamaGen's init: normal(0, 0.02) for linears and embeddings; zero the output head."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
    nn.init.zeros_(model.output.weight)


# ---------------------------------------------------------------- evaluation on held-out captions


def heldout_scenes(n_per_kind: int, seed: int = 1234, kinds: Sequence[str] = synthetic.KINDS) -> list[dict]:
    """`n_per_kind` held-out attribute sets per kind (words: every held-out word scene drawn in turn)."""
    out = []
    for kind in kinds:
        rng = random.Random(seed + synthetic.KINDS.index(kind))
        out += [synthetic.sample_attributes(rng, kind, "heldout") for _ in range(n_per_kind)]
    return out


@torch.no_grad()
def sample_dit(
    model: Flux,
    vae: AutoencoderKL,
    te: TextEncoder,
    captions: list[str],
    *,
    seed: int = 0,
    steps: int = 20,
    cfg: float = 4.0,
    sampler: str = "euler",
    schedule: str = "flux",
    batch: int = 32,
) -> Tensor:
    """Images [B, 64, 64, 3] in 0..1 (CPU) for `captions` through `generate_diffusion`, CFG
    against the empty caption, `batch` at a time (image k from seed + k)."""
    negative = te.encode([""])
    return torch.cat([
        generate_diffusion(model, vae, te.encode(captions[i : i + batch]), negative, height=synthetic.IMAGE_SIZE,
                           width=synthetic.IMAGE_SIZE, seed=seed + i, steps=steps, cfg=cfg, sampler=sampler,
                           schedule=schedule)
        for i in range(0, len(captions), batch)
    ])  # fmt: skip


@torch.no_grad()
def sample_ar(
    model: GPT,
    vq: VQModel,
    te: TextEncoder,
    captions: list[str],
    *,
    seed: int = 0,
    cfg: float = 3.0,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    batch: int = 32,
) -> Tensor:
    """Images [B, 64, 64, 3] in 0..1 (CPU) for `captions` through `generate_autoregressive`,
    `batch` at a time (image k from seed + k)."""
    return torch.cat([
        generate_autoregressive(model, vq, te.encode(captions[i : i + batch]), seed=seed + i, cfg=cfg,
                                temperature=temperature, top_k=top_k, top_p=top_p)
        for i in range(0, len(captions), batch)
    ])  # fmt: skip


def score_images(images: Tensor, scenes: list[dict]) -> dict[str, dict[str, float]]:
    """Per-kind attribute pass rates (lab.scorers) plus the mean per-attribute accuracy."""
    from .scorers import aggregate, score

    by_kind: dict[str, list[dict]] = {}
    for img, a in zip(images, scenes):
        by_kind.setdefault(a["kind"], []).append(score(img, a))
    out = {}
    for kind, results in by_kind.items():
        agg = aggregate(results)
        attrs = [v for k, v in agg.items() if k not in ("all", "n")]
        agg["mean_attribute"] = sum(attrs) / len(attrs)
        out[kind] = {k: round(v, 3) for k, v in agg.items()}
    return out


def evaluate(
    models_dir: Path,
    n_per_kind: int = 48,
    seed: int = 0,
    dit_kwargs: dict | None = None,
    ar_kwargs: dict | None = None,
    which: Sequence[str] = ("dit", "ar"),
    kinds: Sequence[str] = synthetic.KINDS,
    files: dict | None = None,
    device: str = "cpu",
    var_kwargs: dict | None = None,
) -> dict:
    """Held-out prompt adherence of the shipped generators, scored by lab.scorers."""
    files = {**DEFAULT_FILES, **(files or {})}
    models_dir = Path(models_dir)
    te = load_text_encoder(models_dir / files["text_encoder"], device, torch.float32).eval()
    scenes = heldout_scenes(n_per_kind, kinds=kinds)
    captions = [synthetic.caption(a) for a in scenes]
    report = {"n_per_kind": n_per_kind, "captions": "canonical captions of held-out attribute combinations"}
    if "dit" in which:
        model = load_dit(models_dir / files["dit"], device=device)
        vae = load_vae(models_dir / files["vae"], device=device)
        kw = {"steps": 20, "cfg": 4.0, **(dit_kwargs or {})}
        t = time.time()
        images = sample_dit(model, vae, te, captions, seed=seed, **kw)
        report["dit"] = {"settings": kw, "seconds": round(time.time() - t, 1), **score_images(images, scenes)}
    if "ar" in which:
        model = load_gpt(models_dir / files["ar"], device=device)
        vq = load_vq(models_dir / files["vq"], device=device)
        kw = {"cfg": 2.0, "temperature": 1.0, **(ar_kwargs or {})}
        t = time.time()
        images = sample_ar(model, vq, te, captions, seed=seed, **kw)
        report["ar"] = {"settings": kw, "seconds": round(time.time() - t, 1), **score_images(images, scenes)}
    if "var" in which:  # the next-scale pair (lab.next_scale_training)
        from .next_scale_training import sample_var

        model = load_var(models_dir / files["var"], device=device)
        msvq = load_multiscale_vq(models_dir / files["msvq"], device=device)
        kw = {"cfg": 2.0, "temperature": 1.0, **(var_kwargs or {})}
        t = time.time()
        images = sample_var(model, msvq, te, captions, seed=seed, **kw)
        report["var"] = {"settings": kw, "seconds": round(time.time() - t, 1), **score_images(images, scenes)}
    return report


DEFAULT_FILES = {
    "text_encoder": "text_encoders/tessera-text-encoder.safetensors",
    "vae": "vae/tessera-vae-f8.safetensors",
    "vq": "vq_models/tessera-vq-f8.safetensors",
    "dit": "diffusion_models/tessera-dit-tiny.safetensors",
    "ar": "ar_models/tessera-ar-tiny.safetensors",
    "msvq": "vq_models/tessera-msvq-f8.safetensors",  # the next-scale pair (lab.next_scale_training)
    "var": "ar_models/tessera-var-tiny.safetensors",
}
