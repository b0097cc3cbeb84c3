"""Load on the server: N clients × M prompts, each client with its own WebSocket listener.

Starts `tessera serve` in a temporary folder (or uses --url), connects N WebSockets (one
client_id each), and has every client queue M small SaveImage workflows whose file
prefix and colour are unique to that prompt. Reports throughput, p50/p99 latency (the
start of POST /api/prompt → the prompt's final event on its client's socket), and:
  lost    prompts that never reached `success` (history and event both checked),
  crossed prompts whose history entry or output file belongs to another prompt, or whose
          final event reached another client,
  stray   events a client received about prompts it did not submit.
Then, while one 10,000-node graph validates, it times other requests (p99). Prints a
table, then one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import aiohttp

from tessera.workflow import CURRENT_VERSION

FINAL = ("execution_success", "execution_error", "execution_interrupted")


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def prompt_workflow(client: int, index: int, clients: int, prompts: int) -> tuple[dict, str]:
    prefix = f"load/c{client:03d}_p{index:03d}"
    workflow = {
        "version": CURRENT_VERSION,
        "nodes": {
            "1": {
                "type": "SolidColor",
                "inputs": {
                    "width": 8,
                    "height": 8,
                    "red": client / max(clients, 1),
                    "green": index / max(prompts, 1),
                    "blue": 0.5,
                },
            },
            "2": {
                "type": "SaveImage",
                "inputs": {"images": {"node": "1", "output": "image"}, "filename_prefix": prefix},
            },
        },
    }
    return workflow, prefix


class Client:
    def __init__(self, number: int, url: str, session: aiohttp.ClientSession):
        self.number, self.url, self.session = number, url, session
        self.client_id = f"load-{number}-{uuid.uuid4().hex[:8]}"
        self.mine: dict[str, dict] = {}  # prompt id -> {workflow, prefix, submitted}
        self.events: list[tuple[float, str, str]] = []  # (time, type, prompt id) of every prompt event
        self.finals: set[str] = set()
        self.done = asyncio.Event()
        self.expected = 0

    async def listen(self, ready: asyncio.Event) -> None:
        async with self.session.ws_connect(f"{self.url}/ws?client_id={self.client_id}", heartbeat=30) as ws:
            ready.set()
            async for message in ws:
                if message.type == aiohttp.WSMsgType.BINARY:
                    n = int.from_bytes(message.data[:4], "big")
                    kind, data = "preview", json.loads(message.data[4 : 4 + n])
                elif message.type == aiohttp.WSMsgType.TEXT:
                    frame = json.loads(message.data)
                    kind, data = frame["type"], frame["data"]
                else:
                    break
                pid = data.get("prompt_id") if isinstance(data, dict) else None
                if pid is None:
                    continue  # queue-length summaries go to everyone
                self.events.append((time.perf_counter(), kind, pid))
                if kind in FINAL:
                    self.finals.add(pid)
                    self._check_done()

    def _check_done(self) -> None:
        if len(self.mine) == self.expected and set(self.mine) <= self.finals:
            self.done.set()

    async def submit(self, prompts: int, clients: int) -> None:
        self.expected = prompts
        for index in range(prompts):
            workflow, prefix = prompt_workflow(self.number, index, clients, prompts)
            started = time.perf_counter()
            async with self.session.post(
                f"{self.url}/api/prompt", json={"workflow": workflow, "client_id": self.client_id}
            ) as r:
                body = await r.json()
                if r.status != 200:
                    raise RuntimeError(f"client {self.number}: POST /api/prompt answered {r.status}: {body}")
            self.mine[body["prompt_id"]] = {"workflow": workflow, "prefix": prefix, "submitted": started}
        self._check_done()

    def final(self, pid: str) -> tuple[float, str] | None:
        """(time, type) of the first final event of one of this client's prompts."""
        return next(((t, k) for t, k, p in self.events if p == pid and k in FINAL), None)

    def stray(self) -> int:
        return sum(1 for _, _, pid in self.events if pid not in self.mine)


async def verify(
    client: Client, session: aiohttp.ClientSession, url: str, output_dir: Path | None
) -> tuple[int, int]:
    """(lost, crossed) for one client's prompts, from the history and the files."""
    lost = crossed = 0
    for pid, info in client.mine.items():
        async with session.get(f"{url}/api/history/{pid}") as r:
            entry = await r.json()
        final = client.final(pid)
        if entry.get("status") != "success" or final is None or final[1] != "execution_success":
            lost += 1
            continue
        images = entry["outputs"].get("2", {}).get("images", [])
        folder, _, stem = info["prefix"].rpartition("/")
        right = (
            entry["workflow"]["nodes"] == info["workflow"]["nodes"]
            and len(images) == 1
            and images[0]["subfolder"] == folder
            and images[0]["filename"].startswith(stem + "_")
        )
        if right and output_dir is not None:
            right = (output_dir / folder / images[0]["filename"]).is_file()
        crossed += not right
    return lost, crossed


