"""A loader's cache key covers every file its model is read from: with a sharded folder, changing a
shard other than the one the workflow names (or the index, or config.json) re-runs the loader."""

from __future__ import annotations

import os

import pytest
from real_model_fixtures import AE, DIT_SCHNELL, random_state, save_sharded

from tessera.engines.flux import Flux
from tessera.engines.vae import AutoencoderKL
from tessera.executor import Executor
from tessera.registry import default_registry


@pytest.fixture
def executor(tmp_path):
    models = tmp_path / "models"
    save_sharded(random_state(Flux(DIT_SCHNELL), 3), models / "diffusion_models" / "flux", "model")
    save_sharded(random_state(AutoencoderKL(AE), 2), models / "vae" / "ae", "model")
    return Executor(default_registry(), models, tmp_path / "in", tmp_path / "out", device="cpu")


def touch(path) -> None:
    """Same bytes, a new modification time: what a re-download or an edit in place looks like."""
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))


@pytest.mark.parametrize(
    ("node", "folder", "inputs"),
    [("LoadDiffusionModel", "diffusion_models/flux", {}), ("LoadVAE", "vae/ae", {})],
)
def test_changing_another_shard_reruns_the_loader(executor, node, folder, inputs):
    chosen = "model-00002-of-00002.safetensors"
    workflow = {
        "version": 2,
        "nodes": {"1": {"type": node, "inputs": {"file": f"{folder.split('/', 1)[1]}/{chosen}", **inputs}}},
    }

    def run() -> str:
        result = executor.run(workflow, targets=["1"])
        assert result.status == "success", result.errors
        return "executed" if result.executed == ["1"] else "cached" if result.cached == ["1"] else "?"

    root = executor.models_dir / folder
    assert run() == "executed"
    assert run() == "cached"
    touch(root / "model-00001-of-00002.safetensors")  # not the file the workflow names
    assert run() == "executed"
    touch(root / "model.safetensors.index.json")
    assert run() == "executed"
    (root / "config.json").write_text("{}")  # a config.json appearing beside the shards
    assert run() == "executed"
    assert run() == "cached"
