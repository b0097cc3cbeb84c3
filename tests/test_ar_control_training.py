"""The GPT ControlNet trained jointly with a LoRA on the GPT (lab/adapter_training.train_gpt_controlnet):
a fresh control and LoRA change nothing, one joint step after another lowers the loss on a fixed batch
and moves both parts, a resumed run ends with the uninterrupted run's weights, and the nodes load a
file carrying both parts and apply both, or refuse a GPT the LoRA does not fit."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import tessera.nodes.adapters as adapter_nodes
import tessera.nodes.autoregressive as ar_nodes
from tessera.engines.conditioning import Conditioning
from tessera.engines.controlnet import (
    ARControlConfig,
    ARControlNet,
    ControlledBlock,
    ControlledGPT,
    gpt_fingerprint,
    load_any_controlnet,
    save_ar_controlnet,
    with_ar_control,
)
from tessera.engines.gpt import GPT, GPTConfig, gpt_config_metadata
from tessera.engines.lora import LoraLinear, with_loras
from tessera.engines.text_encoder import tiny_text_encoder
from tessera.engines.vq import VQConfig, VQModel
from tessera.executor import Executor
from tessera.lab import training
from tessera.lab.adapter_training import (
    GPT_TARGETS,
    TrainSettings,
    _lora_on,
    lora_parameters,
    lora_tensors,
    train_gpt_controlnet,
    trainable_lora,
)
from tessera.lab.objectives import teacher_forced_logits, token_loss
from tessera.node import Input, Node, Output
from tessera.registry import NodeRegistry

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

CAPTURED: dict[str, object] = {}


def caption_gpt(n_layer: int = 3, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    cfg = GPTConfig(dim=32, n_layer=n_layer, n_head=2, n_kv_head=2, ffn_hidden=64, vocab_size=16,
                    num_classes=0, caption_dim=32, cls_token_num=80, grid_size=8)  # fmt: skip
    gpt = GPT(cfg)
    with torch.no_grad():
        for p in gpt.parameters():
            p.normal_(0, 0.2)
    return gpt.eval()


def fixed_batch(seed: int = 1):
    """Control images whose left or right half is bright, and token ids that follow that half."""
    g = torch.Generator().manual_seed(seed)
    images = torch.zeros(4, 64, 64, 3)
    images[:2, :, :32] = 1.0
    images[2:, :, 32:] = 1.0
    ids = torch.zeros(4, 8, 8, dtype=torch.long)
    ids[:2, :, :4] = 7
    ids[2:, :, 4:] = 7
    cond = Conditioning(
        torch.randn(4, 5, 32, generator=g), torch.zeros(4, 16), torch.ones(4, 5, dtype=torch.bool)
    )
    return images, ids, cond


def fresh_net(gpt: GPT, layers=(1, 2)) -> ARControlNet:
    torch.manual_seed(3)
    net = ARControlNet(ARControlConfig(gpt.config.dim, downsample=8, width=8, layers=layers, vocab=16))
    net.zero_init_heads()
    return net


def test_a_fresh_control_and_lora_leave_the_gpt_logits_unchanged():
    gpt = caption_gpt()
    images, ids, cond = fixed_batch()
    _, model = _lora_on(gpt, GPT_TARGETS, TrainSettings(rank=4, alpha=4.0), None)
    controlled = with_ar_control(model, fresh_net(gpt), images)
    assert [type(b) is ControlledBlock for b in controlled.layers] == [False, True, True]
    features, valid = gpt.caption_features(cond)
    with torch.no_grad():
        base = teacher_forced_logits(gpt, features, valid, ids)
        assert torch.equal(teacher_forced_logits(controlled, features, valid, ids), base)
    assert not any(isinstance(b, ControlledBlock) for b in gpt.layers)  # the base is left as it was


def test_the_joint_step_lowers_the_loss_on_a_fixed_batch_and_trains_both_parts():
    gpt = caption_gpt()
    images, ids, cond = fixed_batch()
    lora, model = _lora_on(gpt, GPT_TARGETS, TrainSettings(rank=4, alpha=4.0), None)
    net = fresh_net(gpt).train()
    params = [*net.parameters(), *lora_parameters(lora)]
    opt = torch.optim.AdamW(params, lr=3e-2, weight_decay=0.0)
    no_drop = torch.zeros(4, dtype=torch.bool)
    losses = []
    for _ in range(40):
        loss = token_loss(with_ar_control(model, net, images), cond, ids, no_drop)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # (the loss cannot near 0: the output head is frozen and random, which bounds the logits)
    assert losses[-1] < 0.7 * losses[0], losses
    heads = (net.controlnet_out, *net.controlnet_blocks, net.controlnet_logits)
    assert all(h.weight.abs().max() > 0 for h in heads)
    assert all(u.up.abs().max() > 0 for u in lora.updates)
    # the control now tells the two halves apart: swapping the images raises the loss
    with torch.no_grad():
        swapped = token_loss(with_ar_control(model, net, images.flip(0)), cond, ids, no_drop)
        assert swapped > token_loss(with_ar_control(model, net, images), cond, ids, no_drop) + 0.5


class Interrupted(Exception):
    pass


def test_a_resumed_joint_run_ends_with_the_uninterrupted_runs_weights(tmp_path, monkeypatch):
    gpt = caption_gpt(n_layer=2)
    vq = VQModel(VQConfig(channels=16, ch_mult=[1, 1, 1, 1], decoder_ch_mult=[1, 1, 1, 1], num_res_blocks=1,
                          attn_deepest=False, z_channels=8, codebook_size=16, codebook_dim=4, norm_groups=4)).eval()  # fmt: skip
    text = tiny_text_encoder().requires_grad_(False)

    def settings(name: str, **extra) -> TrainSettings:
        return TrainSettings(steps=3, batch=2, lr=1e-2, rank=2, alpha=2.0, bf16=False, ckpt_every=1,
                             state=tmp_path / f"{name}.state.safetensors", log_every=1, **extra)  # fmt: skip

    whole = train_gpt_controlnet(gpt, vq, text, settings("whole"), width=8, head_steps=2)
    assert whole.config.layers == (1,) and whole.config.vocab == 16 and whole.lora
    save_state = training._save_state

    def stop_after_step_2(path, step, *args, **kwargs):
        save_state(path, step, *args, **kwargs)
        if step == 2:
            raise Interrupted

    monkeypatch.setattr(training, "_save_state", stop_after_step_2)
    with pytest.raises(Interrupted):
        train_gpt_controlnet(gpt, vq, text, settings("parts"), width=8, head_steps=2)
    monkeypatch.setattr(training, "_save_state", save_state)
    parts = train_gpt_controlnet(
        gpt,
        vq,
        text,
        settings("parts", resume_from=tmp_path / "parts.state.safetensors"),
        width=8,
        head_steps=2,
    )  # the head stage is skipped: the joint state holds every tensor
    a, b = whole.state_dict(), parts.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert whole.lora.keys() == parts.lora.keys()
    assert all(torch.equal(whole.lora[k], parts.lora[k]) for k in whole.lora)
    assert any(v.abs().max() > 0 for k, v in whole.lora.items() if "lora_B" in k)  # the LoRA trained
    assert whole.base["fingerprint"] == gpt_fingerprint(gpt)


# ---------------------------------------------------------------- through the nodes


class ControlImage(Node):
    """A fixed control image: a bright left half."""

    outputs = (Output("image", "IMAGE"),)

    def execute(self, ctx):
        image = torch.zeros(1, 24, 32, 3)
        image[:, :, :16] = 1.0
        return (image,)


class CaptureAR(Node):
    is_output = True
    inputs = (Input("model", "AR_MODEL"), Input("name", "STRING", default="m"))

    def execute(self, ctx, model, name):
        CAPTURED[name] = model
        return ()


def class_gpt(n_layer: int, seed: int) -> GPT:
    torch.manual_seed(seed)
    gpt = GPT(
        GPTConfig(dim=32, n_layer=n_layer, n_head=4, n_kv_head=4, ffn_hidden=64, vocab_size=24, num_classes=3)
    )
    with torch.no_grad():
        for p in gpt.parameters():
            p.normal_(0, 0.3)
    return gpt.eval()


def logits(model: GPT, ids: torch.Tensor) -> torch.Tensor:
    """Teacher-forced logits of a class-conditioned GPT for ids [B, 3, 4] after class 1."""
    b = ids.shape[0]
    x = torch.cat(
        [model.class_prefix(torch.ones(b, dtype=torch.long)), model.embed_tokens(ids.flatten(1)[:, :-1])], 1
    )
    model.setup_caches(b, 3, 4, allocate_kv=False)
    try:
        with torch.no_grad():
            return model(x, torch.arange(x.shape[1]), use_cache=False)
    finally:
        model.clear_caches()


@pytest.fixture
def files(tmp_path):
    """A models folder: the GPT the control was trained on, a same-shape stranger, a shallower GPT,
    and the control file carrying a LoRA (random heads and factors, so every part shows)."""
    for folder in ("ar_models", "controlnet", "in", "out"):
        (tmp_path / folder).mkdir()
    gpts = {"gpt": class_gpt(3, 0), "other": class_gpt(3, 1), "shallow": class_gpt(2, 0)}
    for name, gpt in gpts.items():
        save_file(gpt.state_dict(), str(tmp_path / "ar_models" / f"{name}.safetensors"),
                  metadata=gpt_config_metadata(gpt.config))  # fmt: skip
    gpt = gpts["gpt"]
    net = ARControlNet(ARControlConfig(32, downsample=8, width=8, layers=(1, 2), vocab=24))
    lora = trainable_lora(gpt, 2, 2.0, lambda n: bool(GPT_TARGETS.match(n)), seed=4)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in [*net.parameters(), *lora_parameters(lora)]:
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    net.lora = lora_tensors(lora, "peft")
    net.base = {"name": "gpt.safetensors", "fingerprint": gpt_fingerprint(gpt)}
    save_ar_controlnet(net, tmp_path / "controlnet" / "cn.safetensors")
    return tmp_path, gpt


def run_apply(root, model_file: str, strength: float = 1.0):
    registry = NodeRegistry()
    for module in (ar_nodes, adapter_nodes):
        registry.register_module(module)
    for node in (ControlImage, CaptureAR):
        registry.register(node)
    executor = Executor(registry, root, root / "in", root / "out", "cpu")
    workflow = {
        "version": 1,
        "nodes": {
            "gpt": {"type": "LoadARModel", "inputs": {"model_name": model_file}},
            "cn": {"type": "LoadControlNet", "inputs": {"file": "cn.safetensors"}},
            "image": {"type": "ControlImage", "inputs": {}},
            "apply": {
                "type": "ApplyControlNetGPT",
                "inputs": {
                    "model": {"node": "gpt", "output": "model"},
                    "control_net": {"node": "cn", "output": "control_net"},
                    "image": {"node": "image", "output": "image"},
                    "strength": strength,
                },
            },
            "keep": {"type": "CaptureAR", "inputs": {"model": {"node": "apply", "output": "model"}}},
        },
    }
    return executor.run(workflow)


def test_the_nodes_load_a_control_file_and_apply_its_control_and_its_lora(files):
    root, gpt = files
    result = run_apply(root, "gpt.safetensors")
    assert result.status == "success", result.errors
    text = result.outputs["apply"]["text"][0]
    assert "layers 1, 2" in text and "logits" in text and "LoRA" in text and "not on this model" not in text
    model = CAPTURED["m"]
    assert isinstance(model, ControlledGPT)
    assert sum(isinstance(m, LoraLinear) for m in model.modules()) == 3 * 5  # every targeted linear
    # the node's model is exactly the control applied on top of the file's LoRA
    net = load_any_controlnet(root / "controlnet" / "cn.safetensors")
    image = torch.zeros(1, 24, 32, 3)
    image[:, :, :16] = 1.0
    ids = torch.randint(0, 24, (2, 3, 4), generator=torch.Generator().manual_seed(6))
    lora_only = with_loras(gpt, [(net.gpt_lora(gpt), 1.0)])
    control_only = ARControlNet(net.config)
    control_only.load_state_dict(net.state_dict())
    expected = logits(with_ar_control(lora_only, control_only, image), ids)
    got = logits(model, ids)
    torch.testing.assert_close(got, expected)
    for part in (lora_only, with_ar_control(gpt, control_only, image)):  # neither half alone
        assert (logits(part, ids) - got).abs().max() > 1e-2
    off = run_apply(root, "gpt.safetensors", strength=0.0)
    assert off.status == "success"
    assert torch.equal(logits(CAPTURED["m"], ids), logits(gpt, ids))


def test_a_control_file_applies_to_another_gpt_of_its_shape_and_says_so_but_never_half(files):
    root, _ = files
    other = run_apply(root, "other.safetensors")
    assert other.status == "success", other.errors
    assert "trained on gpt.safetensors, not on this model" in other.outputs["apply"]["text"][0]
    assert sum(isinstance(m, LoraLinear) for m in CAPTURED["m"].modules()) == 15
    shallow = run_apply(root, "shallow.safetensors")
    assert shallow.status == "error"
    assert shallow.errors[0]["node"] == "apply" and "layer 2" in str(shallow.errors[0])
