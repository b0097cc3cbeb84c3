"""Constant inputs are checked when the workflow is validated, before anything runs; EmptyLatent
takes the VAE's native size and warns far above it."""

from __future__ import annotations

import json

import pytest

import tessera.nodes.diffusion as dn
from tessera.engines.vae import AutoencoderKL, VAEConfig, save_vae
from tessera.executor import Executor
from tessera.node import Result
from tessera.registry import default_registry
from tessera.workflow import InvalidWorkflow

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def executor(tmp_path_factory):
    root = tmp_path_factory.mktemp("checks")
    (root / "models" / "vae").mkdir(parents=True)
    (root / "out").mkdir()
    vae = AutoencoderKL(
        VAEConfig(latent_channels=4, block_out_channels=(8, 16), layers_per_block=1, norm_groups=4)
    )
    save_vae(
        vae,
        root / "models" / "vae" / "carded.safetensors",
        json.dumps({"data": "synthetic 64x64 captioned scenes"}),
    )
    save_vae(vae, root / "models" / "vae" / "sized.safetensors", json.dumps({"resolution": 96}))
    save_vae(vae, root / "models" / "vae" / "bare.safetensors")
    return Executor(default_registry(), root / "models", root / "in", root / "out", "cpu")


def link(node, output):
    return {"node": node, "output": output}


def issues_of(executor, workflow) -> list:
    with pytest.raises(InvalidWorkflow) as caught:
        executor.validate(workflow)
    return caught.value.issues


def test_a_bad_filename_prefix_is_refused_before_anything_runs_naming_the_character(executor):
    workflow = {
        "version": 1,
        "nodes": {
            "img": {"type": "SolidColor", "inputs": {"width": 8, "height": 8}},
            "save": {
                "type": "SaveImage",
                "inputs": {"images": link("img", "image"), "filename_prefix": "run:1"},
            },
        },
    }
    (issue,) = issues_of(executor, workflow)
    assert (issue.node, issue.input) == ("save", "filename_prefix")
    assert "contains ':'" in issue.reason
    result = executor.run(workflow)
    assert result.status == "error" and result.executed == []
    workflow["nodes"]["save"]["inputs"]["filename_prefix"] = "runs//a"
    assert "empty folder or file name" in issues_of(executor, workflow)[0].reason
    workflow["nodes"]["save"]["inputs"]["filename_prefix"] = "runs/day 1/a-b_c.d"
    executor.validate(workflow)


def sampler_nodes(**sampler) -> dict:
    return {
        "version": 1,
        "nodes": {
            "dit": {"type": "LoadDiffusionModel", "inputs": {"file": "missing.safetensors"}},
            "te": {"type": "LoadTextEncoder", "inputs": {"file": "missing.safetensors"}},
            "pos": {
                "type": "TextEncode",
                "inputs": {"text_encoder": link("te", "text_encoder"), "text": "a cat"},
            },
            "empty": {"type": "EmptyLatent", "inputs": {}},
            "sample": {
                "type": sampler.pop("type", "DiTSampler"),
                "inputs": {
                    "model": link("dit", "model"),
                    "positive": link("pos", "conditioning"),
                    "latent": link("empty", "latent"),
                    **sampler,
                },
            },
        },
    }


def test_cfg_without_a_negative_is_refused_at_validation(executor):
    issues = [i for i in issues_of(executor, sampler_nodes(cfg=4.0)) if i.node == "sample"]
    assert [(i.input, "cfg 4.0 needs a negative conditioning" in i.reason) for i in issues] == [
        ("negative", True)
    ]
    assert not [i for i in issues_of(executor, sampler_nodes(cfg=1.0)) if i.node == "sample"]


def test_a_denoise_step_past_the_schedule_is_refused_at_validation(executor):
    issues = [
        i
        for i in issues_of(executor, sampler_nodes(type="DiTDenoiseStep", steps=3, step=5))
        if i.node == "sample"
    ]
    assert [(i.input, i.reason) for i in issues] == [
        ("step", "step 5 is past the last step (2) of a 3-step schedule")
    ]


def test_empty_latent_takes_the_vae_native_size_and_warns_far_above_it(executor):
    ctx = executor.context("n")
    assert dn.native_resolution(executor.models_dir / "vae" / "sized.safetensors") == 96
    carded = dn.LoadVAE().execute(ctx, "carded.safetensors")[0]
    assert carded.native_resolution == 64
    f = carded.config.downscale
    (latent,) = dn.EmptyLatent().execute(ctx, 0, 0, 1, 16, carded)
    assert latent.samples.shape[-2:] == (64 // f, 64 // f)
    far = dn.EmptyLatent().execute(ctx, 1024, 1024, 1, 16, carded)
    assert isinstance(far, Result) and far.outputs[0].samples.shape[-2:] == (1024 // f, 1024 // f)
    assert "far above the VAE's native 64x64" in far.ui["warnings"][0]
    assert isinstance(dn.EmptyLatent().execute(ctx, 128, 96, 1, 16, carded), tuple)  # near native: no warning
    bare = dn.LoadVAE().execute(ctx, "bare.safetensors")[0]
    assert bare.native_resolution is None
    (latent,) = dn.EmptyLatent().execute(ctx, 0, 0, 1, 16, bare)
    assert latent.samples.shape[-2:] == (dn.AUTO_SIDE // f, dn.AUTO_SIDE // f)


def test_the_warning_reaches_the_run_result(executor):
    workflow = {
        "version": 1,
        "nodes": {
            "vae": {"type": "LoadVAE", "inputs": {"file": "carded.safetensors"}},
            "empty": {
                "type": "EmptyLatent",
                "inputs": {"width": 160, "height": 160, "vae": link("vae", "vae")},
            },
            "dec": {
                "type": "VAEDecode",
                "inputs": {"vae": link("vae", "vae"), "latent": link("empty", "latent")},
            },
            "out": {"type": "PreviewImage", "inputs": {"images": link("dec", "image")}},
        },
    }
    events = []
    result = executor.run(workflow, emit=lambda kind, data: events.append((kind, data)))
    assert result.status == "success", result.errors
    assert "160x160 is far above" in result.outputs["empty"]["warnings"][0]
    assert any(kind == "executed" and data["node"] == "empty" for kind, data in events)


def test_load_image_lists_the_input_folder_and_the_shipped_examples(executor):
    (executor.input_dir / "sub").mkdir(parents=True, exist_ok=True)
    (executor.input_dir / "mine.png").write_bytes(b"png")
    (executor.input_dir / "sub" / "deep.webp").write_bytes(b"webp")
    (executor.input_dir / "notes.txt").write_text("not an image")
    names = executor.input_images()
    assert {"mine.png", "sub/deep.webp", "example.png"} <= set(names) and "notes.txt" not in names
    info = executor.registry.get("LoadImage").info(executor.model_files, executor.input_images)
    assert info["inputs"][0]["choices"] == names
