"""The Flux DiT: parity with diffusers from both key layouts, masking, CFG batching, loader errors."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import FluxTransformer2DModel
from safetensors.torch import save_file

from tessera.engines.checkpoint import CheckpointError
from tessera.engines.conditioning import Conditioning
from tessera.engines.flux import FluxConfig, guided_velocity, load_dit, save_dit

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# head_dim 16 with axes (2, 6, 8): what the loader infers when no metadata says otherwise.
SMALL = dict(
    patch_size=1,
    in_channels=16,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=24,
    pooled_projection_dim=12,
    axes_dims_rope=(2, 6, 8),
)


def reference(guidance: bool, seed: int = 0) -> FluxTransformer2DModel:
    torch.manual_seed(seed)
    model = FluxTransformer2DModel(guidance_embeds=guidance, **SMALL).eval()
    with torch.no_grad():
        for p in model.parameters():  # diffusers zero-inits some layers; make every weight matter
            p.normal_(0, 0.15)
    return model


def to_bfl_layout(sd: dict) -> dict:
    """An independent diffusers → BFL key mapping (the loader has its own)."""
    sd = dict(sd)
    out = {}
    simple = {
        "x_embedder": "img_in",
        "context_embedder": "txt_in",
        "proj_out": "final_layer.linear",
        "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
        "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
        "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
        "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
        "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
        "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    }
    double = {
        "norm1.linear": "img_mod.lin",
        "norm1_context.linear": "txt_mod.lin",
        "attn.to_out.0": "img_attn.proj",
        "attn.to_add_out": "txt_attn.proj",
        "ff.net.0.proj": "img_mlp.0",
        "ff.net.2": "img_mlp.2",
        "ff_context.net.0.proj": "txt_mlp.0",
        "ff_context.net.2": "txt_mlp.2",
        "attn.norm_q": "img_attn.norm.query_norm",
        "attn.norm_k": "img_attn.norm.key_norm",
        "attn.norm_added_q": "txt_attn.norm.query_norm",
        "attn.norm_added_k": "txt_attn.norm.key_norm",
    }
    single = {
        "proj_out": "linear2",
        "norm.linear": "modulation.lin",
        "attn.norm_q": "norm.query_norm",
        "attn.norm_k": "norm.key_norm",
    }
    fused_double = {
        "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
        "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    }
    fused_single = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}

    def rename(name: str, new: str) -> None:
        for suffix in ("weight", "bias"):
            if f"{name}.{suffix}" in sd:
                t = sd.pop(f"{name}.{suffix}")
                out[f"{new}.{'scale' if new.endswith('_norm') else suffix}"] = t

    for k, v in simple.items():
        rename(k, v)
    n_double = len({k.split(".")[1] for k in sd if k.startswith("transformer_blocks.")})
    n_single = len({k.split(".")[1] for k in sd if k.startswith("single_transformer_blocks.")})
    for i in range(n_double):
        for k, v in double.items():
            rename(f"transformer_blocks.{i}.{k}", f"double_blocks.{i}.{v}")
        for v, parts in fused_double.items():
            for suffix in ("weight", "bias"):
                out[f"double_blocks.{i}.{v}.{suffix}"] = torch.cat(
                    [sd.pop(f"transformer_blocks.{i}.{p}.{suffix}") for p in parts]
                )
    for i in range(n_single):
        for k, v in single.items():
            rename(f"single_transformer_blocks.{i}.{k}", f"single_blocks.{i}.{v}")
        for v, parts in fused_single.items():
            for suffix in ("weight", "bias"):
                out[f"single_blocks.{i}.{v}.{suffix}"] = torch.cat(
                    [sd.pop(f"single_transformer_blocks.{i}.{p}.{suffix}") for p in parts]
                )
    for suffix in ("weight", "bias"):
        scale, shift = sd.pop(f"norm_out.linear.{suffix}").chunk(2)
        out[f"final_layer.adaLN_modulation.1.{suffix}"] = torch.cat([shift, scale])
    assert not sd, sorted(sd)
    return out


def pack(x: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape
    return x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, c * 4)


def grid_ids(h: int, w: int) -> torch.Tensor:
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(-1, 3)


def inputs(batch: int = 2, h: int = 8, w: int = 6, text: int = 5, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, 4, h, w, generator=g),
        torch.rand(batch, generator=g),
        torch.randn(batch, text, 24, generator=g),
        torch.randn(batch, 12, generator=g),
    )


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("layout", ["diffusers", "bfl"])
@pytest.mark.parametrize("guidance", [True, False])
def test_dit_matches_diffusers_from_either_layout(tmp_path, layout, guidance):
    ref = reference(guidance)
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    path = tmp_path / f"dit_{layout}.safetensors"
    save_file(sd if layout == "diffusers" else to_bfl_layout(sd), str(path))

    model = load_dit(path)
    c = model.config
    assert (c.in_channels, c.patch_size, c.hidden_size, c.num_heads, c.depth, c.depth_single) == (
        4,
        2,
        32,
        2,
        2,
        2,
    )
    assert (c.context_dim, c.vec_dim, c.axes_dim, c.guidance_embed) == (24, 12, (2, 6, 8), guidance)

    x, t, ctx, y = inputs()
    g = torch.tensor([3.5, 1.5]) if guidance else None
    with torch.no_grad():
        expected = ref(pack(x), ctx, y, t, grid_ids(4, 3), torch.zeros(5, 3), g).sample
        ours = model(x, t, ctx, y, g)
    assert ours.shape == x.shape
    assert rel_err(pack(ours), expected) < 1e-4


def test_metadata_config_sets_what_shapes_cannot_tell(tmp_path):
    """RoPE axes are invisible in the weights: `tessera.config` metadata supplies them."""
    torch.manual_seed(0)
    ref = FluxTransformer2DModel(guidance_embeds=False, **{**SMALL, "axes_dims_rope": (4, 4, 8)}).eval()
    path = tmp_path / "dit.safetensors"
    save_file(
        dict(ref.state_dict()), str(path), metadata={"tessera.config": json.dumps({"axes_dim": [4, 4, 8]})}
    )
    model = load_dit(path)
    assert model.config.axes_dim == (4, 4, 8)
    x, t, ctx, y = inputs()
    with torch.no_grad():
        expected = ref(pack(x), ctx, y, t, grid_ids(4, 3), torch.zeros(5, 3)).sample
        assert rel_err(pack(model(x, t, ctx, y)), expected) < 1e-4

    save_dit(model, tmp_path / "again.safetensors")
    assert load_dit(tmp_path / "again.safetensors").config == model.config


def small_model(tmp_path, guidance: bool = False):
    path = tmp_path / "small.safetensors"
    save_file(dict(reference(guidance).state_dict()), str(path))
    return load_dit(path)


def test_padding_tokens_are_masked_out_and_odd_sizes_are_padded(tmp_path):
    model = small_model(tmp_path)
    x, t, ctx, y = inputs(h=7, w=5)
    padded = torch.cat([ctx, torch.randn(2, 3, 24)], dim=1)
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[:, 5:] = False
    with torch.no_grad():
        plain = model(x, t, ctx, y)
        masked = model(x, t, padded, y, context_mask=mask)
        unmasked = model(x, t, padded, y)
    assert plain.shape == x.shape
    assert rel_err(masked, plain) < 1e-5
    assert rel_err(unmasked, plain) > 1e-3


def test_cfg_runs_one_batched_forward_equal_to_separate_predictions(tmp_path):
    model = small_model(tmp_path)
    calls = []
    model.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    x, t, ctx, y = inputs()
    pos = Conditioning(ctx[:1], y[:1], torch.ones(1, 5, dtype=torch.bool))
    neg = Conditioning(
        torch.randn(1, 3, 24), torch.randn(1, 12), torch.ones(1, 3, dtype=torch.bool)
    )  # shorter
    with torch.no_grad():
        guided = guided_velocity(model, pos, neg, cfg=4.0)(x, t)
        assert calls == [4]  # one forward over [x; x]
        v_pos = model(x, t, pos.tokens.expand(2, -1, -1), pos.pooled.expand(2, -1))
        v_neg = model(x, t, neg.tokens.expand(2, -1, -1), neg.pooled.expand(2, -1))
    assert rel_err(guided, v_neg + 4.0 * (v_pos - v_neg)) < 1e-5
    assert guided.dtype == torch.float32


def test_guidance_embedding_changes_the_prediction(tmp_path):
    model = small_model(tmp_path, guidance=True)
    x, t, ctx, y = inputs()
    cond = Conditioning(ctx, y, torch.ones(2, 5, dtype=torch.bool))
    with torch.no_grad():
        a = guided_velocity(model, cond, guidance=1.0)(x, t)
        b = guided_velocity(model, cond, guidance=4.0)(x, t)
        with pytest.raises(ValueError, match="guidance"):
            model(x, t, ctx, y)
    assert rel_err(a, b) > 1e-3


def test_conditioning_width_mismatch_names_who_and_both_widths(tmp_path):
    model = small_model(tmp_path)
    wrong = Conditioning(torch.randn(1, 4, 32), torch.randn(1, 12), torch.ones(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"DiTSampler positive: .* 32 wide .* expects 24"):
        guided_velocity(model, wrong, who="DiTSampler")


def test_bf16_weights_run_with_fp32_sensitive_parts(tmp_path):
    path = tmp_path / "small.safetensors"
    save_file(dict(reference(True).state_dict()), str(path))
    fp32, bf16 = load_dit(path), load_dit(path, dtype=torch.bfloat16)
    assert bf16.img_in.weight.dtype == torch.bfloat16
    x, t, ctx, y = inputs()
    g = torch.full((2,), 3.5)
    with torch.no_grad():
        out = bf16(x, t, ctx, y, g)
        assert out.dtype == torch.float32 and torch.isfinite(out).all()
        assert rel_err(out, fp32(x, t, ctx, y, g)) < 0.05


def test_loader_errors_name_the_file_and_the_key(tmp_path):
    sd = {k: v.contiguous() for k, v in reference(False).state_dict().items()}

    wrong = tmp_path / "a_vae.safetensors"
    save_file({"encoder.conv_in.weight": torch.zeros(8, 3, 3, 3)}, str(wrong))
    with pytest.raises(CheckpointError, match=r"a_vae\.safetensors: not a Flux DiT"):
        load_dit(wrong)

    full = tmp_path / "full.safetensors"
    save_file(sd, str(full))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(full.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match=r"truncated\.safetensors, key '.+': file is truncated"):
        load_dit(truncated)

    bad = dict(sd)
    bad["transformer_blocks.1.attn.to_k.weight"] = torch.zeros(32, 31)
    save_file(bad, str(tmp_path / "mismatch.safetensors"))
    with pytest.raises(
        CheckpointError, match=r"mismatch\.safetensors, key 'transformer_blocks\.1\.attn\.to_k\.weight'"
    ):
        load_dit(tmp_path / "mismatch.safetensors")
    bfl = to_bfl_layout(sd)
    bfl["single_blocks.0.linear2.weight"] = torch.zeros(32, 100)
    save_file(bfl, str(tmp_path / "mismatch_bfl.safetensors"))
    with pytest.raises(
        CheckpointError,
        match=r"mismatch_bfl\.safetensors, key 'single_blocks\.0\.linear2\.weight': "
        r"shape \(32, 100\) does not match the expected \(32, 160\)",
    ):
        load_dit(tmp_path / "mismatch_bfl.safetensors")

    missing = {k: v for k, v in sd.items() if k != "single_transformer_blocks.1.proj_mlp.bias"}
    save_file(missing, str(tmp_path / "missing.safetensors"))
    with pytest.raises(
        CheckpointError,
        match=r"missing\.safetensors, key 'single_transformer_blocks\.1\.proj_mlp\.bias': missing",
    ):
        load_dit(tmp_path / "missing.safetensors")

    extra = {**to_bfl_layout(sd), "double_blocks.0.lora_up.weight": torch.zeros(2)}
    save_file(extra, str(tmp_path / "extra.safetensors"))
    with pytest.raises(
        CheckpointError, match=r"extra\.safetensors, key 'double_blocks\.0\.lora_up\.weight': unexpected"
    ):
        load_dit(tmp_path / "extra.safetensors")


def test_config_rejects_rope_axes_that_do_not_fill_a_head():
    with pytest.raises(ValueError, match="axes_dim"):
        FluxConfig(hidden_size=64, num_heads=4, axes_dim=(4, 4, 4))
