"""The verdict arithmetic of `tessera bench paradigms` on made-up numbers with known answers: the
needed-n power calculation, the 2-SE rule (paired and from summaries), the row rule over N
paradigms, and the learning-curve stability (a verdict that holds at every budget vs one that
flips). No model is run here; the end-to-end runs are in test_bench_paradigms.py."""

from __future__ import annotations

import importlib.util
import json
import math
import sys

import numpy as np
import pytest

from tessera.paths import SOURCE_ROOT


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_paradigms", SOURCE_ROOT / "bench" / "paradigms.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


bench = _load_bench()


def test_needed_n_matches_the_closed_form():
    # n = ceil(((2 + z_0.8) * s / d)^2), z_0.8 = 0.8416
    assert bench.needed_n(0.1, 0.5) == math.ceil((2 + 0.8416212) ** 2 * 25)  # 202
    assert bench.needed_n(0.1, 0.5) == 202
    assert bench.needed_n(-0.1, 0.5) == 202  # the sign does not matter
    # two independent binomial rates 0.5 vs 0.3: s^2 = 0.25 + 0.21
    assert bench.needed_n(0.2, math.sqrt(0.46)) == 93
    # a larger effect needs fewer samples, never below MIN_N; no effect: no n is enough
    assert bench.needed_n(1.0, 0.5) == bench.MIN_N
    assert bench.needed_n(0.0, 0.5) is None
    assert bench.needed_n(0.1, 0.0) == bench.MIN_N
    assert bench.needed_n(1e-9, 1.0) == bench.MAX_NEEDED


