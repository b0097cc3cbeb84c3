"""Caption -> image has one path per paradigm (engines/generation.py): the node graph makes the
same images bit for bit, and image k of a batch is the image seed + k gives alone."""

from __future__ import annotations

import pytest
import torch

from tessera.engines.flux import load_dit
from tessera.engines.generation import generate_autoregressive, generate_diffusion
from tessera.engines.gpt import load_gpt
from tessera.engines.text_encoder import load_text_encoder
from tessera.engines.vae import load_vae
from tessera.engines.vq import load_vq
from tessera.executor import Executor
from tessera.node import Input, Node
from tessera.paths import default_models_dir
from tessera.registry import default_registry

pytestmark = pytest.mark.usefixtures("one_thread")

MODELS = default_models_dir()
FILES = {
    "te": "text_encoders/tessera-text-encoder.safetensors",
    "vae": "vae/tessera-vae-f8.safetensors",
    "dit": "diffusion_models/tessera-dit-tiny.safetensors",
    "vq": "vq_models/tessera-vq-f8.safetensors",
    "gpt": "ar_models/tessera-ar-tiny.safetensors",
}
CAPTIONS = ["a red circle on a blue background", "the word cat"]


@pytest.fixture(scope="module")
def models():
    return {
        "te": load_text_encoder(MODELS / FILES["te"], dtype=torch.float32),  # as its node loads it on the CPU
        "vae": load_vae(MODELS / FILES["vae"]),
        "dit": load_dit(MODELS / FILES["dit"]),
        "vq": load_vq(MODELS / FILES["vq"]),
        "gpt": load_gpt(MODELS / FILES["gpt"]),
    }


CAPTURED: list[torch.Tensor] = []


class Capture(Node):
    """Keeps the IMAGE it receives (an output node, so the executor runs what leads to it)."""

    category = "testing"
    is_output = True
    inputs = (Input("images", "IMAGE"),)
    outputs = ()

    def execute(self, ctx, images):
        CAPTURED.append(images)
        return ()


def run_graph(nodes: dict, tmp_path) -> torch.Tensor:
    """Run a workflow through the executor; the IMAGE its Capture node received."""
    registry = default_registry()
    registry.register(Capture)
    executor = Executor(registry, MODELS, tmp_path / "in", tmp_path / "out", "cpu")
    CAPTURED.clear()
    result = executor.run({"version": 2, "nodes": nodes})
    assert result.status == "success", result.errors
    (image,) = CAPTURED
    return image


def link(node: str, output: str) -> dict:
    return {"node": node, "output": output}


def dit_images(models, captions: list[str], seed: int) -> torch.Tensor:
    te = models["te"]
    return generate_diffusion(models["dit"], models["vae"], te.encode(captions), te.encode([""]), height=64, width=64,
                              seed=seed, steps=4, cfg=4.0, guidance=3.5)  # fmt: skip


def gpt_images(models, captions: list[str], seed: int) -> torch.Tensor:
    return generate_autoregressive(
        models["gpt"], models["vq"], models["te"].encode(captions), seed=seed, cfg=3.0
    )


@pytest.mark.parametrize("images", [dit_images, gpt_images], ids=["diffusion", "autoregressive"])
def test_image_k_of_a_batch_is_seed_plus_k_alone(models, images):
    batch = images(models, [CAPTIONS[0]] * 3, seed=7)
    assert batch.shape == (3, 64, 64, 3) and 0 <= float(batch.min()) and float(batch.max()) <= 1
    # equal up to fp32 rounding, which depends on the batch size in the matrix products
    torch.testing.assert_close(batch[2:], images(models, [CAPTIONS[0]], seed=9), atol=1e-4, rtol=0)
    assert not torch.allclose(batch[0], batch[1])


def loaders() -> dict:
    return {
        "te": {"type": "LoadTextEncoder", "inputs": {"file": FILES["te"].split("/")[1]}},
        "pos": {
            "type": "TextEncode",
            "inputs": {"text_encoder": link("te", "text_encoder"), "text": CAPTIONS[1]},
        },
        "neg": {"type": "TextEncode", "inputs": {"text_encoder": link("te", "text_encoder"), "text": ""}},
    }


def test_the_diffusion_nodes_make_what_generate_diffusion_makes(models, tmp_path):
    graph = {**loaders(),
             "dit": {"type": "LoadDiffusionModel", "inputs": {"file": FILES["dit"].split("/")[1]}},
             "vae": {"type": "LoadVAE", "inputs": {"file": FILES["vae"].split("/")[1]}},
             "empty": {"type": "EmptyLatent", "inputs": {"width": 64, "height": 64, "vae": link("vae", "vae")}},
             "sample": {"type": "DiTSampler", "inputs": {
                 "model": link("dit", "model"), "positive": link("pos", "conditioning"),
                 "negative": link("neg", "conditioning"), "latent": link("empty", "latent"), "steps": 4,
                 "cfg": 4.0, "guidance": 3.5, "seed": 7}},
             "decode": {"type": "VAEDecode", "inputs": {"vae": link("vae", "vae"), "latent": link("sample", "latent")}},
             "show": {"type": "Capture", "inputs": {"images": link("decode", "image")}}}  # fmt: skip
    assert torch.equal(run_graph(graph, tmp_path), dit_images(models, [CAPTIONS[1]], seed=7))


def test_the_autoregressive_nodes_make_what_generate_autoregressive_makes(models, tmp_path):
    graph = {**loaders(),
             "gpt": {"type": "LoadARModel", "inputs": {"file": FILES["gpt"].split("/")[1]}},
             "vq": {"type": "LoadVQModel", "inputs": {"file": FILES["vq"].split("/")[1]}},
             "tokens": {"type": "ARGenerateTokens", "inputs": {
                 "model": link("gpt", "model"), "positive": link("pos", "conditioning"), "width": 8, "height": 8,
                 "cfg": 3.0, "seed": 7}},
             "decode": {"type": "VQDecode", "inputs": {"vq": link("vq", "vq"), "tokens": link("tokens", "tokens")}},
             "show": {"type": "Capture", "inputs": {"images": link("decode", "image")}}}  # fmt: skip
    assert torch.equal(run_graph(graph, tmp_path), gpt_images(models, [CAPTIONS[1]], seed=7))
