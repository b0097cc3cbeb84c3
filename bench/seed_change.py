"""Seconds per image when only the seed changes, through the executor, for both paradigms.

Runs the shipped workflows (workflows/text_to_image_diffusion.json and
text_to_image_autoregressive.json) on the built-in models: one warm-up run loads the models
(cached afterwards), then each timed run changes the seed, so the sampler (or token
generator), the decoder and the image save re-run, as in the server. This is the figure the
CPU goal is about (<= 0.3 s per 64x64 image on 2 cores). Options try what may help: the AR
`decoding` (sequential or jacobi), the DiT `step_cache` threshold, a compute dtype (bf16 where
the CPU has fast bf16), and `--compile`. Images are compared with the fp32 / default-option
run of the same seed (PSNR), so a speed-up that changes the picture shows. Prints a table,
then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tessera.compile import compile_info, set_compile_mode
from tessera.executor import Executor
from tessera.paths import SOURCE_ROOT, default_models_dir
from tessera.registry import default_registry

WORKFLOWS = {
    "diffusion": ("text_to_image_diffusion.json", "DiTSampler"),
    "autoregressive": ("text_to_image_autoregressive.json", "ARGenerateTokens"),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def load(name: str) -> tuple[dict, str]:
    file, sampler_type = WORKFLOWS[name]
    workflow = json.loads((SOURCE_ROOT / "workflows" / file).read_text())
    sampler = next(k for k, v in workflow["nodes"].items() if v["type"] == sampler_type)
    return workflow, sampler


def saved_images(executor: Executor, result) -> list[np.ndarray]:
    images = []
    for ui in result.outputs.values():
        for image in ui.get("images", []):
            path = executor.output_dir / image["subfolder"] / image["filename"]
            images.append(np.asarray(Image.open(path).convert("RGB"), dtype=np.float64))
    return images


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a - b) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def run_paradigm(name: str, args, out_dir: Path) -> dict:
    workflow, sampler = load(name)
    options = {}
    if name == "autoregressive":
        options = {"decoding": args.decoding, "jacobi_window": args.jacobi_window}
    elif args.step_cache:
        options = {"step_cache": args.step_cache}
    for folder in ("in", name, f"{name}-ref"):
        (out_dir / folder).mkdir(parents=True, exist_ok=True)
    executor = Executor(default_registry(), args.models_dir, out_dir / "in", out_dir / name, "cpu")
    executor.dtype = DTYPES[args.dtype]
    set_compile_mode(args.compile, executor.device)
    reference = Executor(default_registry(), args.models_dir, out_dir / "in", out_dir / f"{name}-ref", "cpu")

    def run(ex: Executor, seed: int, extra: dict):
        wf = json.loads(json.dumps(workflow))
        wf["nodes"][sampler]["inputs"].update(seed=seed, **extra)
        start, cpu = time.perf_counter(), time.process_time()
        result = ex.run(wf, f"{name}-{seed}")
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        if result.status != "success":
            raise SystemExit(f"{name}: {result.errors}")
        return seconds, cpu, result

    run(executor, 0, options)  # loads and caches the models (and compiles, with --compile)
    times, cpu_times, node_times, quality = [], [], {}, []
    for seed in range(1, args.repeats + 1):
        seconds, cpu, result = run(executor, seed, options)
        times.append(seconds)
        cpu_times.append(cpu)
        for node, t in result.timings.items():
            node_times.setdefault(workflow["nodes"][node]["type"], []).append(t)
        if args.compare:
            _, _, ref = run(reference, seed, {})
            quality += [
                psnr(a, b) for a, b in zip(saved_images(executor, result), saved_images(reference, ref))
            ]
    return {
        "paradigm": name,
        "seconds_per_image": statistics.median(times),
        "best": min(times),
        "cpu_seconds_per_image": statistics.median(cpu_times),  # process CPU time: robust to other load
        "nodes": {k: statistics.median(v) for k, v in node_times.items()},
        "psnr_vs_default_fp32": min(quality) if quality else None,
        "options": options,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models-dir", type=Path, default=default_models_dir())
    parser.add_argument("--paradigm", choices=(*WORKFLOWS, "both"), default="both")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (the goal is stated for 2)")
    parser.add_argument("--repeats", type=int, default=5, help="timed seed changes (the median counts)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    parser.add_argument("--compile", choices=("off", "default", "max"), default="off")
    parser.add_argument("--decoding", choices=("sequential", "jacobi"), default="sequential")
    parser.add_argument("--jacobi-window", type=int, default=16)
    parser.add_argument("--step-cache", type=float, default=0.0, help="DiTSampler step_cache threshold")
    parser.add_argument(
        "--compare", action="store_true", help="PSNR against the default fp32 run of each seed"
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run for CI: one timed seed change")
    args = parser.parse_args()
    if args.quick:
        args.repeats = 1
    torch.set_num_threads(args.threads)
    names = list(WORKFLOWS) if args.paradigm == "both" else [args.paradigm]
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        rows = [run_paradigm(name, args, Path(tmp)) for name in names]
    print(f"{'paradigm':16} {'s/image':>8} {'best':>7} {'CPU s':>7} {'PSNR':>7}  slowest nodes")
    for r in rows:
        slow = ", ".join(
            f"{k} {v * 1000:.0f} ms" for k, v in sorted(r["nodes"].items(), key=lambda kv: -kv[1])[:3]
        )
        q = "" if r["psnr_vs_default_fp32"] is None else f"{r['psnr_vs_default_fp32']:.1f}"
        cpu = r["cpu_seconds_per_image"]
        print(f"{r['paradigm']:16} {r['seconds_per_image']:8.3f} {r['best']:7.3f} {cpu:7.3f} {q:>7}  {slow}")
    summary = {
        "bench": "seed_change",
        "threads": args.threads,
        "dtype": args.dtype,
        "compile": compile_info()["mode"],
        "compile_seconds": compile_info()["seconds"],
        "results": rows,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
