"""GPT: LlamaGen key layout loads through `load_gpt`, config inference, RoPE, clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from tessera.engines.checkpoint import CheckpointError
from tessera.engines.conditioning import Conditioning
from tessera.engines.gpt import apply_rope, infer_gpt_config, load_gpt, rope_2d


def llamagen_gpt_shapes(
    dim: int,
    n_layer: int,
    n_head: int,
    n_kv_head: int,
    hidden: int,
    vocab: int,
    num_classes: int = 0,
    caption_dim: int = 0,
    cls_tokens: int = 120,
) -> dict:
    """Key -> shape of LlamaGen's autoregressive/models/gpt.py Transformer, written out by hand."""
    hd = dim // n_head
    shapes = {"tok_embeddings.weight": (vocab, dim), "norm.weight": (dim,), "output.weight": (vocab, dim)}
    if caption_dim:
        shapes["cls_embedding.cap_proj.fc1.weight"] = (dim, caption_dim)
        shapes["cls_embedding.cap_proj.fc2.weight"] = (dim, dim)
        shapes["cls_embedding.uncond_embedding"] = (cls_tokens, caption_dim)
    else:
        shapes["cls_embedding.embedding_table.weight"] = (num_classes + 1, dim)
    for i in range(n_layer):
        p = f"layers.{i}."
        shapes[p + "attention.wqkv.weight"] = ((n_head + 2 * n_kv_head) * hd, dim)
        shapes[p + "attention.wo.weight"] = (dim, dim)
        shapes[p + "feed_forward.w1.weight"] = (hidden, dim)
        shapes[p + "feed_forward.w3.weight"] = (hidden, dim)
        shapes[p + "feed_forward.w2.weight"] = (dim, hidden)
        shapes[p + "attention_norm.weight"] = (dim,)
        shapes[p + "ffn_norm.weight"] = (dim,)
    return shapes


def random_sd(shapes: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) * 0.2 for k, s in shapes.items()}


def test_class_model_in_llamagen_layout_loads_and_reproduces_config(tmp_path):
    sd = random_sd(llamagen_gpt_shapes(128, 3, 2, 2, 352, 50, num_classes=7))
    path = tmp_path / "c2i.safetensors"
    save_file(sd, str(path))
    # width 128 is none of LlamaGen's sizes: the head count is refused by name, not guessed
    with pytest.raises(CheckpointError, match=r"c2i\.safetensors.*width 128.*'n_head'"):
        load_gpt(path)
    save_file(sd, str(path), metadata={"tessera.config": json.dumps({"n_head": 2})})
    model = load_gpt(path)
    c = model.config
    assert (c.dim, c.n_layer, c.n_head, c.n_kv_head, c.ffn_hidden, c.vocab_size) == (128, 3, 2, 2, 352, 50)
    assert (c.num_classes, c.cls_token_num, c.is_caption) == (7, 1, False)
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k
    null = model.class_prefix(torch.tensor([2]), uncond=True)
    assert torch.equal(null[0, 0], sd["cls_embedding.embedding_table.weight"][7])


def test_caption_model_with_gqa_loads_from_metadata_and_projects_text(tmp_path):
    shapes = llamagen_gpt_shapes(96, 2, 6, 2, 256, 40, caption_dim=32, cls_tokens=5)
    sd = random_sd(shapes)
    path = tmp_path / "t2i.safetensors"
    # shapes give everything but the head count; metadata pins it and kv heads follow from wqkv
    save_file(sd, str(path), metadata={"tessera.config": json.dumps({"n_head": 6})})
    model = load_gpt(path)
    assert (model.config.n_head, model.config.n_kv_head, model.config.cls_token_num) == (6, 2, 5)
    # without metadata the head count of a width outside LlamaGen's sizes is refused
    save_file(sd, str(tmp_path / "plain.safetensors"))
    with pytest.raises(CheckpointError, match="plain.safetensors.*cannot size"):
        load_gpt(tmp_path / "plain.safetensors")

    cond = Conditioning(
        torch.randn(1, 7, 32), torch.zeros(1, 4), torch.tensor([[1, 1, 0, 1, 1, 1, 1]]).bool()
    )
    feats, valid = model.caption_features(cond)
    assert valid.tolist() == [[True] * 5]  # six real tokens truncated to five
    assert torch.equal(feats[0], cond.tokens[0, [0, 1, 3, 4, 5]])
    short = Conditioning(torch.randn(1, 3, 32), torch.zeros(1, 4), torch.tensor([[1, 1, 0]]).bool())
    feats, valid = model.caption_features(short)
    assert valid.tolist() == [[False, False, False, True, True]]  # left padding, as LlamaGen
    assert torch.equal(feats[0, 3:], short.tokens[0, :2])
    with pytest.raises(ValueError, match="expects 32"):
        model.caption_features(
            Conditioning(torch.randn(1, 3, 16), torch.zeros(1, 4), torch.ones(1, 3).bool())
        )


