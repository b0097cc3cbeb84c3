"""The `tessera` command: run (JSON or a PNG that carries its workflow), --set, validate, nodes.

The entry point itself (`python -m tessera`, its exit status) is exercised in subprocesses;
the other cases call `tessera.cli.main` in this process, which is the same code minus the
interpreter start-up.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from PIL import Image
from tessera_harness import PYTHON, png_bytes, png_text_chunks, write_custom_nodes

WORKFLOW = {
    "version": 1,
    "nodes": {
        "1": {
            "type": "SolidColor",
            "inputs": {"width": 6, "height": 4, "red": 0.1, "green": 0.2, "blue": 0.3},
        },
        "2": {
            "type": "SaveImage",
            "inputs": {"images": {"node": "1", "output": "image"}, "filename_prefix": "cli"},
        },
    },
}
BAD = {
    "version": 1,
    "nodes": {
        "1": {"type": "SolidColor", "inputs": {"width": 6, "height": 4}},
        "2": {"type": "SaveImage", "inputs": {"images": {"node": "7", "output": "image"}}},
    },
}
DIRS = ["--models-dir", "models", "--input-dir", "in", "--device", "cpu"]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A working folder with a custom_nodes/ pack (the CLI loads ./custom_nodes) and the workflows."""
    write_custom_nodes(tmp_path / "custom_nodes")
    for name in ("models", "in", "out"):
        (tmp_path / name).mkdir()
    (tmp_path / "wf.json").write_text(json.dumps(WORKFLOW))
    (tmp_path / "bad.json").write_text(json.dumps(BAD))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def tessera(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PYTHON, "-m", "tessera", *args], cwd=cwd, capture_output=True, text=True, timeout=180, check=False
    )


