"""ControlNet: diffusers' FluxControlNetModel (random weights, small config) and ours agree through the
loader the nodes use, from either key layout, residuals and the controlled DiT's output; strength and
the start/end window gate the control; the base model is left as it was."""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxControlNetModel, FluxTransformer2DModel
from safetensors.torch import save_file

from tessera.engines.checkpoint import CheckpointError, read_safetensors
from tessera.engines.controlnet import (
    ControlHint,
    ControlledFlux,
    controlnet_from_dit,
    load_controlnet,
    save_controlnet,
    spread,
    with_control,
)
from tessera.engines.flux import load_dit, patchify

COMMON = {
    "in_channels": 16,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 24,
    "pooled_projection_dim": 12,
    "axes_dims_rope": (2, 6, 8),
    "guidance_embeds": True,
}


def randomized(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():  # diffusers zero-inits the heads; make every weight matter
            p.copy_(torch.randn(p.shape, generator=g) * 0.15)
    return model.eval()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    ref = randomized(FluxTransformer2DModel(patch_size=1, num_layers=3, num_single_layers=4, **COMMON), 0)
    path = tmp_path_factory.mktemp("dit") / "dit.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    return ref, load_dit(path)


def ids(gh, gw):
    i = torch.zeros(gh, gw, 3)
    i[..., 1] = torch.arange(gh)[:, None]
    i[..., 2] = torch.arange(gw)[None, :]
    return i.reshape(-1, 3)


def inputs(gh=3, gw=2, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, 4, 2 * gh, 2 * gw, generator=g),
        torch.tensor([0.8, 0.3]),
        torch.randn(batch, 5, 24, generator=g),
        torch.randn(batch, 12, generator=g),
        torch.tensor([3.5, 2.0]),
    )


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("layout", ["diffusers", "bfl"])
def test_latent_hint_controlnet_matches_diffusers_from_either_layout(base, tmp_path, layout):
    ref_base, dit = base
    ref = randomized(FluxControlNetModel(patch_size=1, num_layers=2, num_single_layers=1, **COMMON), 2)
    path = tmp_path / "cn.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    if layout == "bfl":
        save_controlnet(load_controlnet(path), tmp_path / "bfl.safetensors")
        path = tmp_path / "bfl.safetensors"
        assert any(k.startswith("double_blocks.") for k in load_controlnet(path).state_dict())
    net = load_controlnet(path)
    assert (net.config.depth, net.config.depth_single, net.pixel_hint) == (2, 1, False)

    x, t, ctx, y, g = inputs()
    hint = torch.randn(2, 4, 6, 4, generator=torch.Generator().manual_seed(9))
    img_ids, txt_ids = ids(3, 2), torch.zeros(5, 3)
    with torch.no_grad():
        d_ref, s_ref = ref(
            hidden_states=patchify(x, 2),
            controlnet_cond=patchify(hint, 2),
            conditioning_scale=0.7,
            encoder_hidden_states=ctx,
            pooled_projections=y,
            timestep=t,
            img_ids=img_ids,
            txt_ids=txt_ids,
            guidance=g,
            return_dict=False,
        )
        expected = ref_base(
            hidden_states=patchify(x, 2),
            encoder_hidden_states=ctx,
            pooled_projections=y,
            timestep=t,
            img_ids=img_ids,
            txt_ids=txt_ids,
            guidance=g,
            controlnet_block_samples=d_ref,
            controlnet_single_block_samples=s_ref,
        ).sample
        plain = ref_base(
            hidden_states=patchify(x, 2),
            encoder_hidden_states=ctx,
            pooled_projections=y,
            timestep=t,
            img_ids=img_ids,
            txt_ids=txt_ids,
            guidance=g,
        ).sample
        d, s = net.forward_tokens(patchify(x, 2), img_ids, ctx, txt_ids, t, y, patchify(hint, 2), g)
        controlled = with_control(dit, net, ControlHint(latent=hint), strength=0.7)
        ours = controlled(x, t, ctx, y, g)
    for a, b in zip(d + s, d_ref + s_ref):
        assert (a * 0.7 - b).abs().max() < 1e-4
    assert (patchify(ours, 2) - expected).abs().max() < 1e-4 * expected.abs().max()
    assert rel_err(patchify(ours, 2), expected) < 1e-5
    assert rel_err(expected, plain) > 1e-2  # the control changed the output


