"""bench/seed_change.py --quick: a seed change through the executor, both paradigms, JSON line checked."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tessera.paths import SOURCE_ROOT


def test_seed_change_bench_times_both_paradigms_and_compares_images():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(SOURCE_ROOT / "bench" / "seed_change.py"), "--quick", "--threads", "1", "--compare",
         "--decoding", "jacobi"],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    rows = {r["paradigm"]: r for r in result["results"]}
    assert set(rows) == {"diffusion", "autoregressive"}
    for row in rows.values():
        assert row["seconds_per_image"] > 0 and row["cpu_seconds_per_image"] > 0
    # the sampler, decoder and save re-ran for the new seed; the loaders came from the cache
    assert set(rows["diffusion"]["nodes"]) == {"DiTSampler", "VAEDecode", "SaveImage"}
    assert set(rows["autoregressive"]["nodes"]) == {"ARGenerateTokens", "VQDecode", "SaveImage"}
    assert rows["diffusion"]["psnr_vs_default_fp32"] == float("inf")  # default options: the same image
    assert rows["autoregressive"]["options"]["decoding"] == "jacobi"
