"""AutoencoderKL: parity with diffusers from both key layouts, family scale/shift, tiled decode, errors."""

from __future__ import annotations

import json
import re

import pytest
import torch
from diffusers import AutoencoderKL as DiffusersVAE
from safetensors.torch import save_file

from tessera.engines.checkpoint import CheckpointError
from tessera.engines.vae import FAMILIES, load_vae, save_vae

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def reference(latent_channels: int, quant: bool, seed: int = 0) -> DiffusersVAE:
    torch.manual_seed(seed)
    model = DiffusersVAE(
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 16, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        use_quant_conv=quant,
        use_post_quant_conv=quant,
    ).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def to_ldm_layout(sd: dict) -> dict:
    """An independent diffusers → ldm key mapping (the loader has its own)."""
    n_up = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("decoder.up_blocks."))
    rules = [
        (r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out."),
        (r"^(encoder|decoder)\.mid_block\.resnets\.0\.", r"\1.mid.block_1."),
        (r"^(encoder|decoder)\.mid_block\.resnets\.1\.", r"\1.mid.block_2."),
        (r"^(encoder|decoder)\.mid_block\.attentions\.0\.group_norm\.", r"\1.mid.attn_1.norm."),
        (r"^(encoder|decoder)\.mid_block\.attentions\.0\.to_(q|k|v)\.", r"\1.mid.attn_1.\2."),
        (r"^(encoder|decoder)\.mid_block\.attentions\.0\.to_out\.0\.", r"\1.mid.attn_1.proj_out."),
        (r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block."),
        (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample."),
        (r"\.conv_shortcut\.", ".nin_shortcut."),
    ]
    out = {}
    for key, t in sd.items():
        new = key
        for pattern, repl in rules:
            new = re.sub(pattern, repl, new)
        m = re.match(r"^decoder\.up_blocks\.(\d+)\.(resnets|upsamplers\.0)\.(.*)$", new)
        if m:
            part = "block" if m[2] == "resnets" else "upsample"
            new = f"decoder.up.{n_up - 1 - int(m[1])}.{part}.{m[3]}"
        if ".mid.attn_1." in new and new.endswith("weight") and t.ndim == 2:
            t = t[:, :, None, None]
        out[new] = t.contiguous()
    return out


def save_reference(tmp_path, ref, layout: str, name: str = "vae", metadata: dict | None = None):
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    path = tmp_path / f"{name}_{layout}.safetensors"
    meta = {"tessera.config": json.dumps({"norm_groups": 4, **(metadata or {})})}
    save_file(sd if layout == "diffusers" else to_ldm_layout(sd), str(path), metadata=meta)
    return path


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("layout", ["diffusers", "ldm"])
@pytest.mark.parametrize(("channels", "quant", "family"), [(4, True, "sd15"), (16, False, "flux")])
def test_vae_matches_diffusers_from_either_layout(tmp_path, layout, channels, quant, family):
    ref = reference(channels, quant)
    vae = load_vae(save_reference(tmp_path, ref, layout))
    scale, shift = FAMILIES[family]
    c = vae.config
    assert (c.latent_channels, c.block_out_channels, c.layers_per_block, c.use_quant_conv) == (
        channels,
        (8, 16, 16),
        1,
        quant,
    )
    assert (c.scaling_factor, c.shift_factor, c.downscale) == (scale, shift, 4)

    pixels = torch.rand(2, 3, 24, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        mean = ref.encode(pixels).latent_dist.mean
        assert rel_err(vae.encode(pixels), (mean - shift) * scale) < 1e-4
        latent = torch.randn(2, channels, 6, 4, generator=torch.Generator().manual_seed(1))
        expected = ref.decode(latent / scale + shift).sample
        assert rel_err(vae.decode(latent), expected) < 1e-4


def test_sampled_encode_uses_the_posterior_std(tmp_path):
    ref = reference(4, True)
    vae = load_vae(save_reference(tmp_path, ref, "ldm"))
    pixels = torch.rand(1, 3, 16, 16) * 2 - 1
    noise = torch.randn(1, 4, 4, 4)
    with torch.no_grad():
        dist = ref.encode(pixels).latent_dist
        expected = (dist.mean + dist.std * noise) * vae.config.scaling_factor
        assert rel_err(vae.encode(pixels, sample=True, noise=noise), expected) < 1e-4


def test_scale_and_shift_come_from_metadata_or_an_explicit_family(tmp_path):
    ref = reference(16, False)
    sd3 = load_vae(save_reference(tmp_path, ref, "ldm", "sd3", {"family": "sd3"}))
    assert (sd3.config.scaling_factor, sd3.config.shift_factor) == FAMILIES["sd3"]
    own = load_vae(
        save_reference(tmp_path, ref, "diffusers", "own", {"scaling_factor": 0.5, "shift_factor": 0.25})
    )
    assert (own.config.scaling_factor, own.config.shift_factor) == (0.5, 0.25)
    forced = load_vae(save_reference(tmp_path, ref, "ldm", "forced"), family="sd3")
    assert (forced.config.scaling_factor, forced.config.shift_factor) == FAMILIES["sd3"]

    save_vae(own, tmp_path / "roundtrip.safetensors")
    again = load_vae(tmp_path / "roundtrip.safetensors")
    assert again.config == own.config
    latent = torch.randn(1, 16, 4, 4)
    with torch.no_grad():
        assert torch.equal(again.decode(latent), own.decode(latent))


def test_tiled_decode_blends_tiles_and_matches_when_one_tile_covers_all(tmp_path):
    vae = load_vae(save_reference(tmp_path, reference(4, True), "ldm"))
    latent = torch.randn(1, 4, 10, 13, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = vae.decode(latent)
        assert torch.equal(vae.decode_tiled(latent, tile=16), full)
        tiled = vae.decode_tiled(latent, tile=6, overlap=2)
        first_tile = vae.decode(latent[:, :, :6, :6])
    assert tiled.shape == full.shape == (1, 3, 40, 52)
    # Pixels only the first tile covers are that tile's decode, untouched by blending ...
    assert torch.allclose(tiled[:, :, :16, :16], first_tile[:, :, :16, :16], atol=1e-6)
    # ... and blended pixels stay close to the full decode (not a hard seam of another tile).
    assert rel_err(tiled, full) < 0.5


def test_loader_errors_name_the_file_and_the_key(tmp_path):
    dit = tmp_path / "a_dit.safetensors"
    save_file({"img_in.weight": torch.zeros(4, 4)}, str(dit))
    with pytest.raises(CheckpointError, match=r"a_dit\.safetensors: not an AutoencoderKL"):
        load_vae(dit)

    sd = to_ldm_layout(reference(4, True).state_dict())
    del sd["decoder.up.1.block.1.conv2.bias"]
    save_file(sd, str(tmp_path / "missing.safetensors"), metadata={"tessera.config": '{"norm_groups": 4}'})
    with pytest.raises(
        CheckpointError, match=r"missing\.safetensors, key 'decoder\.up\.1\.block\.1\.conv2\.bias'"
    ):
        load_vae(tmp_path / "missing.safetensors")

    sd = to_ldm_layout(reference(4, True).state_dict())
    save_file(sd, str(tmp_path / "bad_meta.safetensors"), metadata={"tessera.config": "{oops"})
    with pytest.raises(
        CheckpointError, match=r"bad_meta\.safetensors: metadata 'tessera.config' is not JSON"
    ):
        load_vae(tmp_path / "bad_meta.safetensors")

    sd = to_ldm_layout(reference(4, True).state_dict())
    save_file(sd, str(tmp_path / "groups.safetensors"), metadata={"tessera.config": '{"norm_groups": 3}'})
    with pytest.raises(CheckpointError, match=r"groups\.safetensors: inconsistent VAE config"):
        load_vae(tmp_path / "groups.safetensors")
