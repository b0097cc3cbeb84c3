"""Diffusion nodes in workflows: generate with previews, chained single steps, img2img, inpainting, errors."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

import tessera.nodes.diffusion as dn
import tessera.nodes.image as image_nodes
from tessera.engines.conditioning import Conditioning
from tessera.engines.flux import Flux, FluxConfig, save_dit
from tessera.engines.latent import Latent
from tessera.engines.vae import AutoencoderKL, VAEConfig, save_vae
from tessera.executor import Executor
from tessera.node import Input, Node, NodeError, Output
from tessera.registry import NodeRegistry

CONTEXT, POOLED = 8, 6


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


class FakeTextEncode(Node):
    """Conditioning made from a prompt's characters (stands in for the real text encoder)."""

    category = "test"
    inputs = (Input("text", "STRING", default=""), Input("width", "INT", default=CONTEXT))
    outputs = (Output("conditioning", "CONDITIONING"),)

    def execute(self, ctx, text, width):
        return (fake_conditioning(text, width),)


def fake_conditioning(text: str, width: int = CONTEXT) -> Conditioning:
    g = torch.Generator().manual_seed(sum(ord(c) * (i + 1) for i, c in enumerate(text)))
    n = max(1, len(text.split()))
    return Conditioning(
        torch.randn(1, n, width, generator=g),
        torch.randn(1, POOLED, generator=g),
        torch.ones(1, n, dtype=torch.bool),
    )


