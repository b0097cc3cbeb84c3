"""ComfyUI workflow files (API and UI format, and ComfyUI PNGs) import through the one mapping
table and run on the tiny real-layout Flux checkpoints (`real_model_fixtures`).

The workflow files in tests/comfy_workflows/ were written by hand from ComfyUI's documented
formats (its Flux dev example graph), not by our exporter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image, PngImagePlugin
from real_model_fixtures import write_flux

from tessera.comfy.convert import file_classifier, read_png, to_tessera
from tessera.comfy.mapping import RULES
from tessera.registry import default_registry
from tessera.workflow import InvalidWorkflow

HERE = Path(__file__).resolve().parent
COMFY = HERE / "comfy_workflows"
WORKFLOWS = HERE.parent / "workflows"
ISSUE_NODES = (
    "CheckpointLoaderSimple UNETLoader VAELoader DualCLIPLoader CLIPLoader CLIPTextEncode FluxGuidance "
    "ConditioningZeroOut EmptyLatentImage EmptySD3LatentImage KSampler KSamplerAdvanced VAEEncode VAEDecode "
    "VAEDecodeTiled SaveImage PreviewImage LoadImage ImageScale LoraLoaderModelOnly ControlNetLoader "
    "ControlNetApplyAdvanced Canny SetLatentNoiseMask"
).split()
# Mapped since (tests/test_comfy_custom_sampler.py): the custom-sampler family and ModelSamplingFlux.
LATER_NODES = (
    "RandomNoise KSamplerSelect BasicScheduler BasicGuider CFGGuider SamplerCustomAdvanced ModelSamplingFlux"
)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    write_flux(root, dev=True)
    return root


@pytest.fixture(scope="module")
def registry():
    return default_registry()


def tessera(*args, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "tessera", *map(str, args)], capture_output=True, text=True, env=env, cwd=cwd
    )


def run_to_png(source: Path, models: Path, out: Path, *extra) -> Image.Image:
    out.mkdir()
    done = tessera(
        "run",
        source,
        "--models-dir",
        models,
        "--out",
        out,
        "--device",
        "cpu",
        "--quiet",
        *extra,
        cwd=out.parent,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    (png,) = sorted(out.glob("*.png"))
    with Image.open(png) as image:
        image.load()
        return image.copy()


def test_the_table_maps_every_node_the_issue_names():
    assert sorted(RULES) == sorted(ISSUE_NODES + LATER_NODES.split())


def test_api_format_flux_runs_and_matches_our_own_flux_workflow(models, tmp_path):
    """ComfyUI's Flux dev graph (DualCLIPLoader, CLIPTextEncode, FluxGuidance, ConditioningZeroOut,
    EmptySD3LatentImage, KSampler euler/simple, cfg 1) gives the very pixels of our shipped
    flux_dev.json with the same size, steps and seed."""
    comfy = run_to_png(COMFY / "flux_dev_api.json", models, tmp_path / "comfy")
    ours = run_to_png(
        WORKFLOWS / "flux_dev.json",
        models,
        tmp_path / "ours",
        "--set",
        "5.width=32",
        "--set",
        "5.height=48",
        "--set",
        "6.steps=2",
    )
    assert comfy.size == (32, 48)
    assert comfy.convert("RGB").tobytes() == ours.convert("RGB").tobytes()


def test_ui_format_imports_to_our_format_and_runs(models, tmp_path, registry):
    out = tmp_path / "imported.json"
    done = tessera("import", COMFY / "flux_dev_ui.json", out, "--models-dir", models, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    nodes = json.loads(out.read_text())["nodes"]
    assert "40" not in nodes and "38" not in nodes  # the Note and the Reroute are not graph nodes
    # the two text encoder files are told apart by their tensors, whatever their order
    assert nodes["11"]["inputs"] == {"clip_file": "clip_l.safetensors", "t5_file": "t5xxl_fp16.safetensors"}
    # KSamplerAdvanced 4 steps from step 2 = 2 steps at denoise 0.5; the seed widget's "fixed" is skipped
    sampler = nodes["31"]["inputs"]
    assert (sampler["steps"], sampler["denoise"], sampler["seed"], sampler["schedule"]) == (2, 0.5, 0, "flux")
    assert nodes["8"]["inputs"]["vae"] == {"node": "10", "output": "vae"}  # through the Reroute
    assert nodes["27"]["inputs"]["vae"] == {
        "node": "10",
        "output": "vae",
    }  # ComfyUI sizes latents to the model
    assert nodes["6"]["ui"] == {
        "pos": [380.0, 40.0],
        "size": [420.0, 160.0],
        "title": "CLIP Text Encode (Positive Prompt)",
    }
    image = run_to_png(out, models, tmp_path / "out")
    assert image.size == (32, 48)


def test_a_comfyui_png_restores_and_reruns(models, tmp_path, registry):
    """A PNG as ComfyUI saves it: the API graph in `prompt`, the editor's graph in `workflow`."""
    info = PngImagePlugin.PngInfo()
    info.add_text("prompt", (COMFY / "flux_dev_api.json").read_text())
    info.add_text("workflow", (COMFY / "flux_dev_ui.json").read_text())
    png = tmp_path / "ComfyUI_00001_.png"
    Image.new("RGB", (32, 48), (9, 9, 9)).save(png, pnginfo=info)
    workflow = to_tessera(read_png(png), registry, file_classifier(models))
    assert workflow["nodes"]["31"]["type"] == "DiTSampler"
    assert workflow["nodes"]["31"]["inputs"]["steps"] == 2  # the executable graph is the `prompt` chunk
    assert workflow["nodes"]["12"]["ui"]["pos"] == [20.0, 260.0]  # the layout comes from `workflow`
    assert run_to_png(png, models, tmp_path / "out").size == (32, 48)


