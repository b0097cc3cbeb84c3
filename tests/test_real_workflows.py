"""The four real-model workflows run end to end through `tessera run` on tiny random checkpoints
written in the real layouts under the real names (`real_model_fixtures`), each to a PNG.

The workflows are the shipped ones, unchanged but for `--set` overrides that shrink the image
and the step count; the files they name are the ones `tessera models pull` puts in models/.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from real_model_fixtures import write_flux, write_llamagen

WORKFLOWS = Path(__file__).resolve().parent.parent / "workflows"
SMALL = {
    "flux_schnell": ["5.width=32", "5.height=48", "6.steps=2"],
    "flux_dev": ["5.width=32", "5.height=48", "6.steps=2"],
    "llamagen_c2i": ["6.width=3", "6.height=2"],
    "llamagen_t2i": ["6.width=3", "6.height=2"],
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    write_flux(root, dev=False)
    write_flux(root, dev=True)
    write_llamagen(root, "c2i")
    write_llamagen(root, "t2i")
    return root


@pytest.mark.parametrize("name", sorted(SMALL))
def test_real_model_workflow_runs_to_a_png(models, tmp_path, name):
    out = tmp_path / "out"
    out.mkdir()
    cmd = [
        sys.executable,
        "-m",
        "tessera",
        "run",
        str(WORKFLOWS / f"{name}.json"),
        "--models-dir",
        str(models),
        "--out",
        str(out),
        "--device",
        "cpu",
        "--quiet",
    ]
    for assignment in SMALL[name]:
        cmd += ["--set", assignment]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    pngs = sorted(out.glob("*.png"))
    assert [p.name for p in pngs] == [f"{name}_00001.png"]
    with Image.open(pngs[0]) as image:
        width, height = image.size
        embedded = json.loads(image.text["workflow"])  # the PNG re-runs its workflow
    if name.startswith("flux"):
        assert (width, height) == (32, 48)  # the tiny VAE halves, the DiT packs 2x2: any multiple of 4 fits
    else:
        assert (width, height) == (3 * 2, 2 * 2)  # token grid x the tiny VQ's 2x downsampling
    assert embedded["nodes"]["8"]["type"] == "SaveImage"


def test_workflows_name_the_files_the_catalogue_pulls():
    """What `tessera models pull` writes is what the workflows load (file names, folders, tokenizers)."""
    from tessera import hub

    pulled = {f.target for entry in hub.CATALOGUE.values() for f in entry.files}
    folders = {
        "LoadDiffusionModel": "diffusion_models",
        "LoadVAE": "vae",
        "LoadARModel": "ar_models",
        "LoadVQModel": "vq_models",
        "CLIPLoader": "text_encoders",
        "DualCLIPLoader": "text_encoders",
    }
    for name in SMALL:
        nodes = json.loads((WORKFLOWS / f"{name}.json").read_text())["nodes"]
        for node in nodes.values():
            folder = folders.get(node["type"])
            for value in node["inputs"].values() if folder else ():
                if isinstance(value, str) and value.endswith(".safetensors"):
                    assert f"{folder}/{value}" in pulled, (name, value)
