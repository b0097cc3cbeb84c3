"""ComfyUI's SamplerCustomAdvanced family (RandomNoise, KSamplerSelect, BasicScheduler,
BasicGuider / CFGGuider) and ModelSamplingFlux import as one DiTSampler where they are the same
algorithm, and are refused by name where they are not.

The graph is ComfyUI's Flux dev example in its custom-sampler form, written by hand from
ComfyUI's node definitions (the same settings as tests/comfy_workflows/flux_dev_api.json).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from test_comfy_import import COMFY, models, registry, run_to_png  # noqa: F401 (fixtures)

from tessera.comfy.convert import to_tessera
from tessera.engines.schedules import schedule_flux, sigmas_for
from tessera.workflow import InvalidWorkflow


def custom_sampler_graph() -> dict:
    """flux_dev_api.json with its KSampler replaced by SamplerCustomAdvanced and its parts."""
    graph = json.loads((COMFY / "flux_dev_api.json").read_text())
    sampler = graph.pop("31")["inputs"]
    graph.update(
        {
            "30": {
                "class_type": "ModelSamplingFlux",
                "inputs": {
                    "max_shift": 1.15,
                    "base_shift": 0.5,
                    "width": 32,
                    "height": 48,
                    "model": ["12", 0],
                },
            },
            "25": {"class_type": "RandomNoise", "inputs": {"noise_seed": sampler["seed"]}},
            "16": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
            "17": {
                "class_type": "BasicScheduler",
                "inputs": {
                    "scheduler": "simple",
                    "steps": sampler["steps"],
                    "denoise": 1.0,
                    "model": ["30", 0],
                },
            },
            "22": {"class_type": "BasicGuider", "inputs": {"model": ["30", 0], "conditioning": ["26", 0]}},
            "13": {
                "class_type": "SamplerCustomAdvanced",
                "inputs": {
                    "noise": ["25", 0],
                    "guider": ["22", 0],
                    "sampler": ["16", 0],
                    "sigmas": ["17", 0],
                    "latent_image": ["27", 0],
                },
            },
        }
    )
    graph["8"]["inputs"]["samples"] = ["13", 0]
    return graph


def test_custom_sampler_flux_graph_gives_the_ksampler_graphs_pixels(models, tmp_path):  # noqa: F811
    """ComfyUI's two ways of sampling Flux dev (KSampler at cfg 1 with a zeroed negative, and
    SamplerCustomAdvanced with BasicGuider and ModelSamplingFlux at the latent's size) are one
    DiTSampler run here: the very same pixels."""
    custom = tmp_path / "custom.json"
    custom.write_text(json.dumps(custom_sampler_graph()))
    ours = run_to_png(custom, models, tmp_path / "custom_out")
    reference = run_to_png(COMFY / "flux_dev_api.json", models, tmp_path / "ksampler_out")
    assert ours.size == (32, 48)
    assert ours.convert("RGB").tobytes() == reference.convert("RGB").tobytes()


def test_the_parts_become_one_sampler_and_denoised_output_is_the_output(registry):  # noqa: F811
    graph = custom_sampler_graph()
    graph["16"]["inputs"]["sampler_name"] = "dpmpp_2m"
    graph["17"]["inputs"].update(scheduler="beta", steps=7, denoise=0.5)
    graph["25"]["inputs"]["noise_seed"] = 99
    graph["22"] = {
        "class_type": "CFGGuider",
        "inputs": {"model": ["30", 0], "positive": ["26", 0], "negative": ["35", 0], "cfg": 2.5},
    }
    graph["8"]["inputs"]["samples"] = ["13", 1]  # denoised_output
    nodes = to_tessera(graph, registry)["nodes"]
    parts = {"30", "25", "16", "17", "22"}
    assert not parts & set(nodes)  # no node of ours for the parts or the shift
    sampler = nodes["13"]
    assert sampler["type"] == "DiTSampler"
    assert {k: v for k, v in sampler["inputs"].items()} == {
        "seed": 99,
        "sampler": "dpmpp_2m",
        "schedule": "beta",
        "steps": 7,
        "denoise": 0.5,
        "cfg": 2.5,
        "model": {"node": "12", "output": "model"},  # through ModelSamplingFlux
        "positive": {"node": "26", "output": "conditioning"},
        "negative": {"node": "35", "output": "conditioning"},
        "latent": {"node": "27", "output": "latent"},
    }
    assert nodes["8"]["inputs"]["latent"] == {"node": "13", "output": "latent"}
    basic = to_tessera(custom_sampler_graph(), registry)["nodes"]["13"]["inputs"]
    assert basic["cfg"] == 1.0 and "negative" not in basic  # BasicGuider: cfg 1, FluxGuidance's guidance


def _refusal(registry, edit) -> list[tuple[str, str | None, str]]:  # noqa: F811
    graph = custom_sampler_graph()
    edit(graph)
    with pytest.raises(InvalidWorkflow) as caught:
        to_tessera(graph, registry)
    return [(i.node, i.input, i.reason) for i in caught.value.issues]


@pytest.mark.parametrize(
    ("edit", "node", "name", "said"),
    [
        (
            lambda g: g["30"]["inputs"].update(width=1024),
            "30",
            "width",
            "1024x48 differs from the latent's 32x48",
        ),
        (lambda g: g["30"]["inputs"].update(max_shift=1.3), "30", "max_shift", "1.15"),
        (
            lambda g: (
                g.update({"13": {**g["13"], "inputs": {**g["13"]["inputs"], "sigmas": ["40", 0]}}})
                or g.update({"40": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}}})
            ),
            "13",
            "sigmas",
            "must come from BasicScheduler, not KSamplerSelect",
        ),
        (lambda g: g["17"]["inputs"].update(model=["12", 0]), "13", "sigmas", "must be the guider's"),
        (lambda g: g["16"]["inputs"].update(sampler_name="lms"), "16", "sampler_name", "dpmpp_2m"),
        (
            lambda g: (
                g["13"]["inputs"].update(latent_image=["50", 0])
                or g.update(
                    {"50": {"class_type": "VAEEncode", "inputs": {"pixels": ["51", 0], "vae": ["10", 0]}}}
                )
                or g.update({"51": {"class_type": "LoadImage", "inputs": {"image": "x.png"}}})
            ),
            "30",
            "width",
            "not known from the graph",
        ),
    ],
    ids=["shift-size", "max-shift", "sigmas-source", "scheduler-model", "sampler", "img2img-shift"],
)
def test_what_is_not_the_same_algorithm_is_refused_by_name(registry, edit, node, name, said):  # noqa: F811
    issues = _refusal(registry, edit)
    assert any(n == node and i == name and said in reason for n, i, reason in issues), issues


def test_a_controlnet_before_a_guider_is_refused(registry):  # noqa: F811
    graph = custom_sampler_graph()
    graph.update(
        {
            "60": {"class_type": "ControlNetLoader", "inputs": {"control_net_name": "cn.safetensors"}},
            "61": {"class_type": "LoadImage", "inputs": {"image": "edges.png"}},
            "62": {
                "class_type": "ControlNetApplyAdvanced",
                "inputs": {
                    "positive": ["26", 0],
                    "negative": ["35", 0],
                    "control_net": ["60", 0],
                    "image": ["61", 0],
                    "strength": 1.0,
                    "start_percent": 0.0,
                    "end_percent": 1.0,
                },
            },
        }
    )
    graph["22"] = copy.deepcopy(graph["22"])
    graph["22"]["inputs"]["conditioning"] = ["62", 0]
    with pytest.raises(InvalidWorkflow) as caught:
        to_tessera(graph, registry)
    assert any(i.node == "13" and "ControlNetApplyAdvanced" in i.reason for i in caught.value.issues)


def test_partial_denoise_walks_the_tail_of_comfyuis_schedule_length(registry):  # noqa: F811
    """ComfyUI's KSampler and BasicScheduler take the last `steps` sigmas of int(steps / denoise)
    (3 steps at 0.4: 7), where round() would give 8: the converted denoise gives ComfyUI's tail."""
    ksampler = json.loads((COMFY / "flux_dev_api.json").read_text())
    ksampler["31"]["inputs"].update(steps=3, denoise=0.4)
    custom = custom_sampler_graph()
    custom["17"]["inputs"].update(steps=3, denoise=0.4)
    comfy_tail = schedule_flux(int(3 / 0.4), 4096)[-4:]
    assert not torch.equal(sigmas_for("flux", 3, 0.4, 4096), comfy_tail)  # the raw value would differ
    for graph, node in ((ksampler, "31"), (custom, "13")):
        inputs = to_tessera(graph, registry)["nodes"][node]["inputs"]
        assert torch.equal(sigmas_for("flux", 3, inputs["denoise"], 4096), comfy_tail)
