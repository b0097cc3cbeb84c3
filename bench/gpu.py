"""Every GPU figure of issue 16 in one run (about 10 minutes on an H200); `--tiny` is its CPU smoke run.

Sections (each prints a table; all go into one JSON line at the end; a section that fails is
recorded with its error and the others still run):
  dit        Flux.1-dev-size DiT, random bf16 weights, 1024x1024, batch 1: ms per forward for
             diffusers' FluxTransformer2DModel (when installed), ours eager and ours compiled, on
             the same weights (and their agreement); torchao float8 (dynamic activation scaling)
             when torchao and an sm89+ GPU are there. Then a 28-step Euler run with the First-Block
             step cache at several thresholds: seconds, cached steps, PSNR of the final latent
             against the uncached bf16 run, and the end-to-end ratio to 28 diffusers eager steps.
  ar         LlamaGen-XL-size GPT (775M, bf16), 576 tokens, CFG: tokens/s of the eager loop and of
             the compiled decode step (CUDA graphs over the static KV cache), the batch table
             (1, 4, 16, 64 images), and achieved memory bandwidth against --peak-gbps.
  jacobi     Speculative Jacobi decoding against sequential decoding: forwards per token and wall
             speedup, on the built-in GPT (its caption, 8x8 tokens) and at LlamaGen-XL size (random
             weights are near-uniform, so acceptance there is a floor, not a forecast).
  precision  bf16 and fp16 against fp32 (relative L2 error) for the DiT, the VAE, the GPT and the
             VQ; xformers against SDPA (when xformers is installed and CUDA is there).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

from tessera.compile import (
    compile_dit,
    compile_info,
    compiled_decode_step,
    compiled_sampler,
    set_compile_mode,
)
from tessera.engines.ar_decoding import condition_prefix, generate
from tessera.engines.attention import attention, set_attention_backend
from tessera.engines.flux import Flux, FluxConfig, convert_diffusers_dit, image_ids, patchify
from tessera.engines.gpt import GPT, GPTConfig, load_gpt
from tessera.engines.latent import Latent, denoise
from tessera.engines.schedules import sigmas_for
from tessera.engines.step_cache import StepCache, psnr
from tessera.engines.vae import AutoencoderKL, VAEConfig
from tessera.engines.vq import VQConfig, VQModel

sys.path.insert(0, str(Path(__file__).parent))
from autoregressive import kv_bytes, weight_bytes_per_step  # noqa: E402  (bench/ is not a package)

ROOT = Path(__file__).resolve().parents[1]


# ---- sizes -----------------------------------------------------------------------------------------
def sizes(tiny: bool) -> dict:
    if tiny:
        return {
            "dit": FluxConfig(
                hidden_size=64,
                num_heads=4,
                depth=1,
                depth_single=2,
                context_dim=32,
                vec_dim=16,
                axes_dim=(2, 6, 8),
            ),
            "latent": 8,  # 64 px through an f8 VAE
            "text": 8,
            "gpt": GPTConfig(
                dim=64, n_layer=2, n_head=4, n_kv_head=4, ffn_hidden=128, vocab_size=256, num_classes=10
            ),
            "grid": 4,
            "batches": (1, 4),
            "steps": 6,
            "thresholds": (0.05, 0.2),
        }
    return {
        "dit": FluxConfig(),  # Flux.1-dev
        "latent": 128,  # 1024 px
        "text": 512,
        "gpt": GPTConfig(dim=1280, n_layer=36, n_head=20, n_kv_head=20, ffn_hidden=3584, vocab_size=16384),
        "grid": 24,  # 576 tokens
        "batches": (1, 4, 16, 64),
        "steps": 28,
        "thresholds": (0.05, 0.12, 0.2),
    }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median seconds of `fn()` after warm-up calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def randomize(module: torch.nn.Module, std: float = 0.02, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, std)
    return module


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# ---- 1. DiT ----------------------------------------------------------------------------------------
def diffusers_config(c: FluxConfig) -> dict:
    return dict(
        patch_size=1,
        in_channels=c.in_channels * c.patch_size**2,
        num_layers=c.depth,
        num_single_layers=c.depth_single,
        attention_head_dim=c.head_dim,
        num_attention_heads=c.num_heads,
        joint_attention_dim=c.context_dim,
        pooled_projection_dim=c.vec_dim,
        guidance_embeds=c.guidance_embed,
        axes_dims_rope=c.axes_dim,
    )


def section_dit(s: dict, device: torch.device, dtype: torch.dtype, args) -> dict:
    c: FluxConfig = s["dit"]
    out: dict = {}
    try:
        from diffusers import FluxTransformer2DModel
    except Exception as e:  # not installed on the GPU machine unless its wheel is carried
        FluxTransformer2DModel, out["diffusers"] = None, f"not available ({type(e).__name__})"
    g = torch.Generator().manual_seed(0)
    side, n_txt = s["latent"], s["text"]
    x = torch.randn(1, c.in_channels, side, side, generator=g).to(device, dtype)
    ctx = torch.randn(1, n_txt, c.context_dim, generator=g).to(device, dtype)
    pooled = torch.randn(1, c.vec_dim, generator=g).to(device, dtype)
    t, guidance = torch.tensor([0.7], device=device), torch.tensor([3.5], device=device)
    gh = side // c.patch_size
    img_ids, txt_ids = image_ids(gh, gh, device), torch.zeros(n_txt, 3, device=device)

    if FluxTransformer2DModel is not None:
        with torch.device(device):
            theirs = FluxTransformer2DModel(**diffusers_config(c)).to(dtype).eval().requires_grad_(False)
        randomize(theirs)
        sd = convert_diffusers_dit(theirs.state_dict())
    with torch.device("meta"):
        ours = Flux(c)
    if FluxTransformer2DModel is not None:
        ours.load_state_dict(sd, assign=True)
        del sd
    else:
        ours = randomize(ours.to_empty(device=device).to(dtype))
    ours = ours.to(device, dtype).eval().requires_grad_(False)

    def ours_step(model: Flux = ours):
        return model(x, t, ctx, pooled, guidance)

    with torch.inference_mode():
        eager_out = ours_step()
        out["ours_eager_ms"] = 1000 * timed(ours_step, device, args.repeats)
        fp8 = fp8_copy(ours, device)  # copied before ours is compiled
        if FluxTransformer2DModel is not None:
            tokens = patchify(x, c.patch_size)

            def theirs_step():
                return theirs(
                    hidden_states=tokens,
                    encoder_hidden_states=ctx,
                    pooled_projections=pooled,
                    timestep=t.to(dtype),
                    img_ids=img_ids,
                    txt_ids=txt_ids,
                    guidance=guidance.to(dtype) if c.guidance_embed else None,
                    return_dict=False,
                )[0]

            out["diffusers_eager_ms"] = 1000 * timed(theirs_step, device, args.repeats)
            from tessera.engines.flux import unpatchify

            out["ours_vs_diffusers_rel_err"] = rel_err(
                eager_out, unpatchify(theirs_step(), gh, gh, c.patch_size)
            )
            del theirs
        if args.compile != "off":
            set_compile_mode(args.compile, device)
            compile_dit(ours)
            start = time.perf_counter()
            compiled_out = ours_step()
            sync(device)
            out["compile_s"] = time.perf_counter() - start
            out["ours_compiled_ms"] = 1000 * timed(ours_step, device, args.repeats)
            out["compiled_vs_eager_rel_err"] = rel_err(compiled_out, eager_out)
        if "diffusers_eager_ms" in out:
            best = out.get("ours_compiled_ms", out["ours_eager_ms"])
            out["step_ratio_vs_diffusers"] = best / out["diffusers_eager_ms"]
        if isinstance(fp8, Flux):
            if args.compile != "off":
                compile_dit(fp8)
            ours_step(fp8)
            out["fp8_ms"] = 1000 * timed(lambda: ours_step(fp8), device, args.repeats)
            out["fp8_vs_bf16_rel_err"] = rel_err(ours_step(fp8), eager_out)
            del fp8
        else:
            out["fp8"] = fp8

        # the step cache over a whole run
        sigmas = sigmas_for("flux", s["steps"], image_seq_len=gh * gh)
        runs = {}
        for threshold in (0.0, *s["thresholds"]):
            cache = StepCache(threshold)

            def velocity(xt, sigma, cache=cache):
                return ours(xt.to(dtype), sigma.to(device), ctx, pooled, guidance, step_cache=cache).float()

            def run(cache=cache, velocity=velocity):
                cache.first = cache.rest = None
                return denoise(
                    velocity,
                    Latent(torch.zeros(1, c.in_channels, side, side)),
                    sampler="euler",
                    sigmas=sigmas,
                    seed=1,
                    device=device,
                ).samples

            final = run()
            seconds = timed(run, device, 1, warmup=0)
            runs[threshold] = (final, seconds, cache.hits // 2)  # hits counted over the two runs
        ref = runs[0.0][0]
        out["step_cache"] = [
            {
                "threshold": th,
                "seconds": sec,
                "cached_steps": hits,
                "psnr_db": psnr(final, ref, peak=float(ref.max() - ref.min())),
                "vs_diffusers_eager_run": sec / (s["steps"] * out["diffusers_eager_ms"] / 1000)
                if "diffusers_eager_ms" in out
                else None,
            }
            for th, (final, sec, hits) in runs.items()
        ]
    print_table("DiT", {k: v for k, v in out.items() if k != "step_cache"})
    for row in out["step_cache"]:
        print(f"  step cache {row}")
    return out


def fp8_copy(model: Flux, device: torch.device) -> Flux | str:
    """A copy of the DiT whose linears compute in float8 through torchao (dynamic activation
    scaling), or why there is none."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        return "needs an sm89+ GPU (H100/H200/L40)"
    try:
        from torchao.quantization import quantize_
    except Exception as e:
        return f"torchao not available ({type(e).__name__})"
    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig as config
    except ImportError:
        from torchao.quantization import float8_dynamic_activation_float8_weight as config
    import copy

    quantized = copy.deepcopy(model)
    quantize_(quantized, config())
    return quantized


