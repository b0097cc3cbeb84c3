"""Decoding: KV cache against full recompute, CFG, sampling, seeds, fixed tokens, schedules."""

from __future__ import annotations

import pytest
import torch

from tessera.engines.ar_decoding import (
    ImageNoise,
    condition_prefix,
    decode_one_token,
    draw,
    filter_logits,
    generate,
    guidance_scales,
    prefill,
    recompute_logits,
    sample,
)
from tessera.engines.conditioning import Conditioning
from tessera.engines.gpt import GPT, GPTConfig
from tessera.engines.tokens import TokenGrid

VOCAB = 40


def tiny_gpt(caption: bool, seed: int = 0) -> GPT:
    cfg = GPTConfig(
        dim=64,
        n_layer=2,
        n_head=4,
        n_kv_head=2,
        ffn_hidden=96,
        vocab_size=VOCAB,
        num_classes=0 if caption else 10,
        caption_dim=24 if caption else 0,
        cls_token_num=6 if caption else 1,
    )
    torch.manual_seed(seed)
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
        if caption:
            model.cls_embedding.uncond_embedding.normal_()
    return model.eval()


def text(batch: int = 2, seed: int = 1) -> Conditioning:
    g = torch.Generator().manual_seed(seed)
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)[:batch]
    return Conditioning(torch.randn(batch, 5, 24, generator=g), torch.randn(batch, 8, generator=g), mask)


def make_prefix(model: GPT, batch: int = 2, cfg: bool = True):
    if model.config.is_caption:
        return condition_prefix(model, batch, positive=text(batch), cfg=cfg)
    return condition_prefix(model, batch, class_ids=torch.arange(batch) + 3, cfg=cfg)


@pytest.mark.parametrize("caption", [True, False], ids=["caption", "class"])
def test_kv_cached_logits_equal_full_recompute_with_cfg_batch(caption):
    model = tiny_gpt(caption)
    b, gh, gw = 2, 3, 4
    prefix = make_prefix(model, b)
    ids = torch.randint(0, VOCAB, (b, gh * gw), generator=torch.Generator().manual_seed(5))
    scales = guidance_scales("linear", 4.0, gh * gw)
    with torch.inference_mode():
        model.setup_caches(prefix.x.shape[0], gh, gw, prefix.key_valid)
        t = model.prefix_len
        cached = [prefill(model, prefix.x, torch.arange(t), b, scales[0])]
        for i in range(gh * gw - 1):
            cached.append(decode_one_token(model, ids[:, i : i + 1], torch.tensor([t + i]), scales[i + 1]))
        model.setup_caches(prefix.x.shape[0], gh, gw, prefix.key_valid, allocate_kv=False)
        full = [recompute_logits(model, prefix, ids[:, :i], scales[i]) for i in range(gh * gw)]
        model.clear_caches()
    assert cached[0].shape == (b, VOCAB)
    for i, (c, f) in enumerate(zip(cached, full)):
        torch.testing.assert_close(c, f, atol=1e-5, rtol=0, msg=f"token {i}")


def test_batched_cfg_mixes_separate_cond_and_uncond_logits():
    model = tiny_gpt(True)
    batch = make_prefix(model, 2, cfg=True)
    with torch.inference_mode():
        model.setup_caches(4, 2, 2, batch.key_valid, allocate_kv=False)
        ids = torch.tensor([[1, 2], [3, 4]])
        guided = recompute_logits(model, batch, ids, torch.tensor(3.0))
        x = torch.cat([batch.x, model.embed_tokens(torch.cat([ids, ids]))], 1)
        both = model(x, torch.arange(x.shape[1]), use_cache=False)[:, -1]
    cond, uncond = both[:2], both[2:]
    torch.testing.assert_close(guided, uncond + 3.0 * (cond - uncond))
    assert not torch.allclose(cond, uncond)


