"""Adapter nodes in workflows: a LoRA'd model is a new value (the cached base stays as it was, other
branches keep using it, a strength change re-runs only what follows), ControlNet steers the sampler,
preprocessors draw edges and scribbles, masks pick AR tokens to regenerate, errors name the input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import tessera.nodes.adapters as adapter_nodes
import tessera.nodes.autoregressive as ar_nodes
import tessera.nodes.diffusion as dn
import tessera.nodes.image as image_nodes
from tessera.engines.checkpoint import read_safetensors
from tessera.engines.conditioning import Conditioning
from tessera.engines.controlnet import controlnet_from_dit, save_controlnet
from tessera.engines.flux import Flux, FluxConfig, save_dit
from tessera.engines.gpt import GPT, GPTConfig, gpt_config_metadata
from tessera.engines.preprocess import canny, luma
from tessera.engines.tokens import TokenGrid
from tessera.engines.vae import AutoencoderKL, VAEConfig, save_vae
from tessera.executor import Executor
from tessera.node import Input, Node, Output
from tessera.registry import NodeRegistry

CONTEXT, POOLED = 8, 6
CAPTURED: dict[str, object] = {}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


class FakeTextEncode(Node):
    """Conditioning made from a prompt's characters."""

    inputs = (Input("text", "STRING", default=""),)
    outputs = (Output("conditioning", "CONDITIONING"),)

    def execute(self, ctx, text):
        g = torch.Generator().manual_seed(sum(ord(c) * (i + 1) for i, c in enumerate(text)))
        return (
            Conditioning(
                torch.randn(1, 3, CONTEXT, generator=g),
                torch.randn(1, POOLED, generator=g),
                torch.ones(1, 3, dtype=torch.bool),
            ),
        )


class Capture(Node):
    """Keep any value for the test to look at."""

    is_output = True
    inputs = (Input("value", "LATENT", link="link"), Input("name", "STRING", default="x"))

    def execute(self, ctx, value, name):
        CAPTURED[name] = value
        return ()


class CaptureModel(Node):
    """Keep a DiT for the test to look at."""

    is_output = True
    inputs = (Input("model", "DIT_MODEL"), Input("name", "STRING", default="m"))

    def execute(self, ctx, model, name):
        CAPTURED[name] = model
        return ()


class CaptureTokens(Node):
    """Keep a token grid for the test to look at."""

    is_output = True
    inputs = (Input("tokens", "TOKENS"), Input("name", "STRING", default="t"))

    def execute(self, ctx, tokens, name):
        CAPTURED[name] = tokens
        return ()


