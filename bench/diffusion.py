"""DiT step speed and memory: our Flux engine against diffusers' FluxTransformer2DModel, same weights.

Each engine runs in its own subprocess (so one's memory never hides the other's) on identical
random weights, generated tensor by tensor from a seed derived from the diffusers key name; ours
receives them through the loader's diffusers → BFL conversion. For each engine it reports ms per
denoising step (one model evaluation + the Euler update) at batch 1 and with classifier-free
guidance (batch 2 in one forward), the peak memory a step adds over the loaded model, and
achieved TFLOP/s. Outputs of the two engines are compared (relative error).

Default: a small Flux-shaped model at 256x256 that runs on a CPU in seconds. `--flux-dev` is the
real Flux.1-dev size (19 + 38 blocks, 3072 wide, random bf16 weights) at 1024x1024 with 512 text
tokens, for a GPU. Memory: CUDA → torch.cuda.max_memory_allocated over the step; CPU → peak
resident-set growth, sampled every 0.2 ms with large allocations returned to the OS on free.
Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

SMALL = dict(
    patch_size=1,
    in_channels=64,
    num_layers=2,
    num_single_layers=4,
    attention_head_dim=32,
    num_attention_heads=8,
    joint_attention_dim=256,
    pooled_projection_dim=128,
    guidance_embeds=True,
    axes_dims_rope=(4, 14, 14),
)
FLUX_DEV = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)


def step_flops(cfg: dict, n_img: int, n_txt: int) -> float:
    """Multiply-adds ×2 of one forward per image: per-token linears plus the attention matmuls."""
    d = cfg["attention_head_dim"] * cfg["num_attention_heads"]
    m = 4 * d
    double = cfg["num_layers"] * (4 * d * d + 2 * d * m)  # qkv + proj + mlp, per stream
    single = cfg["num_single_layers"] * (d * (3 * d + m) + (d + m) * d)
    linear = n_img * (double + 2 * d * cfg["in_channels"]) + n_txt * (double + cfg["joint_attention_dim"] * d)
    linear += (n_img + n_txt) * single
    length = n_img + n_txt
    attn = 2 * length * length * d * (cfg["num_layers"] + cfg["num_single_layers"])
    return 2.0 * (linear + attn)


# ---------------------------------------------------------------- worker (one engine per process)


class PeakRSS:
    """Samples this process's resident set size from /proc while a step runs."""

    def __init__(self, interval: float = 2e-4):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def __enter__(self):
        self.base = self.peak = self.rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())

    @property
    def grown(self) -> int:
        return self.peak - self.base


def random_weights(shapes: dict, device, dtype) -> dict:
    """Deterministic random tensors keyed by name: both engines get bit-identical weights."""
    import torch

    out = {}
    for name, shape in shapes.items():
        g = torch.Generator(device=device).manual_seed(zlib.crc32(name.encode()))
        t = torch.randn(shape, generator=g, device=device, dtype=torch.float32)
        if len(shape) == 1:
            t = 1.0 + 0.02 * t if "norm" in name else 0.02 * t
        else:
            t = t * (0.5 / shape[-1] ** 0.5)
        out[name] = t.to(dtype)
    return out