def _api() -> dict:
    return json.loads((COMFY / "flux_dev_api.json").read_text())


@pytest.mark.parametrize(
    ("edit", "node", "named"),
    [
        (lambda g: g["31"].update(class_type="SamplerCustom"), "31", "SamplerCustom"),
        (lambda g: g["31"]["inputs"].update(sampler_name="dpmpp_sde"), "31", "dpmpp_sde"),
        (lambda g: g["31"]["inputs"].update(scheduler="karras"), "31", "karras"),
    ],
)
def test_unmapped_node_sampler_or_scheduler_is_named_with_the_supported_list(registry, edit, node, named):
    graph = _api()
    edit(graph)
    with pytest.raises(InvalidWorkflow) as caught:
        to_tessera(graph, registry)
    (issue,) = caught.value.issues
    assert issue.node == node and named in issue.reason
    supported = {"SamplerCustom": "KSamplerAdvanced", "dpmpp_sde": "dpmpp_2m", "karras": "simple"}[named]
    assert supported in issue.reason


def test_partial_ksampler_advanced_is_refused(registry):
    graph = _api()
    graph["31"] = {
        "class_type": "KSamplerAdvanced",
        "inputs": {
            **{k: graph["31"]["inputs"][k] for k in ("model", "positive", "negative", "latent_image", "cfg")},
            "add_noise": "enable",
            "noise_seed": 1,
            "steps": 10,
            "sampler_name": "euler",
            "scheduler": "simple",
            "start_at_step": 0,
            "end_at_step": 5,
            "return_with_leftover_noise": "enable",
        },
    }
    with pytest.raises(InvalidWorkflow) as caught:
        to_tessera(graph, registry)
    assert {i.input for i in caught.value.issues} == {"end_at_step", "return_with_leftover_noise"}


def test_controlnet_on_conditioning_becomes_controlnet_on_the_sampler_model(registry):
    graph = _api()
    graph["40"] = {
        "class_type": "ControlNetLoader",
        "inputs": {"control_net_name": "dit_canny_controlnet.safetensors"},
    }
    graph["41"] = {"class_type": "LoadImage", "inputs": {"image": "example.png", "upload": "image"}}
    graph["42"] = {
        "class_type": "Canny",
        "inputs": {"image": ["41", 0], "low_threshold": 0.4, "high_threshold": 0.8},
    }
    graph["43"] = {
        "class_type": "ControlNetApplyAdvanced",
        "inputs": {
            "positive": ["26", 0],
            "negative": ["35", 0],
            "control_net": ["40", 0],
            "image": ["42", 0],
            "strength": 0.7,
            "start_percent": 0.0,
            "end_percent": 0.5,
            "vae": ["10", 0],
        },
    }
    graph["31"]["inputs"].update(positive=["43", 0], negative=["43", 1])
    nodes = to_tessera(graph, registry)["nodes"]
    sampler = nodes["31"]["inputs"]
    assert sampler["model"] == {"node": "43", "output": "model"}
    assert sampler["positive"] == {"node": "26", "output": "conditioning"}  # the conditionings pass through
    assert sampler["negative"] == {"node": "35", "output": "conditioning"}
    assert nodes["43"] == {
        "type": "ApplyControlNet",
        "inputs": {
            "control_net": {"node": "40", "output": "control_net"},
            "image": {"node": "42", "output": "image"},
            "vae": {"node": "10", "output": "vae"},
            "strength": 0.7,
            "start": 0.0,
            "end": 0.5,
            "model": {"node": "12", "output": "model"},
        },
    }
    assert nodes["42"]["inputs"]["blur"] == 1.0


