"""Speculative Jacobi decoding: greedy equals sequential exactly; sampling keeps the distribution."""

from __future__ import annotations

import itertools

import pytest
import torch

from tessera.engines.ar_decoding import (
    condition_prefix,
    generate,
    guidance_scales,
    recompute_logits,
    token_probs,
)
from tessera.engines.conditioning import Conditioning
from tessera.engines.gpt import GPT, GPTConfig
from tessera.engines.tokens import TokenGrid


def tiny_gpt(caption: bool, vocab: int, seed: int = 0, std: float = 0.3) -> GPT:
    cfg = GPTConfig(
        dim=32,
        n_layer=2,
        n_head=2,
        n_kv_head=1,
        ffn_hidden=64,
        vocab_size=vocab,
        num_classes=0 if caption else 4,
        caption_dim=12 if caption else 0,
        cls_token_num=5 if caption else 1,
    )
    torch.manual_seed(seed)
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std)
        if caption:
            model.cls_embedding.uncond_embedding.normal_()
    return model.eval()


def caption_prefix(model: GPT):
    g = torch.Generator().manual_seed(1)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    cond = Conditioning(torch.randn(2, 4, 12, generator=g), torch.randn(2, 8, generator=g), mask)
    return condition_prefix(model, 2, positive=cond, cfg=True)


@pytest.mark.parametrize("window", [1, 3, 16])
def test_greedy_jacobi_gives_exactly_the_sequential_tokens(window):
    model = tiny_gpt(True, vocab=40)
    prefix = caption_prefix(model)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 40, (2, 5, 4), generator=g)
    fixed = torch.rand(2, 5, 4, generator=g) < 0.3
    fixed[:, 0, 0] = False
    kw = dict(cfg_scale=3.0, schedule="linear", temperature=0.0, fixed=TokenGrid(ids, fixed))
    seq_stats, jac_stats = {}, {}
    sequential = generate(model, prefix, 5, 4, stats=seq_stats, **kw)
    jacobi = generate(model, prefix, 5, 4, decoding="jacobi", jacobi_window=window, stats=jac_stats, **kw)
    assert torch.equal(jacobi, sequential)
    assert torch.equal(jacobi[fixed], ids[fixed])
    assert seq_stats == {"forwards": 20, "tokens": 20, "forwards_per_image": 20.0}
    assert jac_stats["tokens"] == 20 and 1 <= jac_stats["forwards"] <= 20


def test_greedy_jacobi_needs_fewer_forwards_when_drafts_come_true():
    # a nearly constant model: every draft from the last distribution is its argmax
    model = tiny_gpt(False, vocab=16, std=0.02)
    with torch.no_grad():
        model.output.weight.zero_()
        model.output.weight[5] = 1.0
        model.norm.weight.fill_(1.0)
    prefix = condition_prefix(model, 1, class_ids=torch.tensor([2]), cfg=False)
    stats = {}
    out = generate(model, prefix, 6, 6, temperature=0.0, decoding="jacobi", jacobi_window=8, stats=stats)
    assert bool((out == out.flatten()[0]).all())
    assert stats["forwards"] <= 1 + 36 // 8 + 1  # prefill + ~n / (window + 1) verifications


def test_jacobi_reports_every_position_once_in_order_and_releases_caches():
    model = tiny_gpt(False, vocab=12)
    prefix = condition_prefix(model, 2, class_ids=torch.tensor([1, 2]), cfg=True)
    seen = []
    out = generate(
        model,
        prefix,
        3,
        3,
        cfg_scale=2.0,
        seed=4,
        decoding="jacobi",
        jacobi_window=4,
        callback=lambda d: seen.append(d["i"]),
    )
    assert seen == list(range(9)) and out.shape == (2, 3, 3)
    assert model.freqs is None and model.layers[0].attention.kv_cache is None
    with pytest.raises(ValueError, match="unknown decoding"):
        generate(model, prefix, 3, 3, decoding="lookahead")


# ---- the distribution: chi-square over whole token sequences ---------------------------------------
VOCAB, GRID, SAMPLES = 3, 2, 10_000


def exact_joint(model: GPT, cfg: float, temperature: float, top_k: int) -> torch.Tensor:
    """P(sequence) for every one of VOCAB**(GRID*GRID) sequences, by enumerating prefixes."""
    n = GRID * GRID
    scales = guidance_scales("constant", cfg, n)
    seqs = torch.tensor(list(itertools.product(range(VOCAB), repeat=n)))
    logp = torch.zeros(len(seqs))
    with torch.inference_mode():
        model.setup_caches(2 * len(seqs), GRID, GRID, allocate_kv=False)
        prefix = condition_prefix(model, len(seqs), class_ids=torch.tensor([1]), cfg=True)
        for i in range(n):
            probs = token_probs(recompute_logits(model, prefix, seqs[:, :i], scales[i]), temperature, top_k)
            logp += probs.gather(-1, seqs[:, i : i + 1]).squeeze(-1).log()
        model.clear_caches()
    return logp.exp()


