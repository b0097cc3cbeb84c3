"""Parity of the next-scale (VAR) engine with the published algorithm, on tiny random models.

The references here are written from FoundationVision/VAR's description and work straight on
state dicts in the published key layout (`real_model_fixtures.var_state` / `var_vqvae_state`):
residual multi-scale quantisation with the shared φ convs, teacher-forcing inputs, and the
transformer as one uncached forward under an additive block-causal bias. The engine must agree
with them, with itself with and without its KV cache, and keep its seed and keep-scales promises.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from real_model_fixtures import (
    VAR_PATCH_NUMS,
    var_shapes,
    var_state,
    var_vqvae_shapes,
    var_vqvae_state,
    write_var_pth,
)

from tessera.convert import convert
from tessera.engines.checkpoint import CheckpointError
from tessera.engines.conditioning import Conditioning
from tessera.engines.generation import generate_next_scale, scales_to_image
from tessera.engines.layouts import detect_family
from tessera.engines.multiscale_vq import (
    MultiScaleTokens,
    MultiScaleVQ,
    MultiScaleVQConfig,
    infer_multiscale_vq_config,
    load_multiscale_vq,
    multiscale_vq_from_state_dict,
    save_multiscale_vq,
)
from tessera.engines.var import (
    VAR,
    VARConfig,
    condition_rows,
    infer_var_config,
    load_var,
    sample_scales,
    save_var,
    teacher_forced_logits,
    var_from_state_dict,
)

torch.set_num_threads(1)
PN = list(VAR_PATCH_NUMS)


@pytest.fixture(scope="module")
def published():
    """The tiny published-layout VQVAE and VAR state dicts, and the engine's models loaded from them."""
    vsd, tsd = var_vqvae_state(), var_state()
    return vsd, tsd, multiscale_vq_from_state_dict(vsd), var_from_state_dict(tsd)


def images(n: int, seed: int = 0, side: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, side, side, generator=g) * 2 - 1


# ---------------------------------------------------------------- references (published algorithm)


def ref_phi(sd: dict, si: int, n_scales: int, h: torch.Tensor) -> torch.Tensor:
    """φ_k(h) = 0.5·h + 0.5·conv3x3(h), k = argmin |ticks - si/(K-1)| over ticks = linspace(1/12, 11/12, 4)
    (numpy's, as VAR computes them: two scales sit exactly between ticks, so the rounding decides)."""
    ticks = np.linspace(1 / 3 / 4, 1 - 1 / 3 / 4, 4)
    k = int(np.argmin(np.abs(ticks - si / (n_scales - 1))))
    w, b = sd[f"quantize.quant_resi.qresi_ls.{k}.weight"], sd[f"quantize.quant_resi.qresi_ls.{k}.bias"]
    return 0.5 * h + 0.5 * F.conv2d(h, w, b, padding=1)


def ref_quantize(sd: dict, f: torch.Tensor, pns: list[int]):
    """VAR's f_to_idxBl_or_fhat: ids per scale and f_hat after each scale."""
    emb = sd["quantize.embedding.weight"]
    b, c, hh, ww = f.shape
    f_rest, f_hat = f.clone(), torch.zeros_like(f)
    ids_all, fhats = [], []
    for si, pn in enumerate(pns):
        z = f_rest if si == len(pns) - 1 else F.interpolate(f_rest, size=(pn, pn), mode="area")
        z = z.permute(0, 2, 3, 1).reshape(-1, c)
        d = (z**2).sum(1, keepdim=True) + (emb**2).sum(1) - 2 * z @ emb.T
        idx = d.argmin(1).view(b, pn, pn)
        h = emb[idx].permute(0, 3, 1, 2)
        if si != len(pns) - 1:
            h = F.interpolate(h, size=(hh, ww), mode="bicubic")
        h = ref_phi(sd, si, len(pns), h)
        f_hat, f_rest = f_hat + h, f_rest - h
        ids_all.append(idx)
        fhats.append(f_hat.clone())
    return ids_all, fhats


def ref_teacher_inputs(sd: dict, ids: list[torch.Tensor], pns: list[int]) -> torch.Tensor:
    """VAR's idxBl_to_var_input: area-downsampled f_hat after scales < k, for k = 1..K-1."""
    emb = sd["quantize.embedding.weight"]
    side = pns[-1]
    f_hat = torch.zeros(ids[0].shape[0], emb.shape[1], side, side)
    out = [torch.zeros(ids[0].shape[0], 0, emb.shape[1])]
    for si in range(min(len(ids), len(pns) - 1)):
        h = F.interpolate(emb[ids[si]].permute(0, 3, 1, 2), size=(side, side), mode="bicubic")
        f_hat = f_hat + ref_phi(sd, si, len(pns), h)
        out.append(F.interpolate(f_hat, size=(pns[si + 1],) * 2, mode="area").flatten(2).transpose(1, 2))
    return torch.cat(out, 1)


