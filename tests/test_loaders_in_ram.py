"""Every model loader loads into CPU memory, whatever the compute device: the model manager
(tessera/model_manager.py) puts a node's input models on the device, within the VRAM budget.
The context here names the `meta` device: a loader that put its model there would show it."""

from __future__ import annotations

import pytest
import torch
from real_model_fixtures import clip_state, save, t5_state, write_flux, write_llamagen

from tessera.engines.layouts import read_weights
from tessera.engines.text_encoder import TextEncoder, TextEncoderConfig, save_text_encoder
from tessera.node import ExecutionContext
from tessera.nodes.autoregressive import LoadARModel, LoadVQModel
from tessera.nodes.diffusion import LoadCheckpoint, LoadDiffusionModel, LoadVAE
from tessera.nodes.text import CLIPLoader, DualCLIPLoader, LoadTextEncoder


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    write_flux(root)
    write_llamagen(root, "c2i")
    save_text_encoder(
        TextEncoder(TextEncoderConfig(width=32, depth=1, heads=2)),
        root / "text_encoders" / "chars.safetensors",
    )
    parts = {
        "model.diffusion_model.": read_weights(root / "diffusion_models" / "flux1-schnell.safetensors")[0],
        "vae.": read_weights(root / "vae" / "ae.safetensors")[0],
        "text_encoders.clip_l.transformer.": clip_state(),
        "text_encoders.t5xxl.transformer.": t5_state(),
    }
    save(
        {p + k: v for p, part in parts.items() for k, v in part.items()},
        root / "checkpoints" / "aio.safetensors",
    )
    return root


def modules(value) -> list[torch.nn.Module]:
    if isinstance(value, torch.nn.Module):
        return [value]
    return [m for part in (value.clip, value.t5) if part is not None for m in part[:1]]


@pytest.mark.parametrize(
    ("node", "inputs"),
    [
        (LoadDiffusionModel, {"file": "flux1-schnell.safetensors"}),
        (LoadVAE, {"file": "ae.safetensors"}),
        (LoadTextEncoder, {"file": "chars.safetensors"}),
        (CLIPLoader, {"file": "clip_l.safetensors"}),
        (DualCLIPLoader, {"clip_file": "clip_l.safetensors", "t5_file": "t5xxl_fp16.safetensors"}),
        (LoadCheckpoint, {"file": "aio.safetensors"}),
        (LoadARModel, {"file": "llamagen_c2i_XL_384.safetensors"}),
        (LoadVQModel, {"file": "llamagen_vq_ds16_c2i.safetensors"}),
    ],
)
def test_loaders_load_into_cpu_memory(models, node, inputs):
    ctx = ExecutionContext(torch.device("meta"), torch.float32, models, models, models)
    outputs = node().execute(ctx, **inputs)
    found = [m for value in outputs for m in modules(value)]
    assert len(found) == len(outputs) + (node is DualCLIPLoader) + (node is LoadCheckpoint)
    for model in found:
        assert {p.device.type for p in model.parameters()} == {"cpu"}, type(model).__name__


def test_load_checkpoint_stores_the_dit_in_fp8_when_asked(models):
    ctx = ExecutionContext(torch.device("cpu"), torch.float32, models, models, models)
    (plain, _, _), (stored, _, _) = (
        LoadCheckpoint().execute(ctx, "aio.safetensors", weight_dtype)
        for weight_dtype in ("default", "fp8_e4m3fn")
    )
    assert plain.double_blocks[0].img_attn.qkv.weight.dtype == torch.float32
    assert stored.double_blocks[0].img_attn.qkv.weight.dtype == torch.float8_e4m3fn
    assert stored.img_in.weight.dtype == torch.float32  # fp8.DTYPE_ANCHORS stay in the compute dtype
    (bf16, _, _) = LoadCheckpoint().execute(ctx, "aio.safetensors", "bfloat16")
    assert bf16.double_blocks[0].img_attn.qkv.weight.dtype == torch.bfloat16