def randomize(module: torch.nn.Module, std: float, seed: int) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, std)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    (root / "diffusion_models").mkdir()
    (root / "vae").mkdir()
    for name, guidance in (("tiny_dit.safetensors", False), ("tiny_dit_guided.safetensors", True)):
        dit = Flux(
            FluxConfig(
                in_channels=4,
                out_channels=4,
                hidden_size=32,
                num_heads=2,
                depth=1,
                depth_single=1,
                context_dim=CONTEXT,
                vec_dim=POOLED,
                axes_dim=(2, 6, 8),
                guidance_embed=guidance,
            )
        )
        randomize(dit, 0.1, 1)
        save_dit(dit, root / "diffusion_models" / name)
    vae = AutoencoderKL(
        VAEConfig(
            latent_channels=4,
            block_out_channels=(8, 16, 16),
            layers_per_block=1,
            norm_groups=4,
            scaling_factor=0.5,
            shift_factor=0.1,
        )
    )
    randomize(vae, 0.05, 2)
    save_vae(vae, root / "vae" / "tiny_vae.safetensors")
    (root / "diffusion_models" / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    return root


@pytest.fixture
def executor(tmp_path, models_dir):
    registry = NodeRegistry()
    registry.register_module(dn)
    registry.register_module(image_nodes)
    registry.register(FakeTextEncode)
    return Executor(registry, models_dir, tmp_path / "in", tmp_path / "out", "cpu")


def link(node, output):
    return {"node": node, "output": output}


def sampler_settings(**overrides) -> dict:
    settings = {
        "sampler": "dpmpp_2m",
        "schedule": "flux",
        "steps": 3,
        "cfg": 2.5,
        "guidance": 3.5,
        "seed": 7,
        "denoise": 1.0,
    }
    return {**settings, **overrides}


def base_nodes(model: str = "tiny_dit.safetensors") -> dict:
    return {
        "dit": {"type": "LoadDiffusionModel", "inputs": {"file": model}},
        "vae": {"type": "LoadVAE", "inputs": {"file": "tiny_vae.safetensors"}},
        "pos": {"type": "FakeTextEncode", "inputs": {"text": "a red cube"}},
        "neg": {"type": "FakeTextEncode", "inputs": {"text": "blurry"}},
        "empty": {
            "type": "EmptyLatent",
            "inputs": {"width": 32, "height": 24, "batch": 2, "channels": 4, "vae": link("vae", "vae")},
        },
    }


def sampler_workflow(seed: int = 7, model: str = "tiny_dit.safetensors") -> dict:
    nodes = base_nodes(model)
    nodes["sample"] = {
        "type": "DiTSampler",
        "inputs": {
            "model": link("dit", "model"),
            "positive": link("pos", "conditioning"),
            "negative": link("neg", "conditioning"),
            "latent": link("empty", "latent"),
            **sampler_settings(seed=seed),
        },
    }
    nodes["decode"] = {
        "type": "VAEDecode",
        "inputs": {"vae": link("vae", "vae"), "latent": link("sample", "latent")},
    }
    nodes["show"] = {"type": "PreviewImage", "inputs": {"images": link("decode", "image")}}
    return {"version": 1, "nodes": nodes}


def test_workflow_samples_with_progress_previews_and_decodes(executor):
    events = []
    result = executor.run(sampler_workflow(), "p", emit=lambda kind, data: events.append((kind, data)))
    assert result.status == "success", result.errors
    progress = [d["value"] for k, d in events if k == "progress" and d["node"] == "sample"]
    assert progress == [1, 2, 3]
    previews = [d["image"] for k, d in events if k == "preview" and d["node"] == "sample"]
    assert len(previews) == 3 and all(isinstance(p, Image.Image) and p.width >= 256 for p in previews)
    assert len(result.outputs["show"]["images"]) == 2

    again = executor.run(sampler_workflow(seed=8))
    assert sorted(again.executed) == ["decode", "sample", "show"]  # loaders, prompts and latent are cached


def test_chained_denoise_steps_reproduce_the_sampler_and_run_as_a_workflow(executor):
    nodes = base_nodes()
    previous = link("empty", "latent")
    for i in range(3):
        nodes[f"step{i}"] = {
            "type": "DiTDenoiseStep",
            "inputs": {
                "model": link("dit", "model"),
                "positive": link("pos", "conditioning"),
                "negative": link("neg", "conditioning"),
                "latent": previous,
                "step": i,
                **sampler_settings(),
            },
        }
        previous = link(f"step{i}", "latent")
    nodes["decode"] = {"type": "VAEDecode", "inputs": {"vae": link("vae", "vae"), "latent": previous}}
    nodes["show"] = {"type": "PreviewImage", "inputs": {"images": link("decode", "image")}}
    result = executor.run({"version": 1, "nodes": nodes})
    assert result.status == "success", result.errors

    ctx = executor.context("n")
    dit = dn.LoadDiffusionModel().execute(ctx, "tiny_dit.safetensors")[0]
    pos, neg = fake_conditioning("a red cube"), fake_conditioning("blurry")
    start = Latent(torch.zeros(2, 4, 6, 8))
    for sampler in ("euler", "heun", "dpmpp_2m", "euler_ancestral"):
        settings = sampler_settings(sampler=sampler, denoise=0.9)
        whole = dn.DiTSampler().execute(ctx, model=dit, positive=pos, negative=neg, latent=start, **settings)[
            0
        ]
        latent = start
        for i in range(3):
            latent = dn.DiTDenoiseStep().execute(
                ctx, model=dit, positive=pos, negative=neg, latent=latent, step=i, **settings
            )[0]
        assert torch.equal(latent.samples, whole.samples), sampler

    # A graph may switch the prompt part-way: the last step with another prompt changes the result.
    latent = start
    for i, prompt in enumerate(("a red cube", "a red cube", "a blue ball")):
        latent = dn.DiTDenoiseStep().execute(
            ctx,
            model=dit,
            positive=fake_conditioning(prompt),
            negative=neg,
            latent=latent,
            step=i,
            **sampler_settings(),
        )[0]
    whole = dn.DiTSampler().execute(
        ctx, model=dit, positive=pos, negative=neg, latent=start, **sampler_settings()
    )[0]
    assert not torch.allclose(latent.samples, whole.samples)


def test_img2img_and_inpainting_through_nodes(executor):
    ctx = executor.context("n")
    dit = dn.LoadDiffusionModel().execute(ctx, "tiny_dit_guided.safetensors")[0]
    vae = dn.LoadVAE().execute(ctx, "tiny_vae.safetensors")[0]
    image = torch.rand(1, 26, 33, 3)  # centre-cropped to 24x32
    source = dn.VAEEncode().execute(ctx, vae, image)[0]
    assert source.samples.shape == (1, 4, 6, 8) and source.rgb_projection.shape == (5, 3)
    pos = fake_conditioning("a cat")
    args = dict(model=dit, positive=pos, negative=None, **sampler_settings(cfg=1.0, sampler="euler"))

    light = dn.DiTSampler().execute(ctx, latent=source, **{**args, "denoise": 0.2})[0]
    full = dn.DiTSampler().execute(ctx, latent=source, **args)[0]
    assert (light.samples - source.samples).norm() < (full.samples - source.samples).norm()

    mask = torch.zeros(1, 24, 32)
    mask[:, :12] = 1.0
    masked = dn.SetLatentMask().execute(ctx, source, mask)[0]
    assert masked.noise_mask.shape == (1, 1, 6, 8)
    out = dn.DiTSampler().execute(ctx, latent=masked, **args)[0]
    assert torch.equal(out.samples[..., 3:, :], source.samples[..., 3:, :])
    assert not torch.allclose(out.samples[..., :3, :], source.samples[..., :3, :])

    decoded = dn.VAEDecode().execute(ctx, vae, out, 0)[0]
    tiled = dn.VAEDecode().execute(ctx, vae, out, 16)[0]
    assert decoded.shape == tiled.shape == (1, 24, 32, 3)
    assert 0 <= decoded.min() and decoded.max() <= 1


def test_tiled_decode_tiles_by_tile_size_and_stays_close_to_the_untiled_decode(executor, monkeypatch):
    """The shipped f8 VAE (trained weights: random ones decode to near-flat images): tile_size
    sets the tiles decode sees; the blend stays within 0.05 mean / 0.6 max of the untiled
    image at 64-px tiles, and larger tiles come closer."""
    from pathlib import Path

    from tessera.engines.vae import load_vae

    vae = load_vae(Path(__file__).resolve().parents[1] / "models" / "vae" / "tessera-vae-f8.safetensors")
    g = torch.Generator().manual_seed(0)
    blocks = torch.rand(1, 3, 12, 16, generator=g) * 2 - 1
    with torch.no_grad():
        latent = Latent(vae.encode(torch.nn.functional.interpolate(blocks, size=(96, 128), mode="nearest")))
    seen: list[tuple] = []
    decode = vae.decode
    monkeypatch.setattr(vae, "decode", lambda z: seen.append(tuple(z.shape[-2:])) or decode(z))
    ctx = executor.context("n")

    def run(tile_size):
        seen.clear()
        image = dn.VAEDecode().execute(ctx, vae, latent, tile_size)[0]
        return image, list(seen)

    full, full_tiles = run(0)
    assert full_tiles == [(12, 16)]
    errors = {}
    for tile_size in (32, 64):
        tiled, tiles = run(tile_size)
        side = tile_size // 8
        assert len(tiles) > 1 and all(h <= side and w <= side for h, w in tiles)
        assert max(max(t) for t in tiles) == side  # the tiles are as large as asked
        assert tiled.shape == full.shape
        errors[tile_size] = (tiled - full).abs()
    assert len(run(32)[1]) > len(run(64)[1])  # a different tile size is a different tiling
    assert errors[64].mean() < 0.05 and errors[64].max() < 0.6
    assert errors[64].mean() < errors[32].mean()
    assert errors[64].mean() > 0  # tiles really were decoded apart


def test_empty_latent_takes_channels_and_scale_from_a_vae(executor):
    ctx = executor.context("n")
    vae = dn.LoadVAE().execute(ctx, "tiny_vae.safetensors", "sd3")[0]
    assert vae.config.scaling_factor == 1.5305
    plain = dn.EmptyLatent().execute(ctx, 64, 48, 3, 16)[0]
    assert plain.samples.shape == (3, 16, 6, 8) and plain.rgb_projection is None
    from_vae = dn.EmptyLatent().execute(ctx, 64, 48, 1, 16, vae)[0]
    assert from_vae.samples.shape == (1, 4, 12, 16) and from_vae.rgb_projection is not None


def test_node_errors_name_the_node_the_input_and_the_mismatch(executor):
    ctx = executor.context("n")
    dit = dn.LoadDiffusionModel().execute(ctx, "tiny_dit.safetensors")[0]
    latent = Latent(torch.zeros(1, 4, 4, 4))
    args = dict(model=dit, latent=latent, **sampler_settings(cfg=1.0))
    with pytest.raises(NodeError, match=r"DiTSampler positive: .* 12 wide .* expects 8") as e:
        dn.DiTSampler().execute(ctx, positive=fake_conditioning("x", width=12), **args)
    assert e.value.input == "positive"
    with pytest.raises(NodeError, match=r"cfg 3.0 needs a negative") as e:
        dn.DiTSampler().execute(ctx, positive=fake_conditioning("x"), **{**args, "cfg": 3.0})
    assert e.value.input == "negative"
    with pytest.raises(NodeError, match=r"latent has 16 channels but the DiT takes 4") as e:
        dn.DiTSampler().execute(
            ctx, positive=fake_conditioning("x"), **{**args, "latent": Latent(torch.zeros(1, 16, 4, 4))}
        )
    with pytest.raises(NodeError, match=r"step 3 is past the last step") as e:
        dn.DiTDenoiseStep().execute(ctx, positive=fake_conditioning("x"), step=3, **args)
    assert e.value.input == "step"

    result = executor.run(sampler_workflow(model="broken.safetensors"))
    assert result.status == "error"
    err = result.errors[0]
    assert err["node"] == "dit" and err["input"] == "file" and "broken.safetensors" in err["message"]


def test_interrupt_stops_sampling_between_steps(executor):
    seen = {"n": 0}

    def emit(kind, data):
        if kind == "progress" and data["node"] == "sample":
            seen["n"] += 1

    result = executor.run(sampler_workflow(seed=99), "p", emit=emit, is_interrupted=lambda: seen["n"] >= 2)
    assert result.status == "interrupted"
    assert seen["n"] == 2
