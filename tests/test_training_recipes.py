"""The training recipes run end to end, resume from their safetensors state, and stay matched."""

from __future__ import annotations

import shutil

import pytest
from safetensors import safe_open

from tessera.engines import training
from tessera.engines.flux import Flux, load_dit
from tessera.engines.gpt import GPT, load_gpt
from tessera.engines.vae import load_vae
from tessera.engines.vq import load_vq
from tessera.training import main as train

TINY = ["--steps", "2", "--batch", "2", "--threads", "1", "--log-every", "1", "--ckpt-every", "1"]


def run(kind: str, folder, *extra: str) -> None:
    args = [kind, *TINY, "--out", str(folder / f"{kind}.safetensors"), "--state", str(folder / f"{kind}.state.safetensors"),
            "--log", str(folder / f"{kind}.jsonl"), *extra]
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
    dit = Flux(training.dit_config(training.VAE_CONFIG.latent_channels, training.TEXT_ENCODER_CONFIG.context_dim,
                                   training.TEXT_ENCODER_CONFIG.pooled_dim))
    gpt = GPT(training.gpt_config(training.VQ_CONFIG.codebook_size, training.TEXT_ENCODER_CONFIG.context_dim,
                                  training.TEXT_ENCODER_CONFIG.max_length))
    n_dit = sum(p.numel() for p in dit.parameters())
    n_gpt = sum(p.numel() for p in gpt.parameters())
    assert abs(n_dit - n_gpt) / n_dit <= 0.10, (n_dit, n_gpt)
