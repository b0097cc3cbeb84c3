"""Scale-out on Ray: throughput with 1 and 2 workers, dispatch overhead, recovery from a killed worker.

Every prompt is a graph of the test pack's `Sleep` node (tests/tessera_harness.py), so a
prompt costs the same wall time wherever it runs and the ratio of the 2- and 1-worker
throughputs shows the scaling (it should approach 2). The dispatch overhead is the extra time
per one-step prompt against the in-process executor; the recovery time runs from a
`kill -9` of the worker holding a prompt to that prompt starting on the other worker.

Ray's daemons bind more than loopback, so the benchmark re-runs itself inside a fresh
network namespace with only `lo` up (`unshare -n`, root). Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

from tessera.paths import SOURCE_ROOT


def in_private_network() -> bool:
    return [name for _, name in socket.if_nameindex()] == ["lo"]


def reexec_in_private_network() -> None:
    if os.geteuid() != 0:
        raise SystemExit(
            "tessera bench cluster: Ray runs only in a private network namespace (unshare -n): run as root"
        )
    command = shlex.join([sys.executable, str(Path(__file__).resolve()), *sys.argv[1:]])
    sys.stdout.flush()
    os.execvp("unshare", ["unshare", "-n", "sh", "-c", f"ip link set lo up && exec {command}"])


def sleep_graph(label: str, steps: int, step_seconds: float, gate: str = "") -> dict:
    inputs = {"steps": steps, "step_seconds": step_seconds, "label": label, "gate": gate}
    return {"version": 1, "nodes": {"1": {"type": "Sleep", "inputs": inputs}}}


def wait_for(condition, what: str, timeout: float = 300.0):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise SystemExit(f"tessera bench cluster: timed out waiting for {what}")
        time.sleep(0.005)
    return value


class Bench:
    """One temporary installation: the Sleep pack, folders, a queue database."""

    def __init__(self, root: Path):
        sys.path.insert(0, str(SOURCE_ROOT / "tests"))
        from tessera_harness import TESTING_PACK

        from tessera.registry import default_registry

        self.root = root
        self.packs = root / "custom_nodes"
        for folder in (self.packs, root / "models", root / "in", root / "out"):
            folder.mkdir(parents=True, exist_ok=True)
        (self.packs / "testing_pack.py").write_text(TESTING_PACK)
        self.registry = default_registry(self.packs)
        self.token = "bench-" + os.urandom(8).hex()

    def in_process(self, workflows: list[dict]) -> float:
        """Seconds to run the prompts one after another with the executor in this process."""
        from tessera.executor import Executor

        executor = Executor(self.registry, self.root / "models", self.root / "in", self.root / "out", "cpu")
        start = time.perf_counter()
        for i, workflow in enumerate(workflows):
            assert executor.run(workflow, f"local{i}").status == "success"
        return time.perf_counter() - start

    def cluster(self, workers: int, name: str):
        from tessera.cluster import ClusterConfig, ClusterDispatcher, WorkerSettings
        from tessera.queue import PromptStore

        store = PromptStore(self.root / name / "queue.sqlite")
        events: list[tuple[float, str, dict]] = []
        settings = WorkerSettings(
            str(self.root / "models"),
            str(self.root / "in"),
            str(self.root / name / "workers"),
            custom_nodes_dir=str(self.packs),
        )
        config = ClusterConfig("ray", worker_cpus=workers, token=self.token, settings=settings)
        dispatcher = ClusterDispatcher(
            store,
            lambda kind, data: events.append((time.perf_counter(), kind, data)),
            config,
            self.root / "out",
            self.root / name,
            self.registry,
            self.root / "models",
        )
        dispatcher.start()
        wait_for(lambda: len(dispatcher.workers) == workers and dispatcher.describe()["attached"], "workers")
        return store, dispatcher, events

    @staticmethod
    def run_all(store, dispatcher, workflows: list[dict]) -> float:
        """Seconds from queueing the prompts to the last one stored as finished."""
        start = time.perf_counter()
        ids = [store.add(w)["prompt_id"] for w in workflows]
        dispatcher.notify()
        wait_for(lambda: store.remaining() == 0, "the prompts to finish")
        elapsed = time.perf_counter() - start
        assert all(store.get(i)["status"] == "success" for i in ids), [store.get(i)["errors"] for i in ids]
        return elapsed

    @staticmethod
    def one_by_one(store, dispatcher, workflows: list[dict]) -> float:
        start = time.perf_counter()
        for w in workflows:
            prompt_id = store.add(w)["prompt_id"]
            dispatcher.notify()
            wait_for(lambda: store.get(prompt_id)["status"] == "success", "a prompt")  # noqa: B023
        return time.perf_counter() - start

    def recovery(self, store, dispatcher, events) -> float:
        """Seconds from kill -9 of the worker running a prompt to that prompt starting elsewhere."""
        gate = self.root / "recovery.gate"
        prompt_id = store.add(sleep_graph("recover", 2, 0.0, str(gate)))["prompt_id"]
        dispatcher.notify()
        victim = wait_for(lambda: dispatcher.assignments().get(prompt_id), "the prompt to start")["worker"]
        wait_for(
            lambda: any(k == "progress" and d.get("prompt_id") == prompt_id for _, k, d in events), "progress"
        )
        pid = dispatcher.workers[victim].info["pid"]
        killed = time.perf_counter()
        os.kill(pid, signal.SIGKILL)

        def restarted():
            return next(
                (
                    t
                    for t, k, d in events
                    if t > killed and k == "execution_start" and d.get("prompt_id") == prompt_id
                ),
                None,
            )

        started = wait_for(restarted, "the prompt to start on the other worker")
        gate.touch()
        wait_for(lambda: store.get(prompt_id)["status"] == "success", "the recovered prompt")
        return started - killed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prompts", type=int, default=16, help="Sleep prompts per throughput run")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--step-seconds", type=float, default=0.05)
    parser.add_argument("--trivial", type=int, default=30, help="one-step prompts for the dispatch overhead")
    parser.add_argument("--quick", action="store_true", help="a smoke run for CI: 4 prompts of 4 steps")
    args = parser.parse_args()
    if args.quick:
        args.prompts, args.steps, args.trivial = 4, 4, 5
    if not in_private_network():
        reexec_in_private_network()
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        bench = Bench(Path(tmp))
        work = [sleep_graph(f"w{i}", args.steps, args.step_seconds) for i in range(args.prompts)]
        trivial = [sleep_graph(f"t{i}", 1, 0.0) for i in range(args.trivial)]
        local_s = bench.in_process(work)
        local_trivial_s = bench.in_process([sleep_graph(f"l{i}", 1, 0.0) for i in range(args.trivial)])
        seconds, overhead_ms, recovery_s = {}, None, None
        for n in (1, 2):
            store, dispatcher, events = bench.cluster(n, f"cluster{n}")
            try:
                if n == 1:
                    trivial_s = Bench.one_by_one(store, dispatcher, trivial)
                    overhead_ms = (trivial_s - local_trivial_s) / args.trivial * 1e3
                seconds[n] = Bench.run_all(
                    store,
                    dispatcher,
                    [sleep_graph(f"c{n}-{i}", args.steps, args.step_seconds) for i in range(args.prompts)],
                )
                if n == 2:
                    recovery_s = bench.recovery(store, dispatcher, events)
            finally:
                dispatcher.stop()
                store.close()
                threading.Event().wait(0.1)
    rate = {n: args.prompts / s for n, s in seconds.items()}
    record = {
        "bench": "cluster",
        "prompts": args.prompts,
        "prompt_seconds": round(args.steps * args.step_seconds, 4),
        "in_process_per_s": round(args.prompts / local_s, 3),
        "workers_1_per_s": round(rate[1], 3),
        "workers_2_per_s": round(rate[2], 3),
        "scaling_2_over_1": round(rate[2] / rate[1], 3),
        "dispatch_overhead_ms": round(overhead_ms, 2),
        "recovery_s": round(recovery_s, 3),
        "device": "cpu",
    }
    print(
        f"cluster benchmark: {args.prompts} Sleep prompts of {record['prompt_seconds']} s, CPU workers of 1 thread"
    )
    print(f"{'measure':38} {'value':>12}")
    print(f"{'in-process executor':38} {record['in_process_per_s']:9.3f} /s")
    print(f"{'1 worker':38} {record['workers_1_per_s']:9.3f} /s")
    print(f"{'2 workers':38} {record['workers_2_per_s']:9.3f} /s")
    print(f"{'  scaling (2 over 1)':38} {record['scaling_2_over_1']:9.3f} x")
    print(f"{'dispatch overhead per prompt':38} {record['dispatch_overhead_ms']:9.2f} ms")
    print(f"{'recovery from a killed worker':38} {record['recovery_s']:9.3f} s")
    print(json.dumps(record))


if __name__ == "__main__":
    main()
