"""LoRA: every file format patches the weights an update made by hand would, on the DiT (both key
layouts, fused qkv slices) and the GPT; in-forward application equals merging; the base is never
changed; unmatched keys are reported and a file matching nothing is an error naming it."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tessera.engines.checkpoint import CheckpointError, read_safetensors
from tessera.engines.flux import Flux, FluxConfig, convert_diffusers_dit, load_dit
from tessera.engines.fp8 import store_fp8
from tessera.engines.gpt import GPT, GPTConfig, load_gpt
from tessera.engines.lora import LoraLinear, load_lora, with_loras

SMALL_DIT = FluxConfig(
    in_channels=4,
    out_channels=4,
    hidden_size=32,
    num_heads=2,
    depth=2,
    depth_single=2,
    context_dim=24,
    vec_dim=12,
    axes_dim=(2, 6, 8),
    guidance_embed=True,
)
DIFFUSERS_SMALL = {
    "patch_size": 1,
    "in_channels": 16,
    "num_layers": 2,
    "num_single_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 24,
    "pooled_projection_dim": 12,
    "axes_dims_rope": (2, 6, 8),
    "guidance_embeds": True,
}
RANK = 4


def randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def diffusers_sd() -> dict[str, torch.Tensor]:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return {
        k: v.clone() for k, v in randomized(FluxTransformer2DModel(**DIFFUSERS_SMALL)).state_dict().items()
    }


@pytest.fixture(scope="module")
def dit(diffusers_sd) -> Flux:
    model = Flux(SMALL_DIT)
    model.load_state_dict(convert_diffusers_dit(diffusers_sd))
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def gpt() -> GPT:
    cfg = GPTConfig(dim=32, n_layer=2, n_head=4, n_kv_head=2, ffn_hidden=64, vocab_size=40, num_classes=5)
    return randomized(GPT(cfg), 1)


def pair(out: int, inp: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(RANK, inp, generator=g), torch.randn(out, RANK, generator=g)


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def effective_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights a model computes with; a LoraLinear's weight is read off its forward on the identity."""
    out = snapshot(model)
    for name, m in model.named_modules():
        if isinstance(m, LoraLinear):
            with torch.no_grad():
                y = m(torch.eye(m.in_features, dtype=m.weight.dtype))
            out[f"{name}.weight"] = (y - (0 if m.bias is None else m.bias)).T.contiguous()
    return out


def merged_copy(model: torch.nn.Module, loras) -> torch.nn.Module:
    """A plain copy of `model` holding the weights `with_loras` computes with."""
    merged = copy.deepcopy(model)
    merged.load_state_dict(effective_weights(with_loras(model, loras)))
    return merged


def patched_weights(model, path, strength):
    lora = load_lora(path, model)
    return effective_weights(with_loras(model, [(lora, strength)])), lora


def test_kohya_bfl_names_patch_fused_qkv_like_the_update_by_hand(dit, tmp_path):
    d, alpha, s = SMALL_DIT.hidden_size, 2.0, 0.7
    down, up = pair(3 * d, d, 1)
    down2, up2 = pair(d, SMALL_DIT.mlp_hidden + d, 2)
    save_file(
        {
            "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": down,
            "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": up,
            "lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(alpha),
            "lora_unet_single_blocks_1_linear2.lora_down.weight": down2,
            "lora_unet_single_blocks_1_linear2.lora_up.weight": up2,  # no alpha: scale 1
        },
        str(tmp_path / "kohya.safetensors"),
    )
    base = snapshot(dit)
    got, lora = patched_weights(dit, tmp_path / "kohya.safetensors", s)
    expect = dict(base)
    expect["double_blocks.0.img_attn.qkv.weight"] = (
        base["double_blocks.0.img_attn.qkv.weight"] + s * alpha / RANK * up @ down
    )
    expect["single_blocks.1.linear2.weight"] = base["single_blocks.1.linear2.weight"] + s * up2 @ down2
    for k in base:
        torch.testing.assert_close(got[k], expect[k], rtol=1e-6, atol=1e-6, msg=k)
    assert lora.matched == 5 and not lora.unmatched