def ref_var_logits(sd: dict, label: torch.Tensor, x_inputs: torch.Tensor, pns: list[int], heads: int):
    """VAR.forward: one uncached pass over every scale with the additive block-causal bias."""
    c = sd["word_embed.weight"].shape[0]
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    lv = torch.cat([torch.full((p * p,), i) for i, p in enumerate(pns)])
    n = x_inputs.shape[1] + 1
    cond = sd["class_emb.weight"][label]
    x = torch.cat(
        [cond[:, None] + sd["pos_start"], F.linear(x_inputs, sd["word_embed.weight"], sd["word_embed.bias"])],
        1,
    )
    x = x + sd["lvl_embed.weight"][lv[:n]][None] + sd["pos_1LC"][:, :n]
    bias = torch.where(lv[:n, None] >= lv[None, :n], 0.0, -torch.inf)
    dh = c // heads

    def ln(t):
        return F.layer_norm(t, (c,), eps=1e-6)

    for i in range(depth):
        p = f"blocks.{i}."
        g1, g2, s1, s2, b1, b2 = (
            F.linear(F.silu(cond), sd[p + "ada_lin.1.weight"], sd[p + "ada_lin.1.bias"])
            .view(-1, 1, 6, c)
            .unbind(2)
        )
        h = ln(x) * (1 + s1) + b1
        qkv_bias = torch.cat([sd[p + "attn.q_bias"], torch.zeros(c), sd[p + "attn.v_bias"]])
        q, k, v = (
            F.linear(h, sd[p + "attn.mat_qkv.weight"], qkv_bias).view(x.shape[0], n, 3, heads, dh).unbind(2)
        )
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        mul = sd[p + "attn.scale_mul_1H11"].clamp_max(math.log(100)).exp()
        q, k = F.normalize(q, dim=-1) * mul, F.normalize(k, dim=-1)
        att = (q @ k.transpose(-1, -2) + bias).softmax(-1) @ v
        att = F.linear(
            att.transpose(1, 2).reshape(x.shape[0], n, c),
            sd[p + "attn.proj.weight"],
            sd[p + "attn.proj.bias"],
        )
        x = x + att * g1
        h = ln(x) * (1 + s2) + b2
        h = F.linear(F.gelu(F.linear(h, sd[p + "ffn.fc1.weight"], sd[p + "ffn.fc1.bias"]), approximate="tanh"),
                     sd[p + "ffn.fc2.weight"], sd[p + "ffn.fc2.bias"])  # fmt: skip
        x = x + h * g2
    scale, shift = (
        F.linear(F.silu(cond), sd["head_nm.ada_lin.1.weight"], sd["head_nm.ada_lin.1.bias"])
        .view(-1, 1, 2, c)
        .unbind(2)
    )
    return F.linear(ln(x) * (1 + scale) + shift, sd["head.weight"], sd["head.bias"])


def ref_greedy(sd_var: dict, sd_vq: dict, label: torch.Tensor, cfg_var: float, pns: list[int], heads: int):
    """Greedy next-scale generation by re-running the uncached reference over all scales so far,
    guided as VAR's autoregressive_infer_cfg does: (1 + t)·cond − t·uncond, t = cfg·si/(K−1)."""
    b, n_classes = label.shape[0], sd_var["class_emb.weight"].shape[0] - 1
    labels = torch.cat([label, torch.full_like(label, n_classes)])
    ids: list[torch.Tensor] = []
    for si, pn in enumerate(pns):
        x_in = (
            ref_teacher_inputs(sd_vq, ids, pns)
            if ids
            else torch.zeros(b, 0, sd_vq["quant_conv.weight"].shape[0])
        )
        logits = ref_var_logits(sd_var, labels, x_in.repeat(2, 1, 1), pns, heads)[:, -pn * pn :]
        t = cfg_var * si / (len(pns) - 1)
        guided = (1 + t) * logits[:b] - t * logits[b:]
        ids.append(guided.argmax(-1).view(b, pn, pn))
    return ids


# ---------------------------------------------------------------- tokenizer