# ---- 2. AR -----------------------------------------------------------------------------------------
def build_gpt(cfg: GPTConfig, device: torch.device, dtype: torch.dtype) -> GPT:
    with torch.device(device):
        model = GPT(cfg)
    return randomize(model).to(dtype).eval()


def tokens_per_s(model: GPT, batch: int, grid: int, device: torch.device, repeats: int, **kw) -> float:
    prefix = condition_prefix(model, batch, class_ids=torch.arange(batch) % 10, cfg=True)
    seconds = timed(
        lambda: generate(model, prefix, grid, grid, cfg_scale=4.0, temperature=1.0, seed=0, **kw),
        device,
        repeats,
    )
    return batch * grid * grid / seconds


def section_ar(s: dict, device: torch.device, dtype: torch.dtype, args) -> dict:
    model = build_gpt(s["gpt"], device, dtype)
    grid = s["grid"]
    out: dict = {"tokens": grid * grid}
    out["eager_tok_s"] = tokens_per_s(model, 1, grid, device, 1)  # ~9 s a run at XL size: one timed run
    if args.compile != "off":
        set_compile_mode(args.compile, device)
        step = compiled_decode_step(device)
        kw = {"decode_fn": step, "sample_fn": compiled_sampler(device), "keep_caches": True}
        before = compile_info()["seconds"]
        out["compiled_tok_s"] = tokens_per_s(model, 1, grid, device, 2, **kw)
        out["compile_s"] = compile_info()["seconds"] - before
        out["compiled_vs_eager"] = out["compiled_tok_s"] / out["eager_tok_s"]
    else:
        kw = {}
    per_step = weight_bytes_per_step(model)
    table = []
    for b in s["batches"]:
        tps = tokens_per_s(model, b, grid, device, 1, **kw)
        steps_per_s = tps / b
        gbps = steps_per_s * (per_step + kv_bytes(model, 2 * b, grid, dtype)) / 1e9
        table.append({"batch": b, "tokens_per_s": tps, "gbps": gbps, "of_peak": gbps / args.peak_gbps})
        model.clear_caches()
    out["batch_table"] = table
    print_table("AR", {k: v for k, v in out.items() if k != "batch_table"})
    for row in table:
        print(f"  batch {row['batch']:3d}: {row['tokens_per_s']:10.1f} tok/s  {row['gbps']:8.1f} GB/s")
    return out


