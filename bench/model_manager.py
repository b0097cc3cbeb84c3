"""The model manager under VRAM budgets: Flux.1-dev-size random weights, bf16 and fp8.

For each weight format and each budget (all in VRAM, 24 GiB, 12 GiB by default) the DiT
goes through `ModelManager.use` (resident, or resident part plus streamed blocks) and runs
`--steps` denoising forwards at 1024x1024 (4,096 image + 512 text tokens). Reported: how
many blocks stream, seconds per step, peak allocated GPU memory, and whether the peak stayed
within the budget. Every budgeted run must match the all-in-VRAM output of its format.
`--tiny` runs the same comparisons on the CPU with a tiny DiT and a simulated budget (the
manager's own accounting stands in for the allocator's peak). Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from tessera.engines.flux import Flux, FluxConfig
from tessera.engines.fp8 import fp8_available, store_fp8, to_fp8, weight_bytes
from tessera.model_manager import GiB, ModelManager, ModelTooLarge, parse_bytes

TINY = FluxConfig(
    in_channels=4,
    out_channels=4,
    hidden_size=64,
    num_heads=4,
    depth=2,
    depth_single=4,
    context_dim=32,
    vec_dim=16,
    axes_dim=(4, 6, 6),
)


def random_dit(cfg: FluxConfig, fmt: str, device: torch.device, seed: int = 0) -> Flux:
    """A DiT with random weights in RAM, drawn on `device` tensor by tensor (fast on a GPU)."""
    with torch.device("meta"):
        model = Flux(cfg).eval().requires_grad_(False)
    g = torch.Generator(device).manual_seed(seed)
    compute = compute_dtype(device)
    fp8_linears = set()
    if fmt == "fp8":
        fp8_linears = {
            f"{n}.weight"
            for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and "img_in" not in n.split(".")
        }
    state = {}
    for name, t in model.state_dict().items():
        w = torch.randn(t.shape, generator=g, device=device, dtype=torch.float32).mul_(0.02)
        state[name] = (to_fp8(w) if name in fp8_linears else w.to(compute)).cpu()
    model.load_state_dict(state, assign=True)
    if fmt == "fp8":
        store_fp8(model, compute)
    return model


def compute_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def inputs(cfg: FluxConfig, side: int, device: torch.device, seed: int = 1) -> dict:
    g, dtype, latent = torch.Generator().manual_seed(seed), compute_dtype(device), side // 8
    return dict(
        x=torch.randn(1, cfg.in_channels, latent, latent, generator=g).to(device, dtype),
        t=torch.tensor([0.7], device=device),
        context=torch.randn(1, 512 if side >= 256 else 8, cfg.context_dim, generator=g).to(device, dtype),
        pooled=torch.randn(1, cfg.vec_dim, generator=g).to(device, dtype),
        guidance=torch.tensor([3.5], device=device) if cfg.guidance_embed else None,
    )


def run(
    model: Flux, label: str, budget: int | None, args, device: torch.device
) -> tuple[dict, torch.Tensor | None]:
    """One budget: place the model through a fresh manager, time `args.steps` forwards, put it back in RAM."""
    size = weight_bytes(model)
    tiny = device.type == "cpu"
    if tiny:  # no separate device memory: the manager accounts as if there were
        mm = ModelManager("cpu", budget=budget if budget is not None else size, reserve=0, simulate=True)
    else:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        mm = ModelManager(device, budget=budget if budget is not None else 1 << 50, pin=True)
    row = {
        "format": label,
        "budget": "all in VRAM" if budget is None else f"{budget / GiB:.3g} GiB",
        "budget_bytes": budget,
        "weights_bytes": size,
    }
    with torch.inference_mode():
        try:
            mm.use(model, "flux")
        except ModelTooLarge as e:
            return {
                **row,
                "placement": "refused",
                "streamed_blocks": 0,
                "s_per_step": None,
                "peak_bytes": 0,
                "within_budget": True,
                "refusal": str(e),
            }, None
        x = inputs(model.config, args.side, device)
        out = model(**x).float().cpu()  # warm-up, and the output compared across budgets
        start = time.perf_counter()
        for _ in range(args.steps):
            model(**x)
        if not tiny:
            torch.cuda.synchronize(device)
        per_step = (time.perf_counter() - start) / args.steps
    state = mm.state()["models"][0]
    peak = mm.device_bytes() if tiny else torch.cuda.max_memory_allocated(device)
    mm.offload(model)
    row.update(
        placement=state["where"],
        streamed_blocks=state.get("streamed_blocks", 0),
        s_per_step=per_step,
        peak_bytes=peak,
        within_budget=budget is None or peak <= budget,
    )
    return row, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny DiT, simulated budgets")
    parser.add_argument("--budgets", default="24GiB,12GiB", help="comma-separated VRAM budgets")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--side", type=int, default=1024, help="image side in pixels")
    args = parser.parse_args()
    if args.tiny:
        device, cfg = torch.device("cpu"), TINY
        torch.set_num_threads(1)
        args.steps, args.side = 1, 32
        size = weight_bytes(random_dit(cfg, "full", device))
        # The ratios of 24 and 12 GiB to Flux.1-dev's 22.2 GiB of bf16 weights, and a tighter one.
        budgets = [None, int(size * 24 / 22.2), int(size * 12 / 22.2), int(size * 0.2)]
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench model_manager: needs a CUDA GPU (or --tiny for the CPU smoke run)")
        device, cfg = torch.device("cuda"), FluxConfig()  # Flux.1-dev sizes
        budgets = [None] + [parse_bytes(b) for b in args.budgets.split(",")]
    formats = ["full", "fp8"] if fp8_available() else ["full"]
    rows = []
    for fmt in formats:
        model = random_dit(cfg, fmt, device)
        label = fmt if fmt == "fp8" else str(compute_dtype(device)).removeprefix("torch.")
        reference = None
        for budget in budgets:
            row, out = run(model, label, budget, args, device)
            reference = out if reference is None else reference
            row["max_abs_diff_vs_all_in_vram"] = None if out is None else float((out - reference).abs().max())
            rows.append(row)
        del model
    print(
        f"{'format':7} {'budget':>12} {'weights GiB':>11} {'placement':>10} {'streamed':>8} "
        f"{'s/step':>8} {'peak GiB':>9} {'<= budget':>9} {'max diff':>9}"
    )
    for r in rows:
        print(
            f"{r['format']:7} {r['budget']:>12} {r['weights_bytes'] / GiB:11.3f} {r['placement']:>10} "
            f"{r['streamed_blocks']:8d} {r['s_per_step'] or float('nan'):8.3f} {r['peak_bytes'] / GiB:9.3f} "
            f"{str(r['within_budget']):>9} {r['max_abs_diff_vs_all_in_vram'] or 0:9.2g}"
        )
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (simulated budget)"
    print(
        json.dumps(
            {
                "bench": "model_manager",
                "device": device_name,
                "side": args.side,
                "steps": args.steps,
                "rows": rows,
            }
        )
    )


if __name__ == "__main__":
    main()