def test_published_vqvae_sizes_are_read_from_its_tensors(published):
    _, _, vq, _ = published
    c = vq.config
    assert (c.channels, c.ch_mult, c.num_res_blocks, c.z_channels, c.vocab_size) == (32, [1, 1], 1, 4, 64)
    assert c.patch_nums == PN and c.share_quant_resi == 4 and c.image_size == 32


def test_multiscale_quantisation_matches_the_published_algorithm(published):
    vsd, _, vq, _ = published
    img = images(2)
    with torch.no_grad():
        f = vq.features(img)
    ref_ids, ref_fhats = ref_quantize(vsd, f, PN)
    tokens = vq.encode(img)
    assert tokens.patch_nums == tuple(PN)
    for got, want in zip(tokens.maps, ref_ids):
        assert torch.equal(got, want)
    torch.testing.assert_close(vq.quantize.fhat(tokens.maps), ref_fhats[-1], atol=1e-5, rtol=1e-5)


def test_decoding_tokens_equals_decoding_the_encoders_quantised_features(published):
    vsd, _, vq, _ = published
    img = images(2, seed=1)
    with torch.no_grad():
        f = vq.features(img)
    _, ref_fhats = ref_quantize(vsd, f, PN)
    tokens = vq.encode(img)
    torch.testing.assert_close(vq.decode(tokens), vq.decode_fhat(ref_fhats[-1]), atol=1e-5, rtol=1e-5)
    for k in (1, 4, 9):  # the first k scales alone decode to the image of f_hat after k scales
        torch.testing.assert_close(
            vq.decode(tokens, scales=k), vq.decode_fhat(ref_fhats[k - 1]), atol=1e-5, rtol=1e-5
        )
        torch.testing.assert_close(vq.decode(tokens.first(k)), vq.decode(tokens, scales=k))
    assert not torch.allclose(vq.decode(tokens, scales=1), vq.decode(tokens))


def test_teacher_inputs_match_the_published_algorithm(published):
    vsd, _, vq, _ = published
    tokens = vq.encode(images(2, seed=2))
    want = ref_teacher_inputs(vsd, list(tokens.maps), PN)
    got = vq.quantize.teacher_inputs(tokens.maps)
    assert got.shape == (2, sum(p * p for p in PN) - 1, 4)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_decode_refuses_maps_that_are_not_the_tokenizers_scales(published):
    _, _, vq, _ = published
    with pytest.raises(ValueError, match="not the first scales"):
        vq.decode(MultiScaleTokens((torch.zeros(1, 2, 2, dtype=torch.long),)))
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        vq.decode(MultiScaleTokens((torch.full((1, 1, 1), 64),)))
    with pytest.raises(ValueError, match="32x32"):
        vq.encode(images(1, side=16))


def test_training_forward_gives_gradients_and_the_encode_ids():
    vq = MultiScaleVQ(
        MultiScaleVQConfig(
            channels=8,
            ch_mult=[1, 2],
            num_res_blocks=1,
            z_channels=4,
            vocab_size=32,
            patch_nums=[1, 2, 4],
            norm_groups=4,
        )  # fmt: skip
    )
    img = images(2, side=8)
    recon, loss, tokens = vq(img)
    (recon.square().mean() + loss).backward()
    assert (
        vq.quantize.embedding.weight.grad.abs().sum() > 0 and vq.encoder.conv_in.weight.grad.abs().sum() > 0
    )
    assert vq.quantize.quant_resi.qresi_ls[0].weight.grad.abs().sum() > 0
    for a, b in zip(tokens.maps, vq.encode(img).maps):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- transformer


def test_published_var_sizes_are_read_from_its_tensors(published):
    _, _, _, model = published
    c = model.config
    assert (c.depth, c.width, c.heads, c.ffn_hidden, c.vocab_size, c.cvae) == (2, 128, 2, 512, 64, 4)
    assert c.patch_nums == PN and c.num_classes == 10 and c.attn_l2_norm


def test_teacher_forced_logits_match_the_reference(published):
    vsd, tsd, vq, model = published
    tokens = vq.encode(images(2, seed=3))
    label = torch.tensor([3, 7])
    got = teacher_forced_logits(model, vq.quantize, model.class_condition(label), tokens)
    want = ref_var_logits(tsd, label, ref_teacher_inputs(vsd, list(tokens.maps), PN), PN, heads=2)
    assert got.shape == (2, 680, 64)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)


