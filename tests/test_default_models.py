"""The shipped default models: they load through the node loaders, the shipped workflows run
end to end on CPU, and a held-out caption comes out with the right background colour."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tessera.engines.checkpoint import read_safetensors
from tessera.executor import Executor
from tessera.lab import synthetic
from tessera.lab.scorers import score
from tessera.paths import SOURCE_ROOT
from tessera.registry import default_registry

MODELS = SOURCE_ROOT / "models"
WORKFLOWS = SOURCE_ROOT / "workflows"
INPUTS = WORKFLOWS / "inputs"
SHIPPED = {
    "text_encoders/tessera-text-encoder.safetensors": ("LoadTextEncoder", "file"),
    "vae/tessera-vae-f8.safetensors": ("LoadVAE", "file"),
    "vq_models/tessera-vq-f8.safetensors": ("LoadVQModel", "file"),
    "diffusion_models/tessera-dit-tiny.safetensors": ("LoadDiffusionModel", "file"),
    "ar_models/tessera-ar-tiny.safetensors": ("LoadARModel", "file"),
    "vq_models/tessera-msvq-f8.safetensors": ("LoadMultiScaleVQ", "file"),  # the next-scale pair
    "ar_models/tessera-var-tiny.safetensors": ("LoadVARModel", "file"),
}
DEFAULT_WORKFLOWS = (
    "text_to_image_diffusion",
    "text_to_image_autoregressive",
    "image_to_image_diffusion",
    "outpaint_tokens_autoregressive",
    "text_to_image_next_scale",
    "next_scale_variations",
)
RED_STAR_TOP_LEFT = {
    "kind": "shape",
    "shape": "star",
    "color": "red",
    "position": "top left",
    "background": "blue",
}
CARD_FIELDS = ("data", "steps", "examples_seen", "wall_time_s", "hardware", "final_loss")


@pytest.fixture(scope="module")
def executor(tmp_path_factory) -> Executor:
    return Executor(default_registry(None), MODELS, INPUTS, tmp_path_factory.mktemp("out"), "cpu")


def _workflow(name: str) -> dict:
    return json.loads((WORKFLOWS / f"{name}.json").read_text())


def _run(executor: Executor, workflow: dict) -> list[Path]:
    result = executor.run(workflow)
    assert result.status == "success", result.errors
    refs = [ref for ui in result.outputs.values() for ref in ui.get("images", [])]
    return [executor.output_dir / ref["subfolder"] / ref["filename"] for ref in refs]


@pytest.mark.parametrize("relpath", sorted(SHIPPED))
def test_shipped_file_is_half_precision_with_config_and_card(relpath):
    tensors, metadata = read_safetensors(MODELS / relpath)
    assert {t.dtype for t in tensors.values() if t.is_floating_point()} <= {torch.float16, torch.bfloat16}
    assert isinstance(json.loads(metadata["tessera.config"]), dict)
    card = json.loads(metadata["tessera.card"])
    missing = [k for k in CARD_FIELDS if card.get(k) in (None, "")]
    assert not missing, f"{relpath}: card lacks {missing}"
    assert card["examples_seen"] == card["steps"] * card["batch"]


def test_shipped_models_fit_the_size_budget_and_generators_match():
    total = sum((MODELS / p).stat().st_size for p in SHIPPED)
    assert total < 60 * 2**20, f"shipped weights take {total / 2**20:.1f} MiB"  # three ~16 MiB generators
    cards = [json.loads(read_safetensors(MODELS / p)[1]["tessera.card"]) for p in SHIPPED]
    dit, ar, var = (next(c for c in cards if c["kind"] == kind) for kind in ("dit", "ar", "var"))
    assert abs(dit["parameters"] - ar["parameters"]) <= 0.1 * dit["parameters"]
    assert dit["examples_seen"] == ar["examples_seen"]
    assert dit["text_encoder"]["sha256_16"] == ar["text_encoder"]["sha256_16"]  # one frozen encoder, shared
    assert all(abs(var["parameters"] - c["parameters"]) <= 0.05 * c["parameters"] for c in (dit, ar))
    assert var["text_encoder"]["sha256_16"] == dit["text_encoder"]["sha256_16"]


@pytest.mark.parametrize(
    "relpath",
    sorted(SHIPPED),
)
def test_shipped_file_loads_through_its_node_in_float32(executor, relpath):
    node_type, input_name = SHIPPED[relpath]
    cls = executor.registry.nodes[node_type]
    assert Path(relpath).name in executor.model_files(relpath.split("/")[0])
    inputs = {i.name: i.default for i in cls.inputs if i.default is not None}
    inputs[input_name] = Path(relpath).name
    (model,) = cls().execute(executor.context("load"), **inputs)
    dtypes = {p.dtype for p in model.parameters()}
    assert dtypes == {torch.float32}, f"{node_type} keeps {dtypes} on the CPU"


@pytest.mark.parametrize("name", DEFAULT_WORKFLOWS)
def test_default_workflow_runs_and_writes_an_image(executor, name):
    workflow = _workflow(name)
    executor.validate(workflow)
    path, *_ = _run(executor, workflow)  # the first image (the variations template makes several)
    image = Image.open(path).convert("RGB")
    assert image.size == (64, 64)
    spread = max(hi - lo for lo, hi in image.getextrema())
    # the built-in VAR saw 11,008 examples on a CPU (the DiT and GPT 283,904 on a GPU): it paints the
    # asked background with faint blobs, not yet the object (models/README.md), so only that is asked
    next_scale = "next_scale" in name
    assert spread > (20 if next_scale else 60), "a blank image"
    if name.startswith("text_to_image"):
        # "a red star at the top left on a blue background": the project's scorer must see the
        # colour, the place and the background the prompt asks for (the shape is the hard part)
        asked = ("background",) if next_scale else ("color", "position", "background")
        result = score(np.asarray(image), RED_STAR_TOP_LEFT)
        assert {k: result[k] for k in asked} == dict.fromkeys(asked, True), result


def test_default_workflows_are_laid_out_on_one_screen():
    """The editor fits a template to the view on load; text stays readable down to 35% zoom, so a
    template must fit 1280x800 at 40% or more, with no node drawn over another."""
    for name in DEFAULT_WORKFLOWS:
        boxes = {i: (*n["ui"]["pos"], *n["ui"]["size"]) for i, n in _workflow(name)["nodes"].items()}
        left = min(x for x, _, _, _ in boxes.values())
        top = min(y for _, y, _, _ in boxes.values())
        right = max(x + w for x, _, w, _ in boxes.values())
        bottom = max(y + h for _, y, _, h in boxes.values())
        zoom = min(1280 / (right - left), 800 / (bottom - top))
        assert zoom >= 0.4, f"{name} needs {zoom:.2f} zoom to fit 1280x800"
        for a, (ax, ay, aw, ah) in boxes.items():
            for b, (bx, by, bw, bh) in boxes.items():
                overlap = a < b and ax < bx + bw and bx < ax + aw and ay < by + bh and by < ay + ah
                assert not overlap, f"{name}: nodes {a} and {b} overlap"


def test_example_input_is_a_64px_rgb_image():
    image = Image.open(INPUTS / "example.png")
    assert image.size == (64, 64) and image.mode == "RGB"


def _heldout_shape_scene() -> dict:
    attributes = synthetic.sample_attributes(random.Random(2), "shape", "heldout")
    assert synthetic.split_of(attributes) == "heldout"
    return attributes


@pytest.mark.parametrize("paradigm", ["diffusion", "autoregressive", "next_scale"])
def test_heldout_caption_gets_its_background_colour(executor, paradigm):
    attributes = _heldout_shape_scene()
    workflow = copy.deepcopy(_workflow(f"text_to_image_{paradigm}"))
    nodes = workflow["nodes"]
    next(n for n in nodes.values() if n["ui"].get("title") == "prompt")["inputs"]["text"] = synthetic.caption(
        attributes
    )
    batch = {"diffusion": "EmptyLatent", "autoregressive": "ARGenerateTokens", "next_scale": "VARGenerate"}
    next(n for n in nodes.values() if n["type"] == batch[paradigm])["inputs"]["batch_size"] = 4
    paths = _run(executor, workflow)
    assert len(paths) == 4
    scores = [score(Image.open(p).convert("RGB"), attributes)["background"] for p in paths]
    assert sum(scores) >= 3, f"{synthetic.caption(attributes)!r}: background right in {sum(scores)} of 4"


def test_next_scale_variations_keep_the_source_composition(executor):
    """Keeping the example's first 3 of 6 scales (1x1 to 3x3) and sampling the finer ones: four
    different images that keep its blue background and a yellow object in its top row."""
    paths = _run(executor, _workflow("next_scale_variations"))
    assert len(paths) == 4
    images = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    assert len({image.tobytes() for image in images}) == 4, "variations, not copies"
    source = {"kind": "shape", "shape": "circle", "color": "yellow", "position": "top", "background": "blue"}
    kept = [score(image, source) for image in images]
    assert sum(k["background"] for k in kept) >= 3, kept
    assert sum(k["color"] for k in kept) >= 3, kept
