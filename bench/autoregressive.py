"""AR decoding speed: static-KV-cache decoding against a naive full-recompute loop.

Default: a small random class-conditioned GPT that runs on a CPU in seconds; reports
image tokens/s for batch 1 (no CFG) and for CFG (cond + uncond: 2 rows), each with the
KV cache and with full recompute, and the speed-up. `--llamagen-xl` sizes the model as
LlamaGen GPT-XL (36 layers, 1280 wide, 20 heads, 576 tokens, random bf16 weights) for a
GPU and reports achieved memory bandwidth: bytes read per decode step (weights + the
static KV cache) x steps/s, against `--peak-gbps`. `--compile` wraps decode_one_token in
torch.compile(mode="reduce-overhead"). Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch

from tessera.engines.ar_decoding import condition_prefix, decode_one_token, generate
from tessera.engines.gpt import GPT, GPTConfig, find_multiple


def build(cfg: GPTConfig, device: torch.device, dtype: torch.dtype) -> GPT:
    torch.manual_seed(0)
    with torch.device(device):
        model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model.to(dtype).eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def weight_bytes_per_step(model: GPT) -> int:
    """Weights one decode step reads: all but the embedding tables (one row each)."""
    skip = {"tok_embeddings.weight", "cls_embedding.embedding_table.weight"}
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if n not in skip)


def kv_bytes(model: GPT, rows: int, grid: int, dtype: torch.dtype) -> int:
    """The static cache; each step's attention reads all of it (the causal mask hides the future)."""
    c = model.config
    max_seq = find_multiple(model.prefix_len + grid * grid, 8)
    return 2 * c.n_layer * rows * c.n_kv_head * max_seq * c.head_dim * torch.finfo(dtype).bits // 8


def run_case(
    model: GPT,
    grid: int,
    cfg_scale: float,
    use_cache: bool,
    device: torch.device,
    decode_fn,
    repeats: int,
    full_warmup: bool,
) -> dict:
    prefix = condition_prefix(model, 1, class_ids=torch.tensor([1]), cfg=cfg_scale != 1.0)
    kwargs = {
        "cfg_scale": cfg_scale,
        "temperature": 1.0,
        "top_k": 0,
        "use_cache": use_cache,
        "decode_fn": decode_fn,
        "keep_caches": use_cache,
    }

    def once(seed: int, side: int = grid) -> float:
        sync(device)
        start = time.perf_counter()
        generate(model, prefix, side, side, seed=seed, **kwargs)
        sync(device)
        return time.perf_counter() - start

    # warm-up; a compiled step must see the timed shapes (compilation, CUDA-graph capture)
    once(0, grid if full_warmup else 2)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    best = min(once(s + 1) for s in range(repeats))
    model.clear_caches()
    n = grid * grid
    peak = (
        torch.cuda.max_memory_allocated(device)
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    return {
        "rows": prefix.x.shape[0],
        "cache": use_cache,
        "seconds": best,
        "tokens_per_s": n / best,
        "steps_per_s": n / best,
        "peak_mem_mb": peak / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--llamagen-xl", action="store_true", help="LlamaGen GPT-XL size, bf16, 24x24 grid")
    parser.add_argument(
        "--compile", action="store_true", help='torch.compile(mode="reduce-overhead") the step'
    )
    parser.add_argument("--naive", action="store_true", help="also time full recompute in --llamagen-xl mode")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument(
        "--grid", type=int, default=None, help="grid side in tokens (8; 24 with --llamagen-xl)"
    )
    parser.add_argument("--cfg", type=float, default=4.0)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per case (the best counts)")
    parser.add_argument(
        "--peak-gbps", type=float, default=3350.0, help="card memory bandwidth (H100 SXM: 3350)"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="CPU threads (1 avoids spin-waits on a shared machine)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run for CI: a one-layer model, 4x4 grid"
    )
    args = parser.parse_args()
    if args.quick:
        args.dim, args.layers, args.heads, args.vocab, args.grid, args.repeats = 64, 1, 2, 64, 4, 1
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.llamagen_xl:
        cfg = GPTConfig(
            dim=1280,
            n_layer=36,
            n_head=20,
            n_kv_head=20,
            ffn_hidden=3584,
            vocab_size=16384,
            num_classes=1000,
            cls_token_num=1,
        )
        grid, dtype = args.grid or 24, torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        cfg = GPTConfig(
            dim=args.dim,
            n_layer=args.layers,
            n_head=args.heads,
            n_kv_head=args.heads,
            ffn_hidden=find_multiple(int(8 * args.dim / 3), 64),
            vocab_size=args.vocab,
            num_classes=10,
            cls_token_num=1,
        )
        grid, dtype = args.grid or 8, torch.float32
    model = build(cfg, device, dtype)
    decode_fn = decode_one_token
    if args.compile:
        decode_fn = torch.compile(decode_one_token, mode="reduce-overhead", fullgraph=True)

    cases = [("batch 1", 1.0), ("CFG batch 2", args.cfg)]
    naive = not args.llamagen_xl or args.naive
    results = []
    for name, scale in cases:
        for use_cache in (True, False) if naive else (True,):
            r = run_case(
                model,
                grid,
                scale,
                use_cache,
                device,
                decode_fn if use_cache else decode_one_token,
                args.repeats,
                full_warmup=args.compile and use_cache,
            )
            step_bytes = weight_bytes_per_step(model) + kv_bytes(model, r["rows"], grid, dtype)
            r.update(
                case=name,
                bytes_per_step=step_bytes if use_cache else None,
                gbps=step_bytes * r["steps_per_s"] / 1e9 if use_cache else None,
            )
            results.append(r)

    print(
        f"device={device} dtype={str(dtype).replace('torch.', '')} dim={cfg.dim} layers={cfg.n_layer} "
        f"heads={cfg.n_head} vocab={cfg.vocab_size} grid={grid}x{grid} compile={args.compile}"
    )
    print(
        f"{'case':<12} {'rows':>4} {'decoding':<10} {'tokens/s':>10} {'seconds':>9} {'GB/s':>8} "
        f"{'% peak':>7} {'peak MB':>9}"
    )
    for r in results:
        gbps = f"{r['gbps']:.1f}" if r["gbps"] is not None else "-"
        pct = f"{100 * r['gbps'] / args.peak_gbps:.1f}" if r["gbps"] is not None else "-"
        print(
            f"{r['case']:<12} {r['rows']:>4} {'KV cache' if r['cache'] else 'recompute':<10} "
            f"{r['tokens_per_s']:>10.1f} {r['seconds']:>9.3f} {gbps:>8} {pct:>7} {r['peak_mem_mb']:>9.1f}"
        )
    speedups = {}
    for name, _ in cases:
        pair = {r["cache"]: r for r in results if r["case"] == name}
        if False in pair:
            speedups[name] = pair[True]["tokens_per_s"] / pair[False]["tokens_per_s"]
            print(f"{name}: KV cache is {speedups[name]:.1f}x faster than full recompute")
    if device.type != "cuda":
        print("(CPU: peak MB is the process's peak RSS; GB/s is nominal, not DRAM-limited decoding)")
    record = {
        "bench": "autoregressive",
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "model": "llamagen-xl" if args.llamagen_xl else "small",
        "dim": cfg.dim,
        "layers": cfg.n_layer,
        "grid": grid,
        "compile": args.compile,
        "peak_gbps": args.peak_gbps,
        "results": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in results],
        "kv_speedup": {k: round(v, 2) for k, v in speedups.items()},
    }
    print(json.dumps(record, separators=(",", ":")))


if __name__ == "__main__":
    main()
