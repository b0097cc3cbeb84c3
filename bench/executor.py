"""Executor overhead on a 1,000-node graph of cheap nodes.

Reports validate+compile time, first-run time per node (and the runtime's overhead
over calling the same nodes' `execute` directly), and the fully cached re-run time.
Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from tessera.executor import Executor
from tessera.registry import default_registry


def build_workflow(n: int) -> dict:
    """A 1-pixel colour source, a layered mesh of blends and inverts, one output."""
    nodes = {"0": {"type": "SolidColor", "inputs": {"width": 1, "height": 1, "red": 0.2}}}
    for i in range(1, n - 1):
        if i % 3 == 0 and i >= 3:
            nodes[str(i)] = {
                "type": "ImageBlend",
                "inputs": {
                    "image_a": {"node": str(i - 1), "output": "image"},
                    "image_b": {"node": str(i - 3), "output": "image"},
                    "factor": 0.5,
                },
            }
        else:
            nodes[str(i)] = {
                "type": "ImageInvert",
                "inputs": {"image": {"node": str(i - 1), "output": "image"}},
            }
    nodes[str(n - 1)] = {
        "type": "PreviewImage",
        "inputs": {"images": {"node": str(n - 2), "output": "image"}},
    }
    return {"version": 1, "nodes": nodes}


def bare_calls(executor: Executor, plan) -> float:
    """The same node executions with no runtime around them (the floor)."""
    values = {}
    ctx = executor.context()
    start = time.perf_counter()
    with torch.inference_mode():
        for step in plan.steps:
            inputs = dict(step.constants)
            for name, (up, _) in step.links.items():
                inputs[name] = values[up][0]
            out = step.node_class().execute(ctx, **inputs)
            values[step.node_id] = out if isinstance(out, tuple) else (None,)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--quick", action="store_true", help="a smoke run for CI: 30 nodes, one repeat")
    args = parser.parse_args()
    if args.quick:
        args.nodes, args.repeats = 30, 1
    torch.set_num_threads(1)
    workflow = build_workflow(args.nodes)
    registry = default_registry()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "out").mkdir()  # writers confine files to an existing output folder
        compile_s, first_s, cached_s, bare_s = [], [], [], []
        for _ in range(args.repeats):
            executor = Executor(registry, tmp / "models", tmp / "in", tmp / "out", "cpu")
            start = time.perf_counter()
            plan = executor.compile(executor.validate(workflow))
            compile_s.append(time.perf_counter() - start)
            bare_s.append(bare_calls(executor, plan))
            start = time.perf_counter()
            first = executor.run(workflow)
            first_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            again = executor.run(workflow)
            cached_s.append(time.perf_counter() - start)
            assert first.status == again.status == "success" and len(again.executed) == 0
    best = {
        k: statistics.median(v[1:] or v)
        for k, v in {
            "validate_compile_s": compile_s,
            "first_run_s": first_s,
            "cached_rerun_s": cached_s,
            "bare_execute_s": bare_s,
        }.items()
    }
    n = args.nodes
    record = {
        "bench": "executor",
        "nodes": n,
        **{k: round(v, 5) for k, v in best.items()},
        "first_run_per_node_us": round(best["first_run_s"] / n * 1e6, 1),
        "overhead_per_node_us": round(
            (best["first_run_s"] - best["validate_compile_s"] - best["bare_execute_s"]) / n * 1e6, 1
        ),
        "cached_rerun_per_node_us": round(best["cached_rerun_s"] / n * 1e6, 1),
        "device": "cpu",
    }
    print(
        f"executor benchmark, {n} nodes, median of {max(1, args.repeats - 1)} after a warm-up (CPU, 1 thread)"
    )
    print(f"{'measure':34} {'value':>12}")
    print(f"{'validate + compile':34} {best['validate_compile_s'] * 1e3:10.1f} ms")
    print(f"{'first run (incl. validate+compile)':34} {best['first_run_s'] * 1e3:10.1f} ms")
    print(f"{'  bare execute() of the same nodes':34} {best['bare_execute_s'] * 1e3:10.1f} ms")
    print(f"{'  per node, total':34} {record['first_run_per_node_us']:10.1f} us")
    print(f"{'  per node, runtime overhead':34} {record['overhead_per_node_us']:10.1f} us")
    print(f"{'fully cached re-run':34} {best['cached_rerun_s'] * 1e3:10.1f} ms")
    print(json.dumps(record))


if __name__ == "__main__":
    main()
