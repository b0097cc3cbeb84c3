"""Our GPT and VQ against an independent LlamaGen reference (tests/llamagen_reference.py).

Tiny random weights in LlamaGen's key layout go through our loaders and through the
reference; logits agree to 1e-5, reconstructions to 1e-4, greedy tokens and code ids exactly.
"""

from __future__ import annotations

import json

import llamagen_reference as ref
import pytest
import torch

from tessera.engines.ar_decoding import condition_prefix, generate
from tessera.engines.conditioning import Conditioning
from tessera.engines.gpt import GPT, gpt_from_state_dict
from tessera.engines.vq import vq_from_state_dict

GRID = 4


def load(sd: dict, n_head: int) -> GPT:
    return gpt_from_state_dict(sd, {"tessera.config": json.dumps({"n_head": n_head})}).eval()


def our_logits(model: GPT, prefix, ids: torch.Tensor) -> torch.Tensor:
    """Full-sequence logits [B, T + N, vocab] through our forward, without the KV cache."""
    model.setup_caches(ids.shape[0], GRID, GRID, prefix.key_valid, allocate_kv=False)
    x = torch.cat([prefix.x, model.embed_tokens(ids)], 1)
    with torch.no_grad():
        return model(x, torch.arange(x.shape[1]), use_cache=False)


def caption(batch: int, tokens: int, dim: int, lengths: list[int], seed: int) -> Conditioning:
    """Right-padded text features (as T5 gives them); padding rows hold noise, not zeros."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(tokens)[None] < torch.tensor(lengths)[:, None]
    return Conditioning(torch.randn(batch, tokens, dim, generator=g), torch.zeros(batch, 4), mask)


@pytest.mark.parametrize("n_kv_head", [4, 2], ids=["mha", "gqa"])
def test_class_model_logits_match_the_reference(n_kv_head):
    sd = ref.gpt_state_dict(64, 2, 4, n_kv_head, 176, 48, num_classes=5, seed=n_kv_head)
    model = load(sd, 4)
    assert model.config.n_kv_head == n_kv_head
    classes = torch.tensor([3, 0])
    ids = torch.randint(0, 48, (2, GRID * GRID - 1), generator=torch.Generator().manual_seed(1))
    ours = our_logits(model, condition_prefix(model, 2, class_ids=classes, cfg=False), ids)
    expected = ref.gpt_logits(sd, 4, ref.class_prefix(sd, classes), ids, GRID)
    assert ours.shape == expected.shape == (2, GRID * GRID, 48)
    torch.testing.assert_close(ours.double(), expected, atol=1e-5, rtol=1e-5)


def test_caption_model_logits_match_the_reference_under_the_padding_mask():
    t, cap_dim = 6, 24
    sd = ref.gpt_state_dict(64, 2, 4, 2, 176, 48, caption_dim=cap_dim, cls_token_num=t, seed=3)
    model = load(sd, 4)
    cond = caption(2, t, cap_dim, lengths=[3, 6], seed=4)
    ids = torch.randint(0, 48, (2, GRID * GRID - 1), generator=torch.Generator().manual_seed(5))
    ours = our_logits(model, condition_prefix(model, 2, positive=cond, cfg=False), ids)
    feats, valid = ref.left_pad(cond.tokens, cond.mask)
    expected = ref.gpt_logits(sd, 4, ref.caption_prefix(sd, feats), ids, GRID, prefix_valid=valid)
    # the positions that predict image tokens; padding rows' own outputs are not part of the model
    torch.testing.assert_close(ours[:, t - 1 :].double(), expected[:, t - 1 :], atol=1e-5, rtol=1e-5)
    # the mask matters here: without it the short caption's logits move well past the tolerance
    unmasked = ref.gpt_logits(sd, 4, ref.caption_prefix(sd, feats), ids, GRID)
    assert (unmasked[0, t - 1 :] - expected[0, t - 1 :]).abs().max() > 1e-2


def test_greedy_guided_class_tokens_equal_the_reference():
    sd = ref.gpt_state_dict(64, 2, 4, 2, 176, 48, num_classes=5, seed=7)
    model = load(sd, 4)
    classes = torch.tensor([1, 4])
    with torch.no_grad():
        ours = generate(
            model, condition_prefix(model, 2, class_ids=classes), GRID, GRID, cfg_scale=3.0, temperature=0
        )
    null = ref.class_prefix(sd, torch.full_like(classes, 5))
    expected = ref.greedy_tokens(sd, 4, ref.class_prefix(sd, classes), null, GRID, 3.0)
    assert torch.equal(ours.reshape(2, -1), expected)


def test_greedy_guided_caption_tokens_equal_the_reference():
    t, cap_dim = 6, 24
    sd = ref.gpt_state_dict(64, 2, 4, 1, 176, 48, caption_dim=cap_dim, cls_token_num=t, seed=8)
    model = load(sd, 4)
    # an empty caption: its rows attend only to themselves, and the null caption's rows under
    # that mask are not zero, so the mask's kept diagonal shows in the guided logits
    cond = caption(2, t, cap_dim, lengths=[0, 5], seed=9)
    with torch.no_grad():
        ours = generate(
            model, condition_prefix(model, 2, positive=cond), GRID, GRID, cfg_scale=2.5, temperature=0
        )
    feats, valid = ref.left_pad(cond.tokens, cond.mask)
    null = ref.caption_prefix(sd, sd["cls_embedding.uncond_embedding"][None].expand(2, -1, -1))
    expected = ref.greedy_tokens(sd, 4, ref.caption_prefix(sd, feats), null, GRID, 2.5, valid)
    assert torch.equal(ours.reshape(2, -1), expected)


@pytest.fixture(scope="module")
def vq():
    sd = ref.vq_state_dict(32, [1, 2, 2], 1, 16, 64, 8, seed=11)
    return sd, vq_from_state_dict(sd).eval()


def test_vq_encode_ids_equal_the_reference(vq):
    sd, model = vq
    g = torch.Generator().manual_seed(12)
    images = (
        torch.nn.functional.interpolate(torch.rand(2, 3, 4, 4, generator=g), size=16, mode="bilinear") * 2 - 1
    )
    ids = model.encode(images)
    distances = ref.vq_distances(sd, ref.vq_latent(sd, images))
    best2 = distances.topk(2, dim=-1, largest=False).values
    # no near-tie that float32 rounding could flip: the comparison below is well posed
    assert (best2[..., 1] - best2[..., 0]).min() > 1e-5
    assert ids.shape == (2, 4, 4)
    assert torch.equal(ids, distances.argmin(-1))
    assert len(ids.unique()) > 4  # the images use several codes, not one


def test_vq_decode_matches_the_reference(vq):
    sd, model = vq
    ids = torch.randint(0, 64, (2, 4, 4), generator=torch.Generator().manual_seed(13))
    expected = ref.vq_decode(sd, ids)
    inside = (expected.abs() < 1).double().mean()
    assert inside > 0.5  # most pixels are not clamped, so the comparison has power
    torch.testing.assert_close(model.decode(ids).double(), expected.clamp(-1, 1), atol=1e-4, rtol=1e-4)