def test_ui_format_with_our_ar_nodes_runs_on_the_built_in_models(registry, tmp_path):
    """A graph a ComfyUI editor builds from /object_info: our AR nodes, their widget values in
    /object_info order (the seed followed by its control_after_generate value)."""

    def node(node_id, kind, widgets=(), inputs=(), outputs=()):
        return {
            "id": node_id,
            "type": kind,
            "pos": [node_id * 100, 0],
            "size": [200, 100],
            "mode": 0,
            "inputs": [{"name": n, "type": t, "link": link} for n, t, link in inputs],
            "outputs": [{"name": n, "type": t, "links": links} for n, t, links in outputs],
            "widgets_values": list(widgets),
        }

    doc = {
        "last_node_id": 8,
        "last_link_id": 8,
        "version": 0.4,
        "nodes": [
            node(1, "LoadARModel", ["tessera-ar-tiny.safetensors"], outputs=[("AR_MODEL", "AR_MODEL", [1])]),
            node(2, "LoadVQModel", ["tessera-vq-f8.safetensors"], outputs=[("VQ_MODEL", "VQ_MODEL", [2, 3])]),
            node(3, "LoadTextEncoder", ["tessera-text-encoder.safetensors"], outputs=[("CLIP", "CLIP", [4])]),
            node(
                4,
                "CLIPTextEncode",
                ["a red star at the top left on a blue background"],
                inputs=[("clip", "CLIP", 4)],
                outputs=[("CONDITIONING", "CONDITIONING", [5])],
            ),
            node(
                6,
                "ARGenerateTokens",
                [0, 4, 4, 1, 1.0, "constant", 1.0, 0, 1.0, 5, "fixed", 0, "sequential", 16],
                inputs=[("model", "AR_MODEL", 1), ("positive", "CONDITIONING", 5), ("vq", "VQ_MODEL", 2)],
                outputs=[("tokens", "TOKENS", [6])],
            ),
            node(
                7,
                "VQDecode",
                inputs=[("vq", "VQ_MODEL", 3), ("tokens", "TOKENS", 6)],
                outputs=[("IMAGE", "IMAGE", [7])],
            ),
            node(8, "SaveImage", ["comfy_ui_ar"], inputs=[("images", "IMAGE", 7)]),
        ],
        "links": [
            [1, 1, 0, 6, 0, "AR_MODEL"],
            [2, 2, 0, 6, 2, "VQ_MODEL"],
            [3, 2, 0, 7, 0, "VQ_MODEL"],
            [4, 3, 0, 4, 0, "CLIP"],
            [5, 4, 0, 6, 1, "CONDITIONING"],
            [6, 6, 0, 7, 1, "TOKENS"],
            [7, 7, 0, 8, 0, "IMAGE"],
        ],
    }
    workflow = to_tessera(doc, registry)
    generate = workflow["nodes"]["6"]["inputs"]
    assert (generate["width"], generate["seed"], generate["preview_every"], generate["decoding"]) == (
        4,
        5,
        0,
        "sequential",
    )
    assert generate["positive"] == {"node": "4", "output": "conditioning"}
    from tessera.executor import Executor

    (tmp_path / "out").mkdir()
    executor = Executor(registry, WORKFLOWS.parent / "models", tmp_path, tmp_path / "out", "cpu")
    result = executor.run(workflow)
    assert result.status == "success", result.errors
    (ref,) = result.outputs["8"]["images"]
    with Image.open(tmp_path / "out" / ref["subfolder"] / ref["filename"]) as image:
        assert image.size == (32, 32)