def histogram(ids: torch.Tensor) -> torch.Tensor:
    flat = ids.reshape(ids.shape[0], -1)
    index = (flat * VOCAB ** torch.arange(flat.shape[1] - 1, -1, -1)).sum(-1)
    return torch.bincount(index, minlength=VOCAB ** flat.shape[1]).double()


def chi2_pvalue(stat: float, dof: int) -> float:
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), torch.tensor(stat / 2)))


def goodness_of_fit(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Chi-square p-value of a histogram against exact probabilities; cells expected below 5
    are merged into one, as the approximation needs. A sample in an impossible cell gives 0."""
    expected = probs.double() * counts.sum()
    if bool((counts[expected == 0] > 0).any()):
        return 0.0
    small = (expected < 5) & (expected > 0)
    obs = torch.cat([counts[expected >= 5], counts[small].sum()[None]])
    exp = torch.cat([expected[expected >= 5], expected[small].sum()[None]])
    obs, exp = obs[exp > 0], exp[exp > 0]  # no small cells: drop the empty merged one
    return chi2_pvalue(float(((obs - exp) ** 2 / exp).sum()), len(obs) - 1)


def two_sample(a: torch.Tensor, b: torch.Tensor, probs: torch.Tensor) -> float:
    """Chi-square test of homogeneity: do two histograms come from one distribution?"""
    keep = probs.double() * a.sum() >= 5
    table = torch.stack([torch.cat([h[keep], h[~keep].sum()[None]]) for h in (a, b)])
    table = table[:, table.sum(0) > 0]
    exp = table.sum(1, keepdim=True) * table.sum(0, keepdim=True) / table.sum()
    return chi2_pvalue(float(((table - exp) ** 2 / exp).sum()), table.shape[1] - 1)


@pytest.mark.parametrize(("temperature", "top_k"), [(1.0, 0), (0.8, 2)])
def test_jacobi_sampling_keeps_the_sequential_distribution(one_thread, temperature, top_k):
    model = tiny_gpt(False, vocab=VOCAB, seed=2, std=0.5)
    probs = exact_joint(model, 2.0, temperature, top_k)
    prefix = condition_prefix(model, SAMPLES, class_ids=torch.tensor([1]), cfg=True)
    kw = dict(cfg_scale=2.0, temperature=temperature, top_k=top_k)
    stats = {}
    jacobi = histogram(
        generate(model, prefix, GRID, GRID, seed=10, decoding="jacobi", jacobi_window=3, stats=stats, **kw)
    )
    sequential = histogram(generate(model, prefix, GRID, GRID, seed=20_000, **kw))
    assert goodness_of_fit(jacobi, probs) > 1e-3
    assert goodness_of_fit(sequential, probs) > 1e-3
    assert two_sample(jacobi, sequential, probs) > 1e-3
    assert stats["forwards_per_image"] < 0.9 * GRID * GRID  # drafts were accepted: fewer forwards than tokens
    # the same test has the power to see a wrong distribution (another temperature)
    hotter = histogram(
        generate(model, prefix, GRID, GRID, seed=10, **dict(kw, temperature=temperature * 1.3))
    )
    assert goodness_of_fit(hotter, probs) < 1e-6


class _Context:
    device = torch.device("cpu")

    def progress(self, *args) -> None:
        pass


def test_ar_generate_tokens_node_offers_jacobi_decoding_and_per_image_seeds():
    import tessera.nodes.autoregressive as ar_nodes

    model = tiny_gpt(False, vocab=20)
    node = ar_nodes.ARGenerateTokens()
    kw = dict(
        model=model, class_id=1, width=3, height=3, cfg=2.0, guidance_schedule="constant", top_k=0, top_p=1.0
    )
    kw.update(preview_every=0)

    def ids(**extra):
        return node.execute(_Context(), **dict(kw, **extra))[0].ids

    greedy = dict(batch_size=1, temperature=0.0, seed=0)
    assert torch.equal(ids(**greedy, decoding="jacobi", jacobi_window=4), ids(**greedy))
    batch = ids(batch_size=2, temperature=1.0, seed=30)
    assert torch.equal(batch[1:], ids(batch_size=1, temperature=1.0, seed=31))