def worker(args) -> None:
    import torch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import save_file

    from tessera.engines.attention import attention_backend_name
    from tessera.engines.checkpoint import assign_checked
    from tessera.engines.conditioning import Conditioning
    from tessera.engines.flux import Flux, convert_diffusers_dit, guided_velocity, infer_dit_config

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    cfg = FLUX_DEV if args.flux_dev else SMALL
    with torch.device("meta"):
        reference = FluxTransformer2DModel(**cfg)
    shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    sd = random_weights(shapes, device, dtype)
    if args.worker == "ours":
        sd = convert_diffusers_dit(sd, consume=True)
        with torch.device("meta"):
            model = Flux(infer_dit_config(sd))
        assign_checked(model, sd, "<bench>", device, dtype)
    else:
        model = reference
        model.load_state_dict(sd, assign=True)
        model.eval().requires_grad_(False)
    del sd

    side = args.size // 8  # latent side (VAE /8), 16 latent channels, 2x2 patches
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, side, side, generator=g).to(device)
    pos = Conditioning(
        torch.randn(1, args.text, cfg["joint_attention_dim"], generator=g),
        torch.randn(1, cfg["pooled_projection_dim"], generator=g),
        torch.ones(1, args.text, dtype=torch.bool),
    )
    neg = Conditioning(
        torch.randn(1, args.text, cfg["joint_attention_dim"], generator=g),
        torch.randn(1, cfg["pooled_projection_dim"], generator=g),
        torch.ones(1, args.text, dtype=torch.bool),
    )
    sigma, sigma_next = torch.tensor([0.7], device=device), 0.6
    h = w = side // 2
    img_ids = torch.zeros(h, w, 3, device=device)
    img_ids[..., 1] = torch.arange(h, device=device)[:, None]
    img_ids[..., 2] = torch.arange(w, device=device)[None]
    img_ids, txt_ids = img_ids.reshape(-1, 3), torch.zeros(args.text, 3, device=device)

    def pack(z):
        return z.view(z.shape[0], 16, h, 2, w, 2).permute(0, 2, 4, 1, 3, 5).reshape(z.shape[0], h * w, 64)

    def unpack(t):
        return (
            t.view(t.shape[0], h, w, 16, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(t.shape[0], 16, side, side)
        )

    def make_step(cfg_scale: float):
        if args.worker == "ours":
            velocity = guided_velocity(model, pos, neg if cfg_scale != 1 else None, cfg_scale, guidance=3.5)
            return lambda: x + (sigma_next - 0.7) * velocity(x, sigma)
        conds = [pos] + ([neg] if cfg_scale != 1 else [])
        tokens = torch.cat([c.tokens for c in conds]).to(device, dtype)
        pooled = torch.cat([c.pooled for c in conds]).to(device, dtype)
        n = len(conds)

        def step():
            out = model(
                pack(x.to(dtype)).repeat(n, 1, 1),
                tokens,
                pooled,
                sigma.to(dtype).repeat(n),
                img_ids,
                txt_ids,
                torch.full((n,), 3.5, device=device, dtype=dtype),
                return_dict=False,
            )[0]
            v = unpack(out).float()
            if n == 2:
                v = v[1:] + cfg_scale * (v[:1] - v[1:])
            return x + (sigma_next - 0.7) * v

        return step

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    results = {
        "engine": args.worker,
        "attention": attention_backend_name() if args.worker == "ours" else "sdpa",
    }
    with torch.inference_mode():
        for case, scale in (("b1", 1.0), ("cfg", args.cfg)):
            step = make_step(scale)
            for _ in range(args.warmup):
                out = step()
            sync()
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                out = step()
                sync()
                times.append(time.perf_counter() - start)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
                out = step()
                sync()
                peak = torch.cuda.max_memory_allocated(device) - base
            else:
                peak = 0
                for _ in range(3):  # RSS sampling can miss a short-lived peak; keep the largest of three
                    del out
                    with PeakRSS() as rss:
                        out = step()
                    peak = max(peak, rss.grown)
            results[f"{case}_ms"] = 1000 * statistics.median(times)
            results[f"{case}_peak_mb"] = peak / 2**20
            if case == "b1":
                save_file({"out": out.float().cpu().contiguous()}, args.out)
    print(json.dumps(results))


# ---------------------------------------------------------------- driver


def run_worker(engine: str, args, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", engine, "--out", str(out)] + forwarded(args)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"{engine} worker failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def forwarded(args) -> list[str]:
    flags = [
        "--device",
        args.device,
        "--dtype",
        args.dtype,
        "--size",
        str(args.size),
        "--text",
        str(args.text),
        "--cfg",
        str(args.cfg),
        "--repeats",
        str(args.repeats),
        "--warmup",
        str(args.warmup),
        "--threads",
        str(args.threads),
    ]
    return flags + (["--flux-dev"] if args.flux_dev else [])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--flux-dev", action="store_true", help="real Flux.1-dev size, bf16, 1024x1024, 512 tokens"
    )
    parser.add_argument("--device", default=None)
    parser.add_argument(
        "--dtype", default=None, help="float32 / bfloat16 / float16 (default: fp32 CPU, bf16 CUDA)"
    )
    parser.add_argument("--size", type=int, default=None, help="image side in pixels")
    parser.add_argument("--text", type=int, default=None, help="text tokens")
    parser.add_argument("--cfg", type=float, default=3.5)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument(
        "--peak-tflops", type=float, default=989.0, help="card's dense bf16 TFLOP/s (H100 SXM: 989)"
    )
    parser.add_argument("--worker", choices=("ours", "diffusers"), help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run for CI: 32 px, 4 text tokens, one repeat"
    )
    args = parser.parse_args()
    if args.quick:
        args.size, args.text, args.repeats, args.warmup, args.threads = (
            args.size or 32,
            args.text or 4,
            1,
            0,
            1,
        )

    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = args.device.startswith("cuda")
    args.dtype = args.dtype or ("bfloat16" if on_gpu else "float32")
    args.size = args.size or (1024 if args.flux_dev else 256)
    args.text = args.text or (512 if args.flux_dev else 32)
    args.repeats = args.repeats or (10 if on_gpu else 5)
    if args.worker:
        worker(args)
        return

    from safetensors.torch import load_file

    cfg = FLUX_DEV if args.flux_dev else SMALL
    with tempfile.TemporaryDirectory() as tmp:
        runs = {e: run_worker(e, args, Path(tmp) / f"{e}.safetensors") for e in ("ours", "diffusers")}
        a, b = (load_file(str(Path(tmp) / f"{e}.safetensors"))["out"] for e in ("ours", "diffusers"))
    rel_err = ((a - b).norm() / b.norm()).item()

    n_img, n_txt = (args.size // 16) ** 2, args.text
    flops = {"b1": step_flops(cfg, n_img, n_txt), "cfg": 2 * step_flops(cfg, n_img, n_txt)}
    width = cfg["attention_head_dim"] * cfg["num_attention_heads"]
    print(
        f"device={args.device} dtype={args.dtype} model={'flux-dev' if args.flux_dev else 'small'} "
        f"width={width} blocks={cfg['num_layers']}+{cfg['num_single_layers']} image={args.size}px "
        f"tokens={n_img}+{n_txt} attention(ours)={runs['ours']['attention']} threads={args.threads or 'default'}"
    )
    print(f"{'engine':<10} {'case':<12} {'ms/step':>9} {'TFLOP/s':>8} {'peak MB':>9}")
    rows = []
    for engine in ("ours", "diffusers"):
        for case, label in (("b1", "batch 1"), ("cfg", "CFG batch 2")):
            ms = runs[engine][f"{case}_ms"]
            tflops = flops[case] / (ms / 1000) / 1e12
            rows.append(
                {
                    "engine": engine,
                    "case": case,
                    "ms": round(ms, 3),
                    "tflops": round(tflops, 3),
                    "peak_mb": round(runs[engine][f"{case}_peak_mb"], 1),
                }
            )
            print(
                f"{engine:<10} {label:<12} {ms:>9.2f} {tflops:>8.2f} {runs[engine][f'{case}_peak_mb']:>9.1f}"
            )
    speed = {c: runs["diffusers"][f"{c}_ms"] / runs["ours"][f"{c}_ms"] for c in ("b1", "cfg")}
    memory = {
        c: runs["diffusers"][f"{c}_peak_mb"] / max(runs["ours"][f"{c}_peak_mb"], 1e-6) for c in ("b1", "cfg")
    }
    print(
        f"diffusers/ours time: batch 1 {speed['b1']:.2f}x, CFG {speed['cfg']:.2f}x   "
        f"memory: batch 1 {memory['b1']:.2f}x, CFG {memory['cfg']:.2f}x   output rel. error {rel_err:.2e}"
    )
    if on_gpu:
        best = max(r["tflops"] for r in rows if r["engine"] == "ours")
        print(f"ours reaches {100 * best / args.peak_tflops:.1f}% of {args.peak_tflops:g} TFLOP/s")
    else:
        print("(CPU: peak MB is resident-set growth during one step, over the loaded model)")
    record = {
        "bench": "diffusion",
        "device": args.device,
        "dtype": args.dtype,
        "model": "flux-dev" if args.flux_dev else "small",
        "image": args.size,
        "tokens": [n_img, n_txt],
        "attention": runs["ours"]["attention"],
        "results": rows,
        "speedup_vs_diffusers": {k: round(v, 3) for k, v in speed.items()},
        "memory_ratio_vs_diffusers": {k: round(v, 3) for k, v in memory.items()},
        "output_rel_error": float(f"{rel_err:.3e}"),
    }
    print(json.dumps(record, separators=(",", ":")))


if __name__ == "__main__":
    main()
