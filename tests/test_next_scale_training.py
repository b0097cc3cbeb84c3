"""The next-scale (VAR) recipes: both losses learn, both kinds run through `tessera train`, resume
to the very weights of an uninterrupted run, and the VAR is matched to the DiT and the GPT."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tessera.engines.flux import Flux
from tessera.engines.gpt import GPT
from tessera.engines.multiscale_vq import MultiScaleVQ, MultiScaleVQConfig, load_multiscale_vq
from tessera.engines.text_encoder import tiny_text_encoder
from tessera.engines.var import VAR, VARConfig, load_var
from tessera.engines.vq import VQModel, save_vq
from tessera.lab import next_scale_training as NS
from tessera.lab import synthetic, training
from tessera.lab.cli import main as train
from tessera.paths import default_models_dir

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_MSVQ = MultiScaleVQConfig(
    channels=8,
    ch_mult=[1, 2, 2, 2],
    num_res_blocks=1,
    attn_deepest=False,
    mid_attn=False,
    z_channels=8,
    vocab_size=32,
    patch_nums=[1, 2, 4, 8],
    norm_groups=4,
)
COMMON = ["--batch", "2", "--threads", "1", "--log-every", "1", "--ckpt-every", "1", "--no-autocast"]


def _adam_steps(params, loss_fn, steps: int) -> tuple[float, float]:
    opt = torch.optim.Adam(params, lr=3e-3)
    first = last = None
    for _ in range(steps):
        loss = loss_fn()
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
        last = loss.item()
    return first, last


def test_the_tokenizer_loss_drops_on_a_fixed_batch():
    torch.manual_seed(0)
    model = MultiScaleVQ(TINY_MSVQ)
    x = synthetic.make_batch(4, 0, 0, "train").images
    first, last = _adam_steps(list(model.parameters()), lambda: NS.msvq_loss(model, x)[0], 40)
    assert last < 0.6 * first, (first, last)


def test_the_next_scale_loss_drops_on_a_fixed_batch():
    """Teacher-forced cross-entropy over all scales: a tiny VAR memorises one batch's tokens."""
    torch.manual_seed(0)
    msvq = MultiScaleVQ(TINY_MSVQ).eval().requires_grad_(False)
    te = tiny_text_encoder()
    model = VAR(VARConfig(depth=2, width=32, heads=2, ffn_hidden=64, vocab_size=32, cvae=8,
                          patch_nums=[1, 2, 4, 8], num_classes=0, pooled_dim=te.config.pooled_dim)).init_weights(0)  # fmt: skip
    batch = synthetic.make_batch(4, 0, 0, "train")
    with torch.no_grad():
        cond = te.encode(batch.captions)
    drop = torch.tensor([False, False, False, True])
    first, last = _adam_steps(
        list(model.parameters()), lambda: NS.next_scale_loss(model, msvq, cond, batch.images, drop)[0], 40
    )
    assert first > 0.9 * torch.log(torch.tensor(32.0)).item()  # starts near uniform over 32 codes
    assert last < 0.5 * first, (first, last)


def test_raster_vq_convolutions_start_the_multiscale_tokenizer(tmp_path):
    """The warm start copies the raster VQ's encoder and decoder exactly (renamed, q/k/v fused), and
    refuses a raster VQ whose sizes do not fit, naming the tensor."""
    torch.manual_seed(0)
    raster_cfg = training.VQ_CONFIG
    raster = VQModel(raster_cfg).eval()
    save_vq(raster, tmp_path / "raster.safetensors")
    model = MultiScaleVQ(NS.MSVQ_CONFIG).eval()
    card = NS.raster_vq_convs(model, tmp_path / "raster.safetensors")
    assert card["convolutions_from"]["file"] == "raster.safetensors"
    x = synthetic.make_batch(2, 0, 0, "train").images
    z = torch.randn(2, raster_cfg.z_channels, 8, 8)
    with torch.no_grad():
        assert torch.allclose(model.encoder(x), raster.encoder(x), atol=1e-5)
        assert torch.allclose(model.decoder(z), raster.decoder(z), atol=1e-5)
    small = MultiScaleVQ(TINY_MSVQ)
    with pytest.raises(
        Exception, match=r"raster\.safetensors: its convolutions do not fit .*\(\w+coder\.\S+: \(\d+"
    ):
        NS.raster_vq_convs(small, tmp_path / "raster.safetensors")


