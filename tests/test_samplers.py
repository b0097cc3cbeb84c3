"""Samplers, schedules, attention and the denoising loop on problems whose answers are known.

The data distribution is a Gaussian N(μ, diag(s²)), whose rectified-flow velocity is exact:
with m(t) = (1−t)μ and V(t) = (1−t)²s² + t², v(x, t) = V'(t)/(2V(t))·(x − m(t)) − μ. Its ODE
keeps each coordinate's z-score, so noise ε lands exactly on μ + s·ε at t = 0.
"""

from __future__ import annotations

import math

import pytest
import torch

from tessera.engines.attention import attention, attention_backend_name, set_attention_backend
from tessera.engines.conditioning import Conditioning
from tessera.engines.flux import Flux, FluxConfig, guided_velocity
from tessera.engines.latent import Latent, StepNoise, denoise, seeded_noise
from tessera.engines.samplers import DETERMINISTIC_SAMPLERS, SAMPLERS
from tessera.engines.schedules import (
    SCHEDULES,
    beta_ppf,
    flux_mu,
    sigmas_for,
    static_shift,
    time_shift,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


DIM = 16
_g = torch.Generator().manual_seed(0)
MU = 0.5 * torch.randn(DIM, generator=_g)
S = 0.3 + 1.5 * torch.rand(DIM, generator=_g)


def gaussian_velocity(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    t = sigma.double().view(-1, *([1] * (x.ndim - 1)))
    mu, s = MU.double(), S.double()
    m, var = (1 - t) * mu, (1 - t) ** 2 * s**2 + t**2
    dvar = -2 * (1 - t) * s**2 + 2 * t
    return (dvar / (2 * var) * (x.double() - m) - mu).float()


def observed_orders(sampler: str, schedule: str, steps=(16, 32, 64, 128)) -> list[float]:
    noise = torch.randn(64, DIM, generator=torch.Generator().manual_seed(1))
    exact = MU + S * noise
    errors = []
    for n in steps:
        out = SAMPLERS[sampler](gaussian_velocity, noise, SCHEDULES[schedule](n, 4096))
        errors.append((out - exact).abs().max().item())
    return [math.log2(a / b) for a, b in zip(errors, errors[1:])]


@pytest.mark.parametrize(
    ("sampler", "schedule", "order"),
    [
        ("euler", "linear", 1.0),
        ("heun", "linear", 2.0),
        ("heun", "flux", 2.0),
        # DPM++ works in log-SNR, whose steps near σ = 1 do not shrink on a uniform t grid; the beta
        # schedule is dense at both ends and shows the method's order cleanly.
        ("dpmpp_2m", "beta", 2.0),
    ],
)
def test_deterministic_samplers_converge_at_their_order(sampler, schedule, order):
    orders = observed_orders(sampler, schedule)
    assert abs(orders[-1] - order) < 0.25, orders


def test_dpmpp_2m_is_better_than_first_order_on_a_uniform_grid():
    assert min(observed_orders("dpmpp_2m", "linear")) > 1.4


def test_euler_ancestral_converges_in_distribution():
    def moments_error(steps: int) -> tuple[float, float]:
        x = torch.randn(20_000, DIM, generator=torch.Generator().manual_seed(2))
        out = SAMPLERS["euler_ancestral"](
            gaussian_velocity, x, SCHEDULES["linear"](steps, 4096), generator=torch.Generator().manual_seed(3)
        )
        return (out.mean(0) - MU).abs().max().item(), (out.std(0) / S - 1).abs().max().item()

    mean_coarse, std_coarse = moments_error(8)
    mean_fine, std_fine = moments_error(64)
    assert mean_fine < 0.06 and std_fine < 0.1
    assert std_fine < std_coarse / 3  # the discretisation bias shrinks with the step size


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_one_step_at_a_time_with_state_equals_one_call(sampler):
    x = torch.randn(4, DIM, generator=torch.Generator().manual_seed(4))
    sigmas = SCHEDULES["flux"](7, 1024)
    whole = SAMPLERS[sampler](gaussian_velocity, x, sigmas, generator=StepNoise(9))
    state: dict = {}
    stepped = x
    for i in range(7):
        state["step"] = i
        stepped = SAMPLERS[sampler](
            gaussian_velocity, stepped, sigmas[i : i + 2], generator=StepNoise(9), state=state
        )
    assert torch.equal(whole, stepped)


def test_callback_reports_every_step_with_the_clean_estimate():
    seen = []
    x = torch.randn(2, DIM)
    SAMPLERS["heun"](gaussian_velocity, x, SCHEDULES["linear"](5, 4096), callback=seen.append)
    assert [s["i"] for s in seen] == [0, 1, 2, 3, 4] and all(s["total"] == 5 for s in seen)
    assert torch.allclose(seen[0]["denoised"], MU.expand(2, -1), atol=1e-5)  # at σ=1 the estimate is E[x₀]


# ---------------------------------------------------------------- schedules


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_schedules_descend_from_at_most_one_to_zero(name):
    sigmas = SCHEDULES[name](10, 4096)
    assert sigmas.shape == (11,) and sigmas.dtype == torch.float32
    assert sigmas[0] == 1.0 and sigmas[-1] == 0.0
    assert (sigmas[1:] < sigmas[:-1]).all()


def test_shifts_follow_their_formulas():
    t = torch.linspace(0, 1, 11)
    assert torch.allclose(static_shift(3.0, t), time_shift(math.log(3.0), t), atol=1e-6)
    assert flux_mu(256) == pytest.approx(0.5) and flux_mu(4096) == pytest.approx(1.15)
    low, high = SCHEDULES["flux"](20, 256), SCHEDULES["flux"](20, 4096)
    assert (high[1:-1] > low[1:-1]).all()  # bigger images spend more steps at high noise


def test_beta_quantiles_match_closed_forms():
    for q in (0.1, 0.37, 0.9):
        assert beta_ppf(q, 1.0, 1.0) == pytest.approx(q, abs=1e-9)
        assert beta_ppf(q, 2.0, 1.0) == pytest.approx(math.sqrt(q), abs=1e-9)  # CDF x²
        assert beta_ppf(q, 1.0, 3.0) == pytest.approx(1 - (1 - q) ** (1 / 3), abs=1e-9)  # CDF 1-(1-x)³
    assert beta_ppf(0.5, 0.6, 0.6) == pytest.approx(0.5, abs=1e-9)


def test_partial_denoise_walks_the_tail_of_a_longer_schedule():
    tail = sigmas_for("linear", 10, denoise=0.5)
    assert tail.shape == (11,) and torch.allclose(tail, SCHEDULES["linear"](20, 4096)[10:])
    assert tail[0] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="unknown schedule"):
        sigmas_for("cosine", 10)


# ---------------------------------------------------------------- attention


def test_attention_backend_is_sdpa_without_cuda_and_matches_the_formula():
    assert attention_backend_name() == "sdpa"
    assert set_attention_backend("auto") == "sdpa"
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 3, 7, 8, generator=g) for _ in range(3))
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), dim=-1)
    assert torch.allclose(attention(q, k, v), weights @ v, atol=1e-5)
    keep = torch.tensor([[True] * 5 + [False] * 2, [True] * 7])
    masked = attention(q, k, v, keep)
    assert torch.allclose(masked[0], attention(q[:1], k[:1, :, :5], v[:1, :, :5])[0], atol=1e-5)