@pytest.fixture(scope="module")
def bad_run(tmp_path_factory):
    """`python -m tessera run bad.json`, launched once at the start of this module so that its
    interpreter start-up overlaps the other tests; `.communicate()` collects it."""
    folder = tmp_path_factory.mktemp("cli_bad")
    (folder / "out").mkdir()
    (folder / "bad.json").write_text(json.dumps(BAD))
    proc = subprocess.Popen(
        [PYTHON, "-m", "tessera", "run", "bad.json", "--out", "out", *DIRS],
        cwd=folder,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    proc.folder = folder
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


def main(capsys, *args: str) -> tuple[int, str, str]:
    """Run `tessera ARGS` in this process: (exit status, stdout, stderr)."""
    from tessera.cli import main as cli_main

    try:
        status = cli_main(list(args))
    except SystemExit as e:  # the CLI exits with a message for unusable input
        status = e.code if isinstance(e.code, int) else 1
        if isinstance(e.code, str):
            print(e.code, file=__import__("sys").stderr)
    out, err = capsys.readouterr()
    return status, out, err


def test_run_with_set_then_rerun_the_png(workdir, capsys, bad_run):
    status, out, err = main(
        capsys,
        "run",
        "wf.json",
        "--out",
        "out",
        *DIRS,
        "--quiet",
        "--set",
        "1.red=1.0",
        "--set",
        "2.filename_prefix=cli set",
    )
    assert status == 0, err
    assert out.splitlines() == [str(Path("out") / "cli set_00001.png")]
    first = workdir / "out" / "cli set_00001.png"
    with Image.open(first) as picture:
        assert picture.size == (6, 4) and picture.getpixel((2, 2)) == (255, 51, 77)
    # the workflow that ran, overrides included, is in a tEXt chunk named `workflow`
    from tessera.workflow import migrate

    expected = migrate(
        json.loads(json.dumps(WORKFLOW))
    )  # what ran: the workflow upgraded to the current version
    expected["nodes"]["1"]["inputs"]["red"] = 1.0
    expected["nodes"]["2"]["inputs"]["filename_prefix"] = "cli set"  # not JSON, so kept as text
    embedded = json.loads(png_text_chunks(first.read_bytes())["workflow"])
    assert embedded == expected

    # the real entry point re-runs the PNG: same picture, same workflow
    done = tessera(workdir, "run", str(first), "--out", "again", *DIRS, "--quiet")
    assert done.returncode == 0, done.stderr
    second = workdir / "again" / "cli set_00001.png"
    assert done.stdout.splitlines() == [str(Path("again") / "cli set_00001.png")]
    with Image.open(first) as a, Image.open(second) as b:
        assert a.tobytes() == b.tobytes()
    assert json.loads(png_text_chunks(second.read_bytes())["workflow"]) == expected


def test_run_a_bad_workflow_fails_naming_the_node(bad_run):
    _, stderr = bad_run.communicate(timeout=180)
    assert bad_run.returncode != 0
    assert "node 2, input 'images': dangling link to missing node '7'" in stderr
    assert list((bad_run.folder / "out").iterdir()) == []


def test_run_reports_a_failing_node_and_progress(workdir, capsys):
    (workdir / "fail.json").write_text(
        json.dumps({"version": 1, "nodes": {"1": {"type": "Fail", "inputs": {"reason": "no luck"}}}})
    )
    status, _, err = main(capsys, "run", "fail.json", "--out", "out", *DIRS)
    assert status == 1 and "tessera: node 1 (Fail), input 'reason': no luck" in err
    (workdir / "sleep.json").write_text(
        json.dumps(
            {"version": 1, "nodes": {"1": {"type": "Sleep", "inputs": {"steps": 3, "step_seconds": 0}}}}
        )
    )
    status, _, err = main(capsys, "run", "sleep.json", "--out", "out", *DIRS)
    assert status == 0 and "3/3" in err and "node 1" in err


def test_set_errors(workdir, capsys):
    status, _, err = main(capsys, "run", "wf.json", "--out", "out", *DIRS, "--set", "1red=1")
    assert status != 0 and "expected NODE.INPUT=VALUE" in err
    status, _, err = main(capsys, "run", "wf.json", "--out", "out", *DIRS, "--set", "9.red=1")
    assert status != 0 and "no node '9'" in err
    status, _, err = main(capsys, "run", "wf.json", "--out", "out", *DIRS, "--set", "1.red=2.5")
    assert status == 1 and "node 1, input 'red'" in err and "out of range" in err
    assert list((workdir / "out").iterdir()) == []


def test_validate_good_and_bad(workdir, capsys):
    status, out, err = main(capsys, "validate", "wf.json", "--models-dir", "models")
    assert status == 0 and out.strip() == "wf.json: valid (2 nodes, 2 to run)"
    status, out, err = main(capsys, "validate", "bad.json", "--models-dir", "models")
    assert status == 1 and "bad.json: node 2, input 'images': dangling link to missing node '7'" in err
    several = json.loads(json.dumps(WORKFLOW))
    several["nodes"]["1"]["inputs"].update(width=0, blue="x")
    (workdir / "several.json").write_text(json.dumps(several))
    status, _, err = main(capsys, "validate", "several.json")
    assert status == 1 and "node 1, input 'width'" in err and "node 1, input 'blue'" in err
    (workdir / "nothing.json").write_text(json.dumps({"version": 1, "nodes": {"1": WORKFLOW["nodes"]["1"]}}))
    status, _, err = main(capsys, "validate", "nothing.json")
    assert status == 1 and "no output node" in err
    (workdir / "broken.json").write_text("{nope")
    status, _, err = main(capsys, "validate", "broken.json")
    assert status != 0 and "not valid JSON" in err
    (workdir / "plain.png").write_bytes(png_bytes())
    status, _, err = main(capsys, "validate", "plain.png")
    assert status != 0 and "carries no Tessera workflow" in err
    status, _, err = main(capsys, "validate", "missing.json")
    assert status != 0 and "no such file" in err


def test_nodes_lists_the_catalogue(workdir, capsys):
    status, out, err = main(capsys, "nodes")
    assert status == 0
    names = {line.split()[1] for line in out.splitlines() if line.strip()}
    assert {"SolidColor", "SaveImage", "LoadImage", "ImageInvert", "Int", "Sleep", "Fail"} <= names
    line = next(line for line in out.splitlines() if line.split()[1] == "SaveImage")
    assert "images:IMAGE" in line and "filename_prefix:STRING" in line
    assert "custom_nodes/broken_pack.py failed to load and was skipped" in err
    status, out, _ = main(capsys, "nodes", "--json")
    catalogue = json.loads(out)
    assert status == 0 and catalogue["SolidColor"]["outputs"] == [{"name": "image", "type": "IMAGE"}]
    assert "HalfDefined" not in catalogue
