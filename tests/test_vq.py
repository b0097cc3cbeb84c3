"""VQ tokenizer: LlamaGen key layout loads through `load_vq`; encode/decode shapes and codebook lookups.

With random weights an image does not survive image -> tokens -> image, so these tests pin
what random weights do allow: the config read back from the keys, exact codebook
round trips at the latent level, the l2 (cosine) nearest-code rule, shapes and ranges.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from tessera.engines.checkpoint import CheckpointError
from tessera.engines.vq import VQConfig, VQModel, load_vq, vq_config_metadata


def _res(shapes: dict, p: str, cin: int, cout: int) -> None:
    shapes.update(
        {
            p + "norm1.weight": (cin,),
            p + "norm1.bias": (cin,),
            p + "conv1.weight": (cout, cin, 3, 3),
            p + "conv1.bias": (cout,),
            p + "norm2.weight": (cout,),
            p + "norm2.bias": (cout,),
            p + "conv2.weight": (cout, cout, 3, 3),
            p + "conv2.bias": (cout,),
        }
    )
    if cin != cout:
        shapes.update({p + "nin_shortcut.weight": (cout, cin, 1, 1), p + "nin_shortcut.bias": (cout,)})


def _attn(shapes: dict, p: str, c: int) -> None:
    shapes.update({p + "norm.weight": (c,), p + "norm.bias": (c,)})
    for n in ("q", "k", "v", "proj_out"):
        shapes.update({p + n + ".weight": (c, c, 1, 1), p + n + ".bias": (c,)})


def llamagen_vq_shapes(
    ch: int, enc_mult: list[int], dec_mult: list[int], n_res: int, z: int, n_codes: int, code_dim: int
) -> dict:
    """Key -> shape of LlamaGen's tokenizer/tokenizer_image/vq_model.py VQModel, written out by hand."""
    s: dict = {"encoder.conv_in.weight": (ch, 3, 3, 3), "encoder.conv_in.bias": (ch,)}
    n = len(enc_mult)
    cin = ch
    for i, m in enumerate(enc_mult):
        for r in range(n_res):
            _res(s, f"encoder.conv_blocks.{i}.res.{r}.", cin, ch * m)
            cin = ch * m
            if i == n - 1:
                _attn(s, f"encoder.conv_blocks.{i}.attn.{r}.", cin)
        if i != n - 1:
            s[f"encoder.conv_blocks.{i}.downsample.conv.weight"] = (cin, cin, 3, 3)
            s[f"encoder.conv_blocks.{i}.downsample.conv.bias"] = (cin,)
    _res(s, "encoder.mid.0.", cin, cin)
    _attn(s, "encoder.mid.1.", cin)
    _res(s, "encoder.mid.2.", cin, cin)
    s.update(
        {
            "encoder.norm_out.weight": (cin,),
            "encoder.norm_out.bias": (cin,),
            "encoder.conv_out.weight": (z, cin, 3, 3),
            "encoder.conv_out.bias": (z,),
            "quant_conv.weight": (code_dim, z, 1, 1),
            "quant_conv.bias": (code_dim,),
            "post_quant_conv.weight": (z, code_dim, 1, 1),
            "post_quant_conv.bias": (z,),
            "quantize.embedding.weight": (n_codes, code_dim),
            "quantize.codebook_used": (65536,),
        }
    )
    c = ch * dec_mult[-1]
    s.update({"decoder.conv_in.weight": (c, z, 3, 3), "decoder.conv_in.bias": (c,)})
    _res(s, "decoder.mid.0.", c, c)
    _attn(s, "decoder.mid.1.", c)
    _res(s, "decoder.mid.2.", c, c)
    for j, i in enumerate(reversed(range(len(dec_mult)))):
        for r in range(n_res + 1):
            _res(s, f"decoder.conv_blocks.{j}.res.{r}.", c, ch * dec_mult[i])
            c = ch * dec_mult[i]
            if j == 0:
                _attn(s, f"decoder.conv_blocks.{j}.attn.{r}.", c)
        if i != 0:
            s[f"decoder.conv_blocks.{j}.upsample.conv.weight"] = (c, c, 3, 3)
            s[f"decoder.conv_blocks.{j}.upsample.conv.bias"] = (c,)
    s.update(
        {
            "decoder.norm_out.weight": (c,),
            "decoder.norm_out.bias": (c,),
            "decoder.conv_out.weight": (3, c, 3, 3),
            "decoder.conv_out.bias": (3,),
        }
    )
    return s


def random_sd(shapes: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) * 0.1 for k, s in shapes.items()}


@pytest.fixture(scope="module")
def vq_file(tmp_path_factory):
    sd = random_sd(llamagen_vq_shapes(32, [1, 2, 2], [1, 1, 2], 1, 16, 64, 8))
    path = tmp_path_factory.mktemp("vq") / "vq16.safetensors"
    save_file(sd, str(path))
    return path, sd


def test_llamagen_layout_loads_and_reproduces_config(vq_file):
    path, sd = vq_file
    vq = load_vq(path)
    c = vq.config
    assert (c.channels, c.ch_mult, c.decoder_ch_mult, c.num_res_blocks) == (32, [1, 2, 2], [1, 1, 2], 1)
    assert (c.z_channels, c.codebook_size, c.codebook_dim, c.attn_deepest, c.downsample) == (
        16,
        64,
        8,
        True,
        4,
    )
    own = vq.state_dict()
    assert set(own) == set(sd) - {"quantize.codebook_used"}
    for k, v in own.items():
        assert torch.equal(v, sd[k]), k


