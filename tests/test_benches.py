"""Every `tessera bench` command runs in a quick mode and ends with a JSON line that makes sense.

`paradigms` has its own tests (test_bench_paradigms.py). Only structure and correctness
figures are checked here (agreement with diffusers, cached re-runs, score ranges), never speed.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest


def bench(*args: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "tessera", "bench", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) > 1, "a table comes before the JSON line"
    return json.loads(lines[-1])


def positive(x: object) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_executor_bench_quick():
    record = bench("executor", "--quick")
    assert record["bench"] == "executor" and record["nodes"] == 30
    for key in (
        "validate_compile_s",
        "first_run_s",
        "cached_rerun_s",
        "bare_execute_s",
        "first_run_per_node_us",
    ):
        assert positive(record[key]), key
    assert record["first_run_per_node_us"] == pytest.approx(
        record["first_run_s"] / 30 * 1e6, abs=0.5
    )  # first_run_s is rounded to 10 us


def test_autoregressive_bench_quick():
    record = bench("autoregressive", "--quick")
    assert record["bench"] == "autoregressive" and (record["dim"], record["layers"], record["grid"]) == (
        64,
        1,
        4,
    )
    cases = {(r["case"], r["cache"]) for r in record["results"]}
    assert cases == {("batch 1", True), ("batch 1", False), ("CFG batch 2", True), ("CFG batch 2", False)}
    for r in record["results"]:
        assert positive(r["tokens_per_s"]) and positive(r["seconds"])
        assert positive(r["bytes_per_step"]) if r["cache"] else r["bytes_per_step"] is None
    assert set(record["kv_speedup"]) == {"batch 1", "CFG batch 2"}


def test_diffusion_bench_quick_agrees_with_diffusers():
    record = bench("diffusion", "--quick")
    assert record["bench"] == "diffusion" and record["image"] == 32
    assert {(r["engine"], r["case"]) for r in record["results"]} == {
        (e, c) for e in ("ours", "diffusers") for c in ("b1", "cfg")
    }
    assert all(positive(r["ms"]) for r in record["results"])
    assert record["output_rel_error"] < 1e-4  # same weights, same output


def test_adapters_bench_quick():
    record = bench("adapters", "--n", "2", "--steps", "2", "--threads", "1")
    assert record["bench"] == "adapters" and record["n"] == 2
    for engine in ("dit", "gpt"):
        for measure in ("concept_rate", "adherence"):
            pair = record[f"{engine}_lora"][measure]  # [without, with] the adapter
            assert len(pair) == 2 and all(0 <= v <= 1 for v in pair), (engine, measure)
        for measure in ("edge_iou", "edge_iou_empty_caption", "adherence", "adherence_empty_caption"):
            pair = record[f"{engine}_controlnet"][measure]
            assert len(pair) == 2 and all(0 <= v <= 1 for v in pair), (engine, measure)
