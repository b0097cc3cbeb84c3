"""Conditioning that lacks what its model needs is refused when the workflow is validated, before
any node runs: the loaders describe their models' widths from file headers (`Node.describe`), the
encode nodes what their conditioning will hold, and the samplers compare the two. Checked through
`tessera validate`, the executor and POST /api/validate, on tiny checkpoints in the real layouts."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from real_model_fixtures import (
    CLIP,
    DIT_SCHNELL,
    FLAN,
    T5,
    clip_state,
    random_state,
    save,
    save_sharded,
    t5_state,
    write_flux,
    write_llamagen,
)
from tessera_harness import Server

from tessera.engines.flux import Flux
from tessera.engines.layouts import read_weights
from tessera.engines.text_encoder import TextEncoder, TextEncoderConfig, save_text_encoder
from tessera.executor import Executor
from tessera.nodes.diffusion import LoadCheckpoint, LoadDiffusersPipeline
from tessera.registry import default_registry
from tessera.workflow import InvalidWorkflow

WORKFLOWS = Path(__file__).resolve().parent.parent / "workflows"
FLUX = json.loads((WORKFLOWS / "flux_schnell.json").read_text())
LLAMAGEN_T2I = json.loads((WORKFLOWS / "llamagen_t2i.json").read_text())


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    write_flux(root)
    write_llamagen(root, "t2i")
    # Tessera's own character-level encoder, sized like the tiny Flux's text inputs: only what it
    # is (not its widths) can make it wrong for a real Flux; here its widths are wrong too.
    save_text_encoder(
        TextEncoder(TextEncoderConfig(width=32, depth=1, heads=2, context_dim=24, pooled_dim=12)),
        root / "text_encoders" / "chars.safetensors",
    )
    return root


@pytest.fixture
def executor(models, tmp_path):
    return Executor(default_registry(), models, tmp_path / "in", tmp_path / "out", device="cpu")


def issues(executor: Executor, workflow: dict) -> list[tuple[str, str, str]]:
    try:
        executor.compile(executor.validate(workflow))
    except InvalidWorkflow as e:
        return [(i.node, i.input, i.reason) for i in e.issues]
    return []


def with_nodes(**nodes) -> dict:
    workflow = copy.deepcopy(FLUX)
    workflow["nodes"].update(nodes)
    return workflow


def loader(file: str) -> dict:
    return {"type": "CLIPLoader", "inputs": {"file": file}}


def encode(kind: str = "TextEncode") -> dict:
    return {
        "type": kind,
        "inputs": {"text_encoder": {"node": "1", "output": "text_encoder"}, "text": "a fox"},
    }


def test_the_shipped_flux_workflow_validates(executor):
    assert issues(executor, FLUX) == []


def test_flux_text_encode_without_t5_is_refused_on_its_text_encoder_input(executor):
    [(node, name, reason)] = issues(executor, with_nodes(**{"1": loader("clip_l.safetensors")}))
    assert (node, name) == ("2", "text_encoder")
    assert "FluxTextEncode needs CLIP and T5 but the text encoder has CLIP" in reason


def test_clip_only_conditioning_is_refused_on_the_sampler_input(executor):
    workflow = with_nodes(**{"1": loader("clip_l.safetensors"), "2": encode()})
    [(node, name, reason)] = issues(executor, workflow)
    assert (node, name) == ("6", "positive")
    assert f"tokens (made by CLIP) are {CLIP.hidden_size} wide" in reason
    assert f"expects {DIT_SCHNELL.context_dim}" in reason


def test_t5_without_clip_pooled_is_refused(executor):
    workflow = with_nodes(**{"1": loader("t5xxl_fp16.safetensors"), "2": encode()})
    [(node, name, reason)] = issues(executor, workflow)
    assert (node, name) == ("6", "positive")
    assert f"pooled conditioning (made by T5) is {T5.d_model} wide" in reason
    assert f"vector input (vector_in) expects {DIT_SCHNELL.vec_dim}" in reason


def test_the_character_level_encoder_is_refused_for_a_real_flux(executor):
    char = {"type": "LoadTextEncoder", "inputs": {"file": "chars.safetensors"}}
    [(node, name, reason)] = issues(executor, with_nodes(**{"1": char}))
    assert (node, name) == ("2", "text_encoder")
    assert "has the character-level encoder" in reason
    [(node, name, reason)] = issues(executor, with_nodes(**{"1": char, "2": encode()}))
    assert (node, name) == ("6", "positive")
    assert "made by the character-level encoder" in reason


def test_the_negative_input_and_pass_through_nodes_are_checked_too(executor):
    """FluxGuidance hands on what it is given (Node.describe's default), so a bad negative behind it is caught."""
    workflow = with_nodes(
        **{
            "9": {"type": "CLIPLoader", "inputs": {"file": "clip_l.safetensors"}},
            "10": {"type": "TextEncode", "inputs": {"text_encoder": {"node": "9", "output": "text_encoder"}}},
            "11": {
                "type": "FluxGuidance",
                "inputs": {"conditioning": {"node": "10", "output": "conditioning"}},
            },
        }
    )
    workflow["nodes"]["6"]["inputs"].update(negative={"node": "11", "output": "conditioning"}, cfg=2.0)
    [(node, name, reason)] = issues(executor, workflow)
    assert (node, name) == ("6", "negative")
    assert "DiTSampler negative: conditioning tokens (made by CLIP)" in reason


def test_nothing_runs_when_the_conditioning_is_refused(executor):
    result = executor.run(with_nodes(**{"1": loader("clip_l.safetensors"), "2": encode()}))
    assert result.status == "error" and result.executed == []
    assert (result.errors[0]["node"], result.errors[0]["input"]) == ("6", "positive")


def test_tessera_validate_names_the_node_and_input(models, tmp_path):
    path = tmp_path / "clip_only.json"
    path.write_text(json.dumps(with_nodes(**{"1": loader("clip_l.safetensors"), "2": encode()})))
    cmd = [sys.executable, "-m", "tessera", "validate", str(path), "--models-dir", str(models)]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode != 0
    assert (
        "node 6, input 'positive': DiTSampler positive: conditioning tokens (made by CLIP)"
        in done.stdout + done.stderr
    )
    path.write_text(json.dumps(FLUX))
    ok = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert ok.returncode == 0, ok.stdout + ok.stderr


def test_api_validate_refuses_it(models, tmp_path):
    server = Server(tmp_path / "server")
    server.models_dir.rmdir()
    server.models_dir.symlink_to(models, target_is_directory=True)
    server.start()
    try:
        bad = server.request(
            "POST",
            "/api/validate",
            json_body={"workflow": with_nodes(**{"1": loader("t5xxl_fp16.safetensors"), "2": encode()})},
        )
        good = server.request("POST", "/api/validate", json_body={"workflow": FLUX})
    finally:
        server.stop()
    assert good.status == 200, good.body
    assert bad.status == 400, bad.body
    [error] = bad.json()["errors"]
    assert (error["node"], error["input"]) == ("6", "positive")
    assert "pooled conditioning (made by T5)" in error["reason"]


def test_all_in_one_and_diffusers_loaders_describe_their_parts_from_headers(executor, models):
    """Every layout loader knows its DiT's and encoders' widths before loading: a sharded diffusers
    folder (widths from every shard's header) and an all-in-one checkpoint (its prefixes split)."""
    dit = read_weights(models / "diffusion_models" / "flux1-schnell.safetensors")[0]
    parts = {
        "model.diffusion_model.": dit,
        "text_encoders.clip_l.transformer.": clip_state(),
        "text_encoders.t5xxl.transformer.": t5_state(),
    }
    save(
        {p + k: v for p, part in parts.items() for k, v in part.items()},
        models / "checkpoints" / "aio.safetensors",
    )
    pipeline = models / "diffusion_models" / "FLUX.1-tiny"
    save_sharded(random_state(Flux(DIT_SCHNELL), 7), pipeline / "transformer", "diffusion_pytorch_model")
    save(clip_state(), pipeline / "text_encoder" / "model.safetensors")
    save_sharded(t5_state(), pipeline / "text_encoder_2", "model")
    (pipeline / "model_index.json").write_text("{}")
    expected = {
        "model": {"context_dim": DIT_SCHNELL.context_dim, "vec_dim": DIT_SCHNELL.vec_dim},
        "vae": {},
        "text_encoder": {"encoders": {"clip": CLIP.hidden_size, "t5": T5.d_model}},
    }
    ctx = executor.context("n1")
    assert LoadCheckpoint.describe(ctx, {"file": "aio.safetensors"}, {}) == expected
    shard = "FLUX.1-tiny/transformer/diffusion_pytorch_model-00002-of-00002.safetensors"
    assert LoadDiffusersPipeline.describe(ctx, {"file": shard}, {}) == expected


def test_llamagen_t2i_needs_flan_t5_features_of_its_caption_width(executor):
    assert issues(executor, LLAMAGEN_T2I) == []
    workflow = copy.deepcopy(LLAMAGEN_T2I)
    del workflow["nodes"]["6"]["inputs"]["positive"]
    [(node, name, reason)] = issues(executor, workflow)
    assert (node, name, reason) == (
        "6",
        "positive",
        "this AR model is text-conditioned: link a positive CONDITIONING",
    )
    workflow = copy.deepcopy(LLAMAGEN_T2I)
    workflow["nodes"]["4"] = {
        "type": "TextEncode",
        "inputs": {"text_encoder": {"node": "3", "output": "text_encoder"}},
    }
    workflow["nodes"]["3"]["inputs"]["file"] = "clip_l.safetensors"
    [(node, name, reason)] = issues(executor, workflow)
    assert (node, name) == ("6", "positive")
    assert (
        f"text features (made by CLIP) are {CLIP.hidden_size}-dim but this AR model expects {FLAN.d_model}"
        in reason
    )
    workflow["nodes"]["4"]["type"] = "LlamaGenTextEncode"  # FLAN-T5 is a T5: CLIP alone is refused there
    [(node, name, reason)] = issues(executor, workflow)
    assert (node, name) == (
        "4",
        "text_encoder",
    ) and "LlamaGenTextEncode needs T5 but the text encoder has CLIP" in reason