# ---- 3. Jacobi -------------------------------------------------------------------------------------
def jacobi_vs_sequential(model: GPT, prefix, grid: int, device, seeds: int, window: int, **kw) -> dict:
    rows = {"sequential": [], "jacobi": []}
    for decoding in rows:
        for seed in range(seeds):
            stats: dict = {}
            sync(device)
            start = time.perf_counter()
            generate(
                model,
                prefix,
                grid,
                grid,
                seed=seed,
                decoding=decoding,
                jacobi_window=window,
                stats=stats,
                **kw,
            )
            sync(device)
            rows[decoding].append(
                (time.perf_counter() - start, stats["forwards_per_image"] / stats["tokens"])
            )
    greedy = [
        generate(model, prefix, grid, grid, decoding=d, jacobi_window=window, **dict(kw, temperature=0.0))
        for d in rows
    ]
    seq_s = statistics.median(t for t, _ in rows["sequential"])
    jac_s = statistics.median(t for t, _ in rows["jacobi"])
    return {
        "forwards_per_token_sequential": statistics.mean(f for _, f in rows["sequential"]),
        "forwards_per_token_jacobi": statistics.mean(f for _, f in rows["jacobi"]),
        "fewer_forwards": statistics.mean(f for _, f in rows["sequential"])
        / statistics.mean(f for _, f in rows["jacobi"]),
        "wall_speedup": seq_s / jac_s,
        "greedy_identical": bool(torch.equal(greedy[0], greedy[1])),
    }