async def validation_probe(url: str, session: aiohttp.ClientSession, nodes: int) -> dict:
    """p50/p99 of GET /api/queue while a `nodes`-node graph validates."""
    graph = {str(i): {"type": "SolidColor", "inputs": {"width": 8, "height": 8}} for i in range(nodes - 1)}
    graph["out"] = {"type": "PreviewImage", "inputs": {"images": {"node": "0", "output": "image"}}}
    body = json.dumps({"workflow": {"version": CURRENT_VERSION, "nodes": graph}})
    latencies: list[float] = []

    async def validate():
        started = time.perf_counter()
        async with session.post(
            f"{url}/api/validate", data=body, headers={"Content-Type": "application/json"}
        ) as r:
            await r.read()
            return r.status, time.perf_counter() - started

    async def timed_get() -> float:
        started = time.perf_counter()
        async with session.get(f"{url}/api/queue") as r:
            await r.read()
        return time.perf_counter() - started

    task = asyncio.ensure_future(validate())
    while not task.done():
        latencies.append(await timed_get())
        await asyncio.sleep(0.005)
    status, seconds = await task
    # the same requests with nothing validating: what the machine itself allows (a loaded
    # CPU delays every request, validation or not)
    baseline = []
    for _ in range(len(latencies)):
        baseline.append(await timed_get())
        await asyncio.sleep(0.005)
    return {
        "status": status,
        "validate_s": seconds,
        "requests": len(latencies),
        "p50_ms": 1000 * percentile(latencies, 0.5),
        "p99_ms": 1000 * percentile(latencies, 0.99),
        "max_ms": 1000 * max(latencies, default=float("nan")),
        "idle_p50_ms": 1000 * percentile(baseline, 0.5),
        "idle_p99_ms": 1000 * percentile(baseline, 0.99),
    }


async def run(
    url: str, clients: int, prompts: int, output_dir: Path | None, probe_nodes: int, timeout: float
) -> dict:
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=None)
    ) as session:
        people = [Client(i, url, session) for i in range(clients)]
        readies = [asyncio.Event() for _ in people]
        listeners = [asyncio.ensure_future(c.listen(r)) for c, r in zip(people, readies)]
        await asyncio.wait_for(asyncio.gather(*(r.wait() for r in readies)), 60)
        started = time.perf_counter()
        await asyncio.gather(*(c.submit(prompts, clients) for c in people))
        try:
            await asyncio.wait_for(asyncio.gather(*(c.done.wait() for c in people)), timeout)
        except asyncio.TimeoutError:
            pass
        elapsed = time.perf_counter() - started
        for task in listeners:
            task.cancel()
        checks = [await verify(c, session, url, output_dir) for c in people]
        finals = [(c.final(pid), info) for c in people for pid, info in c.mine.items()]
        latencies = [f[0] - info["submitted"] for f, info in finals if f is not None]
        stray = [c.stray() for c in people]
        finished = sum(1 for f, _ in finals if f is not None and f[1] == "execution_success")
        probe = await validation_probe(url, session, probe_nodes) if probe_nodes else None
    return {
        "bench": "load",
        "clients": clients,
        "prompts_per_client": prompts,
        "prompts": clients * prompts,
        "completed": finished,
        "seconds": elapsed,
        "throughput_prompts_per_s": finished / elapsed,
        "latency_p50_ms": 1000 * percentile(latencies, 0.5),
        "latency_p99_ms": 1000 * percentile(latencies, 0.99),
        "lost": sum(lost for lost, _ in checks),
        "crossed": sum(crossed for _, crossed in checks),
        "stray_events_total": sum(stray),
        "stray_events_max_per_client": max(stray, default=0),
        "validation_probe": probe,
    }


def start_server(folder: Path) -> tuple[subprocess.Popen, str]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(folder / "server.log", "wb")  # noqa: SIM115 - the server writes to it until stopped
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tessera",
            "serve",
            "--port",
            str(port),
            "--device",
            "cpu",
            "--output-dir",
            str(folder / "out"),
            "--input-dir",
            str(folder / "in"),
            "--user-dir",
            str(folder / "user"),
            "--custom-nodes-dir",
            str(folder / "custom_nodes"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=folder,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    url = f"http://127.0.0.1:{port}"
    import urllib.request

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"tessera bench load: the server exited:\n{(folder / 'server.log').read_text()}")
        try:
            urllib.request.urlopen(f"{url}/api/system", timeout=2).read()
            return proc, url
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("tessera bench load: the server did not answer within 120 s")


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="tessera bench load", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--prompts", type=int, default=10, help="prompts per client")
    parser.add_argument("--url", help="an already running server (default: start one in a temporary folder)")
    parser.add_argument(
        "--probe-nodes", type=int, default=10_000, help="graph size for the validation probe (0: skip)"
    )
    parser.add_argument(
        "--timeout", type=float, default=600.0, help="seconds to wait for every prompt to finish"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tessera-load-") as tmp:
        proc = None
        output_dir = None
        url = args.url
        if url is None:
            proc, url = start_server(Path(tmp))
            output_dir = Path(tmp) / "out"
        try:
            record = asyncio.run(
                run(url.rstrip("/"), args.clients, args.prompts, output_dir, args.probe_nodes, args.timeout)
            )
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(30)
    rows = [
        ("clients × prompts", f"{args.clients} × {args.prompts}"),
        ("completed", f"{record['completed']} of {record['prompts']}"),
        ("throughput", f"{record['throughput_prompts_per_s']:.1f} prompts/s"),
        ("latency p50 / p99", f"{record['latency_p50_ms']:.0f} / {record['latency_p99_ms']:.0f} ms"),
        ("lost", str(record["lost"])),
        ("crossed", str(record["crossed"])),
        (
            "stray events (total, max per client)",
            f"{record['stray_events_total']}, {record['stray_events_max_per_client']}",
        ),
    ]
    probe = record["validation_probe"]
    if probe:
        rows.append(
            (
                f"GET /api/queue while {args.probe_nodes:,} nodes validate",
                f"p50 {probe['p50_ms']:.1f} ms, p99 {probe['p99_ms']:.1f} ms, max {probe['max_ms']:.1f} ms "
                f"({probe['requests']} requests, validation {probe['validate_s']:.2f} s, {probe['status']})",
            )
        )
        rows.append(
            (
                "the same with nothing validating",
                f"p50 {probe['idle_p50_ms']:.1f} ms, p99 {probe['idle_p99_ms']:.1f} ms",
            )
        )
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    print(json.dumps(record))


if __name__ == "__main__":
    main()