def test_head_count_follows_llamagen_sizes_by_width():
    def meta_sd(dim, hidden, kv_rows):
        m = "meta"
        return {
            "tok_embeddings.weight": torch.empty(16384, dim, device=m),
            "layers.0.attention.wqkv.weight": torch.empty(kv_rows, dim, device=m),
            "layers.35.attention.wo.weight": torch.empty(dim, dim, device=m),
            "layers.0.feed_forward.w1.weight": torch.empty(hidden, dim, device=m),
            "cls_embedding.embedding_table.weight": torch.empty(1001, dim, device=m),
        }

    xl = infer_gpt_config(meta_sd(1280, 3584, 3 * 1280))
    assert (xl.n_head, xl.n_kv_head, xl.n_layer, xl.num_classes, xl.cls_token_num) == (20, 20, 36, 1000, 1)
    assert infer_gpt_config(meta_sd(768, 2048, 3 * 768)).n_head == 12
    assert infer_gpt_config(meta_sd(1536, 4096, 3 * 1536)).n_head == 24
    gqa = infer_gpt_config(meta_sd(1024, 2816, 1024 + 2 * 4 * 64))  # L: 16 heads of 64, 4 kv heads
    assert (gqa.n_head, gqa.n_kv_head) == (16, 4)
    with pytest.raises(ValueError, match="width 512 .*'n_head'"):  # unknown width: refused, not dim // 64
        infer_gpt_config(meta_sd(512, 1536, 3 * 512))


def test_bad_gpt_files_name_file_and_key(tmp_path):
    shapes = llamagen_gpt_shapes(128, 2, 2, 2, 352, 50, num_classes=7)
    sd = random_sd(shapes)
    heads = {"tessera.config": json.dumps({"n_head": 2})}  # width 128 is no LlamaGen size
    missing = dict(sd)
    del missing["layers.1.feed_forward.w3.weight"]
    save_file(missing, str(tmp_path / "missing.safetensors"), metadata=heads)
    with pytest.raises(CheckpointError, match=r"missing.safetensors, key 'layers.1.feed_forward.w3.weight'"):
        load_gpt(tmp_path / "missing.safetensors")

    wrong = dict(sd, **{"layers.0.ffn_norm.weight": torch.ones(64)})
    save_file(wrong, str(tmp_path / "wrong.safetensors"), metadata=heads)
    with pytest.raises(CheckpointError, match=r"wrong.safetensors, key 'layers.0.ffn_norm.weight'.*\(64,\)"):
        load_gpt(tmp_path / "wrong.safetensors")

    save_file({"encoder.conv_in.weight": torch.zeros(4, 3, 3, 3)}, str(tmp_path / "vq.safetensors"))
    with pytest.raises(CheckpointError, match=r"vq.safetensors, key 'tok_embeddings.weight'"):
        load_gpt(tmp_path / "vq.safetensors")

    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 5)
    with pytest.raises(CheckpointError, match="junk.safetensors"):
        load_gpt(tmp_path / "junk.safetensors")

    extra = dict(
        sd, **{"layers.0.attention.kv_cache.k_cache": torch.zeros(1), "lm_head.bias": torch.zeros(3)}
    )
    save_file(extra, str(tmp_path / "extra.safetensors"), metadata=heads)
    with pytest.raises(CheckpointError, match=r"extra.safetensors, key 'lm_head.bias'.*unexpected"):
        load_gpt(tmp_path / "extra.safetensors")


def test_rope_2d_rows_and_columns_and_zeroed_prefix():
    t = rope_2d(3, 4, 16, 10000.0, prefix=2)
    assert t.shape == (2 + 12, 8, 2)
    assert torch.equal(t[:2], torch.zeros(2, 8, 2))  # LlamaGen zeroes the condition rows
    grid = t[2:].view(3, 4, 8, 2)
    assert torch.allclose(grid[:, 0, :4], grid[:, 3, :4])  # first half turns with the row only
    assert torch.allclose(grid[0, :, 4:], grid[2, :, 4:])  # second half with the column only
    assert not torch.allclose(grid[0, 0, :4], grid[1, 0, :4])
    assert torch.allclose(grid[0, 0, :, 0], torch.ones(8))  # position (0, 0) is the identity


def test_attention_scores_depend_on_relative_grid_offset_only():
    q, k = torch.randn(1, 1, 1, 32), torch.randn(1, 1, 1, 32)
    t = rope_2d(5, 5, 32, 10000.0, 0).view(5, 5, 16, 2)

    def score(a, b):
        return (apply_rope(q, t[a][None]) * apply_rope(k, t[b][None])).sum()

    assert torch.allclose(score((1, 1), (0, 0)), score((4, 3), (3, 2)), atol=1e-5)
    assert not torch.allclose(score((1, 1), (0, 0)), score((1, 0), (0, 0)), atol=1e-3)