def section_jacobi(s: dict, device: torch.device, dtype: torch.dtype, args) -> dict:
    out: dict = {}
    builtin = ROOT / "models" / "ar_models" / "tessera-ar-tiny.safetensors"
    encoder_file = ROOT / "models" / "text_encoders" / "tessera-text-encoder.safetensors"
    if builtin.is_file() and encoder_file.is_file():
        from tessera.engines.text_encoder import load_text_encoder

        model = load_gpt(builtin, device, torch.float32)
        encoder = load_text_encoder(encoder_file)
        cond = encoder.encode(["a red star at the top left on a blue background"])
        prefix = condition_prefix(model, 1, positive=cond.to(device, torch.float32), cfg=True)
        out["builtin"] = jacobi_vs_sequential(
            model, prefix, 8, device, args.seeds, args.window, cfg_scale=2.0, temperature=1.0, top_k=0
        )
    model = build_gpt(s["gpt"], device, dtype)
    prefix = condition_prefix(model, 1, class_ids=torch.tensor([3]), cfg=True)
    out["llamagen_xl_size_random"] = jacobi_vs_sequential(
        model, prefix, s["grid"], device, 2, args.window, cfg_scale=4.0, temperature=1.0, top_k=0
    )
    print_table("Jacobi", out)
    return out


# ---- 4. precision ----------------------------------------------------------------------------------
def section_precision(s: dict, device: torch.device, args) -> dict:
    g = torch.Generator().manual_seed(3)
    dit_cfg = FluxConfig(
        hidden_size=256,
        num_heads=4,
        depth=2,
        depth_single=2,
        context_dim=64,
        vec_dim=32,
        axes_dim=(8, 28, 28),
    )
    dit = randomize(Flux(dit_cfg), 0.05).eval()
    x, ctx, pooled = (
        torch.randn(1, 16, 32, 32, generator=g),
        torch.randn(1, 16, 64, generator=g),
        torch.randn(1, 32, generator=g),
    )
    vae = randomize(AutoencoderKL(VAEConfig(block_out_channels=(32, 64), layers_per_block=1)), 0.05).eval()
    z = torch.randn(1, 16, 16, 16, generator=g)
    gpt = randomize(
        GPT(
            GPTConfig(
                dim=256, n_layer=4, n_head=4, n_kv_head=4, ffn_hidden=512, vocab_size=1024, num_classes=10
            )
        ),
        0.05,
    ).eval()
    vq = randomize(
        VQModel(
            VQConfig(
                channels=32,
                ch_mult=[1, 2],
                decoder_ch_mult=[1, 2],
                num_res_blocks=1,
                z_channels=16,
                codebook_size=256,
            )
        ),
        0.05,
    ).eval()
    img = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1

    def gpt_logits(m):
        p = condition_prefix(m, 1, class_ids=torch.tensor([2]), cfg=False)
        m.setup_caches(1, 8, 8, allocate_kv=False)
        ids = torch.arange(64, device=device)[None] % 1024
        xx = torch.cat([p.x, m.embed_tokens(ids)], 1)
        return m(xx, torch.arange(xx.shape[1], device=device), use_cache=False)

    cases = {
        "dit": (
            dit,
            lambda m, dt: m(
                x.to(device, dt),
                torch.tensor([0.5], device=device),
                ctx.to(device, dt),
                pooled.to(device, dt),
                torch.tensor([3.5], device=device),
            ),
        ),
        "vae_decode": (vae, lambda m, dt: m.decode(z.to(device, dt))),
        "gpt_logits": (gpt, lambda m, dt: gpt_logits(m)),
        "vq_reconstruct": (vq, lambda m, dt: m.decode(m.encode(img.to(device, dt)))),
    }
    out: dict = {}
    with torch.inference_mode():
        for name, (model, fn) in cases.items():
            ref = fn(model.to(device, torch.float32), torch.float32).float()
            row = {}
            for label, dt in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
                try:
                    row[label] = rel_err(fn(model.to(device, dt), dt).float(), ref)
                except Exception as e:  # e.g. a CPU without fp16 kernels for an op
                    row[label] = f"{type(e).__name__}: {e}"[:120]
            model.to(torch.float32)
            out[name] = row
        out["xformers_vs_sdpa"] = xformers_agreement(device)
    print_table("precision (relative L2 error against fp32)", out)
    return out


