"""`tessera bench paradigms --quick` on the shipped models: a complete report, sane values, verdicts
with numbers, a real PNG, forward-pass counts that match the settings, and early-error runs that
really change the generation. Plus the bench's generators against lab.training's samplers,
and the verdict and Fréchet arithmetic on made-up numbers."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import math
import re
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from tessera.engines.text_encoder import load_text_encoder
from tessera.engines.tokens import TokenGrid
from tessera.lab import scene_features, synthetic
from tessera.lab import training as T
from tessera.paths import SOURCE_ROOT

MODELS = SOURCE_ROOT / "models"


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_paradigms", SOURCE_ROOT / "bench" / "paradigms.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


bench = _load_bench()


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("paradigms")
    json_out, png = out / "report.json", out / "report.png"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        report = bench.main(["--quick", "--threads", "1", "--json-out", str(json_out), "--plot", str(png)])
    return report, json_out, png, stdout.getvalue()


def _rate_ok(m: dict, lo: float = 0.0, hi: float = 1.0) -> None:
    assert m["n"] > 0 and m["value"] is not None, m
    assert lo <= m["value"] <= hi, m
    assert m["se"] >= 0 and math.isfinite(m["se"]), m


def test_report_has_every_metric_for_both_paradigms(quick):
    report, json_out, _, stdout = quick
    assert report["bench"] == "paradigms" and report["mode"] == "quick"
    on_disk = json.loads(json_out.read_text())
    last = json.loads(stdout.strip().splitlines()[-1])  # the one machine-readable line comes last
    assert last["bench"] == "paradigms" and last["verdicts"] == on_disk["verdicts"] == report["verdicts"]
    n_captions = report["settings"]["n"] * len(synthetic.KINDS)
    assert report["captions"] == n_captions
    for name in ("dit", "ar"):
        m = report[name]
        for key in (
            "word_exact",
            "single_object_attribute_accuracy",
            "relation_all",
            "relation_attribute_accuracy",
            "texture_accuracy",
            "attribute_accuracy",
            "all_correct",
        ):
            _rate_ok(m[key])
        assert m["attribute_accuracy"]["n"] == n_captions
        assert m["fd"]["value"] >= 0 and m["fd"]["n"] == n_captions
        for key in ("diversity_features", "diversity_pixels"):
            _rate_ok(m[key], 0.0, math.inf)
        assert 0 < m["diversity_pixels"]["value"] <= 1.0  # RMS distance of images in 0..1
        _rate_ok(m["early_error"]["drop"], -1.0, 1.0)
        _rate_ok(m["early_error"]["drop_no_reaction"], -1.0, 1.0)
        for b in (1, 16):
            assert m["latency"][f"ms_per_image_batch{b}"] > 0
        sweep = report["settings"][f"{name}_sweep"]
        assert [p["cfg"] for p in m["guidance_sweep"]] == list(sweep) and 1.0 in sweep
        for p in m["guidance_sweep"]:
            _rate_ok(p["attribute_accuracy"])
        # the default scale's sweep point is the main run itself (quick mode sweeps every caption)
        assert report["guidance_sweep_captions"] == n_captions
        main_point = next(p for p in m["guidance_sweep"] if p["cfg"] == m["cfg"])
        assert main_point["attribute_accuracy"] == m["attribute_accuracy"]
    assert report["realism_reference"]["fd_floor"] >= 0
    _rate_ok(report["diversity_reference"]["real_features"], 0.0, math.inf)


def test_forward_passes_match_the_settings(quick):
    report = quick[0]
    s = report["settings"]
    cfg_rows = {"dit": 2 if s["dit_cfg"] != 1.0 else 1, "ar": 2 if s["ar_cfg"] != 1.0 else 1}
    assert report["dit"]["forward_passes_per_image"] == s["dit_steps"] * cfg_rows["dit"]
    assert report["dit"]["sequential_passes_per_batch"] == s["dit_steps"]
    assert (
        report["ar"]["forward_passes_per_image"] == 64 * cfg_rows["ar"]
    )  # one pass per VQ token of the 8x8 grid
    assert report["ar"]["sequential_passes_per_batch"] == 64
    # the DiT sees all 64 latent positions every pass; the GPT one token per pass after its caption prefill
    assert report["dit"]["image_positions_per_image"] == 64 * s["dit_steps"] * cfg_rows["dit"]
    assert report["ar"]["image_positions_per_image"] < 64 * 64


def test_every_verdict_is_one_of_three_words_with_numbers(quick):
    verdicts = quick[0]["verdicts"]
    assert [v["row"] for v in verdicts] == list(range(1, 9))
    for v in verdicts:
        assert v["verdict"] in ("confirmed", "refuted", "not measurable here"), v
        assert v["why"] and v["claim"]
        if v["row"] < 8:
            assert len(re.findall(r"\d+\.\d+", v["evidence"])) >= 2, v  # the numbers, not just the word
            assert v["numbers"], v
    assert verdicts[7]["verdict"] == "not measurable here" and "adapters" in verdicts[7]["evidence"]
    # quick mode has too few images for any accuracy verdict
    assert all(v["verdict"] == "not measurable here" for v in verdicts if v["row"] in (2, 3, 5, 6))


def test_plot_is_a_png(quick):
    png = quick[2]
    with Image.open(png) as img:
        assert img.format == "PNG"
        img.verify()
    with Image.open(png) as img:
        assert img.size[0] >= 1000 and img.size[1] >= 700
        px = np.asarray(img.convert("RGB"))
    dit_blue = np.array(bench.COLORS["dit"])
    ar_orange = np.array(bench.COLORS["ar"])
    assert (np.abs(px - dit_blue).sum(-1) == 0).sum() > 500  # bars of both colours were drawn
    assert (np.abs(px - ar_orange).sum(-1) == 0).sum() > 500


def test_early_errors_change_the_generation(quick):
    report = quick[0]
    ar, dit = report["ar"]["early_error"], report["dit"]["early_error"]
    assert ar["forced_token_in_place"] and ar["prefix_unchanged"]
    assert dit["pixels_changed"] > 0


@pytest.fixture(scope="module")
def engines():
    te = load_text_encoder(MODELS / T.DEFAULT_FILES["text_encoder"], dtype=torch.float32).eval()
    dev = torch.device("cpu")
    return te, bench.DiTEngine(MODELS, te, dev, steps=6, cfg=4.0), bench.AREngine(MODELS, te, dev, cfg=3.0)


def _captions(n: int) -> list[str]:
    return [synthetic.caption(a) for a in T.heldout_scenes(1)][:n]


def test_the_bench_experiment_loops_give_the_one_generation_path_when_nothing_is_forced(engines):
    """The corrupting DiT loop and the token-forcing GPT loop, with nothing corrupted or forced,
    make the images engines.generation makes (what the main run and the lab's evaluation use)."""
    te, dit, ar = engines
    caps = _captions(3)
    ref = T.sample_dit(dit.model, dit.vae, te, caps, seed=5, steps=6, cfg=4.0, batch=2)
    torch.testing.assert_close(dit.decode(dit.sample_latents(caps, 5, batch=2)), ref, atol=1e-5, rtol=0)
    assert torch.equal(dit.sample(caps, 5, batch=2), ref)
    ref = T.sample_ar(ar.model, ar.vq, te, caps, seed=5, cfg=3.0, batch=2)
    # decoded in one batch of 3 rather than 2 + 1: equal up to the batch size's fp32 rounding
    torch.testing.assert_close(ar.decode(ar.sample_ids(caps, 5, batch=2)), ref, atol=1e-5, rtol=0)


def test_a_prefix_of_the_captions_generates_as_in_the_full_list(engines):
    # the guidance sweep reuses the main run's images for a prefix of the caption list
    _, dit, ar = engines
    caps = _captions(3)
    torch.testing.assert_close(
        dit.sample(caps[:2], 4, batch=2), dit.sample(caps, 4, batch=2)[:2], atol=1e-5, rtol=0
    )
    assert torch.equal(ar.sample_ids(caps[:2], 4, batch=2), ar.sample_ids(caps, 4, batch=2)[:2])


def test_one_wrong_token_is_forced_and_the_rest_resampled(engines):
    _, _, ar = engines
    caps = _captions(4)
    base = ar.sample_ids(caps, 11).flatten(1)
    pos = 10
    wrong = ar.wrong_tokens(base[:, pos])
    assert (wrong != base[:, pos]).all()
    ids, fixed = base.clone(), torch.zeros_like(base, dtype=torch.bool)
    ids[:, pos], fixed[:, pos] = wrong, True
    out = ar.sample_ids(caps, 11, fixed=TokenGrid(ids.view(4, 8, 8), fixed.view(4, 8, 8))).flatten(1)
    assert (out[:, pos] == wrong).all()
    assert torch.equal(out[:, :pos], base[:, :pos])  # the same random stream up to the error
    assert not torch.equal(out, base)


def test_dit_corruption_moves_the_latent_and_only_from_its_step(engines):
    _, dit, _ = engines
    caps = _captions(2)
    base = dit.sample_latents(caps, 3)
    late = dit.corrupt(base, 0.0, None, 1, 2)
    assert torch.equal(late[:, :, 0], base[:, :, 0]) and not torch.equal(late[:, :, 1, 2], base[:, :, 1, 2])
    far = torch.cdist(base[:, :, 1, 2], dit.palette).argmax(1)
    torch.testing.assert_close(late[:, :, 1, 2], dit.palette[far])
    early = dit.sample_latents(caps, 3, corrupt=(1, 1, 2))
    assert not torch.equal(early, base)
    # corrupting "after step 0" at sigma 1 changes nothing: the clean estimate has weight 1 - sigma = 0
    torch.testing.assert_close(dit.sample_latents(caps, 3, corrupt=(0, 1, 2)), base, atol=1e-4, rtol=0)


def test_verdict_rule():
    hi = {"value": 0.8, "se": 0.05, "n": 64}
    lo = {"value": 0.5, "se": 0.06, "n": 64}
    assert bench.compare(hi, lo)[0] == "confirmed"
    assert bench.compare(lo, hi)[0] == "refuted"
    assert bench.compare(lo, hi, higher_is_better=False)[0] == "confirmed"
    near = {"value": 0.55, "se": 0.06, "n": 64}
    assert bench.compare(near, lo)[0] == "not measurable here"  # within 2 SE
    few = {"value": 0.9, "se": 0.01, "n": 4}
    assert bench.compare(few, lo)[0] == "not measurable here"
    r = bench.rate([1, 1, 0, 0])
    assert r["value"] == 0.5 and r["se"] == pytest.approx(0.25)


def test_frechet_distance():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4000, 6))
    mu, cov = scene_features.feature_stats(x)
    assert scene_features.frechet_distance(mu, cov, mu, cov) == pytest.approx(0.0, abs=1e-6)
    shift = np.arange(6.0)
    assert scene_features.frechet_distance(mu + shift, cov, mu, cov) == pytest.approx(
        float(shift @ shift), rel=1e-6
    )
    # N(0, I) vs N(0, 4I) in 6 dims: tr(I + 4I - 2*2I) = 6
    eye = np.eye(6)
    assert scene_features.frechet_distance(np.zeros(6), eye, np.zeros(6), 4 * eye) == pytest.approx(6.0)


def test_shipped_feature_classifier_reads_real_renders():
    net = scene_features.load_scene_net(MODELS / bench.CLASSIFIER_FILE)
    acc = scene_features.heldout_accuracy(net, n=128)
    assert acc["kind"] > 0.9 and acc["background"] > 0.8 and acc["texture"] > 0.8
    feats = scene_features.extract_features(
        net, np.stack([synthetic.make_sample(5, i).image for i in range(8)])
    )
    assert feats.shape == (8, net.config.feature_dim) and np.isfinite(feats).all()


def test_cli_lists_the_benchmark(capsys):
    from tessera.cli import main

    assert main(["bench"]) == 0
    assert "paradigms" in capsys.readouterr().out