# ---------------------------------------------------------------- the denoising loop


def latent_velocity(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The Gaussian problem over [B, C, h, w] latents (each pixel one draw, channel = dimension)."""
    flat = x.permute(0, 2, 3, 1).reshape(-1, DIM)
    v = gaussian_velocity(flat, sigma.repeat_interleave(x.shape[2] * x.shape[3]))
    return v.reshape(x.shape[0], x.shape[2], x.shape[3], DIM).permute(0, 3, 1, 2)


def test_noise_of_an_item_depends_only_on_its_seed():
    batch = seeded_noise(100, (3, 4, 5, 5))
    assert torch.equal(batch[2], seeded_noise(102, (1, 4, 5, 5))[0])
    assert not torch.equal(batch[0], batch[1])
    step = StepNoise(100)(batch, 7)
    assert torch.equal(step[1], StepNoise(101)(batch[:1], 7)[0])
    assert not torch.equal(step, StepNoise(100)(batch, 8))


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_denoising_in_single_steps_reproduces_the_whole_run(sampler):
    latent = Latent(torch.randn(2, DIM, 3, 3))
    sigmas = sigmas_for("flux", 6, denoise=0.8, image_seq_len=9)
    whole = denoise(latent_velocity, latent, sampler=sampler, sigmas=sigmas, seed=11)
    assert whole.run is None
    chained = latent
    for i in range(6):
        chained = denoise(
            latent_velocity, chained, sampler=sampler, sigmas=sigmas, seed=11, start=i, stop=i + 1
        )
        assert (chained.run is None) == (i == 5)
    assert torch.equal(chained.samples, whole.samples)


def test_img2img_starts_from_the_source_noised_to_the_first_sigma():
    source = torch.randn(1, DIM, 2, 2)
    sigmas = sigmas_for("linear", 4, denoise=0.25)
    seen = []

    def recording(x, sigma):
        seen.append((x.clone(), sigma.clone()))
        return latent_velocity(x, sigma)

    denoise(recording, Latent(source), sampler="euler", sigmas=sigmas, seed=5)
    first_x, first_sigma = seen[0]
    assert first_sigma.item() == pytest.approx(0.25)
    assert torch.allclose(first_x, 0.75 * source + 0.25 * seeded_noise(5, tuple(source.shape)), atol=1e-6)


def test_inpainting_keeps_the_unmasked_region_renoised_each_step_and_exact_at_the_end():
    source = torch.randn(1, DIM, 4, 4)
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2, :] = 1.0  # regenerate the top half
    sigmas = sigmas_for("linear", 5)
    noise = seeded_noise(8, tuple(source.shape))
    seen = []

    def recording(x, sigma):
        seen.append((x.clone(), sigma.item()))
        return latent_velocity(x, sigma)

    out = denoise(recording, Latent(source, mask), sampler="dpmpp_2m", sigmas=sigmas, seed=8)
    for x, sigma in seen:
        kept = (1 - sigma) * source + sigma * noise
        assert torch.allclose(x[..., 2:, :], kept[..., 2:, :], atol=1e-5)
    assert torch.equal(out.samples[..., 2:, :], source[..., 2:, :])
    assert not torch.allclose(out.samples[..., :2, :], source[..., :2, :], atol=1e-2)
    assert torch.equal(out.noise_mask, mask)


def tiny_dit() -> Flux:
    torch.manual_seed(0)
    cfg = FluxConfig(
        in_channels=4,
        out_channels=4,
        hidden_size=32,
        num_heads=2,
        depth=1,
        depth_single=1,
        context_dim=8,
        vec_dim=6,
        axes_dim=(2, 6, 8),
        guidance_embed=False,
    )
    model = Flux(cfg).eval().requires_grad_(False)
    for p in model.parameters():
        p.data.normal_(0, 0.1)
    return model


def test_same_seed_same_image_and_batch_items_match_single_runs():
    model = tiny_dit()
    g = torch.Generator().manual_seed(1)
    pos = Conditioning(
        torch.randn(1, 5, 8, generator=g), torch.randn(1, 6, generator=g), torch.ones(1, 5, dtype=torch.bool)
    )
    neg = Conditioning(
        torch.randn(1, 2, 8, generator=g), torch.randn(1, 6, generator=g), torch.ones(1, 2, dtype=torch.bool)
    )
    velocity = guided_velocity(model, pos, neg, cfg=3.0)
    sigmas = sigmas_for("flux", 4, image_seq_len=16)

    def run(batch: int, seed: int, sampler: str = "euler_ancestral") -> torch.Tensor:
        return denoise(
            velocity, Latent(torch.zeros(batch, 4, 8, 8)), sampler=sampler, sigmas=sigmas, seed=seed
        ).samples

    a, b = run(2, 40), run(2, 40)
    assert torch.equal(a, b)
    assert not torch.allclose(run(1, 41), run(1, 42))
    assert torch.allclose(a[1:], run(1, 41), atol=1e-5)  # item 1 of seed 40 is seed 41 alone
    assert torch.allclose(a[:1], run(1, 40), atol=1e-5)
    for sampler in DETERMINISTIC_SAMPLERS:
        assert torch.equal(run(1, 7, sampler), run(1, 7, sampler))