def test_text_padding_content_does_not_change_logits():
    model = tiny_gpt(True)
    cond = text(2)
    noisy = Conditioning(
        torch.where(cond.mask[..., None], cond.tokens, torch.randn_like(cond.tokens) * 9),
        cond.pooled,
        cond.mask,
    )
    outs = []
    for c in (cond, noisy):
        torch.manual_seed(0)
        p = condition_prefix(model, 2, positive=c, cfg=True)
        outs.append(generate(model, p, 2, 3, cfg_scale=2.0, top_k=1))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("schedule", ["constant", "linear"])
def test_top_k_1_is_greedy_argmax_of_guided_logits(schedule):
    model = tiny_gpt(True)
    prefix = make_prefix(model, 2)
    gh, gw = 2, 3
    out = generate(
        model,
        prefix,
        gh,
        gw,
        cfg_scale=5.0,
        schedule=schedule,
        temperature=1.0,
        top_k=1,
        seed=3,
    )
    scales = guidance_scales(schedule, 5.0, gh * gw)
    ids = torch.zeros(2, 0, dtype=torch.long)
    with torch.inference_mode():
        model.setup_caches(4, gh, gw, prefix.key_valid, allocate_kv=False)
        for i in range(gh * gw):
            ids = torch.cat(
                [ids, recompute_logits(model, prefix, ids, scales[i]).argmax(-1, keepdim=True)], 1
            )
        model.clear_caches()
    assert torch.equal(out.reshape(2, -1), ids)


def test_seed_reproduces_and_different_seeds_differ():
    model = tiny_gpt(False)
    prefix = make_prefix(model, 2)

    def run(seed: int) -> torch.Tensor:
        return generate(model, prefix, 4, 4, cfg_scale=2.0, temperature=1.5, seed=seed)

    a, b, c = run(7), run(7), run(8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a[0], a[1])  # batch rows draw different noise


def test_fixed_tokens_stay_fixed_anywhere_in_the_grid():
    model = tiny_gpt(True)
    prefix = make_prefix(model, 2)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, VOCAB, (2, 4, 4), generator=g)
    fixed = torch.rand(2, 4, 4, generator=g) < 0.4
    fixed[:, 0, 0] = False  # the first token is sampled: nothing is prefilled, all forcing is per token
    out = generate(
        model,
        prefix,
        4,
        4,
        cfg_scale=3.0,
        temperature=2.0,
        fixed=TokenGrid(ids, fixed),
        seed=1,
    )
    assert torch.equal(out[fixed], ids[fixed])
    assert not torch.equal(out[~fixed], ids[~fixed])


def test_prefilled_fixed_rows_match_forcing_token_by_token():
    model = tiny_gpt(True)
    prefix = make_prefix(model, 2)
    ids = torch.randint(0, VOCAB, (2, 4, 3), generator=torch.Generator().manual_seed(4))
    rows = TokenGrid(ids).fix_rows(2)  # both images: 6 leading tokens prefilled in one pass
    ragged = rows.fixed.clone()
    ragged[1, 0, 0] = False  # image 1 samples its first token: now every token is decoded one by one
    a = generate(model, prefix, 4, 3, cfg_scale=3.0, top_k=1, fixed=rows)
    b = generate(model, prefix, 4, 3, cfg_scale=3.0, top_k=1, fixed=TokenGrid(ids, ragged))
    assert torch.equal(a[0], b[0])
    assert torch.equal(a[:, :2], ids[:, :2])


def test_fully_fixed_grid_is_returned_unchanged():
    model = tiny_gpt(False)
    ids = torch.randint(0, VOCAB, (1, 2, 2))
    out = generate(
        model, make_prefix(model, 1), 2, 2, fixed=TokenGrid(ids, torch.ones(1, 2, 2, dtype=torch.bool))
    )
    assert torch.equal(out, ids)


