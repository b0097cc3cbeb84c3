"""Next-scale (VAR) nodes in workflows: published-layout and converted files load through the
loaders, generation reports one progress step and preview per scale, variations keep the source's
first scales, and a multi-scale token value is never wired into a raster TOKENS input (or back)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from real_model_fixtures import VQ, write_var, write_var_pth

import tessera.nodes.autoregressive as ar_nodes
import tessera.nodes.image as image_nodes
import tessera.nodes.next_scale as ns_nodes
import tessera.nodes.text as text_nodes
from tessera.convert import convert
from tessera.engines.multiscale_vq import (
    MultiScaleTokens,
    MultiScaleVQ,
    MultiScaleVQConfig,
    save_multiscale_vq,
)
from tessera.engines.text_encoder import save_text_encoder, tiny_text_encoder
from tessera.engines.var import VAR, VARConfig, save_var
from tessera.engines.vq import VQModel, vq_config_metadata
from tessera.executor import Executor
from tessera.node import NodeError
from tessera.registry import NodeRegistry
from tessera.workflow import InvalidWorkflow

torch.set_num_threads(1)
TINY_SCALES = [1, 2, 3, 4]


def link(node: str, output: str) -> dict:
    return {"node": node, "output": output}


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    write_var(root)  # published tensors, no metadata: ar_models/var_d2, vq_models/vae_ch160v4096z32
    vae_pth, var_pth = write_var_pth(tmp_path_factory.mktemp("downloads"))
    convert(vae_pth, root / "vq_models" / "vae_converted.safetensors")
    convert(var_pth, root / "ar_models" / "var_converted.safetensors")
    # our own caption model on the character-level text encoder, with its own small tokenizer
    encoder = tiny_text_encoder()
    save_text_encoder(encoder, root / "text_encoders" / "chars.safetensors")
    vq = MultiScaleVQ(
        MultiScaleVQConfig(
            channels=8,
            ch_mult=[1, 2],
            num_res_blocks=1,
            z_channels=4,
            vocab_size=32,
            patch_nums=TINY_SCALES,
            norm_groups=4,
        )  # fmt: skip
    )
    save_multiscale_vq(vq, root / "vq_models" / "tiny_msvq.safetensors", card="tiny")
    cfg = VARConfig(depth=2, width=32, heads=2, ffn_hidden=64, vocab_size=32, cvae=4, patch_nums=TINY_SCALES,
                    num_classes=0, caption_dim=encoder.config.context_dim, pooled_dim=encoder.config.pooled_dim)  # fmt: skip
    model = VAR(cfg).init_weights(seed=1)
    with torch.no_grad():
        for block in model.blocks:
            block.ada_lin[-1].weight.normal_(0, 0.2)
    save_var(model, root / "ar_models" / "tiny_t2i_var.safetensors", card="tiny")
    raster = VQModel(VQ)
    from safetensors.torch import save_file

    save_file(
        raster.state_dict(),
        str(root / "vq_models" / "raster_vq.safetensors"),
        metadata=vq_config_metadata(VQ),
    )
    return root


@pytest.fixture
def executor(tmp_path, models_dir):
    registry = NodeRegistry()
    for module in (ns_nodes, ar_nodes, image_nodes, text_nodes):
        registry.register_module(module)
    return Executor(registry, models_dir, tmp_path / "in", tmp_path / "out", "cpu")


def issues_of(executor: Executor, workflow: dict) -> list:
    """Every problem validation and compilation find (describe hooks included)."""
    try:
        executor.compile(executor.validate(workflow))
    except InvalidWorkflow as e:
        return e.issues
    return []


def class_workflow(
    model: str = "var_d2.safetensors", vq: str = "vae_ch160v4096z32.safetensors", seed: int = 3
) -> dict:
    return {
        "version": 2,
        "nodes": {
            "var": {"type": "LoadVARModel", "inputs": {"file": model}},
            "vq": {"type": "LoadMultiScaleVQ", "inputs": {"file": vq}},
            "gen": {
                "type": "VARGenerate",
                "inputs": {
                    "model": link("var", "model"),
                    "vq": link("vq", "vq"),
                    "class_id": 4,
                    "batch_size": 2,
                    "cfg": 3.0,
                    "top_k": 10,
                    "seed": seed,
                },
            },
            "coarse": {
                "type": "MultiScaleDecode",
                "inputs": {"vq": link("vq", "vq"), "tokens": link("gen", "tokens"), "scales": 3},
            },
            "show": {"type": "PreviewImage", "inputs": {"images": link("gen", "image")}},
            "show_coarse": {"type": "PreviewImage", "inputs": {"images": link("coarse", "image")}},
        },
    }


@pytest.mark.parametrize(
    "model,vq",
    [
        ("var_d2.safetensors", "vae_ch160v4096z32.safetensors"),
        ("var_converted.safetensors", "vae_converted.safetensors"),
    ],
)
def test_published_layout_generates_scale_by_scale_with_a_preview_each(executor, model, vq):
    events = []
    result = executor.run(class_workflow(model, vq), "p", emit=lambda kind, data: events.append((kind, data)))
    assert result.status == "success", result.errors
    progress = [d["value"] for k, d in events if k == "progress" and d["node"] == "gen"]
    assert progress == list(range(1, 11))  # VAR's ten scales
    previews = [d["image"] for k, d in events if k == "preview" and d["node"] == "gen"]
    assert len(previews) == 10 and all(isinstance(p, Image.Image) and p.size == (32, 32) for p in previews)
    assert len(result.outputs["show"]["images"]) == 2 and len(result.outputs["show_coarse"]["images"]) == 2


def test_published_and_converted_files_load_to_the_same_model(executor):
    ctx = executor.context("n")
    bare = ns_nodes.LoadVARModel().execute(ctx, "var_d2.safetensors")[0]
    converted = ns_nodes.LoadVARModel().execute(ctx, "var_converted.safetensors")[0]
    assert bare.config == converted.config and bare.config.patch_nums == [1, 2, 3, 4, 5, 6, 8, 10, 13, 16]
    for a, b in zip(bare.state_dict().values(), converted.state_dict().values()):
        assert torch.equal(a, b)


def test_node_generation_is_per_image_seeded_and_variations_keep_the_source_scales(executor):
    ctx = executor.context("n")
    model = ns_nodes.LoadVARModel().execute(ctx, "var_d2.safetensors")[0]
    vq = ns_nodes.LoadMultiScaleVQ().execute(ctx, "vae_ch160v4096z32.safetensors")[0]
    gen = ns_nodes.VARGenerate()
    args = dict(model=model, vq=vq, class_id=2, cfg=2.0, guidance_schedule="linear", temperature=1.0, top_k=0,
                top_p=1.0, keep_scales=0, preview=False)  # fmt: skip
    image, tokens = gen.execute(ctx, batch_size=2, seed=7, **args)
    alone_image, alone = gen.execute(ctx, batch_size=1, seed=8, **args)
    assert all(torch.equal(a[1:], b) for a, b in zip(tokens.maps, alone.maps))
    torch.testing.assert_close(
        image[1:], alone_image, atol=1e-4, rtol=1e-4
    )  # batched convs round differently

    picture = torch.rand(
        1, 40, 36, 3, generator=torch.Generator().manual_seed(0)
    )  # center-cropped to 36x36, resized to the tokenizer's 32x32
    source = ns_nodes.MultiScaleTokenize().execute(ctx, vq, picture)[0]
    assert isinstance(source, MultiScaleTokens) and source.patch_nums == (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    _, varied = gen.execute(ctx, batch_size=3, seed=1, source=source, **{**args, "keep_scales": 4})
    for k in range(4):
        assert torch.equal(varied.maps[k], source.maps[k].expand(3, -1, -1))
    assert not torch.equal(varied.maps[-1][0], varied.maps[-1][1])  # the details differ
    coarse = ns_nodes.MultiScaleDecode().execute(ctx, vq, source, 4)[0]
    kept = ns_nodes.MultiScaleDecode().execute(ctx, vq, varied, 4)[0]
    torch.testing.assert_close(kept, coarse.expand(3, -1, -1, -1), atol=1e-4, rtol=1e-4)  # batched convs


def test_caption_model_runs_from_a_prompt_through_the_character_encoder(executor):
    workflow = {
        "version": 2,
        "nodes": {
            "enc": {"type": "LoadTextEncoder", "inputs": {"file": "chars.safetensors"}},
            "pos": {
                "type": "TextEncode",
                "inputs": {"text_encoder": link("enc", "text_encoder"), "text": "a red cat"},
            },
            "var": {"type": "LoadVARModel", "inputs": {"file": "tiny_t2i_var.safetensors"}},
            "vq": {"type": "LoadMultiScaleVQ", "inputs": {"file": "tiny_msvq.safetensors"}},
            "gen": {
                "type": "VARGenerate",
                "inputs": {
                    "model": link("var", "model"),
                    "vq": link("vq", "vq"),
                    "positive": link("pos", "conditioning"),
                    "cfg": 3.0,
                    "seed": 5,
                },  # fmt: skip
            },
            "show": {"type": "PreviewImage", "inputs": {"images": link("gen", "image")}},
        },
    }
    events = []
    result = executor.run(workflow, "p", emit=lambda kind, data: events.append((kind, data)))
    assert result.status == "success", result.errors
    assert [d["value"] for k, d in events if k == "progress" and d["node"] == "gen"] == [1, 2, 3, 4]
    del workflow["nodes"]["gen"]["inputs"]["positive"]
    issues = issues_of(executor, workflow)
    assert [(i.node, i.input) for i in issues] == [("gen", "positive")] and "link a positive" in issues[
        0
    ].reason


def test_multiscale_and_raster_tokens_are_never_wired_into_each_other(executor):
    bad = class_workflow()
    bad["nodes"]["rvq"] = {"type": "LoadVQModel", "inputs": {"file": "raster_vq.safetensors"}}
    bad["nodes"]["raster"] = {
        "type": "VQDecode",
        "inputs": {"vq": link("rvq", "vq"), "tokens": link("gen", "tokens")},
    }
    issues = issues_of(executor, bad)
    assert any(i.node == "raster" and i.input == "tokens" and "type mismatch" in i.reason for i in issues), (
        issues
    )
    back = {
        "version": 2,
        "nodes": {
            "rvq": {"type": "LoadVQModel", "inputs": {"file": "raster_vq.safetensors"}},
            "img": {"type": "VQDecode", "inputs": {"vq": link("rvq", "vq"), "tokens": link("tok", "tokens")}},
            "tok": {"type": "VQTokenize", "inputs": {"vq": link("rvq", "vq"), "image": link("img", "image")}},
            "msvq": {"type": "LoadMultiScaleVQ", "inputs": {"file": "tiny_msvq.safetensors"}},
            "dec": {
                "type": "MultiScaleDecode",
                "inputs": {"vq": link("msvq", "vq"), "tokens": link("tok", "tokens")},
            },
            "vqmix": {
                "type": "MultiScaleDecode",
                "inputs": {"vq": link("rvq", "vq"), "tokens": link("tok", "tokens")},
            },
        },
    }
    issues = issues_of(executor, back)
    assert any(i.node == "dec" and i.input == "tokens" and "MULTISCALE_TOKENS" in i.reason for i in issues), (
        issues
    )
    assert any(i.node == "vqmix" and i.input == "vq" and "type mismatch" in i.reason for i in issues), issues


def test_errors_name_the_input(executor, models_dir):
    ctx = executor.context("n")
    with pytest.raises(NodeError) as e:
        ns_nodes.LoadVARModel().execute(ctx, "../vq_models/vae_ch160v4096z32.safetensors")
    assert e.value.input == "file"
    (models_dir / "ar_models" / "not_var.safetensors").write_bytes(
        (models_dir / "vq_models" / "vae_ch160v4096z32.safetensors").read_bytes()
    )
    with pytest.raises(
        NodeError, match="not a VAR transformer: this file holds a multi-scale VQ tokenizer"
    ) as e:
        ns_nodes.LoadVARModel().execute(ctx, "not_var.safetensors")
    assert e.value.input == "file"
    issues = issues_of(executor, class_workflow(vq="tiny_msvq.safetensors"))
    assert [(i.node, i.input) for i in issues] == [("gen", "vq")] and "scales" in issues[0].reason
    wf = class_workflow()
    wf["nodes"]["gen"]["inputs"]["keep_scales"] = 3
    issues = issues_of(executor, wf)
    assert any(i.node == "gen" and i.input == "source" for i in issues), issues
    model = ns_nodes.LoadVARModel().execute(ctx, "var_d2.safetensors")[0]
    vq = ns_nodes.LoadMultiScaleVQ().execute(ctx, "vae_ch160v4096z32.safetensors")[0]
    args = dict(model=model, vq=vq, batch_size=1, cfg=1.0, guidance_schedule="linear", temperature=1.0, top_k=0,
                top_p=1.0, seed=0, keep_scales=0, preview=False)  # fmt: skip
    with pytest.raises(NodeError) as e:
        ns_nodes.VARGenerate().execute(ctx, class_id=10, **args)
    assert e.value.input == "class_id"


def test_raster_loaders_name_a_next_scale_file(executor, models_dir):
    """A VAR file given to the raster GPT loader, or a multi-scale VQ to the raster VQ loader, is
    refused with the family the file really holds, on the file input."""
    ctx = executor.context("n")
    (models_dir / "ar_models" / "var_as_gpt.safetensors").write_bytes(
        (models_dir / "ar_models" / "var_d2.safetensors").read_bytes()
    )
    with pytest.raises(NodeError, match="not a LlamaGen GPT: this file holds a VAR transformer") as e:
        ar_nodes.LoadARModel().execute(ctx, "var_as_gpt.safetensors")
    assert e.value.input == "file"
    (models_dir / "vq_models" / "msvq_as_vq.safetensors").write_bytes(
        (models_dir / "vq_models" / "vae_ch160v4096z32.safetensors").read_bytes()
    )
    with pytest.raises(
        NodeError, match="not a VQ tokenizer: this file holds a multi-scale VQ tokenizer"
    ) as e:
        ar_nodes.LoadVQModel().execute(ctx, "msvq_as_vq.safetensors")
    assert e.value.input == "file"
