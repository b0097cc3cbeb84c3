"""The training recipes run end to end, resume from their safetensors state, and stay matched."""

from __future__ import annotations

import re
import shutil
import threading
import time

import pytest
import torch
from safetensors import safe_open

from tessera.engines.flux import Flux, load_dit
from tessera.engines.gpt import GPT, load_gpt
from tessera.engines.vae import load_vae
from tessera.engines.vq import load_vq
from tessera.lab import training
from tessera.lab.cli import main as train

TINY = ["--steps", "2", "--batch", "2", "--threads", "1", "--log-every", "1", "--ckpt-every", "1"]


def run(kind: str, folder, *extra: str) -> None:
    args = [
        kind,
        *TINY,
        "--out",
        str(folder / f"{kind}.safetensors"),
        "--state",
        str(folder / f"{kind}.state.safetensors"),
        "--log",
        str(folder / f"{kind}.jsonl"),
        *extra,
    ]
    assert train(args) in (0, None)


@pytest.fixture(scope="module")
def autoencoders(tmp_path_factory):
    """Two-step VAE and VQ files plus the shipped text encoder, laid out as a models folder."""
    work = tmp_path_factory.mktemp("train")
    run("vae", work)
    run("vq", work)
    models = work / "models"
    run("text-encoder", work)
    for kind, source in (("vae", "vae"), ("vq", "vq"), ("text_encoder", "text-encoder")):
        target = models / training.DEFAULT_FILES[kind]
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(work / f"{source}.safetensors", target)
    return work, models


def test_autoencoder_recipes_write_loadable_files_with_a_card(autoencoders):
    work, _ = autoencoders
    assert load_vae(work / "vae.safetensors").config.latent_channels == training.VAE_CONFIG.latent_channels
    assert load_vq(work / "vq.safetensors").config.codebook_size == training.VQ_CONFIG.codebook_size
    with safe_open(str(work / "vq.safetensors"), "pt") as f:
        card = f.metadata()["tessera.card"]
    assert '"steps": 2' in card and '"examples_seen": 4' in card


@pytest.mark.parametrize("kind, loader", [("dit", load_dit), ("ar", load_gpt)])
def test_generator_recipes_train_resume_and_load(autoencoders, kind, loader, capsys):
    work, models = autoencoders
    run(kind, work, "--models-dir", str(models))
    state = work / f"{kind}.state.safetensors"
    with safe_open(str(state), "pt") as f:  # a resumable state is a plain safetensors file
        assert training.STATE_KEY in f.metadata()
    run(kind, work, "--models-dir", str(models), "--steps", "3", "--resume-from", str(state))
    assert f"resumed from {state} at step 2" in capsys.readouterr().out
    assert isinstance(loader(work / f"{kind}.safetensors"), (Flux, GPT))


def test_dit_and_gpt_recipes_are_matched_in_size():
    dit = Flux(
        training.dit_config(
            training.VAE_CONFIG.latent_channels,
            training.TEXT_ENCODER_CONFIG.context_dim,
            training.TEXT_ENCODER_CONFIG.pooled_dim,
        )
    )
    gpt = GPT(
        training.gpt_config(
            training.VQ_CONFIG.codebook_size,
            training.TEXT_ENCODER_CONFIG.context_dim,
            training.TEXT_ENCODER_CONFIG.max_length,
        )
    )
    n_dit = sum(p.numel() for p in dit.parameters())
    n_gpt = sum(p.numel() for p in gpt.parameters())
    assert abs(n_dit - n_gpt) / n_dit <= 0.10, (n_dit, n_gpt)


class VirtualClock:
    """`time` for the pacer: each run's clock advances only by its own simulated steps, and now is
    the furthest run's clock (runs in lockstep wait for the slower one); waiting costs nothing."""

    def __init__(self):
        self.start, self.spent, self.lock = 1_000_000.0, {}, threading.Lock()

    def advance(self, kind: str, seconds: float) -> None:
        with self.lock:
            self.spent[kind] = self.spent.get(kind, 0.0) + seconds

    def time(self) -> float:
        with self.lock:
            return self.start + max(self.spent.values(), default=0.0)

    @staticmethod
    def sleep(seconds: float) -> None:  # the pacer's polling for peers: real, but not counted
        time.sleep(seconds)