def test_greedy_generation_with_and_without_the_kv_cache_agree_and_match_the_reference(published):
    vsd, tsd, vq, model = published
    label = torch.tensor([1, 4])
    cond = condition_rows(model, 2, class_ids=label, cfg=True)
    cached, _ = sample_scales(model, vq.quantize, cond, 2, cfg=3.0, temperature=0)
    full, _ = sample_scales(model, vq.quantize, cond, 2, cfg=3.0, temperature=0, use_cache=False)
    ref = ref_greedy(tsd, vsd, label, cfg_var=2.0, pns=PN, heads=2)  # our cfg 3 = VAR's cfg 2
    for a, b, r in zip(cached.maps, full.maps, ref):
        assert torch.equal(a, b) and torch.equal(a, r)


def test_cfg_ramps_from_unguided_at_the_first_scale(published):
    _, _, vq, model = published
    cond = condition_rows(model, 2, class_ids=[2, 5], cfg=True)
    seen = {}
    for cfg in (1.0, 6.0):
        maps, _ = sample_scales(model, vq.quantize, cond, 2, cfg=cfg, temperature=0)
        seen[cfg] = maps.maps
    unguided, _ = sample_scales(
        model, vq.quantize, condition_rows(model, 2, class_ids=[2, 5], cfg=False), 2, temperature=0
    )
    assert torch.equal(seen[6.0][0], unguided.maps[0])  # scale 0: s = 1 whatever cfg
    assert all(torch.equal(a, b) for a, b in zip(seen[1.0], unguided.maps))
    assert any(not torch.equal(a, b) for a, b in zip(seen[6.0], unguided.maps))


def test_sampling_with_and_without_cache_agree_and_seeds_are_per_image(published):
    _, _, vq, model = published
    cond = condition_rows(model, 3, class_ids=[1, 2, 3], cfg=True)
    kw = dict(cfg=2.5, top_k=20, top_p=0.9, seed=11)
    a, _ = sample_scales(model, vq.quantize, cond, 3, **kw)
    b, _ = sample_scales(model, vq.quantize, cond, 3, use_cache=False, **kw)
    again, _ = sample_scales(model, vq.quantize, cond, 3, **kw)
    assert all(torch.equal(x, y) and torch.equal(x, z) for x, y, z in zip(a.maps, b.maps, again.maps))
    alone = condition_rows(model, 1, class_ids=[3], cfg=True)
    third, _ = sample_scales(model, vq.quantize, alone, 1, **{**kw, "seed": 13})
    assert all(torch.equal(x[2:3], y) for x, y in zip(a.maps, third.maps))
    other, _ = sample_scales(model, vq.quantize, cond, 3, **{**kw, "seed": 12})
    assert any(not torch.equal(x, y) for x, y in zip(a.maps, other.maps))


def test_top_k_one_is_greedy(published):
    _, _, vq, model = published
    cond = condition_rows(model, 2, class_ids=[0, 9], cfg=True)
    greedy, _ = sample_scales(model, vq.quantize, cond, 2, cfg=2.0, temperature=0)
    top1, _ = sample_scales(model, vq.quantize, cond, 2, cfg=2.0, top_k=1, seed=5)
    assert all(torch.equal(a, b) for a, b in zip(greedy.maps, top1.maps))


def test_keep_scales_keeps_the_source_and_samples_the_rest(published):
    _, _, vq, model = published
    source = vq.encode(images(1, seed=4))
    cond = condition_rows(model, 2, class_ids=[6, 6], cfg=True)
    out, f_hat = sample_scales(model, vq.quantize, cond, 2, cfg=2.0, seed=3, source=source, keep_scales=4)
    for k in range(4):
        assert torch.equal(out.maps[k], source.maps[k].expand(2, -1, -1))
    assert any(not torch.equal(out.maps[k], source.maps[k].expand(2, -1, -1)) for k in range(4, 10))
    torch.testing.assert_close(f_hat, vq.quantize.fhat(out.maps))
    everything, _ = sample_scales(model, vq.quantize, cond, 2, cfg=2.0, seed=3, source=source, keep_scales=10)
    assert all(torch.equal(a, b.expand(2, -1, -1)) for a, b in zip(everything.maps, source.maps))
    with pytest.raises(ValueError, match="source"):
        sample_scales(model, vq.quantize, cond, 2, keep_scales=2)


# ---------------------------------------------------------------- caption models (our built-in design)


