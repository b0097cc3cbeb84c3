"""First-Block step cache: threshold 0 is the uncached computation bit for bit; above it, steps reuse."""

from __future__ import annotations

import pytest
import torch

import tessera.nodes.diffusion as diffusion_nodes
from tessera.engines.conditioning import Conditioning
from tessera.engines.flux import Flux, FluxConfig, guided_velocity
from tessera.engines.latent import Latent, denoise
from tessera.engines.schedules import sigmas_for
from tessera.engines.step_cache import StepCache, psnr

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_dit(depth: int = 2) -> Flux:
    torch.manual_seed(0)
    cfg = FluxConfig(
        in_channels=4,
        out_channels=4,
        hidden_size=32,
        num_heads=2,
        depth=depth,
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


def conds() -> tuple[Conditioning, Conditioning]:
    g = torch.Generator().manual_seed(1)
    pos = Conditioning(
        torch.randn(1, 5, 8, generator=g), torch.randn(1, 6, generator=g), torch.ones(1, 5, dtype=torch.bool)
    )
    neg = Conditioning(
        torch.randn(1, 3, 8, generator=g), torch.randn(1, 6, generator=g), torch.ones(1, 3, dtype=torch.bool)
    )
    return pos, neg


def run(model: Flux, cache: StepCache | None, steps: int = 12, sampler: str = "euler") -> torch.Tensor:
    pos, neg = conds()
    velocity = guided_velocity(model, pos, neg, cfg=3.0, step_cache=cache)
    sigmas = sigmas_for("flux", steps, image_seq_len=16)
    return denoise(velocity, Latent(torch.zeros(2, 4, 8, 8)), sampler=sampler, sigmas=sigmas, seed=5).samples


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_threshold_zero_gives_exactly_the_uncached_output(sampler):
    model = tiny_dit()
    cache = StepCache(0.0)
    assert torch.equal(run(model, cache, sampler=sampler), run(model, None, sampler=sampler))
    assert cache.hits == 0


def test_a_repeated_input_reuses_the_deeper_blocks_and_gives_the_same_output():
    model = tiny_dit()
    g = torch.Generator().manual_seed(2)
    x, ctx, pooled = (
        torch.randn(1, 4, 8, 8, generator=g),
        torch.randn(1, 5, 8, generator=g),
        torch.randn(1, 6, generator=g),
    )
    t = torch.tensor([0.7])
    cache = StepCache(0.05)
    full = model(x, t, ctx, pooled, step_cache=cache)
    again = model(x, t, ctx, pooled, step_cache=cache)
    assert (cache.calls, cache.hits) == (2, 1)
    torch.testing.assert_close(again, full, atol=1e-6, rtol=0)
    # a clearly different input is computed in full again
    model(x, torch.tensor([0.1]), ctx * 3, pooled, step_cache=cache)
    assert (cache.calls, cache.hits) == (3, 1)


def test_higher_thresholds_reuse_more_steps_and_drift_further():
    model = tiny_dit()
    exact = run(model, None, steps=16)
    results = {}
    for threshold in (0.05, 0.3, 1e9):
        cache = StepCache(threshold)
        out = run(model, cache, steps=16)
        results[threshold] = (cache.hits, psnr(out, exact, peak=float(exact.abs().max()) * 2))
    hits = [h for h, _ in results.values()]
    quality = [q for _, q in results.values()]
    assert hits == sorted(hits) and hits[0] < hits[-1]
    assert hits[-1] == 15  # reuse everywhere after the first step
    assert quality[0] > quality[-1]


def test_a_controlnet_step_is_never_cached():
    model = tiny_dit()
    g = torch.Generator().manual_seed(3)
    img, txt = torch.randn(1, 16, 16, generator=g), torch.randn(1, 5, 8, generator=g)
    ids, txt_ids = torch.zeros(16, 3), torch.zeros(5, 3)
    cache = StepCache(1e9)
    args = (img, ids, txt, txt_ids, torch.tensor([0.5]), torch.randn(1, 6, generator=g))
    for _ in range(2):
        model.forward_tokens(*args, controlnet_double=[torch.zeros(1, 16, 32), None], step_cache=cache)
    assert cache.calls == 0
    with pytest.raises(ValueError, match=">= 0"):
        StepCache(-0.1)


class _Context:
    def progress(self, *args) -> None:
        pass


def test_dit_sampler_node_exposes_the_threshold():
    model = tiny_dit()
    pos, neg = conds()
    node = diffusion_nodes.DiTSampler()
    kw = dict(
        model=model,
        positive=pos,
        negative=neg,
        latent=Latent(torch.zeros(1, 4, 8, 8)),
        sampler="euler",
        schedule="flux",
        steps=10,
        cfg=3.0,
        guidance=3.5,
        seed=1,
        denoise=1.0,
    )
    default = node.execute(_Context(), **kw)[0].samples
    assert torch.equal(node.execute(_Context(), **kw, step_cache=0.0)[0].samples, default)
    assert not torch.equal(node.execute(_Context(), **kw, step_cache=1.0)[0].samples, default)
