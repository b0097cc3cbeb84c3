"""The character-level text encoder: conditioning shapes, masking, files and pretraining."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import torch
from safetensors.torch import load_file, save_file

from tessera.engines import text_encoder as T
from tessera.engines.checkpoint import CheckpointError
from tessera.engines.conditioning import Conditioning
from tessera.lab import synthetic as S
from tessera.lab.text_encoder_training import attribute_accuracy
from tessera.lab.training import RunOptions, pretrain_text_encoder
from tessera.node import ExecutionContext, NodeError
from tessera.nodes.text import LoadTextEncoder, TextEncode
from tessera.registry import NodeRegistry


@pytest.fixture
def model() -> T.TextEncoder:
    return T.tiny_text_encoder()


def test_encode_gives_conditioning_with_one_token_per_character(model):
    cond = model.encode(["a red circle", ""], pad_to_max=True)
    assert isinstance(cond, Conditioning)
    c = model.config
    assert cond.tokens.shape == (2, c.max_length, c.context_dim)
    assert model.encode(["a red circle", ""]).tokens.shape == (2, 1 + len("a red circle"), c.context_dim)
    assert cond.pooled.shape == (2, c.pooled_dim)
    assert cond.mask.dtype == torch.bool
    assert cond.mask.sum(1).tolist() == [1 + len("a red circle"), 1]  # BOS + characters
    assert (cond.tokens[~cond.mask] == 0).all()
    assert torch.isfinite(cond.tokens).all() and torch.isfinite(cond.pooled).all()


def test_padding_never_changes_a_prompts_features(model):
    alone = model.encode(["cat"])
    padded = model.encode(["cat", "a much longer prompt about a dog on a mat"], pad_to_max=True)
    n = alone.mask.sum()
    assert torch.allclose(alone.tokens[0, :n], padded.tokens[0, :n], atol=1e-5)
    assert torch.allclose(alone.pooled[0], padded.pooled[0], atol=1e-5)


def test_case_is_ignored_but_spelling_is_not(model):
    upper, lower, other = (
        model.encode(["The word CAT"]),
        model.encode(["the word cat"]),
        model.encode(["the word cot"]),
    )
    assert torch.equal(upper.tokens, lower.tokens)
    assert not torch.allclose(lower.tokens, other.tokens)


def test_tokenize_adds_bos_maps_bytes_and_truncates():
    ids, mask = T.tokenize(["ab", "é"], max_length=4)
    assert ids.tolist() == [[T.BOS, ord("a") + 3, ord("b") + 3], [T.BOS, 0xC3 + 3, 0xA9 + 3]]
    assert mask.all()
    ids, mask = T.tokenize(["abcdef"], max_length=4, pad_to=6)
    assert ids[0].tolist() == [T.BOS, ord("a") + 3, ord("b") + 3, ord("c") + 3, T.PAD, T.PAD]
    assert mask[0].tolist() == [True] * 4 + [False] * 2


def test_gradients_reach_the_encoder_for_end_to_end_training(model):
    model.train().requires_grad_(True)
    cond = model.encode(["a blue star"])
    (cond.tokens.square().sum() + cond.pooled.sum()).backward()
    assert model.embed.weight.grad is not None and model.embed.weight.grad.abs().sum() > 0


def test_save_and_load_round_trip(model, tmp_path):
    path = tmp_path / "te.safetensors"
    T.save_text_encoder(model, path, card="# tiny\nrandom weights")
    loaded = T.load_text_encoder(path)
    assert loaded.config == model.config and not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    assert T.model_card(path) == "# tiny\nrandom weights"
    a, b = (
        model.encode(["a red circle above a blue square"]),
        loaded.encode(["a red circle above a blue square"]),
    )
    assert torch.allclose(a.tokens, b.tokens, atol=1e-6) and torch.allclose(a.pooled, b.pooled, atol=1e-6)


def _rewrite(src, dst, tensors=None, metadata=None):
    from safetensors import safe_open

    with safe_open(str(src), "pt") as f:
        meta = dict(f.metadata())
    save_file(tensors if tensors is not None else load_file(str(src)), str(dst), metadata=metadata or meta)
    return dst


def test_load_errors_name_the_file_and_key(model, tmp_path):
    good = tmp_path / "good.safetensors"
    T.save_text_encoder(model, good)
    sd = load_file(str(good))
    config = json.dumps(asdict(model.config))

    missing = {k: v for k, v in sd.items() if k != "pos"}
    with pytest.raises(CheckpointError, match=r"missing\.safetensors, key 'pos': missing tensor"):
        T.load_text_encoder(_rewrite(good, tmp_path / "missing.safetensors", missing))

    wrong = dict(sd, pos=torch.zeros(3, 3))
    with pytest.raises(CheckpointError, match=r"shape\.safetensors, key 'pos': shape \(3, 3\)"):
        T.load_text_encoder(_rewrite(good, tmp_path / "shape.safetensors", wrong))

    extra = dict(sd, surplus=torch.zeros(1))
    with pytest.raises(CheckpointError, match="key 'surplus': unexpected tensor"):
        T.load_text_encoder(_rewrite(good, tmp_path / "extra.safetensors", extra))

    with pytest.raises(CheckpointError, match=r"bare\.safetensors: no 'tessera\.config'"):
        T.load_text_encoder(_rewrite(good, tmp_path / "bare.safetensors", metadata={"other": "x"}))

    bad_config = {"tessera.config": config.replace('"depth"', '"layers"')}
    with pytest.raises(CheckpointError, match="unknown text encoder config field"):
        T.load_text_encoder(_rewrite(good, tmp_path / "config.safetensors", metadata=bad_config))


def test_config_refuses_inconsistent_sizes():
    with pytest.raises(ValueError, match="divisible"):
        T.TextEncoderConfig(width=30, heads=4)


def test_pretraining_learns_the_attributes_of_captions(tmp_path):
    torch.manual_seed(0)
    model = T.TextEncoder(T.TextEncoderConfig(max_length=80, width=32, depth=1, heads=2, context_dim=32,
                                              pooled_dim=32))  # fmt: skip
    classes = {k: len(v) for k, v in S.ATTRIBUTE_CLASSES.items()}
    options = RunOptions(out=tmp_path / "te.safetensors", steps=60, batch=16, autocast=False,
                         state=tmp_path / "te.state.safetensors", log=tmp_path / "te.jsonl")  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small only loses time to threading on a busy machine
    try:
        heads, log = pretrain_text_encoder(
            options, model, S.caption_batches(16, seed=1, kinds=("shape",)), classes, lr=5e-3
        )
    finally:
        torch.set_num_threads(threads)
    losses = log.tail["loss"]
    assert len(losses) == 60 and sum(losses[-5:]) / 5 < 0.75 * losses[0]
    # captions whose attribute combination it never saw: the colour is read off, not memorised
    held_out = attribute_accuracy(
        model, heads, S.caption_batches(128, seed=7, split="heldout", kinds=("shape",))
    )
    assert held_out["kind"] == 1.0 and held_out["color"] > 0.5


# ---------------------------------------------------------------- nodes


def _context(tmp_path) -> ExecutionContext:
    for name in ("models/text_encoders", "in", "out"):
        (tmp_path / name).mkdir(parents=True, exist_ok=True)
    return ExecutionContext(
        torch.device("cpu"), torch.float32, tmp_path / "models", tmp_path / "in", tmp_path / "out"
    )


def test_nodes_load_an_encoder_and_encode_a_prompt(model, tmp_path):

    registry = NodeRegistry()
    registry.load_builtins()
    assert registry.get("LoadTextEncoder") is LoadTextEncoder and registry.get("TextEncode") is TextEncode
    assert LoadTextEncoder.input("file").model_folder == "text_encoders"
    assert TextEncode.input("text").multiline

    ctx = _context(tmp_path)
    T.save_text_encoder(model, tmp_path / "models" / "text_encoders" / "te.safetensors")
    (encoder,) = LoadTextEncoder().execute(ctx, file="te.safetensors")
    (cond,) = TextEncode().execute(ctx, text_encoder=encoder, text="A red circle")
    expected = model.encode(["a red circle"])
    assert torch.allclose(cond.tokens, expected.tokens, atol=1e-6) and cond.tokens.grad_fn is None


def test_load_node_blames_the_file_input(model, tmp_path):

    ctx = _context(tmp_path)
    (tmp_path / "models" / "text_encoders" / "broken.safetensors").write_bytes(b"not a model")
    for name in ("broken.safetensors", "absent.safetensors", "../escape.safetensors"):
        with pytest.raises(NodeError) as err:
            LoadTextEncoder().execute(ctx, file=name)
        assert err.value.input == "file"