def _paced_run(pace_dir, clock: VirtualClock, kind: str, seconds_per_step: float) -> training.RunOptions:
    """A stand-in training loop: one step takes `seconds_per_step` of simulated time."""
    options = training.RunOptions(
        out=pace_dir / f"{kind}.safetensors",
        steps=100_000,
        batch=1,
        deadline=clock.start + 4,
        pace_dir=pace_dir,
        pace_peers=2,
    )
    state: dict = {}
    step = 0
    while training.pace_to_deadline(options, kind, step, state):
        clock.advance(kind, seconds_per_step)
        step += 1
    assert step == options.steps  # the card's count is the steps really run
    return options


def test_paired_runs_take_the_same_steps_at_the_slower_pace(tmp_path, monkeypatch):
    """The DiT and the GPT must see the same examples: they go in lockstep and agree on one count,
    the one the slower run can finish by the deadline."""
    from concurrent.futures import ThreadPoolExecutor

    clock = VirtualClock()
    monkeypatch.setattr(training, "time", clock)
    with ThreadPoolExecutor(2) as pool:
        fast = pool.submit(_paced_run, tmp_path, clock, "dit", 0.002)
        slow = pool.submit(_paced_run, tmp_path, clock, "ar", 0.02)
        fast, slow = fast.result(), slow.result()
    assert fast.steps == slow.steps
    # 4 simulated seconds at the slower one's 50 steps/s, less the pacer's margins; the fast one
    # alone would take ~2,000
    assert 0.8 * 200 <= fast.steps <= 200
    assert clock.time() <= clock.start + 4


def test_a_run_past_its_deadline_stops_there():
    import time

    options = training.RunOptions(out="x.safetensors", steps=1000, batch=1, deadline=time.time() - 1)
    assert not training.pace_to_deadline(options, "vae", 7, {})
    assert options.steps == 7  # the card then reports the steps really taken


def test_batch_workers_render_the_same_stream_as_the_loop():
    """Rendering ahead in worker processes changes speed, never the data (resume relies on it)."""
    inline = training.RunOptions(out="x.safetensors", steps=3, batch=4, seed=5)
    ahead = training.RunOptions(out="x.safetensors", steps=3, batch=4, seed=5, workers=1)
    a, b = list(training._stream(inline, 1)), list(training._stream(ahead, 1))
    assert [s for s, _ in a] == [s for s, _ in b] == [1, 2]
    for (_, x), (_, y) in zip(a, b):
        assert x.captions == y.captions and bool((x.images == y.images).all())


def test_train_defaults_runs_every_stage_in_its_budget(tmp_path, monkeypatch):
    """`tessera train defaults`: all stages as parallel processes, files in the models layout,
    the DiT and the GPT with the same number of examples."""
    import json

    from tessera.paths import default_models_dir

    monkeypatch.chdir(tmp_path)
    models = tmp_path / "models"
    shipped_te = default_models_dir() / training.DEFAULT_FILES["text_encoder"]
    assert (
        train(
            ["defaults", "--minutes", "0.8", "--models-dir", str(models), "--text-encoder", str(shipped_te)]
        )
        == 0
    )
    # every run was stopped by its stage's deadline (its step cap is a million), not by the cap:
    # directly, through the pace it set itself, or through its paired run's stop
    logs = sorted((tmp_path / "artifacts" / "train").glob("*.out"))
    assert sorted(p.stem for p in logs) == sorted(
        [
            "vae",
            "vq",
            "var-vq",
            "dit",
            "ar",
            "var",
            "lora-dit",
            "lora-gpt",
            "controlnet-dit",
            "controlnet-gpt",
        ]
    )
    assert all(re.search(r"paced to \d+ steps|stopping at step", p.read_text()) for p in logs)
    cards = {}
    for key in ("vae", "vq", "msvq", "dit", "ar", "var"):
        with safe_open(str(models / training.DEFAULT_FILES[key]), "pt") as f:
            cards[key] = json.loads(f.metadata()["tessera.card"])
    assert cards["dit"]["examples_seen"] == cards["ar"]["examples_seen"] == cards["var"]["examples_seen"]
    for name in (
        "loras/dit_giant_lora",
        "loras/gpt_giant_lora",
        "controlnet/dit_canny_controlnet",
        "controlnet/gpt_canny_controlnet",
    ):
        assert (models / f"{name}.safetensors").stat().st_size > 0
    assert (tmp_path / "artifacts" / "train" / "dit.out").is_file()


