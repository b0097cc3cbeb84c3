"""The training objectives, written once (lab/objectives.py) for the base models and the adapters."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tessera.engines.conditioning import Conditioning
from tessera.lab.objectives import GUIDANCE, drop_captions, flow_matching_loss, lr_at


def test_lr_warms_up_linearly_then_decays_to_its_floor():
    factors = [lr_at(s, 100, 10, floor=0.1) for s in range(101)]
    assert factors[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert factors[10] == pytest.approx(1.0) and factors[100] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
    assert lr_at(60, 100, 5, floor=0.0) == pytest.approx(
        0.5 * (1 + torch.cos(torch.tensor(55 / 95 * torch.pi)).item())
    )


def test_caption_dropout_draws_one_uniform_per_caption():
    captions = [f"c{i}" for i in range(200)]
    kept, dropped = drop_captions(captions, torch.Generator().manual_seed(3), p=0.25)
    expected = torch.rand(200, generator=torch.Generator().manual_seed(3)) < 0.25
    assert torch.equal(dropped, expected) and 20 < int(dropped.sum()) < 80
    assert kept == ["" if d else c for c, d in zip(captions, expected.tolist())]


class Recorder:
    """Stands in for a DiT: records its inputs and predicts zero velocity."""

    def __init__(self, guidance_embed: bool):
        self.config = SimpleNamespace(guidance_embed=guidance_embed)
        self.calls = []

    def __call__(self, x, sigma, tokens, pooled, guidance, mask):
        self.calls.append({"x": x, "sigma": sigma, "guidance": guidance, "mask": mask})
        return torch.zeros_like(x)


@pytest.mark.parametrize("guidance_embed", [True, False])
def test_flow_matching_loss_interpolates_and_feeds_guidance_only_to_models_that_take_it(guidance_embed):
    x0 = torch.randn(3, 4, 2, 2, generator=torch.Generator().manual_seed(1))
    cond = Conditioning(torch.randn(3, 5, 8), torch.randn(3, 6), torch.ones(3, 5, dtype=torch.bool))
    model = Recorder(guidance_embed)
    loss = flow_matching_loss(model, x0, cond, torch.Generator().manual_seed(9))
    g = torch.Generator().manual_seed(9)
    sigma = torch.sigmoid(torch.randn(3, generator=g))
    noise = torch.randn(x0.shape, generator=g)
    (call,) = model.calls
    torch.testing.assert_close(call["sigma"], sigma)
    torch.testing.assert_close(
        call["x"], (1 - sigma[:, None, None, None]) * x0 + sigma[:, None, None, None] * noise
    )
    assert call["mask"] is None  # nothing padded: no mask
    if guidance_embed:
        assert torch.equal(call["guidance"], torch.full((3,), GUIDANCE))
    else:
        assert call["guidance"] is None
    torch.testing.assert_close(loss, ((noise - x0) ** 2).mean())  # zero velocity: the target's power


def test_token_loss_scores_what_cached_decoding_of_the_controlled_gpt_predicts():
    """Teacher forcing (prefix trimmed to the longest caption) gives the logits the nodes' cached,
    token-by-token decoding gives, control residuals included; dropped captions read the null caption."""
    from tessera.engines.controlnet import ARControlConfig, ARControlNet, with_ar_control
    from tessera.engines.gpt import GPT, GPTConfig
    from tessera.lab.objectives import teacher_forced_logits, token_loss

    torch.manual_seed(0)
    cfg = GPTConfig(dim=32, n_layer=2, n_head=4, n_kv_head=2, ffn_hidden=64, vocab_size=40)
    gpt = GPT(GPTConfig(**{**cfg.__dict__, "caption_dim": 16, "cls_token_num": 8, "grid_size": 4}))
    net = ARControlNet(ARControlConfig(dim=32, downsample=8, width=8))
    for p in [*gpt.parameters(), *net.parameters()]:
        p.data.normal_(0, 0.2)
    mask = torch.tensor([[1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    cond = Conditioning(torch.randn(3, 6, 16), torch.zeros(3, 16), mask)
    ids = torch.randint(0, 40, (3, 4, 4))
    controlled = with_ar_control(gpt, net, torch.rand(3, 32, 32, 3))

    def decoded(model, features, valid):
        """Logits of every token from a prefill of the whole prefix, then one cached step per token."""
        t, flat = model.prefix_len, ids.flatten(1)
        x = torch.cat([model.caption_prefix(features), model.embed_tokens(flat[:, :-1])], dim=1)
        model.setup_caches(3, 4, 4, valid)
        rows = [model(x[:, :t], torch.arange(t))[:, -1:]]
        rows += [model(x[:, i : i + 1], torch.tensor([i])) for i in range(t, x.shape[1])]
        model.clear_caches()
        return torch.cat(rows, dim=1)

    features, valid = gpt.caption_features(cond)
    with torch.no_grad():
        expected = decoded(controlled, features, valid)
        assert (expected - decoded(gpt, features, valid)).abs().max() > 0.1  # the control shows
        torch.testing.assert_close(teacher_forced_logits(controlled, features, valid, ids), expected)
        drop = torch.tensor([False, True, False])
        dropped = torch.where(drop[:, None, None], gpt.uncond_features(3), features)
        loss = token_loss(controlled, cond, ids, drop)
        want = torch.nn.functional.cross_entropy(
            decoded(controlled, dropped, valid).flatten(0, 1), ids.flatten()
        )
    torch.testing.assert_close(loss, want)
    assert gpt.freqs is None and controlled.freqs is None