def test_the_var_is_matched_to_the_dit_and_the_gpt_in_size():
    te = training.TEXT_ENCODER_CONFIG
    msvq = NS.MSVQ_CONFIG
    n_var = training.count_params(
        VAR(NS.var_config(msvq.vocab_size, msvq.z_channels, msvq.patch_nums, te.pooled_dim))
    )
    n_dit = training.count_params(
        Flux(training.dit_config(training.VAE_CONFIG.latent_channels, te.context_dim, te.pooled_dim))
    )
    n_gpt = training.count_params(
        GPT(training.gpt_config(training.VQ_CONFIG.codebook_size, te.context_dim, te.max_length))
    )
    for other in (n_dit, n_gpt):
        assert abs(n_var - other) <= 0.05 * other, (n_var, n_dit, n_gpt)
    assert msvq.patch_nums[-1] * msvq.downsample == synthetic.IMAGE_SIZE
    assert msvq.vocab_size == training.VQ_CONFIG.codebook_size  # the GPT's vocabulary


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A 2-step multi-scale VQ written by `tessera train var-vq`, beside the shipped text encoder."""
    work = tmp_path_factory.mktemp("next-scale")
    models = work / "models"
    te = models / training.DEFAULT_FILES["text_encoder"]
    te.parent.mkdir(parents=True)
    shutil.copy(default_models_dir() / training.DEFAULT_FILES["text_encoder"], te)
    out = models / training.DEFAULT_FILES["msvq"]
    assert train(["var-vq", "--steps", "2", *COMMON, "--models-dir", str(models), "--out", str(out),
                  "--state", str(work / "msvq.state.safetensors"), "--log", str(work / "msvq.jsonl")]) == 0  # fmt: skip
    return work, models


def test_var_vq_writes_a_loadable_tokenizer_with_a_card(models):
    _, folder = models
    path = folder / training.DEFAULT_FILES["msvq"]
    assert load_multiscale_vq(path).config.patch_nums == NS.MSVQ_CONFIG.patch_nums
    with safe_open(str(path), "pt") as f:
        card = json.loads(f.metadata()["tessera.card"])
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes == {"F16"}
    assert card["kind"] == "msvq" and card["steps"] == 2 and card["examples_seen"] == 4
    assert set(card["heldout_reconstruction"]["psnr_db_by_scales"]) == {"1:1x1", "2:2x2", "3:3x3", "4:4x4",
                                                                       "5:6x6", "6:8x8"}  # fmt: skip


def test_var_trains_resumes_loads_and_is_scored(models, capsys, tmp_path):
    work, folder = models
    out, state = folder / training.DEFAULT_FILES["var"], work / "var.state.safetensors"
    args = ["var", *COMMON, "--models-dir", str(folder), "--out", str(out), "--state", str(state),
            "--log", str(work / "var.jsonl")]  # fmt: skip
    assert train([*args, "--steps", "2"]) == 0
    assert train([*args, "--steps", "3", "--resume-from", str(state)]) == 0
    assert f"resumed from {state} at step 2" in capsys.readouterr().out
    model = load_var(out)
    assert model.config.is_caption and model.config.patch_nums == NS.MSVQ_CONFIG.patch_nums
    with safe_open(str(out), "pt") as f:
        card = json.loads(f.metadata()["tessera.card"])
    assert card["kind"] == "var" and card["steps"] == 3 and card["sequential_passes"] == 6
    assert card["msvq"]["file"] == "tessera-msvq-f8.safetensors"
    assert card["text_encoder"]["file"] == "tessera-text-encoder.safetensors"
    # tessera train eval --which var: held-out captions through generate_next_scale, scored per kind
    report = tmp_path / "eval.json"
    assert train(["eval", "--models-dir", str(folder), "--which", "var", "--n", "2", "--kinds", "shape",
                  "--threads", "1", "--var", '{"cfg": 3}', "--json-out", str(report)]) == 0  # fmt: skip
    scores = json.loads(report.read_text())["var"]
    assert scores["settings"]["cfg"] == 3 and scores["shape"]["n"] == 2
    assert 0 <= scores["shape"]["mean_attribute"] <= 1


class Interrupted(Exception):
    pass


@pytest.mark.parametrize("kind", ["var-vq", "var"])
def test_a_resumed_run_equals_an_uninterrupted_one_bit_for_bit(models, kind, tmp_path, monkeypatch):
    """Stopped right after its state at step 2 of 3 is written, then resumed from that state, a run
    writes the very weights an uninterrupted 3-step run writes (CPU)."""
    _, folder = models

    def train_to(name: str, *extra: str) -> None:
        assert train([kind, "--steps", "3", *COMMON, "--models-dir", str(folder),
                      "--out", str(tmp_path / f"{name}.safetensors"),
                      "--state", str(tmp_path / f"{name}.state.safetensors"),
                      "--log", str(tmp_path / f"{name}.jsonl"), *extra]) == 0  # fmt: skip

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
