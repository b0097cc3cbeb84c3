"""--compile: the compiled DiT and AR decode step agree with eager on the CPU (inductor), once per shape."""

from __future__ import annotations

import pytest
import torch

from tessera.cli import build_parser
from tessera.compile import (
    compile_dit,
    compile_info,
    compile_mode,
    compiled_decode_step,
    compiled_sampler,
    set_compile_mode,
)
from tessera.engines.ar_decoding import condition_prefix, generate
from tessera.engines.flux import Flux, FluxConfig
from tessera.engines.gpt import GPT, GPTConfig

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")


@pytest.fixture
def mode():
    yield lambda m: set_compile_mode(m, CPU)
    set_compile_mode("off", CPU)


def tiny_dit() -> Flux:
    torch.manual_seed(0)
    cfg = FluxConfig(
        in_channels=4,
        out_channels=4,
        hidden_size=32,
        num_heads=2,
        depth=2,
        depth_single=2,
        context_dim=8,
        vec_dim=6,
        axes_dim=(2, 6, 8),
        guidance_embed=False,
    )
    model = Flux(cfg).eval().requires_grad_(False)
    for p in model.parameters():
        p.data.normal_(0, 0.1)
    return model


def tiny_gpt() -> GPT:
    torch.manual_seed(0)
    model = GPT(
        GPTConfig(dim=32, n_layer=2, n_head=2, n_kv_head=2, ffn_hidden=64, vocab_size=24, num_classes=4)
    )
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model.eval()


def test_modes_default_to_off_on_the_cpu_and_unknown_modes_are_refused(mode):
    assert mode(None) == "off" and compile_mode() == "off"
    model = tiny_dit()
    assert compile_dit(model) is model and not hasattr(model, "_tessera_compiled")
    assert compiled_decode_step(CPU) is None
    with pytest.raises(ValueError, match="unknown compile mode 'fast'"):
        mode("fast")
    args = build_parser().parse_args(["run", "wf.json", "--compile", "max"])
    assert args.compile == "max"
    assert build_parser().parse_args(["serve"]).compile is None


def test_compiled_dit_matches_eager_and_compiles_once_per_shape(mode):
    model = tiny_dit()
    g = torch.Generator().manual_seed(1)
    x, ctx, pooled = (
        torch.randn(2, 4, 8, 8, generator=g),
        torch.randn(2, 5, 8, generator=g),
        torch.randn(2, 6, generator=g),
    )
    t = torch.tensor([0.3, 0.8])
    with torch.inference_mode():
        eager = model(x, t, ctx, pooled)
        mode("default")
        before = len(compile_info()["artefacts"])
        compile_dit(model)
        compiled = model(x, t, ctx, pooled)
        again = model(x * 0.5, t, ctx, pooled)  # same shapes: the same artefact
        info = compile_info()
        assert [r["what"] for r in info["artefacts"][before:]] == ["DiT forward"]
        assert info["mode"] == "default" and info["seconds"] > 0
        model(x[:1], t[:1], ctx[:1], pooled[:1])  # a new shape compiles (and is recorded) once
        assert len(compile_info()["artefacts"]) == before + 2
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again, model.forward(x * 0.5, t, ctx, pooled), atol=1e-5, rtol=1e-5)


def test_compiled_ar_decode_step_gives_the_eager_tokens(mode):
    model = tiny_gpt()
    prefix = condition_prefix(model, 2, class_ids=torch.tensor([1, 2]), cfg=True)
    kw = dict(cfg_scale=3.0, temperature=1.0, seed=9)
    eager = generate(model, prefix, 3, 3, **kw)
    mode("default")
    step, sampler = compiled_decode_step(CPU), compiled_sampler(CPU)
    assert step is compiled_decode_step(CPU)  # one compiled step per device and mode
    fast = dict(decode_fn=step, sample_fn=sampler, keep_caches=True)
    compiled = generate(model, prefix, 3, 3, **fast, **kw)
    assert torch.equal(compiled, eager)
    assert torch.equal(
        generate(model, prefix, 3, 3, **fast, **dict(kw, seed=10)),
        generate(model, prefix, 3, 3, **dict(kw, seed=10)),
    )
    assert {"AR decode step", "AR sampler"} <= {r["what"] for r in compile_info()["artefacts"]}
    model.clear_caches()
