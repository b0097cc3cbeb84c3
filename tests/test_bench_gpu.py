"""bench/gpu.py --tiny: the GPU script's every section runs on the CPU and ends with its JSON line."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

from tessera.paths import SOURCE_ROOT


def test_gpu_bench_tiny_runs_every_section_and_reports_its_figures():
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, str(SOURCE_ROOT / "bench" / "gpu.py"), "--tiny", "--device", "cpu"],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["tiny"] and result["device"] == "cpu" and result["compile"] == "off"
    for section in ("dit", "ar", "jacobi", "precision"):
        assert "error" not in result[section], (section, result[section])
    dit = result["dit"]
    assert dit["ours_eager_ms"] > 0 and dit["fp8"].startswith("needs")
    if "diffusers_eager_ms" in dit:  # diffusers is a test extra: same weights, same velocity
        assert dit["ours_vs_diffusers_rel_err"] < 1e-4
    exact = dit["step_cache"][0]
    assert exact["threshold"] == 0 and exact["cached_steps"] == 0 and math.isinf(exact["psnr_db"])
    assert [row["batch"] for row in result["ar"]["batch_table"]] == [1, 4]
    for case in result["jacobi"].values():
        assert case["greedy_identical"] and case["forwards_per_token_sequential"] == 1.0
        assert 0 < case["forwards_per_token_jacobi"] <= 1.0
    for name in ("dit", "vae_decode", "gpt_logits"):
        assert result["precision"][name]["bf16"] < 0.05 and result["precision"][name]["fp16"] < 0.05
