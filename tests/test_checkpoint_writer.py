"""One atomic checkpoint writer: every save goes through `write_safetensors`, and a save that
fails part-way leaves the previous file intact and no temporary file behind."""

from __future__ import annotations

import errno
import re
from pathlib import Path

import pytest
import torch

from tessera.engines import checkpoint
from tessera.engines.checkpoint import read_safetensors, write_safetensors
from tessera.engines.vq import VQConfig, VQModel, load_vq, save_vq

ROOT = Path(__file__).resolve().parents[1]


def test_written_file_reads_back_with_its_metadata(tmp_path):
    out = tmp_path / "deep" / "w.safetensors"
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3).t()  # not contiguous
    write_safetensors(out, {"w": t}, {"tessera.card": "{}"})
    tensors, metadata = read_safetensors(out)
    assert torch.equal(tensors["w"], t) and metadata == {"tessera.card": "{}"}
    assert sorted(p.name for p in out.parent.iterdir()) == ["w.safetensors"]


def test_a_failed_save_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    out = tmp_path / "w.safetensors"
    write_safetensors(out, {"w": torch.ones(3)})
    before = out.read_bytes()

    def disk_full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        write_safetensors(out, {"w": torch.zeros(3)})
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]


def test_model_savers_round_trip(tmp_path):
    config = VQConfig(
        channels=8,
        ch_mult=[1, 2],
        decoder_ch_mult=[1, 2],
        num_res_blocks=1,
        z_channels=8,
        codebook_size=16,
        codebook_dim=4,
        norm_groups=4,
    )
    model = VQModel(config)
    save_vq(model, tmp_path / "vq.safetensors", card='{"name": "tiny"}')
    loaded = load_vq(tmp_path / "vq.safetensors")
    assert loaded.config == model.config
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k


def test_every_save_in_engines_and_lab_goes_through_the_one_writer():
    direct = re.compile(r"\bsave_file\(|torch\.save\(")
    offenders = [
        f"{path.relative_to(ROOT)}:{n}"
        for folder in ("engines", "lab")
        for path in sorted((ROOT / folder).glob("*.py"))
        if path.name != "checkpoint.py"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if direct.search(line)
    ]
    assert offenders == []