def test_callback_reports_every_token_and_its_exception_propagates():
    model = tiny_gpt(False)
    seen = []
    generate(
        model,
        make_prefix(model, 1),
        2,
        3,
        callback=lambda d: seen.append((d["i"], d["total"], d["tokens"].shape)),
    )
    assert seen == [(i, 6, (1, i + 1)) for i in range(6)]

    class Stop(Exception):
        pass

    def interrupt(d):
        if d["i"] == 2:
            raise Stop

    with pytest.raises(Stop):
        generate(model, make_prefix(model, 1), 2, 3, callback=interrupt)
    assert model.freqs is None and model.layers[0].attention.kv_cache is None  # caches released


def test_guidance_schedules():
    torch.testing.assert_close(guidance_scales("constant", 4.0, 5), torch.full((5,), 4.0))
    lin = guidance_scales("linear", 4.0, 5)
    torch.testing.assert_close(lin, torch.tensor([1.0, 1.75, 2.5, 3.25, 4.0]))
    cos = guidance_scales("cosine", 4.0, 5)
    assert cos[0] == 1.0 and cos[-1] == 4.0 and cos[2] == pytest.approx(2.5)
    with pytest.raises(ValueError, match="unknown guidance schedule"):
        guidance_scales("sigmoid", 4.0, 5)


def test_filters_keep_top_k_and_the_nucleus():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[True, False, True, False]]
    # probabilities ~[0.03, 0.64, 0.09, 0.24]: the 0.6 nucleus is the best token alone, 0.8 adds the next
    assert torch.isfinite(filter_logits(logits, top_p=0.6)).tolist() == [[False, True, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.8)).tolist() == [[False, True, False, True]]


def test_inverse_cdf_sampling_draws_the_softmax_distribution():
    logits = torch.tensor([0.0, 1.0, 2.0, -1.0]).repeat(20000, 1)
    draws = sample(
        logits, temperature=1.0, uniform=torch.rand(20000, generator=torch.Generator().manual_seed(0))
    )
    freq = torch.bincount(draws, minlength=4).float() / draws.numel()
    torch.testing.assert_close(freq, logits[0].softmax(-1), atol=0.01, rtol=0)
    assert torch.equal(sample(logits[:3], temperature=0.0), torch.full((3,), 2))
    with pytest.raises(ValueError, match="uniform"):
        sample(logits[:2], temperature=1.0)


def test_draw_never_picks_a_zero_weight_token_even_at_the_ends_of_the_unit_interval():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0]]).repeat(4, 1)
    u = torch.tensor([0.0, 0.4999, 0.5, 1.0 - 2**-24])
    assert draw(probs, u).tolist() == [1, 1, 3, 3]
    assert draw(probs * 7, u).tolist() == [1, 1, 3, 3]  # unnormalised weights are fine


@pytest.mark.parametrize("caption", [True, False], ids=["caption", "class"])
def test_image_k_of_a_batch_is_the_image_seed_plus_k_gives_alone(caption):
    model = tiny_gpt(caption)
    if caption:
        one = condition_prefix(model, 1, positive=text(1), cfg=True)
        three = condition_prefix(model, 3, positive=text(1), cfg=True)
    else:
        one = condition_prefix(model, 1, class_ids=torch.tensor([3]), cfg=True)
        three = condition_prefix(model, 3, class_ids=torch.tensor([3]), cfg=True)
    kw = dict(cfg_scale=2.0, temperature=1.5, top_p=0.95)
    batch = generate(model, three, 3, 3, seed=40, **kw)
    alone = [generate(model, one, 3, 3, seed=40 + k, **kw) for k in range(3)]
    for k in range(3):
        assert torch.equal(batch[k], alone[k][0]), f"image {k}"
    assert not torch.equal(batch[0], batch[1])


def test_uniforms_come_from_one_cpu_stream_per_image():
    a = ImageNoise(5, 3).uniform(4, 2)
    b = ImageNoise(6, 1).uniform(4, 2)
    assert a.shape == (3, 4, 2) and a.device.type == "cpu"
    torch.testing.assert_close(a[1], b[0], rtol=0, atol=0)
    torch.testing.assert_close(
        a[0], torch.rand(4, 2, generator=torch.Generator().manual_seed(5)), rtol=0, atol=0
    )