def test_pixel_hint_controlnet_repeats_its_residuals_like_diffusers(base, tmp_path):
    ref_base, dit = base
    ref = randomized(
        FluxControlNetModel(
            patch_size=2, num_layers=2, num_single_layers=0, conditioning_embedding_channels=4, **COMMON
        ),
        3,
    )
    path = tmp_path / "xlabs.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    net = load_controlnet(path)
    assert net.pixel_hint and net.config.depth_single == 0
    x, t, ctx, y, g = inputs()
    image = torch.rand(2, 48, 32, 3, generator=torch.Generator().manual_seed(4))  # 3x2 tokens of 16 px
    img_ids, txt_ids = ids(3, 2), torch.zeros(5, 3)
    with torch.no_grad():
        d_ref, s_ref = ref(
            hidden_states=patchify(x, 2),
            controlnet_cond=image.permute(0, 3, 1, 2) * 2 - 1,
            encoder_hidden_states=ctx,
            pooled_projections=y,
            timestep=t,
            img_ids=img_ids,
            txt_ids=txt_ids,
            guidance=g,
            return_dict=False,
        )
        expected = ref_base(
            hidden_states=patchify(x, 2),
            encoder_hidden_states=ctx,
            pooled_projections=y,
            timestep=t,
            img_ids=img_ids,
            txt_ids=txt_ids,
            guidance=g,
            controlnet_block_samples=d_ref,
            controlnet_single_block_samples=s_ref,
            controlnet_blocks_repeat=True,
        ).sample
        ours = with_control(dit, net, ControlHint(image=image))(x, t, ctx, y, g)
    assert rel_err(patchify(ours, 2), expected) < 1e-5


def test_strength_window_and_stacking_gate_the_control_and_the_base_stays_unchanged(base):
    _, dit = base
    torch.manual_seed(5)
    net = controlnet_from_dit(dit, depth=2, depth_single=1)
    x, _, ctx, y, g = inputs()
    hint = ControlHint(latent=torch.randn(1, 4, 6, 4))
    params = dict(dit.state_dict(keep_vars=True))
    with torch.no_grad():
        t_early, t_late = torch.tensor([1.0, 1.0]), torch.tensor([0.05, 0.05])
        plain_early, plain_late = dit(x, t_early, ctx, y, g), dit(x, t_late, ctx, y, g)
        fresh = with_control(dit, net, hint)  # zero heads: no effect
        assert torch.allclose(fresh(x, t_late, ctx, y, g), plain_late, atol=1e-6)
        for p in net.parameters():
            p.add_(torch.randn(p.shape) * 0.1)
        late_only = with_control(dit, net, hint, strength=1.0, start=0.5, end=1.0)
        assert torch.equal(late_only(x, t_early, ctx, y, g), plain_early)
        assert rel_err(late_only(x, t_late, ctx, y, g), plain_late) > 1e-3
        assert torch.equal(with_control(dit, net, hint, strength=0.0)(x, t_late, ctx, y, g), plain_late)
        # two nets stacked = their residuals summed
        twice = with_control(with_control(dit, net, hint, 0.5), net, hint, 0.5)
        once = with_control(dit, net, hint, 1.0)
        assert isinstance(twice, ControlledFlux) and len(twice.controls) == 2
        torch.testing.assert_close(
            twice(x, t_late, ctx, y, g), once(x, t_late, ctx, y, g), rtol=1e-5, atol=1e-5
        )
    assert type(dit).__name__ == "Flux" and not hasattr(dit, "controls")
    assert all(v is params[k] for k, v in dit.state_dict(keep_vars=True).items())


