"""`tessera convert`: pickles become safetensors only through weights_only loading, atomically."""

from __future__ import annotations

import json
import pathlib
from argparse import Namespace

import pytest
import torch
from safetensors import safe_open

from tessera.cli import main
from tessera.convert import ConvertError, convert, unwrap_state_dict
from tessera.engines.gpt import GPT, GPTConfig, load_gpt
from tessera.engines.vq import VQConfig, VQModel, load_vq


class Payload:
    """Pickles to a call that writes a marker file: what a malicious checkpoint does."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.write_text, (self.marker, "the payload ran"))


def tiny_gpt(dim: int = 768) -> GPT:
    torch.manual_seed(0)
    cfg = GPTConfig(
        dim=dim,
        n_layer=2,
        n_head=12 if dim == 768 else 4,
        n_kv_head=12 if dim == 768 else 4,
        ffn_hidden=64,
        vocab_size=32,
        num_classes=10,
        grid_size=4,
    )
    return GPT(cfg).eval()


def test_malicious_pickle_is_refused_and_its_payload_never_runs(tmp_path):
    marker = tmp_path / "pwned.txt"
    src = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.ones(2)}, "extra": Payload(marker)}, src)
    # The file really is dangerous: an unrestricted load runs the payload.
    control = tmp_path / "control.txt"
    torch.save({"x": Payload(control)}, tmp_path / "control.pt")
    torch.load(tmp_path / "control.pt", weights_only=False)
    assert control.read_text() == "the payload ran"

    out = tmp_path / "evil.safetensors"
    with pytest.raises(
        ConvertError, match=r"evil\.pt: refused: .*Unsupported global: GLOBAL getattr\); nothing was run"
    ):
        convert(src, out)
    assert not marker.exists()
    assert not out.exists() and not list(tmp_path.glob(".*.tmp"))


def test_cli_refuses_malicious_pickle_with_nonzero_exit(tmp_path, capsys):
    marker = tmp_path / "pwned.txt"
    torch.save(Payload(marker), tmp_path / "evil.bin")
    with pytest.raises(SystemExit, match="evil.bin: refused"):
        main(["convert", str(tmp_path / "evil.bin"), str(tmp_path / "out.safetensors")])
    assert not marker.exists() and not (tmp_path / "out.safetensors").exists()


def test_llamagen_training_checkpoint_is_unwrapped_and_loads_identically(tmp_path, capsys):
    gpt = tiny_gpt()
    src = tmp_path / "c2i_tiny.pt"
    # What LlamaGen's trainer writes: weights under "model", beside optimizer state and its arguments.
    torch.save(
        {
            "model": gpt.state_dict(),
            "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4}]},
            "steps": 100,
            "args": Namespace(gpt_model="GPT-B", lr=1e-4),
        },
        src,
    )
    out = tmp_path / "c2i_tiny.safetensors"
    assert main(["convert", str(src), str(out)]) == 0
    assert "under 'model'" in capsys.readouterr().out
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["tessera.family"] == "LlamaGen GPT"
    assert json.loads(meta["tessera.config"])["n_layer"] == 2
    loaded = load_gpt(out)
    for k, v in gpt.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v, rtol=0, atol=0)


def test_vq_under_nested_wrappers_and_ddp_prefix(tmp_path):
    torch.manual_seed(0)
    cfg = VQConfig(
        channels=8,
        ch_mult=[1, 2],
        decoder_ch_mult=[1, 2],
        num_res_blocks=1,
        z_channels=4,
        codebook_size=16,
        codebook_dim=4,
        norm_groups=4,
    )
    vq = VQModel(cfg).eval()
    wrapped = {"state_dict": {"module": {f"module.{k}": v for k, v in vq.state_dict().items()}}, "epoch": 3}
    torch.save(wrapped, tmp_path / "vq.pth")
    summary = convert(tmp_path / "vq.pth", tmp_path / "vq.safetensors", {"norm_groups": 4})
    assert summary["family"] == "VQ tokenizer" and summary["wrapper"] == "state_dict.module"
    loaded = load_vq(tmp_path / "vq.safetensors")
    x = torch.rand(1, 3, 8, 8) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(loaded.decode(loaded.encode(x)), vq.decode(vq.encode(x)))


def test_unknown_head_count_is_refused_by_name_then_supplied(tmp_path):
    gpt = tiny_gpt(dim=96)
    torch.save(gpt.state_dict(), tmp_path / "odd.pt")
    out = tmp_path / "odd.safetensors"
    with pytest.raises(ConvertError, match=r"head count.*--config '\{\"n_head\": N\}'"):
        convert(tmp_path / "odd.pt", out)
    assert not out.exists()
    assert convert(tmp_path / "odd.pt", out, {"n_head": 4})["config"]["n_head"] == 4
    assert load_gpt(out).config.n_head == 4


def test_unrecognised_tensors_convert_without_config_and_tied_weights_survive(tmp_path):
    w = torch.randn(4, 3)
    torch.save({"a": w, "b": w, "c": torch.arange(5)}, tmp_path / "plain.bin")
    summary = convert(tmp_path / "plain.bin", tmp_path / "plain.safetensors")
    assert summary["family"] is None and summary["tensors"] == 3
    with safe_open(str(tmp_path / "plain.safetensors"), "pt") as f:
        assert "tessera.config" not in f.metadata()
        torch.testing.assert_close(f.get_tensor("b"), w)
        torch.testing.assert_close(f.get_tensor("c"), torch.arange(5))


@pytest.mark.parametrize(
    "obj, match",
    [
        ([torch.ones(1)], "not a dict of tensors"),
        ({"weights": torch.ones(1), "note": "hi"}, "key 'note': not a plain dict of tensors"),
        ({"model": {"w": torch.ones(1), "n": 3}}, "not a plain dict of tensors"),
        ({}, "not a plain dict of tensors"),
    ],
)
def test_non_tensor_contents_are_refused(obj, match):
    with pytest.raises(ConvertError, match=match):
        unwrap_state_dict(obj, "x.pt")


def test_existing_output_kept_unless_forced_and_bad_names_refused(tmp_path):
    torch.save({"w": torch.ones(2)}, tmp_path / "a.pt")
    out = tmp_path / "a.safetensors"
    out.write_bytes(b"keep me")
    with pytest.raises(ConvertError, match="already exists"):
        convert(tmp_path / "a.pt", out)
    assert out.read_bytes() == b"keep me"
    convert(tmp_path / "a.pt", out, force=True)
    with safe_open(str(out), "pt") as f:
        assert f.keys() == ["w"]
    with pytest.raises(ConvertError, match="must be a .safetensors"):
        convert(tmp_path / "a.pt", tmp_path / "a.pt2")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ConvertError, match="junk.pt: cannot read"):
        convert(tmp_path / "junk.pt", tmp_path / "junk.safetensors")
    with pytest.raises(ConvertError, match="expected a PyTorch pickle"):
        convert(out, tmp_path / "b.safetensors")


def test_a_hugging_face_t5_bin_is_named_but_gets_no_config(tmp_path):
    sd = {
        "shared.weight": torch.randn(10, 4),
        "encoder.block.0.layer.0.SelfAttention.q.weight": torch.randn(4, 4),
    }
    torch.save(sd, tmp_path / "pytorch_model.bin")
    summary = convert(tmp_path / "pytorch_model.bin", tmp_path / "model.safetensors")
    assert summary["family"] == "T5 text encoder" and summary["config"] is None
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert f.metadata()["tessera.family"] == "T5 text encoder" and "tessera.config" not in f.metadata()


def test_legacy_format_pickle_converts_and_is_still_weights_only(tmp_path):
    marker = tmp_path / "pwned.txt"
    torch.save({"w": torch.arange(6.0)}, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    assert convert(tmp_path / "old.pt", tmp_path / "old.safetensors")["tensors"] == 1
    with safe_open(str(tmp_path / "old.safetensors"), "pt") as f:
        torch.testing.assert_close(f.get_tensor("w"), torch.arange(6.0))
    torch.save({"w": Payload(marker)}, tmp_path / "old_evil.pt", _use_new_zipfile_serialization=False)
    with pytest.raises(ConvertError, match="refused"):
        convert(tmp_path / "old_evil.pt", tmp_path / "old_evil.safetensors")
    assert not marker.exists()