def test_needed_n_gives_the_promised_power():
    """Drawn at the needed n, a true difference of that size is decided about 80% of the time."""
    rng = np.random.default_rng(0)
    d, s = 0.15, 0.6
    n = bench.needed_n(d, s)
    decided = 0
    trials = 2000
    for _ in range(trials):
        a = rng.normal(d, s, n)
        decided += bench.paired(a, np.zeros(n))["verdict"] == "confirmed"
    assert 0.76 < decided / trials < 0.84
    # and at a quarter of it, far less often
    small = max(bench.MIN_N, n // 4)
    hits = sum(
        bench.paired(rng.normal(d, s, small), np.zeros(small))["verdict"] == "confirmed" for _ in range(500)
    )
    assert hits / 500 < 0.45


def test_paired_and_unpaired_rule():
    a = np.array([1.0] * 30 + [0.0] * 10)
    b = np.array([1.0] * 10 + [0.0] * 30)
    res = bench.paired(a, b)
    assert res["verdict"] == "confirmed" and res["diff"] == pytest.approx(0.5) and res["needed_n"] is None
    assert bench.paired(b, a)["verdict"] == "refuted"
    # lower is better: the claimed side's smaller values win
    assert bench.paired(b, a, higher_is_better=False)["verdict"] == "confirmed"
    # within 2 SE: the sample size it would need, from the measured difference and SD
    x = np.array([1.0, 0.0] * 20)
    y = np.array([1.0, 0.0] * 18 + [0.0, 0.0, 1.0, 1.0])
    y[:4] = [0.0, 0.0, 0.0, 0.0]
    res = bench.paired(x, y)
    d = x - y
    assert res["verdict"] == "not measurable here"
    assert res["needed_n"] == bench.needed_n(float(d.mean()), float(d.std(ddof=1)))
    # too few samples: no verdict even for a large difference, and at least MIN_N needed
    few = bench.paired(np.ones(4), np.zeros(4))
    assert few["verdict"] == "not measurable here" and few["needed_n"] == bench.MIN_N
    with pytest.raises(ValueError, match="differ in length"):
        bench.paired(np.ones(3), np.ones(4))
    # summaries: per-sample SD recovered as se * sqrt(n)
    hi = {"value": 0.8, "se": 0.05, "n": 64}
    lo = {"value": 0.5, "se": 0.06, "n": 64}
    assert bench.compare(hi, lo)[0] == "confirmed"
    assert bench.compare(lo, hi)[0] == "refuted"
    assert bench.compare(lo, hi, higher_is_better=False)[0] == "confirmed"
    near = {"value": 0.55, "se": 0.06, "n": 64}
    res = bench.unpaired(near, lo)
    assert res["verdict"] == "not measurable here"
    assert res["needed_n"] == bench.needed_n(0.05, math.sqrt(64 * (0.06**2 + 0.06**2)))
    r = bench.rate([1, 1, 0, 0])
    assert r["value"] == 0.5 and r["se"] == pytest.approx(0.25)


def test_exact_counts_decide_without_samples():
    assert bench.exact(10, 64, higher_is_better=False)["verdict"] == "confirmed"
    assert bench.exact(64, 20, higher_is_better=False)["verdict"] == "refuted"
    assert bench.exact(20, 20)["verdict"] == "not measurable here"


def _m(value: float, se: float, n: int) -> dict:
    return {"value": value, "se": se, "n": n}


def fake_report(names=("dit", "ar", "var"), word=None, seq=None) -> dict:
    """A report with every field the verdicts read, for the paradigms in `names`."""
    word = word or {"dit": 0.2, "ar": 0.6, "var": 0.7}
    seq = seq or {"dit": 20, "ar": 64, "var": 7}
    r = {"paradigms": list(names), "absent": {}, "settings": {"device": "cpu"},
         "realism_reference": {"fd_floor": 10.0}, "diversity_reference": {"real_features": _m(5.0, 0.5, 64)}}  # fmt: skip
    for name in names:
        w = word[name]
        r[name] = {
            "cfg": 2.0,
            "word_exact": _m(w, math.sqrt(w * (1 - w) / 200), 200),
            "relation_all": _m(0.3, 0.03, 200),
            "relation_attribute_accuracy": _m(0.6, 0.02, 200),
            "single_object_attribute_accuracy": _m(0.9, 0.01, 200),
            "single_object_all": _m(0.7, 0.03, 200),
            "texture_accuracy": _m(0.8, 0.02, 200),
            "fd": _m({"dit": 50.0, "ar": 80.0, "var": 70.0}[name], 3.0, 800),
            "diversity_features": _m(5.0, 0.4, 64),
            "diversity_pixels": _m(0.1, 0.01, 64),
            "early_error": {k: _m(0.02, 0.01, 800) for k in ("drop", "drop_no_reaction", "accumulation")},
            "latency": {
                f"ms_per_image_batch{b}": _m({"dit": 100.0, "ar": 300.0, "var": 50.0}[name] / b**0.5, 2.0, 5)
                for b in (1, 16)
            },  # fmt: skip
            "sequential_passes_per_batch": seq[name],
            "forward_passes_per_image": 2 * seq[name],
            "guidance_sweep": [
                {"cfg": 1.0, "attribute_accuracy": _m(0.5, 0.02, 200)},
                {"cfg": 2.0, "attribute_accuracy": _m(0.7, 0.02, 200)},
            ],  # fmt: skip
        }
    return r


def _row(verdicts: list[dict], row: int) -> dict:
    return next(v for v in verdicts if v["row"] == row)


def test_rows_over_three_paradigms():
    v = bench.verdicts(fake_report())
    assert [x["row"] for x in v] == list(bench.ROWS)
    text = _row(v, 1)
    assert [(x["claimed"], x["other"]) for x in text["comparisons"]] == [("ar", "dit"), ("var", "dit")]
    assert text["verdict"] == "confirmed"
    # latency: diffusion slower than next-scale at both batch sizes -> the row is refuted, named
    lat = _row(v, 4)
    assert len(lat["comparisons"]) == 4 and lat["verdict"] == "refuted" and "next-scale" in lat["why"]
    # realism: DiT beats both
    assert _row(v, 3)["verdict"] == "confirmed"
    # sequential passes: exact counts, next-scale fewest
    seq = _row(v, 9)
    assert seq["verdict"] == "confirmed" and all(x["se"] == 0 for x in seq["comparisons"])
    # guidance: one comparison per paradigm, default scale vs cfg 1
    g = _row(v, 7)
    assert [x["claimed"] for x in g["comparisons"]] == ["dit@cfg2", "ar@cfg2", "var@cfg2"]
    assert g["verdict"] == "confirmed"
    # undecided rows give the n they would need, with the option that sets it
    div = _row(v, 5)
    assert div["verdict"] == "not measurable here"
    assert div["needed_n"] is None  # equal diversity everywhere: no n is enough
    acc = _row(v, 6)
    assert acc["verdict"] == "not measurable here" and acc["needed_n"] is None
    for row in v:
        assert row["verdict"] in bench.VERDICTS


def test_an_undecided_row_prints_its_needed_n():
    r = fake_report(word={"dit": 0.50, "ar": 0.55, "var": 0.56})
    row = _row(bench.verdicts(r), 1)
    assert row["verdict"] == "not measurable here"
    needs = [x["needed_n"] for x in row["comparisons"]]
    assert all(n is not None and n > 200 for n in needs)
    assert row["needed_n"] == max(needs)
    assert f"--n {max(needs)}" in row["evidence"] and f"needs n ≈ {max(needs)}" in row["why"]


def test_two_paradigms_and_an_absent_next_scale():
    r = fake_report(names=("dit", "ar"))
    r["absent"] = {"var": "no next-scale model in /x"}
    v = bench.verdicts(r)
    assert [(x["claimed"], x["other"]) for x in _row(v, 1)["comparisons"]] == [("ar", "dit")]
    assert "no next-scale model in /x" in _row(v, 1)["why"]
    assert _row(v, 9)["verdict"] == "confirmed"  # DiT 20 vs raster 64 still counted


def test_learning_curves_detect_a_flip():
    early = fake_report(word={"dit": 0.6, "ar": 0.2, "var": 0.7})  # raster AR loses on text
    late = fake_report(word={"dit": 0.2, "ar": 0.6, "var": 0.7})  # raster AR wins on text
    budgets = [
        ("0.25", {**early, "verdicts": bench.verdicts(early)}),
        ("1.00", {**late, "verdicts": bench.verdicts(late)}),
    ]
    rows = {r["row"]: r for r in bench.curves(budgets)}
    text = rows[1]
    assert text["verdicts"] == ["refuted", "confirmed"] and text["stability"] == "flips"
    by_pair = {(x["claimed"], x["other"]): x for x in text["comparisons"]}
    assert by_pair["ar", "dit"]["stability"] == "flips"
    assert by_pair["var", "dit"]["stability"] == "holds at every budget"  # 0.7 vs 0.6 then 0.7 vs 0.2
    assert rows[3]["stability"] == "holds at every budget"  # FD unchanged: confirmed at both
    assert rows[5]["stability"] == "undecided at some budget"


def test_stability_words():
    assert bench.stability(["confirmed", "confirmed"]) == "holds at every budget"
    assert bench.stability(["refuted", "refuted", "refuted"]) == "holds at every budget"
    assert bench.stability(["confirmed", "not measurable here", "refuted"]) == "flips"
    assert bench.stability(["confirmed", "not measurable here"]) == "undecided at some budget"


def test_a_curve_with_the_next_scale_model_at_one_budget_only():
    with_var = fake_report()
    without = fake_report(names=("dit", "ar"))
    budgets = [
        ("a", {**without, "verdicts": bench.verdicts(without)}),
        ("b", {**with_var, "verdicts": bench.verdicts(with_var)}),
    ]
    text = next(r for r in bench.curves(budgets) if r["row"] == 1)
    by_pair = {(x["claimed"], x["other"]): x for x in text["comparisons"]}
    assert by_pair["var", "dit"]["verdicts"] == ["absent", "confirmed"]
    assert by_pair["var", "dit"]["stability"] == "not measured at every budget"


def test_paradigm_names_and_snapshot_folders(tmp_path):
    assert bench.paradigm_name("next-scale") == "var" and bench.paradigm_name("DiT") == "dit"
    with pytest.raises(ValueError, match="unknown paradigm 'mamba'"):
        bench.paradigm_name("mamba")
    for name in ("1.00", "0.25", "0.50", "notes"):
        (tmp_path / name).mkdir()
        if name != "notes":  # a snapshot folder holds the record lab.training writes with it
            (tmp_path / name / "snapshot-dit.json").write_text("{}")
    assert [label for label, _ in bench.snapshot_dirs(tmp_path)] == ["0.25", "0.50", "1.00"]
    with pytest.raises(FileNotFoundError, match="no snapshots"):
        bench.snapshot_dirs(tmp_path / "notes")
    assert bench.budget_dirs([f"quarter={tmp_path / '0.25'}", str(tmp_path / "1.00")]) == [
        ("quarter", tmp_path / "0.25"),
        ("1.00", tmp_path / "1.00"),
    ]
    with pytest.raises(FileNotFoundError, match="not a folder"):
        bench.budget_dirs([str(tmp_path / "missing")])


def test_curves_table_gives_each_budget_its_cost_and_each_row_its_stability(tmp_path):
    (tmp_path / "snapshot-dit.json").write_text(
        json.dumps({"kind": "dit", "examples_seen": 4096, "cpu_time_s": 120.5})
    )
    assert bench.training_cost(tmp_path) == {
        "dit": {"kind": "dit", "examples_seen": 4096, "cpu_time_s": 120.5}
    }
    early = fake_report(word={"dit": 0.6, "ar": 0.2, "var": 0.7})
    late = fake_report(word={"dit": 0.2, "ar": 0.6, "var": 0.7})
    budgets = [
        ("0.25", {**early, "verdicts": bench.verdicts(early)}),
        ("1.00", {**late, "verdicts": bench.verdicts(late)}),
    ]
    rep = {
        "budgets": [
            {"label": "0.25", "training": bench.training_cost(tmp_path), "report": budgets[0][1]},
            {"label": "1.00", "training": {}, "report": budgets[1][1]},
        ],
        "curves": bench.curves(budgets),
    }
    lines = bench.curves_table(rep).splitlines()
    assert lines[0] == "budget 0.25: DiT 4096 examples, 120.5 CPU-s"
    text = next(line for line in lines if line.startswith("1. text rendering"))
    assert text.split()[-3:] == ["refuted", "confirmed", "flips"]
    (tmp_path / "snapshot-ar.json").write_text("{not json")
    with pytest.raises(ValueError, match="snapshot-ar.json: not a readable snapshot record"):
        bench.training_cost(tmp_path)
