"""AR nodes in workflows: load, generate with previews, decode, token-space outpainting, errors."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import tessera.nodes.autoregressive as ar_nodes
import tessera.nodes.image as image_nodes
from tessera.engines.conditioning import Conditioning
from tessera.engines.gpt import GPT, GPTConfig, gpt_config_metadata
from tessera.engines.tokens import TokenGrid
from tessera.engines.vq import VQConfig, VQModel, vq_config_metadata
from tessera.executor import Executor
from tessera.node import NodeError
from tessera.registry import NodeRegistry

CODES = 32


def _randomize(module: torch.nn.Module, std: float) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, std)


def _save_gpt(path, caption: bool) -> None:
    cfg = GPTConfig(
        dim=64,
        n_layer=2,
        n_head=4,
        n_kv_head=4,
        ffn_hidden=128,
        vocab_size=CODES,
        num_classes=0 if caption else 10,
        caption_dim=16 if caption else 0,
        cls_token_num=4 if caption else 1,
    )
    torch.manual_seed(1)
    model = GPT(cfg)
    _randomize(model, 0.3)
    if caption:
        model.cls_embedding.uncond_embedding.normal_()
    save_file(model.state_dict(), str(path), metadata=gpt_config_metadata(cfg))


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    (root / "ar_models").mkdir()
    (root / "vq_models").mkdir()
    _save_gpt(root / "ar_models" / "tiny_c2i.safetensors", caption=False)
    _save_gpt(root / "ar_models" / "tiny_t2i.safetensors", caption=True)
    cfg = VQConfig(
        channels=32,
        ch_mult=[1, 2],
        decoder_ch_mult=[1, 2],
        num_res_blocks=1,
        z_channels=16,
        codebook_size=CODES,
        codebook_dim=8,
    )
    torch.manual_seed(2)
    vq = VQModel(cfg)
    save_file(
        vq.state_dict(), str(root / "vq_models" / "tiny_vq.safetensors"), metadata=vq_config_metadata(cfg)
    )
    (root / "ar_models" / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    return root


@pytest.fixture
def executor(tmp_path, models_dir):
    registry = NodeRegistry()
    registry.register_module(ar_nodes)
    registry.register_module(image_nodes)
    return Executor(registry, models_dir, tmp_path / "in", tmp_path / "out", "cpu")


def link(node, output):
    return {"node": node, "output": output}


def generation_workflow(seed: int = 3, model: str = "tiny_c2i.safetensors") -> dict:
    return {
        "version": 1,
        "nodes": {
            "gpt": {"type": "LoadARModel", "inputs": {"model_name": model}},
            "vq": {"type": "LoadVQModel", "inputs": {"model_name": "tiny_vq.safetensors"}},
            "gen": {
                "type": "ARGenerateTokens",
                "inputs": {
                    "model": link("gpt", "model"),
                    "vq": link("vq", "vq"),
                    "class_id": 4,
                    "width": 4,
                    "height": 3,
                    "batch_size": 2,
                    "cfg": 3.0,
                    "seed": seed,
                    "preview_every": 4,
                    "top_k": 0,
                },
            },
            "decode": {
                "type": "VQDecode",
                "inputs": {"vq": link("vq", "vq"), "tokens": link("gen", "tokens")},
            },
            "show": {"type": "PreviewImage", "inputs": {"images": link("decode", "image")}},
        },
    }


def test_workflow_generates_decodes_and_reports_every_token_with_previews(executor):
    events = []
    result = executor.run(generation_workflow(), "p", emit=lambda kind, data: events.append((kind, data)))
    assert result.status == "success", result.errors
    progress = [d["value"] for k, d in events if k == "progress" and d["node"] == "gen"]
    assert progress == list(range(1, 13))
    previews = [d["image"] for k, d in events if k == "preview" and d["node"] == "gen"]
    assert len(previews) == 3 and all(isinstance(p, Image.Image) and p.size == (8, 6) for p in previews)
    assert len(result.outputs["show"]["images"]) == 2

    again = executor.run(generation_workflow(seed=4))
    assert sorted(again.executed) == ["decode", "gen", "show"]  # models come from the cache


def test_generated_tokens_reproduce_by_seed_and_decode_to_images(executor, models_dir):
    ctx = executor.context("n")
    gpt = ar_nodes.LoadARModel().execute(ctx, "tiny_c2i.safetensors")[0]
    vq = ar_nodes.LoadVQModel().execute(ctx, "tiny_vq.safetensors")[0]
    gen = ar_nodes.ARGenerateTokens()
    args = {
        "model": gpt,
        "class_id": 1,
        "width": 3,
        "height": 3,
        "batch_size": 1,
        "cfg": 2.0,
        "guidance_schedule": "linear",
        "temperature": 1.0,
        "top_k": 0,
        "top_p": 0.9,
        "preview_every": 0,
    }
    a, b, c = (gen.execute(ctx, seed=s, **args)[0] for s in (5, 5, 6))
    assert isinstance(a, TokenGrid) and a.ids.shape == (1, 3, 3)
    assert torch.equal(a.ids, b.ids) and not torch.equal(a.ids, c.ids)
    image = ar_nodes.VQDecode().execute(ctx, vq, a)[0]
    assert image.shape == (1, 6, 6, 3) and 0 <= image.min() and image.max() <= 1


def test_token_space_outpainting_keeps_the_tokenized_top(executor):
    ctx = executor.context("n")
    gpt = ar_nodes.LoadARModel().execute(ctx, "tiny_t2i.safetensors")[0]
    vq = ar_nodes.LoadVQModel().execute(ctx, "tiny_vq.safetensors")[0]
    image = torch.rand(1, 9, 8, 3)  # cropped to 8x8 -> a 4x4 grid
    tokens = ar_nodes.VQTokenize().execute(ctx, vq, image)[0]
    assert tokens.ids.shape == (1, 4, 4) and tokens.fixed is None
    top = ar_nodes.FixTokenRows().execute(ctx, tokens, 2)[0]
    assert top.fixed[0, :2].all() and not top.fixed[0, 2:].any()
    text = Conditioning(torch.randn(1, 6, 16), torch.zeros(1, 4), torch.ones(1, 6, dtype=torch.bool))
    out = ar_nodes.ARGenerateTokens().execute(
        ctx,
        model=gpt,
        positive=text,
        negative=None,
        class_id=0,
        width=4,
        height=6,
        batch_size=2,
        cfg=4.0,
        guidance_schedule="constant",
        temperature=1.5,
        top_k=0,
        top_p=1.0,
        seed=1,
        fixed=top,
        vq=vq,
        preview_every=0,
    )[0]
    assert out.ids.shape == (2, 6, 4)
    assert torch.equal(out.ids[:, :2], tokens.ids[:, :2].expand(2, -1, -1))
    assert not torch.equal(out.ids[0, 2:], out.ids[1, 2:])

    inside = ar_nodes.TokenRegion().execute(ctx, tokens, 1, 1, 2, 2, "outside")[0]
    assert inside.fixed.sum() == 12 and not inside.fixed[0, 1:3, 1:3].any()


def test_node_errors_name_the_input(executor):
    ctx = executor.context("n")
    t2i = ar_nodes.LoadARModel().execute(ctx, "tiny_t2i.safetensors")[0]
    args = {
        "class_id": 0,
        "width": 2,
        "height": 2,
        "batch_size": 1,
        "cfg": 1.0,
        "guidance_schedule": "constant",
        "temperature": 1.0,
        "top_k": 0,
        "top_p": 1.0,
        "seed": 0,
        "preview_every": 0,
    }
    with pytest.raises(NodeError, match="positive") as e:
        ar_nodes.ARGenerateTokens().execute(ctx, model=t2i, **args)
    assert e.value.input == "positive"
    wide = Conditioning(torch.randn(1, 3, 99), torch.zeros(1, 4), torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(NodeError, match="expects 16"):
        ar_nodes.ARGenerateTokens().execute(ctx, model=t2i, positive=wide, **args)
    c2i = ar_nodes.LoadARModel().execute(ctx, "tiny_c2i.safetensors")[0]
    big = TokenGrid(torch.zeros(1, 3, 3, dtype=torch.long))
    with pytest.raises(NodeError, match="does not fit") as e:
        ar_nodes.ARGenerateTokens().execute(ctx, model=c2i, fixed=big, **args)
    assert e.value.input == "fixed"

    wf = generation_workflow(model="broken.safetensors")
    result = executor.run(wf)
    assert result.status == "error"
    err = result.errors[0]
    assert err["node"] == "gpt" and err["input"] == "file" and "broken.safetensors" in err["message"]


def test_interrupt_stops_generation_between_tokens(executor):
    seen = {"n": 0}

    def emit(kind, data):
        if kind == "progress" and data["node"] == "gen":
            seen["n"] += 1

    result = executor.run(generation_workflow(), "p", emit=emit, is_interrupted=lambda: seen["n"] >= 5)
    assert result.status == "interrupted"
    assert seen["n"] == 5