def test_image_to_tokens_to_image_shapes_and_range(vq_file):
    vq = load_vq(vq_file[0])
    images = torch.rand(2, 3, 16, 24) * 2 - 1
    ids = vq.encode(images)
    assert ids.shape == (2, 4, 6) and ids.dtype == torch.long
    assert 0 <= ids.min() and ids.max() < 64
    out = vq.decode(ids)
    assert out.shape == (2, 3, 16, 24) and out.min() >= -1 and out.max() <= 1
    assert torch.equal(vq.encode(images), ids)  # deterministic
    with pytest.raises(ValueError, match="multiple of 4"):
        vq.encode(torch.zeros(1, 3, 18, 16))
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        vq.decode(torch.full((1, 2, 2), 64))


def test_encode_picks_the_nearest_code_by_cosine(vq_file):
    vq = load_vq(vq_file[0])
    images = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        z = vq.quant_conv(vq.encoder(images))  # [1, 8, 4, 4]
    codes = vq.state_dict()["quantize.embedding.weight"]
    sim = F.cosine_similarity(z.permute(0, 2, 3, 1)[..., None, :], codes, dim=-1)  # [1, 4, 4, 64]
    assert torch.equal(vq.encode(images), sim.argmax(-1))


def test_codes_round_trip_through_lookup_and_quantize(vq_file):
    vq = load_vq(vq_file[0])
    ids = torch.arange(64).view(1, 8, 8)
    vectors = vq.quantize.lookup(ids)
    assert vectors.shape == (1, 8, 8, 8)
    assert torch.allclose(vectors.norm(dim=1), torch.ones(1, 8, 8))  # l2-normalised codebook
    assert torch.equal(vq.quantize.ids(vectors * 3.0), ids)  # scale does not matter under l2


def test_partial_decode_is_grey_where_unknown(vq_file):
    vq = load_vq(vq_file[0])
    ids = torch.randint(0, 64, (1, 4, 4))
    known = torch.zeros(1, 4, 4, dtype=torch.bool)
    known[:, :2] = True
    img = vq.decode_partial(ids, known)
    assert torch.equal(img[..., 8:, :], torch.zeros(1, 3, 8, 16))
    assert img[..., :8, :].abs().sum() > 0
    torch.testing.assert_close(vq.decode_partial(ids, torch.ones_like(known)), vq.decode(ids))


def test_metadata_config_wins_over_inference(tmp_path):
    cfg = VQConfig(
        channels=16,
        ch_mult=[1, 2],
        decoder_ch_mult=[1, 2],
        num_res_blocks=1,
        z_channels=8,
        codebook_size=32,
        codebook_dim=4,
        codebook_l2_norm=False,
        norm_groups=8,
    )
    torch.manual_seed(0)
    model = VQModel(cfg)
    save_file(model.state_dict(), str(tmp_path / "m.safetensors"), metadata=vq_config_metadata(cfg))
    loaded = load_vq(tmp_path / "m.safetensors")
    assert dataclasses.asdict(loaded.config) == dataclasses.asdict(cfg)
    x = torch.rand(1, 3, 8, 8) * 2 - 1
    assert torch.equal(loaded.encode(x), model.encode(x))
    assert loaded.decode(loaded.encode(x)).shape == (1, 3, 8, 8)


def test_bad_vq_files_name_file_and_key(tmp_path, vq_file):
    sd = dict(vq_file[1])
    del sd["decoder.conv_blocks.1.upsample.conv.bias"]
    save_file(sd, str(tmp_path / "cut.safetensors"))
    with pytest.raises(
        CheckpointError, match=r"cut.safetensors, key 'decoder.conv_blocks.1.upsample.conv.bias'"
    ):
        load_vq(tmp_path / "cut.safetensors")
    sd = dict(vq_file[1], **{"post_quant_conv.weight": torch.zeros(16, 4, 1, 1)})
    save_file(sd, str(tmp_path / "shape.safetensors"))
    with pytest.raises(CheckpointError, match=r"shape.safetensors, key 'post_quant_conv.weight'"):
        load_vq(tmp_path / "shape.safetensors")
    save_file({"tok_embeddings.weight": torch.zeros(4, 4)}, str(tmp_path / "gpt.safetensors"))
    with pytest.raises(
        CheckpointError, match=r"gpt.safetensors: not a VQ tokenizer: this file holds a LlamaGen GPT"
    ):
        load_vq(tmp_path / "gpt.safetensors")
    with pytest.raises(CheckpointError, match="nothere.safetensors: file not found"):
        load_vq(tmp_path / "nothere.safetensors")


def test_vq_and_vae_are_built_from_the_same_conv_blocks():
    """One definition of the blocks (engines/conv_blocks.py): same fp32 GroupNorm and attention backend."""
    from tessera.engines import conv_blocks
    from tessera.engines.vae import AutoencoderKL, VAEConfig
    from tessera.engines.vq import VQConfig, VQModel

    vq = VQModel(VQConfig(channels=8, ch_mult=[1, 2], decoder_ch_mult=[1, 2], num_res_blocks=1, z_channels=8,
                          codebook_size=16, codebook_dim=4, norm_groups=4))  # fmt: skip
    vae = AutoencoderKL(
        VAEConfig(latent_channels=4, block_out_channels=(8, 16), layers_per_block=1, norm_groups=4)
    )
    blocks = (conv_blocks.ResnetBlock, conv_blocks.AttnBlock, conv_blocks.Downsample, conv_blocks.Upsample)
    for model in (vq, vae):
        used = {type(m) for m in model.modules() if type(m).__name__ in {"ResnetBlock", "ResBlock", "AttnBlock",
                                                                      "Downsample", "Upsample"}}  # fmt: skip
        assert used == set(blocks)
        assert not any(type(m) is torch.nn.GroupNorm for m in model.modules())  # all fp32-statistics norms