def caption_models():
    vq = MultiScaleVQ(
        MultiScaleVQConfig(
            channels=8,
            ch_mult=[1, 2],
            num_res_blocks=1,
            z_channels=4,
            vocab_size=32,
            patch_nums=[1, 2, 3, 4],
            norm_groups=4,
        )  # fmt: skip
    ).eval()
    cfg = VARConfig(depth=2, width=32, heads=2, ffn_hidden=64, vocab_size=32, cvae=4, patch_nums=[1, 2, 3, 4],
                    num_classes=0, caption_dim=6, pooled_dim=5)  # fmt: skip
    model = VAR(cfg).init_weights(seed=0).eval()
    with torch.no_grad():  # the init's tiny AdaLN gains would make every block the identity
        for block in model.blocks:
            block.ada_lin[-1].weight.normal_(0, 0.2)
        model.null_pooled.normal_()
        model.null_tokens.normal_()
    return vq, model


def captions(lengths: list[int], seed: int = 0) -> Conditioning:
    g = torch.Generator().manual_seed(seed)
    n, longest = len(lengths), max(lengths)
    mask = torch.arange(longest)[None] < torch.tensor(lengths)[:, None]
    return Conditioning(torch.randn(n, longest, 6, generator=g), torch.randn(n, 5, generator=g), mask)


def test_caption_model_cache_parity_and_padding_independence():
    vq, model = caption_models()
    pos = captions([7, 3])
    cond = condition_rows(model, 2, positive=pos, cfg=True)
    a, _ = sample_scales(model, vq.quantize, cond, 2, cfg=3.0, temperature=0)
    b, _ = sample_scales(model, vq.quantize, cond, 2, cfg=3.0, temperature=0, use_cache=False)
    assert all(torch.equal(x, y) for x, y in zip(a.maps, b.maps))
    short = Conditioning(pos.tokens[1:2, :3], pos.pooled[1:2], pos.mask[1:2, :3])
    alone, _ = sample_scales(model, vq.quantize, condition_rows(model, 1, positive=short, cfg=True), 1,
                             cfg=3.0, temperature=0)  # fmt: skip
    assert all(torch.equal(x[1:2], y) for x, y in zip(a.maps, alone.maps))


def test_caption_teacher_forcing_equals_cached_greedy_logits_and_dropout_uses_the_null_caption():
    vq, model = caption_models()
    pos = captions([4, 2], seed=1)
    cond = model.caption_condition(pos)
    seen = []
    sample_scales(model, vq.quantize, cond, 2, temperature=0, callback=lambda d: seen.append(d["tokens"]))
    tokens = seen[-1]
    logits = teacher_forced_logits(model, vq.quantize, cond, tokens)
    torch.testing.assert_close(logits.argmax(-1), tokens.flat())  # greedy picks = teacher-forced argmax
    dropped = model.caption_condition(pos, drop=torch.tensor([True, False]))
    null = model.caption_condition(None, batch=1)
    torch.testing.assert_close(dropped.vec[0], null.vec[0])
    torch.testing.assert_close(dropped.vec[1], cond.vec[1])
    tf_drop = teacher_forced_logits(model, vq.quantize, dropped, tokens)
    tf_null = teacher_forced_logits(
        model, vq.quantize, null, MultiScaleTokens(tuple(m[:1] for m in tokens.maps))
    )
    torch.testing.assert_close(tf_drop[:1], tf_null, atol=1e-5, rtol=1e-5)
    tf_drop.sum().backward()  # autograd-friendly
    assert model.null_tokens.grad is not None and model.null_tokens.grad.abs().sum() > 0


def test_generate_next_scale_image_per_seed_and_callback():
    vq, model = caption_models()
    pos = captions([5, 5, 2], seed=2)
    calls = []
    img = generate_next_scale(model, vq, pos, None, cfg=2.0, seed=4, top_k=8, on_scale=calls.append)
    assert img.shape == (3, 8, 8, 3) and 0 <= float(img.min()) and float(img.max()) <= 1
    assert [c["i"] for c in calls] == [0, 1, 2, 3] and calls[-1]["tokens"].patch_nums == (1, 2, 3, 4)
    torch.testing.assert_close(img, scales_to_image(vq, calls[-1]["tokens"]))
    one = Conditioning(pos.tokens[1:2], pos.pooled[1:2], pos.mask[1:2])
    alone = generate_next_scale(model, vq, one, None, cfg=2.0, seed=5, top_k=8)
    torch.testing.assert_close(img[1:2], alone, atol=1e-4, rtol=1e-4)  # batched convs round differently
    with pytest.raises(ValueError, match="expects 6 / 5"):
        generate_next_scale(
            model, vq, Conditioning(torch.zeros(1, 2, 7), torch.zeros(1, 5), torch.ones(1, 2).bool())
        )


