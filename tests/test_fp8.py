"""fp8 weight storage: Linear weights in e4m3fn, upcast per layer, same result as the rounded weights."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file

from tessera.engines import fp8
from tessera.engines.checkpoint import CheckpointError, read_safetensors
from tessera.engines.flux import Flux, FluxConfig, save_dit
from tessera.node import ExecutionContext, NodeError
from tessera.nodes.diffusion import LoadDiffusionModel


def tiny_flux(seed: int = 0) -> Flux:
    torch.manual_seed(seed)
    cfg = FluxConfig(
        in_channels=4,
        out_channels=4,
        hidden_size=32,
        num_heads=2,
        depth=1,
        depth_single=1,
        context_dim=24,
        vec_dim=8,
        axes_dim=(2, 6, 8),
        guidance_embed=False,
    )
    model = Flux(cfg).eval().requires_grad_(False)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


def inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(1, 4, 8, 8, generator=g),
        torch.tensor([0.7]),
        torch.randn(1, 5, 24, generator=g),
        torch.randn(1, 8, generator=g),
    )


def rounded_reference(model: Flux) -> Flux:
    """The same network in fp32 with each Linear weight rounded through e4m3fn, stored at full width."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, m in ref.named_modules():
            if isinstance(m, torch.nn.Linear) and "img_in" not in name.split("."):
                m.weight.copy_(fp8.to_fp8(m.weight).float())
    return ref


def test_fp8_model_equals_rounded_weights_and_stores_a_quarter():
    model = tiny_flux()
    ref = rounded_reference(model)
    full = fp8.weight_bytes(model)
    fp8.store_fp8(model, torch.float32)
    linear = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    stored = [m for m in linear if m.weight.dtype == torch.float8_e4m3fn]
    assert len(stored) == len(linear) - 1  # all but the dtype anchor img_in
    assert model.img_in.weight.dtype == torch.float32 and model.dtype == torch.float32
    assert all(m.bias is None or m.bias.dtype == torch.float32 for m in stored)
    linear_fp32 = sum(m.weight.numel() * 4 for m in stored)
    assert fp8.weight_bytes(model) == full - linear_fp32 * 3 // 4
    with torch.no_grad():
        out, expected = model(*inputs()), ref(*inputs())
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    with torch.no_grad():  # and it is a real approximation of the unrounded network
        exact = tiny_flux()(*inputs())
    assert 0 < (out - exact).norm() / exact.norm() < 0.2  # e4m3 keeps 3 mantissa bits


def test_quantising_clamps_to_the_finite_range():
    q = fp8.to_fp8(torch.tensor([1e6, -1e6, 1.0]))
    assert torch.isfinite(q.float()).all() and q.float().tolist() == [448.0, -448.0, 1.0]


def test_fp8_input_is_upcast_not_used_as_compute_dtype():
    layer = fp8.store_fp8(torch.nn.Sequential(torch.nn.Linear(4, 3)), torch.float32, keep=())[0]
    x = torch.randn(2, 4)
    out = layer(x.to(torch.float8_e4m3fn))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, layer(x.to(torch.float8_e4m3fn).float()))


def ctx(models_dir):
    return ExecutionContext(torch.device("cpu"), torch.float32, models_dir, models_dir, models_dir)


@pytest.fixture
def models_dir(tmp_path):
    (tmp_path / "diffusion_models").mkdir()
    model = tiny_flux()
    save_dit(model, tmp_path / "diffusion_models" / "dit.safetensors")
    # A ComfyUI-style fp8 file: the same tensors with every matrix already in e4m3fn.
    sd = {k: (fp8.to_fp8(v) if v.ndim == 2 else v) for k, v in model.state_dict().items()}
    save_file(sd, tmp_path / "diffusion_models" / "dit_fp8_e4m3fn.safetensors")
    return tmp_path


def test_loader_stores_fp8_from_a_full_file_and_from_an_fp8_file(models_dir):
    node = LoadDiffusionModel()
    (a,) = node.execute(ctx(models_dir), "dit.safetensors", "fp8_e4m3fn")
    (b,) = node.execute(ctx(models_dir), "dit_fp8_e4m3fn.safetensors", "fp8_e4m3fn")
    assert a.double_blocks[0].img_attn.qkv.weight.dtype == torch.float8_e4m3fn
    assert a.txt_in.weight.dtype == torch.float8_e4m3fn and a.img_in.weight.dtype == torch.float32
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert va.dtype == vb.dtype, k
    # The fp8 file also rounded img_in, which the loader then upcasts: round a's the same way.
    a.img_in.weight.data = fp8.to_fp8(a.img_in.weight).float()
    with torch.no_grad():
        torch.testing.assert_close(a(*inputs()), b(*inputs()), rtol=1e-6, atol=1e-6)
    (c,) = node.execute(ctx(models_dir), "dit_fp8_e4m3fn.safetensors", "default")  # upcast at load
    assert all(p.dtype == torch.float32 for p in c.parameters())


def test_fp8_on_a_torch_without_fp8_names_the_input(models_dir, monkeypatch):
    monkeypatch.setattr(fp8, "fp8_available", lambda: False)
    with pytest.raises(NodeError, match=r"torch\.float8_e4m3fn, which torch .* does not have") as err:
        LoadDiffusionModel().execute(ctx(models_dir), "dit.safetensors", "fp8_e4m3fn")
    assert err.value.input == "weight_dtype"
    with pytest.raises(fp8.Fp8Unavailable):
        fp8.store_fp8(tiny_flux(), torch.float32)


def test_an_fp8_file_on_a_torch_without_fp8_names_the_file_and_key(models_dir, monkeypatch):
    monkeypatch.setattr(fp8, "fp8_available", lambda: False)
    with pytest.raises(
        CheckpointError, match=r"dit_fp8_e4m3fn\.safetensors, key '.+': stores F8_E4M3 \(fp8\)"
    ):
        read_safetensors(models_dir / "diffusion_models" / "dit_fp8_e4m3fn.safetensors")
    with pytest.raises(NodeError, match=r"dit_fp8_e4m3fn\.safetensors, key .*torch .* cannot read") as err:
        LoadDiffusionModel().execute(ctx(models_dir), "dit_fp8_e4m3fn.safetensors", "default")
    assert err.value.input == "file"
    (model,) = LoadDiffusionModel().execute(ctx(models_dir), "dit.safetensors", "default")  # no fp8 in it
    assert model.img_in.weight.dtype == torch.float32