def xformers_agreement(device: torch.device) -> dict | str:
    if device.type != "cuda":
        return "needs CUDA"
    q, k, v = (torch.randn(2, 24, 4096, 128, device=device, dtype=torch.bfloat16) for _ in range(3))
    try:
        if set_attention_backend("xformers") != "xformers":
            return "xformers not installed"
        xf = attention(q, k, v)
    except Exception as e:
        return f"{type(e).__name__}: {e}"[:120]
    finally:
        set_attention_backend("sdpa")
    sd = attention(q, k, v)
    return {"rel_err_bf16": rel_err(xf, sd), "max_abs": float((xf.float() - sd.float()).abs().max())}


# ---- main --------------------------------------------------------------------------------------------
def print_table(title: str, rows: dict) -> None:
    print(f"== {title}")
    for k, v in rows.items():
        print(f"  {k:34} {v:.4g}" if isinstance(v, float) else f"  {k:34} {v}")


SECTIONS = ("dit", "ar", "jacobi", "precision")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--tiny", action="store_true", help="tiny sizes on the CPU: a smoke run of every section"
    )
    parser.add_argument("--device", default=None, help="default: cuda when present, else cpu")
    parser.add_argument("--only", nargs="*", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument(
        "--compile",
        choices=("off", "default", "max"),
        default=None,
        help="default: default on CUDA, off with --tiny",
    )
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--seeds", type=int, default=None, help="images per decoding in the Jacobi section")
    parser.add_argument("--window", type=int, default=16, help="Jacobi window")
    parser.add_argument(
        "--peak-gbps", type=float, default=4800.0, help="memory bandwidth of the GPU (H200: 4.8 TB/s)"
    )
    args = parser.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.compile is None:
        args.compile = "off" if args.tiny or device.type != "cuda" else "default"
    args.repeats = args.repeats or (1 if args.tiny else 5)
    args.seeds = args.seeds or (2 if args.tiny else 8)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    s = sizes(args.tiny)
    results: dict = {"bench": "gpu", "device": str(device), "tiny": args.tiny, "compile": args.compile}
    if device.type == "cuda":
        results["gpu"] = torch.cuda.get_device_name(device)
    runners = {
        "dit": lambda: section_dit(s, device, dtype, args),
        "ar": lambda: section_ar(s, device, dtype, args),
        "jacobi": lambda: section_jacobi(s, device, dtype, args),
        "precision": lambda: section_precision(s, device, args),
    }
    for name in args.only:
        start = time.perf_counter()
        try:
            results[name] = runners[name]()
        except Exception as e:
            traceback.print_exc()
            results[name] = {"error": f"{type(e).__name__}: {e}"[:300]}
        results[name + "_seconds"] = time.perf_counter() - start
        set_compile_mode("off", device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    results["compile_info"] = {k: v for k, v in compile_info().items() if k != "artefacts"}
    print(json.dumps(results, default=str))


if __name__ == "__main__":
    main()