def test_a_failed_recipe_leaves_the_models_folder_as_it_was(tmp_path, monkeypatch):
    """A bad input is named up front; a stage that fails changes nothing in the models folder."""
    monkeypatch.chdir(tmp_path)
    models = tmp_path / "models"
    (models / "vae").mkdir(parents=True)
    (models / "vae" / "keep.safetensors").write_bytes(b"untouched")
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(SystemExit, match=r"--text-encoder .*broken\.safetensors.*not a safetensors file"):
        train(["defaults", "--minutes", "0.3", "--models-dir", str(models), "--text-encoder", str(bad)])
    # a stage failing mid-recipe (a one-stage recipe whose VAE run is given batch 0 and exits 1)
    from tessera.paths import default_models_dir

    monkeypatch.setattr("tessera.lab.cli.RECIPE", (((("vae", "vae"),), (0, 0), 1.0),))
    with pytest.raises(SystemExit) as failure:
        train(
            [
                "defaults",
                "--minutes",
                "0.2",
                "--models-dir",
                str(models),
                "--text-encoder",
                str(default_models_dir() / training.DEFAULT_FILES["text_encoder"]),
            ]
        )
    assert "vae failed" in str(failure.value) and f"{models} is unchanged" in str(failure.value)
    assert sorted(p.relative_to(models).as_posix() for p in models.rglob("*")) == [
        "vae",
        "vae/keep.safetensors",
    ]


class Interrupted(Exception):
    pass


@pytest.mark.parametrize("kind", ["text-encoder", "vae", "vq", "dit", "ar"])
def test_a_resumed_run_equals_an_uninterrupted_one_bit_for_bit(autoencoders, kind, tmp_path, monkeypatch):
    """Stopped right after its state at step 2 of 3 is written, then resumed from that state, a
    run writes the very weights an uninterrupted 3-step run writes (CPU)."""
    from safetensors.torch import load_file

    _, models = autoencoders
    common = [
        "--steps",
        "3",
        "--batch",
        "2",
        "--threads",
        "1",
        "--ckpt-every",
        "1",
        "--models-dir",
        str(models),
    ]

    def train_to(name: str, *extra: str) -> None:
        assert train([kind, *common, "--out", str(tmp_path / f"{name}.safetensors"),
                      "--state", str(tmp_path / f"{name}.state.safetensors"), "--log", str(tmp_path / f"{name}.jsonl"),
                      *extra]) in (0, None)  # fmt: skip

    train_to("whole")
    save_state = training._save_state

    def stop_after_step_2(path, step, *args, **kwargs):
        save_state(path, step, *args, **kwargs)
        if step == 2:
            raise Interrupted

    monkeypatch.setattr(training, "_save_state", stop_after_step_2)
    with pytest.raises(Interrupted):
        train_to("parts")
    monkeypatch.setattr(training, "_save_state", save_state)
    train_to("parts", "--resume-from", str(tmp_path / "parts.state.safetensors"))
    whole, parts = load_file(tmp_path / "whole.safetensors"), load_file(tmp_path / "parts.safetensors")
    assert whole.keys() == parts.keys()
    assert [k for k in whole if not torch.equal(whole[k], parts[k])] == []
