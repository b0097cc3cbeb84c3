"""Scale-out on Ray (tessera/cluster.py).

The scenarios that start Ray (two workers, affinity, interrupt, a killed worker, a late one,
a server restart) are in tests/cluster_scenarios.py and run inside a fresh network namespace
that has only `lo`: Ray's daemons bind more than loopback, and no test may talk to anything
but 127.0.0.1. Here: that run, plus what needs no Ray at all (and must not import it).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tessera.cluster import ClusterError, WorkerState, check_token, choose_worker, parse_workers, write_new

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = {
    "test_two_cpu_workers_complete_every_prompt",
    "test_events_reach_the_socket_in_order",
    "test_affinity_loads_each_model_once",
    "test_interrupt_reaches_the_worker",
    "test_killed_worker_prompt_completes_elsewhere_with_one_output",
    "test_second_death_fails_the_prompt_then_a_late_worker_gets_work",
}
RESTART = {"test_server_restart_reattaches_and_redispatches"}


def in_private_network(command: str, timeout: float) -> subprocess.CompletedProcess:
    """Run `command` in a new network namespace with only loopback up (needs root, as in CI)."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        pytest.fail("the cluster tests need `unshare` (util-linux) and `ip` (iproute2) to isolate Ray")
    if os.geteuid() != 0:
        pytest.fail(
            "the cluster tests start Ray only inside a private network namespace, which needs root "
            "(`unshare -n`); run them as root (CI does)"
        )
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", OMP_NUM_THREADS="1")
    return subprocess.run(
        ["unshare", "-n", "sh", "-c", f"ip link set lo up && exec {command}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def scenarios(tmp_path: Path, selection: str, expected: set[str]) -> None:
    """Run the selected scenarios of tests/cluster_scenarios.py in a namespace of their own."""
    report = tmp_path / "scenarios.xml"
    proc = in_private_network(
        f"{sys.executable} -m pytest -q -p no:cacheprovider tests/cluster_scenarios.py -k '{selection}' "
        f"--junitxml={report}",
        timeout=1500,
    )
    assert report.is_file(), proc.stdout[-4000:] + proc.stderr[-4000:]
    cases = ET.parse(report).getroot().iter("testcase")
    passed = {c.get("name") for c in cases if not list(c)}  # no failure, error or skipped child
    assert passed == expected, f"not passed: {sorted(expected - passed)}\n{proc.stdout[-6000:]}"
    assert proc.returncode == 0


@pytest.mark.timeout(1800)  # six scenarios on one local head and its workers (about 3 minutes here)
def test_cluster_scenarios_pass_in_a_private_network_namespace(tmp_path):
    scenarios(tmp_path, "not restart", SCENARIOS)


@pytest.mark.timeout(900)
def test_server_restart_scenario_passes_in_a_private_network_namespace(tmp_path):
    """A head of its own, a worker, and a server that is killed and started again (through ray://)."""
    scenarios(tmp_path, "restart", RESTART)


def test_the_namespace_has_only_loopback():
    proc = in_private_network(f'{sys.executable} -c "import socket; print(socket.if_nameindex())"', 60)
    assert proc.stdout.strip() == "[(1, 'lo')]", proc.stderr


def test_serving_without_workers_never_imports_ray(tmp_path):
    """A normal server start (app, worker thread, /api/system) leaves Ray unimported."""
    script = f"""
import asyncio, socket, sys
from pathlib import Path
from aiohttp.test_utils import TestClient, TestServer
from tessera.registry import default_registry
from tessera.server import ServerConfig, TesseraServer

root = Path({str(tmp_path)!r})
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
config = ServerConfig(
    port=port, output_dir=root / "out", input_dir=root / "in", user_dir=root / "user", device="cpu"
)

async def main():
    server = TesseraServer(config, default_registry())
    async with TestClient(TestServer(server.make_app(), port=port)) as client:
        system = await (await client.get("/api/system")).json()
        queue = await (await client.get("/api/queue")).json()
    assert "cluster" not in system and queue == {{"running": [], "pending": []}}, (system, queue)

asyncio.run(main())
print("ray imported:", "ray" in sys.modules)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.strip().endswith("ray imported: False")


def test_worker_addresses_are_parsed_or_refused_by_name():
    assert parse_workers("ray") == ("local", None)
    assert parse_workers("ray://10.0.0.5:10001") == ("ray://10.0.0.5:10001", "10.0.0.5")
    assert parse_workers("127.0.0.1:6379") == ("127.0.0.1:6379", "127.0.0.1")
    with pytest.raises(ClusterError, match="--workers 'rey'"):
        parse_workers("rey")


def test_a_head_beyond_loopback_needs_a_token():
    check_token("127.0.0.1", None, "the cluster head")  # loopback: the token is optional
    check_token("10.0.0.5", "secret", "the cluster head")
    with pytest.raises(ClusterError, match="10.0.0.5 is not a loopback address.*cluster token is required"):
        check_token("10.0.0.5", None, "the cluster head")


@pytest.mark.parametrize(
    "args",
    [
        ("serve", "--workers", "10.0.0.5:6379", "--port", "0"),
        ("worker", "--address", "10.0.0.5:6379"),
    ],
)
def test_cli_refuses_a_remote_head_without_a_token(args, tmp_path):
    """Refused before Ray is imported or any connection is tried (no traffic leaves the machine)."""
    env = {k: v for k, v in os.environ.items() if k != "TESSERA_CLUSTER_TOKEN"}
    proc = subprocess.run(
        [sys.executable, "-m", "tessera", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=env,
    )
    assert proc.returncode != 0
    assert "10.0.0.5 is not a loopback address" in proc.stderr and "--cluster-token" in proc.stderr, (
        proc.stderr
    )
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "user" / "cluster.sqlite").exists()


def test_a_worker_joins_through_its_own_ray_node(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "tessera", "worker", "--address", "ray://127.0.0.1:10001"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode != 0 and "ray start --address HEAD:PORT" in proc.stderr, proc.stderr


def test_affinity_first_then_least_loaded():
    a = WorkerState("a", models={"checkpoints/x@1:2"}, runs=5)
    b = WorkerState("b", runs=1)
    c = WorkerState("c", models={"checkpoints/y@3:4"}, runs=0)
    assert choose_worker([a, b, c], {"checkpoints/x@1:2"}) == (a, "affinity: holds checkpoints/x@1:2")
    assert choose_worker([b, c], {"checkpoints/x@1:2"}) == (b, "least loaded")  # holds nothing yet
    assert choose_worker([a, c], {"checkpoints/z@5:6"})[0] is c  # equal models held: fewer runs


def test_a_streamed_file_never_replaces_one_already_there(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "tessera_00001.png").write_bytes(b"old")
    assert write_new(tmp_path, "img/tessera_00001.png", b"new") == "img/tessera_00002.png"
    assert write_new(tmp_path, "plain.png", b"x") == "plain.png"
    assert (tmp_path / "img" / "tessera_00001.png").read_bytes() == b"old"
    assert (tmp_path / "img" / "tessera_00002.png").read_bytes() == b"new"


@pytest.mark.timeout(900)
def test_cluster_bench_quick_reports_scaling_overhead_and_recovery():
    """`tessera bench cluster --quick` re-runs itself in a private network namespace (needs root)."""
    if os.geteuid() != 0:
        pytest.fail(
            "tessera bench cluster starts Ray only inside `unshare -n`, which needs root (CI runs as root)"
        )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "tessera", "bench", "cluster", "--quick"],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.strip().splitlines()
    assert any(line.startswith("2 workers") for line in lines), "a table comes before the JSON line"
    record = json.loads(lines[-1])
    assert record["bench"] == "cluster" and record["prompts"] == 4
    for key in ("workers_1_per_s", "workers_2_per_s", "scaling_2_over_1", "recovery_s", "in_process_per_s"):
        assert isinstance(record[key], float) and record[key] > 0, (key, record)
    assert isinstance(record["dispatch_overhead_ms"], float)  # may be negative in the noise