def test_interval_rule_and_file_errors(tmp_path):
    r = [torch.tensor(float(i)) for i in range(5)]
    assert [int(v) for v in spread(r, 19, repeat=False)] == [i // 4 for i in range(19)]
    assert [int(v) for v in spread(r[:2], 5, repeat=True)] == [0, 1, 0, 1, 0]
    assert spread([], 3, repeat=False) == [None] * 3
    save_file({"img_in.weight": torch.zeros(2, 2)}, str(tmp_path / "dit.safetensors"))
    with pytest.raises(CheckpointError, match="dit.safetensors.*not a Flux ControlNet"):
        load_controlnet(tmp_path / "dit.safetensors")


@pytest.mark.parametrize(("layers", "vocab"), [((), 0), ((1,), 24)])
def test_ar_control_is_a_no_op_until_trained_and_cached_decoding_matches_recompute(tmp_path, layers, vocab):
    """With or without control into a later layer's input and the logits (`layers`, `vocab`): a fresh net changes nothing; a
    trained one changes the tokens identically through the KV cache, a recompute and fixed rows."""
    from tessera.engines.ar_decoding import condition_prefix, generate
    from tessera.engines.controlnet import (
        ARControlConfig,
        ARControlNet,
        ControlledGPT,
        load_any_controlnet,
        save_ar_controlnet,
        with_ar_control,
    )
    from tessera.engines.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    gpt = randomized(
        GPT(GPTConfig(dim=32, n_layer=2, n_head=4, n_kv_head=4, ffn_hidden=64, vocab_size=24, num_classes=3)),
        6,
    )
    net = ARControlNet(ARControlConfig(dim=32, downsample=8, width=8, layers=layers, vocab=vocab))
    net.zero_init_heads()
    image = torch.rand(1, 24, 32, 3, generator=torch.Generator().manual_seed(1))

    def run(model, use_cache=True, fixed=None):
        prefix = condition_prefix(model, 2, class_ids=torch.tensor([1]), cfg=True)
        return generate(model, prefix, 3, 4, cfg_scale=2.0, temperature=0.0, use_cache=use_cache, fixed=fixed)

    base = run(gpt)
    assert torch.equal(run(with_ar_control(gpt, net, image)), base)
    for p in net.parameters():
        p.data.normal_(0, 0.3)
    save_ar_controlnet(net, tmp_path / "ar.safetensors")
    net = load_any_controlnet(tmp_path / "ar.safetensors")
    controlled = with_ar_control(gpt, net, image, strength=2.0)
    assert isinstance(controlled, ControlledGPT) and not isinstance(gpt, ControlledGPT)
    cached = run(controlled)
    assert not torch.equal(cached, base)
    assert torch.equal(run(controlled, use_cache=False), cached)
    from tessera.engines.tokens import TokenGrid

    top = TokenGrid(cached).fix_rows(1)  # fixed rows are prefilled in one pass: same control positions
    assert torch.equal(run(controlled, fixed=top), cached)
    assert gpt.freqs is None and all(layer.attention.kv_cache is None for layer in gpt.layers)
    assert all(
        getattr(layer, "control", None) is None for layer in controlled.layers
    )  # cleared after each call


def test_an_ar_control_file_whose_layers_disagree_with_its_tensors_is_refused_by_name(tmp_path):
    import json

    from tessera.engines.controlnet import (
        ARControlConfig,
        ARControlNet,
        load_any_controlnet,
        save_ar_controlnet,
    )

    save_ar_controlnet(
        ARControlNet(ARControlConfig(dim=32, downsample=8, width=8, layers=(1, 2))),
        tmp_path / "a.safetensors",
    )
    sd, metadata = read_safetensors(tmp_path / "a.safetensors")
    config = json.loads(metadata["tessera.config"])
    assert config["layers"] == [1, 2] and load_any_controlnet(tmp_path / "a.safetensors").config.layers == (
        1,
        2,
    )
    save_file(
        sd,
        str(tmp_path / "b.safetensors"),
        metadata={"tessera.config": json.dumps({**config, "layers": [1]})},
    )
    with pytest.raises(CheckpointError, match=r"b\.safetensors.*'layers'.*2 controlnet_blocks"):
        load_any_controlnet(tmp_path / "b.safetensors")
    with pytest.raises(ValueError, match="distinct GPT layers from 1"):
        ARControlNet(ARControlConfig(dim=32, downsample=8, width=8, layers=(0,)))


def test_a_fresh_pixel_hint_controlnet_changes_nothing_yet_learns_to_read_its_hint(base):
    """Zeroed heads make a fresh net a no-op; its hint encoder must still get a gradient (if both the
    encoder's last convolution and `controlnet_x_embedder` started at zero, neither would ever train)."""
    from tessera.lab.training import _trainable_flux

    _, dit = base
    torch.manual_seed(6)
    net = controlnet_from_dit(dit, depth=1, depth_single=0, hint_channels=4).train()
    x, t, ctx, y, g = inputs()
    images = torch.rand(2, 2, 48, 32, 3, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        plain = dit(x, t, ctx, y, g)
        assert torch.equal(with_control(dit, net, ControlHint(image=images[0]))(x, t, ctx, y, g), plain)
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    with _trainable_flux():
        for _ in range(5):  # the zeroed residual heads move first, then the hint input, then the encoder
            opt.zero_grad()
            loss = (
                (with_control(dit, net, ControlHint(image=images[0]))(x, t, ctx, y, g) - plain - 1)
                .square()
                .mean()
            )
            loss.backward()
            opt.step()
    assert net.input_hint_block[0].weight.grad.abs().sum() > 0
    with torch.no_grad():
        a, b = (with_control(dit, net, ControlHint(image=im))(x, t, ctx, y, g) for im in images)
    assert rel_err(a, b) > 1e-5  # the output now depends on the control image