def test_diffusers_peft_names_land_on_the_rows_the_dit_loader_puts_them(dit, diffusers_sd, tmp_path):
    """Patch the diffusers-layout weights by hand, convert with the DiT loader: same as our patch."""
    d, mlp, s = SMALL_DIT.hidden_size, SMALL_DIT.mlp_hidden, 1.3
    targets = {  # diffusers module -> (out, in)
        "transformer_blocks.0.attn.to_k": (d, d),
        "transformer_blocks.1.attn.add_v_proj": (d, d),
        "transformer_blocks.1.ff_context.net.0.proj": (mlp, d),
        "single_transformer_blocks.0.proj_mlp": (mlp, d),
        "single_transformer_blocks.1.attn.to_q": (d, d),
        "single_transformer_blocks.1.attn.to_v": (d, d),
        "norm_out.linear": (2 * d, d),  # BFL swaps its halves (shift, scale)
    }
    file, by_hand = {}, dict(diffusers_sd)
    for i, (module, (out, inp)) in enumerate(targets.items()):
        down, up = pair(out, inp, 10 + i)
        file[f"transformer.{module}.lora_A.weight"] = down
        file[f"transformer.{module}.lora_B.weight"] = up
        by_hand[module + ".weight"] = diffusers_sd[module + ".weight"] + s * up @ down
    file["transformer.single_transformer_blocks.1.attn.to_v.alpha"] = torch.tensor(
        8.0
    )  # diffusers may store alpha
    by_hand["single_transformer_blocks.1.attn.to_v.weight"] = diffusers_sd[
        "single_transformer_blocks.1.attn.to_v.weight"
    ] + (
        s
        * 2.0
        * file["transformer.single_transformer_blocks.1.attn.to_v.lora_B.weight"]
        @ file["transformer.single_transformer_blocks.1.attn.to_v.lora_A.weight"]
    )
    save_file(file, str(tmp_path / "peft.safetensors"))
    got, lora = patched_weights(dit, tmp_path / "peft.safetensors", s)
    expect = convert_diffusers_dit(by_hand)
    for k in expect:
        torch.testing.assert_close(got[k], expect[k], rtol=1e-5, atol=1e-5, msg=k)
    assert lora.matched == len(file) and not lora.unmatched


def test_kohya_diffusers_names_and_unprefixed_peft_names(dit, diffusers_sd, tmp_path):
    d, s = SMALL_DIT.hidden_size, 1.0
    down, up = pair(d, d, 30)
    down2, up2 = pair(d, d, 31)
    save_file(
        {
            "lora_transformer_single_transformer_blocks_0_attn_to_k.lora_down.weight": down,
            "lora_transformer_single_transformer_blocks_0_attn_to_k.lora_up.weight": up,
            "lora_transformer_single_transformer_blocks_0_attn_to_k.alpha": torch.tensor(float(RANK)),
            "transformer_blocks.0.attn.to_out.0.lora_A.weight": down2,
            "transformer_blocks.0.attn.to_out.0.lora_B.weight": up2,
        },
        str(tmp_path / "mixed.safetensors"),
    )
    by_hand = dict(diffusers_sd)
    by_hand["single_transformer_blocks.0.attn.to_k.weight"] = (
        diffusers_sd["single_transformer_blocks.0.attn.to_k.weight"] + up @ down
    )
    by_hand["transformer_blocks.0.attn.to_out.0.weight"] = (
        diffusers_sd["transformer_blocks.0.attn.to_out.0.weight"] + up2 @ down2
    )
    got, _ = patched_weights(dit, tmp_path / "mixed.safetensors", s)
    expect = convert_diffusers_dit(by_hand)
    for k in expect:
        torch.testing.assert_close(got[k], expect[k], rtol=1e-5, atol=1e-5, msg=k)