def randomize(module: torch.nn.Module, std: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


DIT = FluxConfig(
    in_channels=4,
    out_channels=4,
    hidden_size=32,
    num_heads=2,
    depth=2,
    depth_single=1,
    context_dim=CONTEXT,
    vec_dim=POOLED,
    axes_dim=(2, 6, 8),
    guidance_embed=False,
)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    for folder in ("diffusion_models", "vae", "loras", "controlnet", "ar_models"):
        (root / folder).mkdir()
    dit = Flux(DIT)
    randomize(dit, 0.1, 1)
    save_dit(dit, root / "diffusion_models" / "tiny_dit.safetensors")
    vae = AutoencoderKL(
        VAEConfig(
            latent_channels=4,
            block_out_channels=(8, 16),
            layers_per_block=1,
            norm_groups=4,
            scaling_factor=0.5,
            shift_factor=0.1,
        )
    )
    randomize(vae, 0.05, 2)
    save_vae(vae, root / "vae" / "tiny_vae.safetensors")
    g = torch.Generator().manual_seed(3)
    save_file(
        {
            "lora_unet_double_blocks_1_img_attn_qkv.lora_down.weight": torch.randn(4, 32, generator=g),
            "lora_unet_double_blocks_1_img_attn_qkv.lora_up.weight": torch.randn(96, 4, generator=g) * 0.5,
            "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.randn(4, 8, generator=g),
        },
        str(root / "loras" / "dit_lora.safetensors"),
    )
    save_file(
        {
            "layers.0.attention.wo.lora_A.weight": torch.randn(4, 32, generator=g),
            "layers.0.attention.wo.lora_B.weight": torch.randn(32, 4, generator=g),
        },
        str(root / "loras" / "gpt_lora.safetensors"),
    )
    net = controlnet_from_dit(dit, depth=1, depth_single=1)
    save_controlnet(net, root / "controlnet" / "zero_cn.safetensors")  # zero heads: no effect yet
    randomize(net, 0.2, 4)
    save_controlnet(net, root / "controlnet" / "cn.safetensors")
    cfg = GPTConfig(dim=32, n_layer=2, n_head=4, n_kv_head=4, ffn_hidden=64, vocab_size=24, num_classes=3)
    gpt = GPT(cfg)
    randomize(gpt, 0.3, 5)
    save_file(
        gpt.state_dict(), str(root / "ar_models" / "tiny_gpt.safetensors"), metadata=gpt_config_metadata(cfg)
    )
    return root


@pytest.fixture
def executor(tmp_path, models_dir):
    registry = NodeRegistry()
    for module in (dn, image_nodes, ar_nodes, adapter_nodes):
        registry.register_module(module)
    for node in (FakeTextEncode, Capture, CaptureModel, CaptureTokens):
        registry.register(node)
    (tmp_path / "in").mkdir()
    return Executor(registry, models_dir, tmp_path / "in", tmp_path / "out", "cpu")


def link(node, output):
    return {"node": node, "output": output}


def sampler(model: str, name: str) -> dict:
    return {
        f"sample_{name}": {
            "type": "DiTSampler",
            "inputs": {
                "model": link(model, "model"),
                "positive": link("text", "conditioning"),
                "latent": link("empty", "latent"),
                "sampler": "euler",
                "schedule": "flux",
                "steps": 2,
                "cfg": 1.0,
                "guidance": 3.5,
                "seed": 3,
                "denoise": 1.0,
            },
        },
        f"keep_{name}": {
            "type": "Capture",
            "inputs": {"value": link(f"sample_{name}", "latent"), "name": name},
        },
    }


def lora_workflow(strength: float) -> dict:
    return {
        "version": 1,
        "nodes": {
            "dit": {"type": "LoadDiffusionModel", "inputs": {"file": "tiny_dit.safetensors"}},
            "lora": {
                "type": "LoadLoRA",
                "inputs": {
                    "model": link("dit", "model"),
                    "file": "dit_lora.safetensors",
                    "strength": strength,
                },
            },
            "text": {"type": "FakeTextEncode", "inputs": {"text": "a red square"}},
            "empty": {"type": "EmptyLatent", "inputs": {"width": 32, "height": 32, "channels": 4}},
            **sampler("dit", "base"),
            **sampler("lora", "lora"),
            "base_model": {
                "type": "CaptureModel",
                "inputs": {"model": link("dit", "model"), "name": "base_model"},
            },
        },
    }


def test_lora_node_makes_a_new_model_and_a_strength_change_reruns_only_what_follows(executor):
    first = executor.run(lora_workflow(1.0))
    assert first.status == "success", first.errors
    assert "1 keys not applied" in first.outputs["lora"]["text"][0]
    base, with_lora = CAPTURED["base"].samples, CAPTURED["lora"].samples
    model = CAPTURED["base_model"]
    assert not torch.allclose(base, with_lora)

    second = executor.run(lora_workflow(0.0))
    assert second.status == "success", second.errors
    assert set(second.executed) == {"lora", "sample_lora", "keep_lora"}
    assert {"dit", "text", "empty", "sample_base", "keep_base", "base_model"} <= set(second.cached)
    assert torch.equal(CAPTURED["lora"].samples, base)  # strength 0 = the base model
    on_disk = read_safetensors(executor.models_dir / "diffusion_models" / "tiny_dit.safetensors")[0]
    for k, v in model.state_dict().items():  # the cached base object was never patched
        assert torch.equal(v, on_disk[k]), k


def test_lora_file_matching_nothing_is_an_error_on_the_file_input(executor, models_dir):
    wf = lora_workflow(1.0)
    wf["nodes"]["lora"]["inputs"]["file"] = "gpt_lora.safetensors"
    result = executor.run(wf)
    assert result.status == "error"
    err = result.errors[0]
    assert err["node"] == "lora" and err["input"] == "file" and "gpt_lora.safetensors" in err["message"]


def control_workflow(cn: str, strength: float = 1.0) -> dict:
    return {
        "version": 1,
        "nodes": {
            "dit": {"type": "LoadDiffusionModel", "inputs": {"file": "tiny_dit.safetensors"}},
            "vae": {"type": "LoadVAE", "inputs": {"file": "tiny_vae.safetensors"}},
            "cn": {"type": "LoadControlNet", "inputs": {"file": cn}},
            "picture": {"type": "LoadImage", "inputs": {"image": "square.png"}},
            "edges": {"type": "CannyEdges", "inputs": {"image": link("picture", "image")}},
            "control": {
                "type": "ApplyControlNet",
                "inputs": {
                    "model": link("dit", "model"),
                    "control_net": link("cn", "control_net"),
                    "image": link("edges", "image"),
                    "vae": link("vae", "vae"),
                    "strength": strength,
                    "start": 0.0,
                    "end": 1.0,
                },
            },
            "text": {"type": "FakeTextEncode", "inputs": {"text": "a red square"}},
            "empty": {
                "type": "EmptyLatent",
                "inputs": {"width": 32, "height": 32, "vae": link("vae", "vae")},
            },
            **sampler("dit", "base"),
            **sampler("control", "controlled"),
        },
    }


def test_controlnet_nodes_steer_the_sampler_and_a_zero_net_changes_nothing(executor):
    picture = np.zeros((32, 32, 3), np.uint8)
    picture[8:24, 10:22] = 255
    Image.fromarray(picture).save(executor.input_dir / "square.png")
    result = executor.run(control_workflow("zero_cn.safetensors"))
    assert result.status == "success", result.errors
    assert torch.allclose(CAPTURED["controlled"].samples, CAPTURED["base"].samples, atol=1e-6)
    result = executor.run(control_workflow("cn.safetensors"))
    assert result.status == "success", result.errors
    assert "sample_base" in result.cached
    assert (CAPTURED["controlled"].samples - CAPTURED["base"].samples).abs().max() > 1e-3

    wf = control_workflow("cn.safetensors")
    del wf["nodes"]["control"]["inputs"]["vae"]
    result = executor.run(wf)
    assert result.status == "error" and result.errors[0]["input"] == "vae"


def test_gpt_lora_node_changes_generation_and_leaves_the_base_alone(executor):
    def workflow(strength):
        return {
            "version": 1,
            "nodes": {
                "gpt": {"type": "LoadARModel", "inputs": {"model_name": "tiny_gpt.safetensors"}},
                "lora": {
                    "type": "LoadLoRAGPT",
                    "inputs": {
                        "model": link("gpt", "model"),
                        "file": "gpt_lora.safetensors",
                        "strength": strength,
                    },
                },
                **{
                    f"gen_{n}": {
                        "type": "ARGenerateTokens",
                        "inputs": {
                            "model": link(m, "model"),
                            "class_id": 1,
                            "width": 3,
                            "height": 3,
                            "cfg": 2.0,
                            "temperature": 0.0,
                            "seed": 1,
                        },
                    }
                    for n, m in (("base", "gpt"), ("lora", "lora"))
                },
                **{
                    f"keep_{n}": {
                        "type": "CaptureTokens",
                        "inputs": {"tokens": link(f"gen_{n}", "tokens"), "name": n},
                    }
                    for n in ("base", "lora")
                },
            },
        }

    assert executor.run(workflow(4.0)).status == "success"
    base, strong = CAPTURED["base"].ids, CAPTURED["lora"].ids
    assert not torch.equal(base, strong)
    again = executor.run(workflow(0.0))
    assert "gen_base" in again.cached and torch.equal(CAPTURED["lora"].ids, base)


def test_preprocessors_draw_thin_edges_and_scribbles():
    img = np.zeros((40, 40), np.float32)
    img[10:30, 12:28] = 0.9
    edges = canny(img)
    ys, xs = np.nonzero(edges)
    assert (
        abs(ys.min() - 10) <= 1
        and abs(ys.max() - 29) <= 1
        and abs(xs.min() - 12) <= 1
        and abs(xs.max() - 27) <= 1
    )
    assert edges[15:25, 17:23].sum() == 0 and edges.sum() < 2 * 2 * (
        20 + 16
    )  # one pixel wide, nothing inside
    faint = img * 0.1
    assert canny(faint).sum() == 0  # below the high threshold everywhere
    # hysteresis: a faint edge touching a strong one survives, an isolated faint one does not
    mixed = np.zeros((40, 40), np.float32)
    mixed[10:30, 5:20] = 1.0
    mixed[10:30, 20:35] = 0.15
    kept = canny(mixed, low=0.03, high=0.2)
    assert kept[10:30, 19:22].any() and kept[12, 30:36].sum() == 0
    # the thresholds are shares of a black-to-white step whatever the blur
    for sigma in (0.8, 1.4, 2.5):
        assert (
            canny(img * 0.3 / 0.9, 0.1, 0.25, sigma).any()
            and not canny(img * 0.2 / 0.9, 0.1, 0.25, sigma).any()
        )
    # colour: a red square on blue has almost no brightness step, yet it is an edge (as in OpenCV)
    rgb = np.empty((40, 40, 3), np.float32)
    rgb[:] = (35 / 255, 85 / 255, 220 / 255)
    rgb[10:30, 12:28] = (215 / 255, 35 / 255, 35 / 255)
    assert not canny(luma(rgb)).any()
    colour_edges = canny(rgb)
    near = np.logical_or.reduce([np.roll(edges, (dy, dx), (0, 1)) for dy in (-1, 0, 1) for dx in (-1, 0, 1)])
    assert colour_edges.sum() == edges.sum() and not (colour_edges & ~near).any()  # the same outline, ±1 px
    node_edges = adapter_nodes.CannyEdges().execute(
        None, torch.from_numpy(np.repeat(img[None, ..., None], 3, -1)), 0.1, 0.2, 1.4
    )[0]
    assert node_edges.shape == (1, 40, 40, 3) and torch.equal(
        node_edges[0, ..., 0], torch.from_numpy(edges).float()
    )
    paper = torch.ones(1, 20, 20, 3)
    paper[0, 5, 2:18] = 0.0  # a dark stroke on white paper
    lines = adapter_nodes.Scribble().execute(None, paper, 0.5, True, 1)[0]
    assert lines[0, 4:7, 2:18].min() == 1 and lines[0, 10:].max() == 0


def test_mask_frees_the_tokens_it_covers():
    grid = TokenGrid(torch.arange(12).view(1, 3, 4))
    mask = torch.zeros(1, 48, 64)
    mask[:, 16:32, 32:64] = 1.0  # the middle row, right half
    (out,) = adapter_nodes.MaskToTokens().execute(None, grid, mask, 0.5)
    free = ~out.fixed[0]
    assert free.tolist() == [[False] * 4, [False, False, True, True], [False] * 4]
    assert torch.equal(out.ids, grid.ids)


def test_gpt_controlnet_node_steers_generation_from_a_blended_scaled_image(executor, models_dir):
    """ApplyControlNetGPT in a workflow, its control image made by ImageBlend and ImageScale and
    its strength fed by a Float node: the net changes the tokens, strength 0 gives the base's."""
    import tessera.nodes.primitives as primitives
    from tessera.engines.controlnet import ARControlConfig, ARControlNet, save_ar_controlnet

    executor.registry.register_module(primitives)
    net = ARControlNet(ARControlConfig(dim=32, downsample=4, width=8))
    randomize(net, 0.3, 6)
    save_ar_controlnet(net, models_dir / "controlnet" / "gpt_cn.safetensors")

    def workflow(strength):
        gen = {"class_id": 1, "width": 3, "height": 3, "cfg": 2.0, "temperature": 0.0, "seed": 1}
        return {
            "version": 1,
            "nodes": {
                "gpt": {"type": "LoadARModel", "inputs": {"model_name": "tiny_gpt.safetensors"}},
                "cn": {"type": "LoadControlNet", "inputs": {"file": "gpt_cn.safetensors"}},
                "red": {
                    "type": "SolidColor",
                    "inputs": {"width": 24, "height": 24, "red": 1.0, "green": 0.0, "blue": 0.0},
                },
                "blue": {
                    "type": "SolidColor",
                    "inputs": {"width": 6, "height": 6, "red": 0.0, "green": 0.0, "blue": 1.0},
                },
                "blend": {
                    "type": "ImageBlend",
                    "inputs": {
                        "image_a": link("red", "image"),
                        "image_b": link("blue", "image"),
                        "factor": 0.25,
                    },
                },
                "scale": {
                    "type": "ImageScale",
                    "inputs": {"image": link("blend", "image"), "width": 12, "height": 12},
                },
                "strength": {"type": "Float", "inputs": {"value": strength}},
                "apply": {
                    "type": "ApplyControlNetGPT",
                    "inputs": {
                        "model": link("gpt", "model"),
                        "control_net": link("cn", "control_net"),
                        "image": link("scale", "image"),
                        "strength": link("strength", "value"),
                    },
                },
                "gen_base": {"type": "ARGenerateTokens", "inputs": {"model": link("gpt", "model"), **gen}},
                "gen_cn": {"type": "ARGenerateTokens", "inputs": {"model": link("apply", "model"), **gen}},
                "keep_base": {
                    "type": "CaptureTokens",
                    "inputs": {"tokens": link("gen_base", "tokens"), "name": "base"},
                },
                "keep_cn": {
                    "type": "CaptureTokens",
                    "inputs": {"tokens": link("gen_cn", "tokens"), "name": "cn"},
                },
            },
        }

    first = executor.run(workflow(3.0))
    assert first.status == "success", first.errors
    assert {"blend", "scale", "strength", "apply"} <= set(first.executed)
    base = CAPTURED["base"].ids
    assert not torch.equal(CAPTURED["cn"].ids, base)
    off = executor.run(workflow(0.0))
    assert off.status == "success" and {"blend", "scale"} <= set(off.cached)
    assert torch.equal(CAPTURED["cn"].ids, base)


def test_image_blend_and_scale_values():
    ctx = None
    a = torch.zeros(2, 8, 8, 3)
    a[..., 0] = 1.0
    b = torch.zeros(1, 4, 4, 3)
    b[..., 2] = 1.0
    blended = image_nodes.ImageBlend().execute(ctx, a, b, 0.25)[0]
    assert blended.shape == (2, 8, 8, 3)
    assert torch.allclose(blended[..., 0], torch.full((2, 8, 8), 0.75)) and torch.allclose(
        blended[..., 2], torch.full((2, 8, 8), 0.25)
    )
    checker = (torch.arange(8)[:, None] + torch.arange(8)[None]) % 2
    image = checker[None, ..., None].float().expand(1, 8, 8, 3)
    area = image_nodes.ImageScale().execute(ctx, image, 4, 2, "area")[0]
    assert area.shape == (1, 2, 4, 3) and torch.allclose(area, torch.full_like(area, 0.5))
    nearest = image_nodes.ImageScale().execute(ctx, image, 16, 16, "nearest")[0]
    assert torch.equal(nearest[0, ::2, ::2], image[0])
    from tessera.node import NodeError

    with pytest.raises(NodeError, match="batch sizes differ") as e:
        image_nodes.ImageBlend().execute(ctx, torch.zeros(2, 4, 4, 3), torch.zeros(3, 4, 4, 3), 0.5)
    assert e.value.input == "image_b"
