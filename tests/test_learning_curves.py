"""Learning-curve snapshots: a run saves complete models folders at fractions of its budget, a
resumed run writes the same ones, and `tessera train curves` scores and plots them."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tessera.lab import learning_curves, training
from tessera.lab.cli import main as train
from tessera.paths import default_models_dir

FRACTIONS = {"0.25": 1, "0.50": 2, "1.00": 4}  # folder: step, of a 4-step run


def _train(kind: str, folder, snapshots, *extra: str) -> None:
    args = [kind, "--steps", "4", "--batch", "2", "--threads", "1", "--log-every", "1", "--no-autocast",
            "--models-dir", str(default_models_dir()), "--snapshots", "0.25,0.5,1", "--snapshot-dir",
            str(snapshots), "--out", str(folder / f"{kind}.safetensors"), "--state",
            str(folder / f"{kind}.state.safetensors"), "--log", str(folder / f"{kind}.jsonl"), *extra]  # fmt: skip
    assert train(args) in (0, None)


@pytest.fixture(scope="module")
def paired(tmp_path_factory):
    """A 4-step DiT run and a 4-step GPT run sharing one snapshot folder (frozen inputs: the shipped files)."""
    work = tmp_path_factory.mktemp("curves")
    for kind in ("dit", "ar"):
        _train(kind, work, work / "snapshots")
    return work


def test_each_fraction_is_a_complete_models_folder(paired):
    snapshots = paired / "snapshots"
    assert sorted(p.name for p in snapshots.iterdir()) == sorted(FRACTIONS)
    for name, step in FRACTIONS.items():
        folder = snapshots / name
        for key in ("text_encoder", "vae", "vq", "dit", "ar"):
            assert (folder / training.DEFAULT_FILES[key]).is_file(), f"{name} lacks {key}"
        for kind in ("dit", "ar"):
            record = json.loads((folder / f"snapshot-{kind}.json").read_text())
            assert (record["step"], record["of_steps"], record["examples_seen"]) == (step, 4, 2 * step)
            assert record["train_flops"]["flops"] > 0
            card = json.loads(
                training.read_safetensors(folder / training.DEFAULT_FILES[kind])[1]["tessera.card"]
            )
            assert card["steps"] == step
        source = default_models_dir() / training.DEFAULT_FILES["vq"]  # the frozen inputs, copied as they are
        assert (folder / training.DEFAULT_FILES["vq"]).read_bytes() == source.read_bytes()
    for kind in ("dit", "ar"):  # the last snapshot is the run's output; earlier ones are earlier weights
        final = load_file(paired / f"{kind}.safetensors")
        last = load_file(snapshots / "1.00" / training.DEFAULT_FILES[kind])
        first = load_file(snapshots / "0.25" / training.DEFAULT_FILES[kind])
        assert all(torch.equal(final[k], last[k]) for k in final)
        assert any(not torch.equal(first[k], last[k]) for k in final)


def test_flops_grow_with_the_budget_and_the_pair_is_costed_alike(paired):
    flops = {
        (name, kind): json.loads((paired / "snapshots" / name / f"snapshot-{kind}.json").read_text())[
            "train_flops"
        ]["flops"]
        for name in FRACTIONS
        for kind in ("dit", "ar")
    }
    for kind in ("dit", "ar"):
        assert flops[("0.25", kind)] < flops[("0.50", kind)] < flops[("1.00", kind)]
        assert flops[("1.00", kind)] == pytest.approx(4 * flops[("0.25", kind)], rel=1e-3)
    assert flops[("1.00", "dit")] == pytest.approx(flops[("1.00", "ar")], rel=0.1)  # same tokens, ~same size


def test_a_resumed_run_skips_the_snapshots_it_passed_and_writes_the_same_weights(
    paired, tmp_path, monkeypatch
):
    save_state = training._save_state

    def stop_after_step_3(path, step, *args, **kwargs):
        save_state(path, step, *args, **kwargs)
        if step == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(training, "_save_state", stop_after_step_3)
    with pytest.raises(KeyboardInterrupt):
        _train("ar", tmp_path, tmp_path / "snapshots", "--ckpt-every", "1")
    assert not (tmp_path / "snapshots" / "1.00").exists()
    monkeypatch.setattr(training, "_save_state", save_state)
    _train("ar", tmp_path, tmp_path / "snapshots", "--resume-from", str(tmp_path / "ar.state.safetensors"))
    events = [json.loads(line) for line in (tmp_path / "ar.jsonl").read_text().splitlines()]
    assert [e["fraction"] for e in events if e.get("event") == "snapshot"] == [0.25, 0.5, 1.0]
    for name in FRACTIONS:
        whole = load_file(paired / "snapshots" / name / training.DEFAULT_FILES["ar"])
        parts = load_file(tmp_path / "snapshots" / name / training.DEFAULT_FILES["ar"])
        assert [k for k in whole if not torch.equal(whole[k], parts[k])] == [], name


@pytest.mark.parametrize("bad", ["0", "1.5", "a,b", ""])
def test_bad_fractions_are_refused_by_name(bad, capsys):
    with pytest.raises(SystemExit):
        train(["ar", "--snapshots", bad])
    assert "--snapshots" in capsys.readouterr().err
    with pytest.raises(ValueError, match="snapshot fractions"):
        training.RunOptions(out="x.safetensors", steps=4, batch=2, snapshots=(2.0,))


def test_a_kind_without_a_snapshot_writer_says_so(tmp_path):
    with pytest.raises(ValueError, match="text-encoder: this kind cannot write snapshots"):
        train(["text-encoder", "--steps", "2", "--batch", "2", "--snapshots", "0.5", "--out",
               str(tmp_path / "te.safetensors"), "--log", str(tmp_path / "te.jsonl")])  # fmt: skip
    assert not (tmp_path / "te.safetensors").exists()


def test_curves_scores_every_snapshot_and_plots_them(paired, capsys):
    snapshots = paired / "snapshots"
    train(["curves", "--snapshot-dir", str(snapshots), "--n", "2", "--kinds", "shape",
           "--dit", '{"steps": 2}'])  # fmt: skip
    curves = json.loads((snapshots / "curves.json").read_text())
    assert sorted((p["fraction"], p["kind"]) for p in curves["points"]) == sorted(
        (f, k) for f in (0.25, 0.5, 1.0) for k in ("dit", "ar")
    )
    rows = learning_curves.curve_table(curves)
    assert {(r["kind"], r["measure"]) for r in rows} == {
        (k, m) for k in ("dit", "ar") for m in ("mean_attribute", "all")
    }
    for row in rows:
        assert row["examples_seen"] == [2, 4, 8] and all(0 <= v <= 1 for v in row["values"])
    png = (snapshots / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert "shape" in capsys.readouterr().out


def test_curves_names_a_folder_without_snapshots(tmp_path):
    with pytest.raises(SystemExit, match="no snapshots"):
        train(["curves", "--snapshot-dir", str(tmp_path)])


def test_the_recipe_hands_its_snapshots_to_the_dit_and_the_gpt(tmp_path, monkeypatch):
    """`tessera train defaults --snapshots` asks the paired generator runs (and only them) for snapshots."""
    from tessera.lab import cli

    stages = []
    monkeypatch.setattr(cli, "_run_stage", lambda commands, work: stages.append(commands))
    args = cli.build_parser().parse_args(
        ["defaults", "--snapshots", "0.25,0.5,1", "--snapshot-dir", str(tmp_path / "curve")]
    )
    cli._run_recipe(args, tmp_path / "models", tmp_path, budget=60.0)
    commands = {name: cmd for stage in stages for name, cmd in stage}
    assert {"dit", "ar"} <= commands.keys()
    for name, cmd in commands.items():
        if name in ("dit", "ar"):
            i = cmd.index("--snapshots")
            assert cmd[i + 1] == "0.25,0.5,1" and cmd[cmd.index("--snapshot-dir") + 1] == str(
                tmp_path / "curve"
            )
            assert cli.build_parser().parse_args(cmd).snapshots == (0.25, 0.5, 1.0)
        else:
            assert "--snapshots" not in cmd