def test_dense_diff_and_diff_b_in_both_layouts(dit, diffusers_sd, tmp_path):
    d, s = SMALL_DIT.hidden_size, -0.5
    g = torch.Generator().manual_seed(5)
    qkv, qkv_b = torch.randn(3 * d, d, generator=g), torch.randn(3 * d, generator=g)
    to_v_b = torch.randn(d, generator=g)
    norm = torch.randn(d // SMALL_DIT.num_heads, generator=g)
    save_file(
        {
            "diffusion_model.double_blocks.1.img_attn.qkv.diff": qkv,
            "diffusion_model.double_blocks.1.img_attn.qkv.diff_b": qkv_b,
            "transformer_blocks.0.attn.to_v.diff_b": to_v_b,
            "single_blocks.0.norm.key_norm.scale.diff": norm,
        },
        str(tmp_path / "diff.safetensors"),
    )
    base = snapshot(dit)
    got, lora = patched_weights(dit, tmp_path / "diff.safetensors", s)
    by_hand = dict(diffusers_sd)
    by_hand["transformer_blocks.0.attn.to_v.bias"] = (
        diffusers_sd["transformer_blocks.0.attn.to_v.bias"] + s * to_v_b
    )
    expect = convert_diffusers_dit(by_hand)
    expect["double_blocks.1.img_attn.qkv.weight"] = base["double_blocks.1.img_attn.qkv.weight"] + s * qkv
    expect["double_blocks.1.img_attn.qkv.bias"] = base["double_blocks.1.img_attn.qkv.bias"] + s * qkv_b
    expect["single_blocks.0.norm.key_norm.scale"] = base["single_blocks.0.norm.key_norm.scale"] + s * norm
    for k in expect:
        torch.testing.assert_close(got[k], expect[k], rtol=1e-6, atol=1e-6, msg=k)
    assert lora.matched == 4


def test_gpt_llamagen_peft_and_kohya_names(gpt, tmp_path):
    c, s = gpt.config, 0.8
    qkv_rows = (c.n_head + 2 * c.n_kv_head) * c.head_dim
    a, b = pair(qkv_rows, c.dim, 40)
    a2, b2 = pair(c.dim, c.ffn_hidden, 41)
    a3, b3 = pair(c.ffn_hidden, c.dim, 42)
    w1 = torch.randn(c.dim, c.dim, generator=torch.Generator().manual_seed(43))
    save_file(
        {
            "base_model.model.layers.0.attention.wqkv.lora_A.weight": a,
            "base_model.model.layers.0.attention.wqkv.lora_B.weight": b,
            "lora_unet_layers_1_feed_forward_w2.lora_down.weight": a2,
            "lora_unet_layers_1_feed_forward_w2.lora_up.weight": b2,
            "lora_unet_layers_1_feed_forward_w2.alpha": torch.tensor(1.0),
            "layers.1.feed_forward.w3.lora_A.default.weight": a3,
            "layers.1.feed_forward.w3.lora_B.default.weight": b3,
            "layers.0.attention.wo.diff": w1,
        },
        str(tmp_path / "gpt.safetensors"),
    )
    base = snapshot(gpt)
    got, lora = patched_weights(gpt, tmp_path / "gpt.safetensors", s)
    expect = dict(base)
    expect["layers.0.attention.wqkv.weight"] = base["layers.0.attention.wqkv.weight"] + s * b @ a
    expect["layers.1.feed_forward.w2.weight"] = base["layers.1.feed_forward.w2.weight"] + s / RANK * b2 @ a2
    expect["layers.1.feed_forward.w3.weight"] = base["layers.1.feed_forward.w3.weight"] + s * b3 @ a3
    expect["layers.0.attention.wo.weight"] = base["layers.0.attention.wo.weight"] + s * w1
    for k in base:
        torch.testing.assert_close(got[k], expect[k], rtol=1e-6, atol=1e-6, msg=k)
    assert lora.matched == 8


def _dit_inputs(batch: int = 2):
    g = torch.Generator().manual_seed(7)
    return (
        torch.randn(batch, 4, 6, 6, generator=g),
        torch.rand(batch, generator=g),
        torch.randn(batch, 5, 24, generator=g),
        torch.randn(batch, 12, generator=g),
        torch.full((batch,), 3.5),
    )


def _lora_files(tmp_path, d: int, mlp: int) -> tuple:
    a, b = pair(d, d, 50)
    a2, b2 = pair(3 * d + mlp, d, 51)
    a3, b3 = pair(2 * d, d, 52)
    save_file(
        {
            "transformer.transformer_blocks.1.attn.to_q.lora_A.weight": a,
            "transformer.transformer_blocks.1.attn.to_q.lora_B.weight": b,
            "transformer.norm_out.linear.lora_A.weight": a3,
            "transformer.norm_out.linear.lora_B.weight": b3,
        },
        str(tmp_path / "one.safetensors"),
    )
    save_file(
        {
            "lora_unet_single_blocks_0_linear1.lora_down.weight": a2,
            "lora_unet_single_blocks_0_linear1.lora_up.weight": b2,
            "lora_unet_single_blocks_0_linear1.alpha": torch.tensor(2.0),
            "double_blocks.0.txt_mlp.0.diff_b": torch.randn(mlp),
        },
        str(tmp_path / "two.safetensors"),
    )
    return tmp_path / "one.safetensors", tmp_path / "two.safetensors"


def test_stacked_loras_in_the_forward_equal_merged_weights_and_leave_the_base_alone(dit, tmp_path):
    one, two = _lora_files(tmp_path, SMALL_DIT.hidden_size, SMALL_DIT.mlp_hidden)
    stack = [(load_lora(one, dit), 0.6), (load_lora(two, dit), -1.2)]
    base = snapshot(dit)
    base_params = {k: v for k, v in dit.state_dict(keep_vars=True).items()}
    x = _dit_inputs()
    with torch.no_grad():
        plain = dit(*x[:4], x[4])
        lora_model = with_loras(dit, stack[:1])
        lora_model = with_loras(lora_model, stack[1:])  # chained nodes stack
        applied = lora_model(*x[:4], x[4])
        merged = merged_copy(dit, stack)(*x[:4], x[4])
        again = dit(*x[:4], x[4])
    assert type(lora_model) is Flux and lora_model is not dit
    assert isinstance(lora_model.single_blocks[0].linear1, LoraLinear)
    assert not isinstance(dit.single_blocks[0].linear1, LoraLinear)
    torch.testing.assert_close(applied, merged, rtol=1e-4, atol=1e-5)
    assert (applied - plain).abs().max() > 1e-3
    assert torch.equal(again, plain)
    for k, v in dit.state_dict(keep_vars=True).items():
        assert v is base_params[k] and torch.equal(v, base[k]), k
    # the copy shares every tensor it did not change
    shared = {k for k, v in lora_model.state_dict(keep_vars=True).items() if v is base_params[k]}
    assert shared == set(base) - {"double_blocks.0.txt_mlp.0.bias"}
    changed = effective_weights(lora_model)
    assert {k for k in base if not torch.equal(changed[k], base[k])} == {
        "double_blocks.1.img_attn.qkv.weight",
        "final_layer.adaLN_modulation.1.weight",
        "single_blocks.0.linear1.weight",
        "double_blocks.0.txt_mlp.0.bias",
    }


@pytest.mark.parametrize("compute", [torch.float32, torch.bfloat16])
def test_loras_on_an_fp8_stored_dit_upcast_its_weights_and_keep_adapters_in_the_compute_dtype(
    dit, tmp_path, compute
):
    one, two = _lora_files(tmp_path, SMALL_DIT.hidden_size, SMALL_DIT.mlp_hidden)
    stack = [(load_lora(one, dit), 0.6), (load_lora(two, dit), -1.2)]
    stored = store_fp8(copy.deepcopy(dit), compute)
    rounded = copy.deepcopy(dit).to(compute)  # the same weights as the fp8 ones read, never in fp8
    for name, m in rounded.named_modules():
        if isinstance(m, torch.nn.Linear):
            m.weight.data = stored.get_submodule(name).weight.data.to(compute)
    x = _dit_inputs()
    with torch.no_grad():
        lora_model = with_loras(stored, stack)
        out = lora_model(*x[:4], x[4])
        expected = with_loras(rounded, stack)(*x[:4], x[4])
    layer = lora_model.single_blocks[0].linear1
    assert isinstance(layer, LoraLinear) and layer.weight.dtype == torch.float8_e4m3fn  # still stored in fp8
    assert layer.weight is stored.single_blocks[0].linear1.weight
    assert {a.down.dtype for a in layer.adapters} == {a.up.dtype for a in layer.adapters} == {compute}
    tol = 1e-5 if compute == torch.float32 else 2e-2
    torch.testing.assert_close(out, expected, rtol=tol, atol=tol)


def test_lora_gpt_generates_with_its_own_caches(gpt, tmp_path):
    from tessera.engines.ar_decoding import condition_prefix, generate

    c = gpt.config
    a, b = pair(c.dim, c.dim, 60)
    save_file(
        {"layers.1.attention.wo.lora_A.weight": a, "layers.1.attention.wo.lora_B.weight": b},
        str(tmp_path / "g.safetensors"),
    )
    lora = load_lora(tmp_path / "g.safetensors", gpt)
    model = with_loras(gpt, [(lora, 2.0)])

    def run(m):
        prefix = condition_prefix(m, 1, class_ids=torch.tensor([1]), cfg=True)
        return generate(m, prefix, 3, 3, cfg_scale=2.0, temperature=0.0)

    merged = run(merged_copy(gpt, [(lora, 2.0)]))
    assert torch.equal(run(model), merged)
    assert gpt.layers[0].attention.kv_cache is None and gpt.freqs is None


def test_unmatched_keys_are_reported_and_a_file_matching_nothing_names_itself(dit, gpt, tmp_path):
    d = SMALL_DIT.hidden_size
    a, b = pair(d, d, 70)
    file = {
        "lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": a,
        "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": b,
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": a,
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": b,
        "lora_unet_double_blocks_7_img_attn_proj.lora_down.weight": a,  # no block 7
        "lora_unet_double_blocks_1_img_attn_proj.lora_up.weight": b,  # down missing
        "lora_unet_double_blocks_1_img_mlp_0.lora_down.weight": a,  # wrong shape
        "lora_unet_double_blocks_1_img_mlp_0.lora_up.weight": b,
        "something_else": a,
    }
    save_file({k: v.clone() for k, v in file.items()}, str(tmp_path / "partial.safetensors"))
    lora = load_lora(tmp_path / "partial.safetensors", dit)
    assert lora.matched == 2
    assert set(lora.unmatched) == {
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight",
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight",
        "lora_unet_double_blocks_7_img_attn_proj.lora_down.weight",
        "lora_unet_double_blocks_1_img_attn_proj.lora_up.weight",
        "lora_unet_double_blocks_1_img_mlp_0.lora_down.weight",
        "lora_unet_double_blocks_1_img_mlp_0.lora_up.weight",
        "something_else",
    }
    assert "does not fit" in lora.unmatched["lora_unet_double_blocks_1_img_mlp_0.lora_up.weight"]
    assert "2 keys matched" in lora.summary() and "7 keys not applied" in lora.summary()
    with pytest.raises(CheckpointError, match="partial.safetensors: no LoRA tensor matches"):
        load_lora(tmp_path / "partial.safetensors", gpt)


def test_giant_scenes_are_drawn_big_and_detected_only_when_big_and_the_asked_colour():
    from tessera.lab import synthetic
    from tessera.lab.adapter_training import (
        GIANT_EXTENT,
        GIANT_SIZES,
        concept_batch,
        concept_rate,
        concept_sample,
        shows_concept,
    )

    s = concept_sample(0, 3)
    assert s.caption.startswith("a giant ") and s.attributes["size"] == "giant"
    assert s.attributes["color"] in s.caption and s.attributes["shape"] in s.caption
    bg = np.array(synthetic.COLORS[s.attributes["background"]])
    ys, xs = np.nonzero(np.abs(s.image.astype(int) - bg).sum(-1) > 60)
    assert GIANT_SIZES[0] - 1 <= max(np.ptp(ys), np.ptp(xs)) + 1 <= GIANT_SIZES[1]

    batch = concept_batch(16, 0, 0, fraction=1.0)
    images = (batch.images.permute(0, 2, 3, 1) + 1) / 2
    colors = [a["color"] for a in batch.attributes]
    assert concept_rate(images, colors) == 1.0
    wrong = [
        next(c for c in synthetic.COLORS if c not in (a["color"], a["background"])) for a in batch.attributes
    ]
    assert concept_rate(images, wrong) == 0.0  # giant, but not in the colour asked for
    # every ordinary object (17-22 px) and pair of objects is too small to count
    for kind in ("shape", "relation"):
        scenes = [synthetic.make_sample(5, i, kinds=(kind,)) for i in range(64)]
        assert not any(shows_concept(x.image / 255.0, x.attributes["color"]) for x in scenes)
    assert GIANT_EXTENT < GIANT_SIZES[0]


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """A models folder of tiny random stand-ins for the built-in models."""
    from safetensors.torch import save_file as save

    from tessera.engines.flux import save_dit
    from tessera.engines.gpt import gpt_config_metadata
    from tessera.engines.text_encoder import save_text_encoder, tiny_text_encoder
    from tessera.engines.vae import AutoencoderKL, VAEConfig, save_vae
    from tessera.engines.vq import VQConfig, VQModel, vq_config_metadata

    md = tmp_path_factory.mktemp("adapters") / "models"
    for folder in ("text_encoders", "diffusion_models", "vae", "ar_models", "vq_models"):
        (md / folder).mkdir(parents=True)
    torch.manual_seed(0)
    save_text_encoder(tiny_text_encoder(), md / "text_encoders" / "te.safetensors")
    dit = Flux(
        FluxConfig(
            in_channels=4,
            out_channels=4,
            patch_size=1,
            hidden_size=32,
            num_heads=2,
            depth=1,
            depth_single=1,
            context_dim=32,
            vec_dim=16,
            axes_dim=(2, 6, 8),
            guidance_embed=False,
        )
    )
    save_dit(dit, md / "diffusion_models" / "dit.safetensors")
    vae = AutoencoderKL(
        VAEConfig(latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_groups=4)
    )
    save_vae(vae, md / "vae" / "vae.safetensors")
    gcfg = GPTConfig(
        dim=32,
        n_layer=1,
        n_head=2,
        n_kv_head=2,
        ffn_hidden=64,
        vocab_size=16,
        num_classes=0,
        caption_dim=32,
        cls_token_num=80,
        grid_size=8,
    )
    save(
        {k: v.contiguous() for k, v in GPT(gcfg).state_dict().items()},
        str(md / "ar_models" / "gpt.safetensors"),
        metadata=gpt_config_metadata(gcfg),
    )
    vcfg = VQConfig(
        channels=16,
        ch_mult=[1, 1, 1, 1],
        decoder_ch_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        attn_deepest=False,
        z_channels=8,
        codebook_size=16,
        codebook_dim=4,
        norm_groups=4,
    )
    save(
        VQModel(vcfg).state_dict(),
        str(md / "vq_models" / "vq.safetensors"),
        metadata=vq_config_metadata(vcfg),
    )
    return md


def test_train_commands_write_adapters_the_loaders_read(tiny_models):
    """`tessera train lora|controlnet` end to end on tiny stand-ins of the built-in models (2 steps)."""
    from tessera.engines.controlnet import ARControlNet, FluxControlNet, load_any_controlnet
    from tessera.lab.adapter_training import main_controlnet, main_lora

    md = tiny_models
    common = ["--models-dir", str(md), "--steps", "2", "--batch", "2", "--threads", "1"]

    for engine, model_file in (
        ("dit", "diffusion_models/dit.safetensors"),
        ("gpt", "ar_models/gpt.safetensors"),
    ):
        out = main_lora(["--engine", engine, "--rank", "2", *common])
        base = load_dit(md / model_file) if engine == "dit" else load_gpt(md / model_file)
        lora = load_lora(out, base)
        assert not lora.unmatched and lora.updates
        assert "'giant'" in read_safetensors(out)[1]["tessera.card"]
        net = load_any_controlnet(
            main_controlnet(["--engine", engine, "--depth", "1", "--width", "8", *common])
        )
        assert isinstance(net, FluxControlNet if engine == "dit" else ARControlNet)


@pytest.mark.parametrize("style", ["kohya", "peft"])
def test_continuing_a_saved_lora_starts_from_its_exact_factors(gpt, tmp_path, style):
    """`tessera train lora --init-from`: the trainable factors equal the file's (scale folded in)."""
    from tessera.lab.adapter_training import GPT_TARGETS, continue_lora, save_lora, trainable_lora

    def targets(n):
        return bool(GPT_TARGETS.match(n))

    trained = trainable_lora(gpt, 4, 2.0, targets, seed=1)
    with torch.no_grad():
        for u in trained.updates:
            u.up.normal_()
    path = tmp_path / f"{style}.safetensors"
    save_lora(trained, path, style)
    fresh = trainable_lora(gpt, 4, 2.0, targets, seed=2)
    continue_lora(fresh, path, gpt)
    for a, b in zip(trained.updates, fresh.updates):
        assert a.target == b.target
        torch.testing.assert_close(b.down, a.down)
        torch.testing.assert_close(b.up * b.scale, a.up * a.scale)
    with pytest.raises(ValueError, match="rank 4"):
        continue_lora(trainable_lora(gpt, 8, 2.0, targets), path, gpt)


def test_continuing_a_dit_controlnet_starts_from_the_file(tmp_path):
    """`tessera train controlnet --init-from`: with a zero learning rate the file comes back unchanged."""
    from safetensors.torch import load_file

    from tessera.lab.cli import main as train
    from tessera.paths import default_models_dir

    shipped = default_models_dir() / "controlnet" / "dit_canny_controlnet.safetensors"
    out = tmp_path / "continued.safetensors"
    train(
        [
            "controlnet",
            "--engine",
            "dit",
            "--init-from",
            str(shipped),
            "--steps",
            "1",
            "--lr",
            "0",
            "--batch",
            "2",
            "--threads",
            "1",
            "--out",
            str(out),
        ]
    )
    before, after = load_file(shipped), load_file(out)
    assert sorted(before) == sorted(after)
    assert all(torch.equal(before[k], after[k]) for k in before)
    # the shipped net reads the edge map itself: continuing it as a latent-hint net is refused by name
    with pytest.raises(
        ValueError, match="dit_canny_controlnet.safetensors is not a DiT ControlNet reading its VAE"
    ):
        train(
            [
                "controlnet",
                "--hint",
                "latent",
                "--init-from",
                str(shipped),
                "--out",
                str(tmp_path / "y.safetensors"),
            ]
        )
    assert not (tmp_path / "y.safetensors").exists()
    with pytest.raises(SystemExit, match="--engine dit"):
        train(
            [
                "controlnet",
                "--engine",
                "gpt",
                "--init-from",
                str(shipped),
                "--out",
                str(tmp_path / "x.safetensors"),
            ]
        )


class Interrupted(Exception):
    pass


@pytest.mark.parametrize("kind", ["lora", "controlnet"])
@pytest.mark.parametrize("engine", ["dit", "gpt"])
def test_a_resumed_adapter_run_equals_an_uninterrupted_one_bit_for_bit(tiny_models, kind, engine, tmp_path,
                                                                       monkeypatch):  # fmt: skip
    """Stopped right after its state at step 2 of 3 is written, then resumed, an adapter run writes the
    very tensors an uninterrupted 3-step run writes (CPU)."""
    from tessera.lab import training
    from tessera.lab.cli import main as train

    def train_to(name: str, *extra: str) -> None:
        own = ["--rank", "2"] if kind == "lora" else ["--depth", "1", "--width", "8"]
        assert train([kind, "--engine", engine, *own, "--models-dir", str(tiny_models), "--steps", "3",
                      "--batch", "2", "--ckpt-every", "1", "--out", str(tmp_path / f"{name}.safetensors"),
                      "--state", str(tmp_path / f"{name}.state.safetensors"), "--log", str(tmp_path / f"{name}.jsonl"),
                      "--log-every", "1", *extra]) == 0  # fmt: skip

    train_to("whole")
    save_state = training._save_state

    def stop_after_step_2(path, step, *args, **kwargs):
        save_state(path, step, *args, **kwargs)
        if step == 2:
            raise Interrupted

    monkeypatch.setattr(training, "_save_state", stop_after_step_2)
    with pytest.raises(Interrupted):
        train_to("parts")
    monkeypatch.setattr(training, "_save_state", save_state)
    train_to("parts", "--resume-from", str(tmp_path / "parts.state.safetensors"))
    whole, _ = read_safetensors(tmp_path / "whole.safetensors")
    parts, _ = read_safetensors(tmp_path / "parts.safetensors")
    assert whole.keys() == parts.keys()
    assert [k for k in whole if not torch.equal(whole[k], parts[k])] == []
    # the one training loop's log: every step once, the resumed run appending to the stopped one's
    logs = {
        n: [json.loads(line) for line in (tmp_path / f"{n}.jsonl").read_text().splitlines()]
        for n in ("whole", "parts")
    }
    assert [r.get("step", "start") for r in logs["whole"]] == ["start", 0, 1, 2]
    assert [r.get("step", "start") for r in logs["parts"]] == ["start", 0, 1, "start", 2]
    assert logs["whole"][-1]["loss"] == logs["parts"][-1]["loss"]