# ---------------------------------------------------------------- files


def test_our_files_round_trip_with_their_config(tmp_path):
    vq, model = caption_models()
    save_multiscale_vq(vq, tmp_path / "msvq.safetensors", card="tiny")
    save_var(model, tmp_path / "var.safetensors", card="tiny")
    vq2, model2 = load_multiscale_vq(tmp_path / "msvq.safetensors"), load_var(tmp_path / "var.safetensors")
    assert vq2.config == vq.config and model2.config == model.config
    pos = captions([3, 4])
    torch.testing.assert_close(
        generate_next_scale(model, vq, pos, cfg=2.0, seed=1),
        generate_next_scale(model2, vq2, pos, cfg=2.0, seed=1),
    )


def test_convert_detects_the_published_files_and_records_their_config(tmp_path):
    vae_pth, var_pth = write_var_pth(tmp_path / "dl")
    s1 = convert(vae_pth, tmp_path / "vae.safetensors")
    s2 = convert(var_pth, tmp_path / "var.safetensors")
    assert s1["family"] == "multi-scale VQ tokenizer" and s1["config"]["patch_nums"] == PN
    assert (
        s2["family"] == "VAR transformer" and s2["config"]["heads"] == 2 and s2["config"]["patch_nums"] == PN
    )
    vq, model = load_multiscale_vq(tmp_path / "vae.safetensors"), load_var(tmp_path / "var.safetensors")
    img = generate_next_scale(model, vq, None, class_ids=[3], cfg=2.0, seed=0, top_k=10)
    assert img.shape == (1, 32, 32, 3)


def test_settings_the_weights_cannot_tell_are_refused_by_name():
    vsd = {k: v for k, v in var_vqvae_state().items() if k != "quantize.ema_vocab_hit_SV"}
    with pytest.raises(CheckpointError, match="patch_nums"):
        multiscale_vq_from_state_dict(vsd)
    assert (
        multiscale_vq_from_state_dict(
            vsd, {"tessera.config": json.dumps({"patch_nums": PN})}
        ).config.patch_nums
        == PN
    )
    tsd = {k: v for k, v in var_state().items() if k not in ("lvl_1L", "attn_bias_for_masking")}
    tsd["lvl_embed.weight"] = tsd["lvl_embed.weight"][:9]  # 9 levels over 680 positions: no known list
    with pytest.raises(CheckpointError, match="patch_nums"):
        var_from_state_dict(tsd)
    no_l2 = {k: v for k, v in var_state().items() if "scale_mul" not in k}
    assert var_from_state_dict(no_l2).config.heads == 2  # width 128 = 64 * depth 2: VAR's rule
    no_l2["word_embed.weight"] = no_l2["word_embed.weight"][:96]  # a width the rule does not cover
    with pytest.raises(CheckpointError, match="'heads'"):
        var_from_state_dict(no_l2)
    assert detect_family(var_state()) == "VAR transformer"
    assert detect_family(var_vqvae_state()) == "multi-scale VQ tokenizer"


@pytest.mark.parametrize("depth,millions", [(16, 310), (20, 601), (24, 1033), (30, 2010)])
def test_full_size_published_layouts_are_sized_as_var_d16_to_d30(depth, millions):
    """The real files' shapes (as meta tensors: nothing allocated) give VAR's published sizes:
    width 64·depth, heads = depth, 310M … 2.0B parameters; the tokenizer is vae_ch160v4096z32."""
    shapes = var_shapes(depth=depth, z=32, vocab=4096, num_classes=1000)
    cfg = infer_var_config({k: torch.empty(s, device="meta") for k, s in shapes.items()})
    assert (cfg.width, cfg.heads, cfg.ffn_hidden, cfg.patch_nums) == (64 * depth, depth, 256 * depth, PN)
    with torch.device("meta"):
        model = VAR(cfg)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6) == millions
    assert set(model.state_dict()) == set(shapes)
    vae = var_vqvae_shapes(ch=160, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, z=32, vocab=4096)
    vq_cfg = infer_multiscale_vq_config({k: torch.empty(s, device="meta") for k, s in vae.items()})
    assert vq_cfg == MultiScaleVQConfig()
    with torch.device("meta"):
        vq = MultiScaleVQ(vq_cfg)
    assert set(vq.state_dict()) == set(vae) - {"quantize.ema_vocab_hit_SV"}
