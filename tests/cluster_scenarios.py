"""The cluster scenarios, run by tests/test_cluster.py inside a fresh network namespace.

Ray's daemons bind more than loopback, so this module refuses to run anywhere a network
interface other than `lo` exists: `test_cluster.py` starts it with
`unshare -n sh -c 'ip link set lo up && exec python -m pytest tests/cluster_scenarios.py'`.
Every mid-prompt state is made with the test pack's `Sleep` node and its `gate` file: a
prompt ends when the test creates that file, never after a timer.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from tessera_harness import TESTING_PACK, EventRecorder, Server, free_port, wait_until

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "cluster-test-token-1234"
PYTHON = sys.executable

# A loader whose every load is logged with the worker's process id: affinity shows as one
# load per model, and the output cache of each worker is what makes a repeat free.
CLUSTER_PACK = '''
"""Test nodes for the cluster: ToyLoad (a logged model load) and ToyUse (an output that uses it)."""
import os

from safetensors.torch import load_file

from tessera.node import Input, Node, Output, Result


class ToyLoad(Node):
    """Load a model file, writing one line per load to `log`."""

    category = "testing"
    inputs = (
        Input("ckpt_name", "STRING", model_folder="checkpoints", link="widget"),
        Input("log", "STRING", default="", link="widget"),
    )
    outputs = (Output("summary", "STRING"),)

    def execute(self, ctx, ckpt_name, log):
        tensors = load_file(str(ctx.model_file("checkpoints", ckpt_name, "ckpt_name")))
        with open(log, "a") as f:
            f.write(f"load {ckpt_name} {os.getpid()}\\n")
        return (f"{ckpt_name}:{sum(float(t.sum()) for t in tensors.values())}",)


class ToyUse(Node):
    """Show what a ToyLoad loaded."""

    category = "testing"
    is_output = True
    inputs = (Input("summary", "STRING", link="link"), Input("label", "STRING", default="", link="widget"))
    outputs = ()

    def execute(self, ctx, summary, label):
        return Result(ui={"used": [f"{label} {summary} {os.getpid()}"]})
'''


def only_loopback() -> bool:
    return [name for _, name in socket.if_nameindex()] == ["lo"]  # this process's network namespace


if not only_loopback():  # never start Ray where it could reach or be reached by anything else
    raise RuntimeError(
        "tests/cluster_scenarios.py runs only inside a network namespace with nothing but `lo` "
        "(run tests/test_cluster.py, which starts it there)"
    )


@pytest.fixture(scope="module")
def packs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cluster_nodes")
    (folder / "testing_pack.py").write_text(TESTING_PACK)
    (folder / "cluster_pack.py").write_text(CLUSTER_PACK)
    return folder


def make_models(folder: Path) -> None:
    import torch
    from safetensors.torch import save_file

    (folder / "checkpoints").mkdir(parents=True, exist_ok=True)
    for name, value in (("a.safetensors", 1.0), ("b.safetensors", 2.0)):
        save_file({"w": torch.full((4,), value)}, str(folder / "checkpoints" / name))


def cluster_server(root: Path, packs: Path, *args: str) -> Server:
    s = Server(root, packs, None, ("--cluster-token", TOKEN, *args))
    make_models(s.models_dir)
    return s


def workers(server: Server) -> list[dict]:
    return server.get_json("/api/system")["cluster"]["workers"]


def wait_workers(server: Server, n: int, timeout: float = 180.0) -> list[dict]:
    return wait_until(lambda: len(workers(server)) >= n and workers(server), timeout, 0.2, f"{n} workers")


def running_on(server: Server, prompt_id: str) -> dict:
    """The /api/queue entry of a running prompt, once it has a worker."""

    def found():
        for item in server.get_json("/api/queue")["running"]:
            if item["prompt_id"] == prompt_id and item.get("worker"):
                return item
        return None

    return wait_until(found, 60, 0.05, f"prompt {prompt_id} running on a worker")


def running_elsewhere(server: Server, prompt_id: str, dead: str) -> dict:
    """The /api/queue entry of a prompt once it runs again, on a worker other than `dead`."""

    def moved():
        item = running_on(server, prompt_id)
        return item if item["worker"] != dead else None

    return wait_until(moved, 180, 0.05, f"prompt {prompt_id} to run on a worker other than {dead}")


def sleep(label: str, gate: Path | None = None, steps: int = 2) -> dict:
    inputs = {"steps": steps, "step_seconds": 0.0, "label": label, "gate": str(gate) if gate else ""}
    return {"version": 1, "nodes": {"1": {"type": "Sleep", "inputs": inputs}}}


def toy(model: str, label: str, log: Path) -> dict:
    return {
        "version": 1,
        "nodes": {
            "1": {"type": "ToyLoad", "inputs": {"ckpt_name": model, "log": str(log)}},
            "2": {
                "type": "ToyUse",
                "inputs": {"summary": {"node": "1", "output": "summary"}, "label": label},
            },
        },
    }


def saved_then_sleep(prefix: str, gate: Path) -> dict:
    """A PNG written by node 2, then node 3 waits on its gate (nodes run in id order)."""
    return {
        "version": 1,
        "nodes": {
            "1": {"type": "SolidColor", "inputs": {"width": 8, "height": 8, "red": 0.5}},
            "2": {
                "type": "SaveImage",
                "inputs": {"images": {"node": "1", "output": "image"}, "filename_prefix": prefix},
            },
            "3": {
                "type": "Sleep",
                "inputs": {"steps": 2, "step_seconds": 0.0, "label": prefix, "gate": str(gate)},
            },
        },
    }


# -- one local head with two CPU workers ---------------------------------------------------------
@pytest.fixture(scope="module")
def local(tmp_path_factory, packs):
    s = cluster_server(tmp_path_factory.mktemp("local"), packs, "--workers", "ray", "--worker-cpus", "2")
    s.start()
    wait_workers(s, 2)
    yield s
    s.stop(60)


def test_two_cpu_workers_complete_every_prompt(local, tmp_path):
    gate = tmp_path / "gate"
    first = local.submit(sleep("first", gate))
    held = running_on(local, first)["worker"]
    # while the first is held on its worker, the rest run on the other one
    others = [local.submit(sleep(f"p{i}")) for i in range(5)]
    for prompt_id in others:
        assert local.wait_status(prompt_id, timeout=120)["status"] == "success"
    gate.touch()
    assert local.wait_status(first, timeout=120)["status"] == "success"
    by_worker = {w["name"]: w["runs"] for w in workers(local)}
    assert by_worker[held] >= 1 and sum(by_worker.values()) == 6
    assert all(runs >= 1 for runs in by_worker.values()), by_worker
    assert local.entry(others[0])["outputs"] == {"1": {"slept": ["p0"]}}


def test_events_reach_the_socket_in_order(local, tmp_path):
    """Progress, the preview (a binary frame), the result: as the in-process worker sends them."""
    recorder = EventRecorder(local)
    try:
        workflow = sleep("events", steps=3)
        workflow["nodes"]["1"]["inputs"]["preview"] = True
        prompt_id = local.submit(workflow)
        local.wait_status(prompt_id, timeout=120)
        recorder.wait_for(lambda k, d: k == "execution_success" and d.get("prompt_id") == prompt_id)
        kinds = [k for k, _ in recorder.of_prompt(prompt_id)]
        assert kinds == [
            "execution_start",
            "executing",
            "progress",
            "binary",
            "progress",
            "progress",
            "executed",
            "execution_success",
        ]
        assert recorder.of_prompt(prompt_id)[-2][1]["output"] == {"slept": ["events"]}
    finally:
        recorder.close()


def test_affinity_loads_each_model_once(local, tmp_path):
    log = tmp_path / "loads.txt"
    # both workers free: a and b go to different workers and load there
    first = [local.submit(toy("a.safetensors", "a1", log)), local.submit(toy("b.safetensors", "b1", log))]
    for prompt_id in first:
        assert local.wait_status(prompt_id, timeout=120)["status"] == "success"
    # one at a time, so every choice has both workers free: each prompt goes where its model is
    for label in ("b2", "a2", "b3", "a3"):
        prompt_id = local.submit(toy(f"{label[0]}.safetensors", label, log))
        assert local.wait_status(prompt_id, timeout=120)["status"] == "success"
    loads = log.read_text().splitlines()
    assert sorted(line.split()[1] for line in loads) == ["a.safetensors", "b.safetensors"], loads
    assert len({line.split()[2] for line in loads}) == 2, "each model loaded by a different worker"
    holders = {w["name"]: w["models"] for w in workers(local)}
    assert sorted(len(m) for m in holders.values()) == [1, 1], holders


def test_interrupt_reaches_the_worker(local, tmp_path):
    gate = tmp_path / "never"
    recorder = EventRecorder(local)
    try:
        prompt_id = local.submit(sleep("stop me", gate))
        running_on(local, prompt_id)
        recorder.wait_for(
            lambda k, d: k == "progress" and d.get("prompt_id") == prompt_id and d["value"] == 2
        )
        r = local.request("POST", "/api/interrupt", json_body={"prompt_id": prompt_id})
        assert r.json() == {"interrupted": prompt_id}
        assert local.wait_status(prompt_id, timeout=60)["status"] == "interrupted"
        recorder.wait_for(lambda k, d: k == "execution_interrupted" and d.get("prompt_id") == prompt_id)
    finally:
        recorder.close()


def png_files(folder: Path, prefix: str) -> list[Path]:
    return sorted(folder.rglob(f"{prefix}_*.png"))


def test_killed_worker_prompt_completes_elsewhere_with_one_output(local, tmp_path):
    gate = tmp_path / "gate"
    prompt_id = local.submit(saved_then_sleep("killed", gate))
    item = running_on(local, prompt_id)
    victim = next(w for w in workers(local) if w["name"] == item["worker"])
    recorder = EventRecorder(local)
    try:
        # the PNG of node 2 reached the server before node 3 waits on the gate
        wait_until(lambda: png_files(local.output_dir, "killed"), 60, 0.05, "the first attempt's PNG")
        os.kill(victim["pid"], signal.SIGKILL)
        again = running_elsewhere(local, prompt_id, victim["name"])
        assert again["attempt"] == 2
        gate.touch()
        entry = local.wait_status(prompt_id, timeout=120)
    finally:
        recorder.close()
    assert entry["status"] == "success", entry["errors"]
    files = png_files(local.output_dir, "killed")
    assert len(files) == 1, files  # the first attempt's file was removed: written exactly once
    ref = entry["outputs"]["2"]["images"][0]
    assert (local.output_dir / ref["subfolder"] / ref["filename"]) == files[0]
    assert local.get(f"/api/view?filename={ref['filename']}&type=output").status == 200
    assert victim["name"] not in {w["name"] for w in workers(local)}


def test_second_death_fails_the_prompt_then_a_late_worker_gets_work(local, tmp_path):
    """Runs after the kill above: one local worker is left. Kill it too on a retried prompt."""
    gate = tmp_path / "gate"
    prompt_id = local.submit(sleep("doomed", gate))
    first = running_on(local, prompt_id)
    os.kill(next(w["pid"] for w in workers(local) if w["name"] == first["worker"]), signal.SIGKILL)
    # no worker is left: the prompt waits in the queue until one joins
    address = local.get_json("/api/system")["cluster"]["address"]
    joiner = start_worker(address, local, tmp_path / "joiner")
    try:
        second = running_elsewhere(local, prompt_id, first["worker"])
        assert second["attempt"] == 2
        os.kill(next(w["pid"] for w in workers(local) if w["name"] == second["worker"]), signal.SIGKILL)
        entry = local.wait_status(prompt_id, timeout=120)
        assert entry["status"] == "error"
        message = entry["errors"][0]["message"]
        assert "died" in message and first["worker"] in message and second["worker"] in message
        assert "not retried" in message
        # a worker that joins later gets the next prompt
        joiner.send_signal(signal.SIGINT)
        joiner.wait(60)
        joiner = start_worker(address, local, tmp_path / "joiner2")
        later = local.submit(sleep("late"))
        assert local.wait_status(later, timeout=180)["status"] == "success"
    finally:
        joiner.send_signal(signal.SIGINT)
        joiner.wait(60)


def start_worker(address: str, server: Server, work_dir: Path, *extra: str) -> subprocess.Popen:
    log = open(work_dir.with_suffix(".log"), "ab")  # noqa: SIM115 - the process writes to it until stopped
    return subprocess.Popen(
        [
            PYTHON,
            "-m",
            "tessera",
            "worker",
            "--address",
            address,
            "--cluster-token",
            TOKEN,
            "--worker-cpus",
            "1",
            "--models-dir",
            str(server.models_dir),
            "--input-dir",
            str(server.input_dir),
            "--custom-nodes-dir",
            str(server.custom_nodes_dir),
            "--work-dir",
            str(work_dir),
            *extra,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )


# -- a cluster of its own: the server restarts, the worker keeps running ----------------------------
@pytest.fixture
def head(tmp_path):
    """A Ray head of its own: (its GCS address for workers, its Ray Client address for the server)."""
    port, client_port = free_port(), free_port()
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=TOKEN, RAY_USAGE_STATS_ENABLED="0")
    ray = str(Path(PYTHON).parent / "ray")
    subprocess.run(
        [
            ray,
            "start",
            "--head",
            "--port",
            str(port),
            "--node-ip-address",
            "127.0.0.1",
            "--num-cpus",
            "2",
            "--include-dashboard",
            "false",
            "--disable-usage-stats",
            "--ray-client-server-port",
            str(client_port),
        ],
        check=True,
        env=env,
        capture_output=True,
        timeout=180,
    )
    yield f"127.0.0.1:{port}", f"ray://127.0.0.1:{client_port}"
    subprocess.run([ray, "stop", "--force"], env=env, capture_output=True, timeout=120)


def test_server_restart_reattaches_and_redispatches(head, packs, tmp_path):
    gcs, client = head
    server = cluster_server(tmp_path / "srv", packs, "--workers", client, "--worker-outputs", "shared")
    worker = start_worker(gcs, server, tmp_path / "w")
    try:
        server.start()
        wait_workers(server, 1)
        gate_a, gate_b = tmp_path / "gate_a", tmp_path / "gate_b"
        a = server.submit(sleep("A", gate_a))
        b = server.submit(sleep("B", gate_b))
        assert running_on(server, a)["worker"]
        wait_until(lambda: "start A" in server.sleep_log(), 60, 0.05, "A to start")
        server.kill()  # no shutdown code runs: A keeps running on its worker
        server.start()
        item = running_on(server, a)  # re-attached, not started again
        assert item["reason"].startswith("re-attached")
        gate_a.touch()
        gate_b.touch()
        assert server.wait_status(a, timeout=120)["status"] == "success"
        assert server.wait_status(b, timeout=120)["status"] == "success"
        log = server.sleep_log()
        assert log.count("start A") == 1 and log.count("done A") == 1, log
        assert log.count("start B") == 1 and log.count("done B") == 1, log
    finally:
        server.stop(60)
        worker.send_signal(signal.SIGINT)
        worker.wait(60)
