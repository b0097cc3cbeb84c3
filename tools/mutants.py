"""Mutation testing: one-line breaks of the core, each run against the tests that cover it.

Why: line coverage says a line ran, not that any test would notice it breaking. Each mutant
below is a plausible one-line regression (a swapped SwiGLU branch, a cache key without the
link's output name, an executor that never frees, …). The script exports the committed tree
(`git archive`, default HEAD; `--ref worktree` copies the working tree's files instead) into
a temporary folder, never mutating the checkout itself, makes the copy importable as
`tessera` ahead of any editable install, checks that each test
selection passes unmutated, then applies one mutant at a time, runs its tests with one thread
and restores the file. A mutant is caught when its tests fail (or hang past the timeout).

    python tools/mutants.py [--only NAME[,NAME…]] [--ref REV] [--list] [--json-out FILE]

Prints a table and one JSON line; exits 1 if any mutant survives or a baseline fails.
Slow (minutes): kept out of the default test run; run it before changing the core.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    name: str
    area: str
    path: str
    find: str  # must occur exactly once in the file
    replace: str
    tests: tuple[str, ...]  # pytest arguments


REF = ("tests/test_llamagen_reference.py",)
EXECUTOR = ("tests/test_executor.py",)
LORA = ("tests/test_lora.py",)
WORKFLOW = ("tests/test_workflow.py",)
SAMPLERS = ("tests/test_samplers.py",)
SECURITY = (
    "tests/test_confined_paths.py",
    "tests/test_api_security.py",
    "-k",
    "traversal or upload_names or confined",
)

MUTANTS: tuple[Mutant, ...] = (
    # the six breaks issue 21 found surviving
    Mutant(
        "gpt-swiglu-swapped",
        "GPT",
        "engines/gpt.py",
        "return self.w2(F.silu(self.w1(x)) * self.w3(x))",
        "return self.w2(F.silu(self.w3(x)) * self.w1(x))",
        REF,
    ),
    Mutant(
        "resume-skips-weights",
        "training",
        "lab/training.py",
        "        m.load_state_dict({n.removeprefix(prefix): t for n, t in tensors.items() if n.startswith(prefix)})",
        "        pass",
        ("tests/test_training_recipes.py", "-k", "resume"),
    ),
    Mutant(
        "cache-key-drops-output-name",
        "cache key",
        "tessera/plan.py",
        "sorted((name, keys[up], out) for name, (up, out) in links.items())",
        "sorted((name, keys[up]) for name, (up, out) in links.items())",
        EXECUTOR,
    ),
    Mutant(
        "loadimage-no-fingerprint",
        "cache key",
        "nodes/image.py",
        "return hashlib.sha256(path.read_bytes()).hexdigest()",
        "return None",
        EXECUTOR,
    ),
    Mutant(
        "executor-never-frees",
        "executor",
        "tessera/executor.py",
        "values.pop(up, None)",
        "pass",
        EXECUTOR,
    ),
    Mutant(
        "vaedecode-ignores-tile-size",
        "VAE",
        "engines/generation.py",  # VAEDecode's one decoding path
        "pixels = vae.decode_tiled(latent, tile, max(1, tile // 4)) if tile > 0 else vae.decode(latent)",
        "pixels = vae.decode(latent)",
        ("tests/test_diffusion_nodes.py", "-k", "tiled"),
    ),
    # GPT
    Mutant(
        "gpt-rope-rows-and-columns-swapped",
        "GPT",
        "engines/gpt.py",
        "ang = torch.cat([rows[:, None, :].expand(-1, grid_w, -1), cols[None, :, :].expand(grid_h, -1, -1)], -1)",
        "ang = torch.cat([cols[None, :, :].expand(grid_h, -1, -1), rows[:, None, :].expand(-1, grid_w, -1)], -1)",
        REF,
    ),
    Mutant(
        "gpt-condition-tokens-rotate-by-identity",
        "GPT",
        "engines/gpt.py",
        "return torch.cat([torch.zeros(prefix, head_dim // 2, 2), table])",
        "return torch.cat([torch.stack([torch.ones(prefix, head_dim // 2), torch.zeros(prefix, head_dim // 2)], -1), table])",
        REF,
    ),
    Mutant(
        "gpt-caption-padding-not-masked",
        "GPT",
        "engines/gpt.py",
        "keys[:, : self.prefix_len] = key_valid.to(p.device)",
        "keys[:, : self.prefix_len] = True",
        REF,
    ),
    Mutant(
        "gpt-mask-loses-its-diagonal",
        "GPT",
        "engines/gpt.py",
        "mask = ((causal[None] & keys[:, None, :]) | eye[None]).unsqueeze(1)",
        "mask = (causal[None] & keys[:, None, :]).unsqueeze(1)",
        REF,
    ),
    Mutant(
        "gpt-k-and-v-swapped",
        "GPT",
        "engines/gpt.py",
        "q, k, v = self.wqkv(x).split([self.n_head * self.head_dim, kv, kv], dim=-1)",
        "q, v, k = self.wqkv(x).split([self.n_head * self.head_dim, kv, kv], dim=-1)",
        REF,
    ),
    Mutant(
        "gpt-rmsnorm-sums",
        "GPT",
        "engines/gpt.py",
        "xf.pow(2).mean(-1, keepdim=True)",
        "xf.pow(2).sum(-1, keepdim=True)",
        REF,
    ),
    # VQ
    Mutant(
        "vq-decoder-skips-middle-blocks",
        "VQ",
        "engines/vq.py",
        "h = self.conv_in(z)\n        for block in self.mid:",
        "h = self.conv_in(z)\n        for block in self.mid[:0]:",
        REF,
    ),
    Mutant(
        "vq-codebook-not-normalised",
        "VQ",
        "engines/vq.py",
        "return F.normalize(w, dim=-1) if self.l2_norm else w",
        "return w",
        REF,
    ),
    Mutant(
        "vq-downsample-pads-the-wrong-side",
        "VQ",
        "engines/conv_blocks.py",  # shared by the VQ and the VAE
        "return self.conv(F.pad(x, (0, 1, 0, 1)))",
        "return self.conv(F.pad(x, (1, 0, 1, 0)))",
        REF,
    ),
    # cache key and executor
    Mutant(
        "cache-key-drops-constants",
        "cache key",
        "tessera/plan.py",
        "cls.version,\n            constants,",
        "cls.version,\n            {},",
        EXECUTOR,
    ),
    Mutant(
        "cache-key-drops-fingerprints",
        "cache key",
        "tessera/plan.py",
        "extra = fingerprint(cls, node_id, constants) if fingerprint else None",
        "extra = None",
        EXECUTOR,
    ),
    Mutant(
        "cache-key-uses-node-ids-not-upstream-keys",
        "cache key",
        "tessera/plan.py",
        "sorted((name, keys[up], out) for name, (up, out) in links.items())",
        "sorted((name, up, out) for name, (up, out) in links.items())",
        EXECUTOR,
    ),
    Mutant(
        "executor-ignores-the-cache",
        "executor",
        "tessera/executor.py",
        "entry = self.cache.get(step.cache_key)",
        "entry = None",
        EXECUTOR,
    ),
    Mutant(
        "executor-no-interrupt-check-between-nodes",
        "executor",
        "tessera/executor.py",
        "                ctx.check_interrupted()\n                entry = self.cache.get",
        "                entry = self.cache.get",
        EXECUTOR,
    ),
    Mutant(
        "executor-error-loses-its-input",
        "executor",
        "tessera/executor.py",
        '"input": getattr(e, "input", None) if isinstance(e, NodeError) else None,',
        '"input": None,',
        EXECUTOR,
    ),
    # queue
    Mutant(
        "queue-forgets-running-prompts-on-restart",
        "queue",
        "tessera/queue.py",
        "UPDATE prompts SET status='pending', started=NULL WHERE status='running'",
        "UPDATE prompts SET status='pending', started=NULL WHERE status='never'",
        ("tests/test_queue_restart.py",),
    ),
    Mutant(
        "queue-runs-newest-first",
        "queue",
        "tessera/queue.py",
        "WHERE status='pending' ORDER BY number LIMIT 1",
        "WHERE status='pending' ORDER BY number DESC LIMIT 1",
        ("tests/test_api.py", "-k", "queue_order"),
    ),
    # path confinement
    Mutant(
        "paths-resolved-escape-allowed",
        "paths",
        "tessera/paths.py",
        "if path != root and root not in path.parents:",
        "if False:",
        SECURITY,
    ),
    Mutant(
        "paths-dotdot-allowed",
        "paths",
        "tessera/paths.py",
        'if any(p in ("", ".", "..") for p in parts):',
        'if any(p in ("", ".") for p in parts):',
        SECURITY,
    ),
    # samplers
    Mutant(
        "euler-step-halved",
        "samplers",
        "engines/samplers.py",
        "x = x + (sig[j + 1] - sig[j]) * v",
        "x = x + 0.5 * (sig[j + 1] - sig[j]) * v",
        SAMPLERS,
    ),
    Mutant(
        "heun-uses-one-slope",
        "samplers",
        "engines/samplers.py",
        "x = x + (s_next - s) * 0.5 * (v + v_next)",
        "x = x + (s_next - s) * 0.5 * (v + v)",
        SAMPLERS,
    ),
    Mutant(
        "dpmpp-2m-first-order",
        "samplers",
        "engines/samplers.py",
        "d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised.to(denoised)",
        "d = denoised",
        SAMPLERS,
    ),
    # LoRA merge and restore
    Mutant(
        "lora-alpha-not-divided-by-rank",
        "LoRA",
        "engines/lora.py",
        "alpha / rank, down=down",
        "alpha, down=down",
        LORA,
    ),
    Mutant(
        "lora-merges-into-the-base-tensor",
        "LoRA",
        "engines/lora.py",
        "out = base.float().clone()",
        "out = base.float()",
        LORA,
    ),
    Mutant(
        "lora-copy-shares-the-parameter-table",
        "LoRA",
        "engines/lora.py",
        "c._parameters = dict(m._parameters)",
        "c._parameters = m._parameters",
        LORA,
    ),
    Mutant(
        "lora-strength-ignored",
        "LoRA",
        "engines/lora.py",
        "strength * u.scale,",
        "u.scale,",
        LORA,
    ),
    # workflow validation
    Mutant(
        "workflow-type-mismatch-accepted",
        "workflow",
        "tessera/workflow.py",
        "if output_type != spec.type and",
        "if False and output_type != spec.type and",
        WORKFLOW,
    ),
    Mutant(
        "workflow-cycles-accepted",
        "workflow",
        "tessera/workflow.py",
        "issues.extend(_cycle_issues(nodes))",
        "pass",
        WORKFLOW,
    ),
    Mutant(
        "workflow-missing-input-accepted",
        "workflow",
        "tessera/workflow.py",
        '            if spec.required:\n                issues.append(WorkflowIssue(node_id, spec.name, "missing required input"))',
        '            if False:\n                issues.append(WorkflowIssue(node_id, spec.name, "missing required input"))',
        WORKFLOW,
    ),
)


def export(ref: str, dest: Path) -> None:
    """The tree at `ref` (or the working tree's tracked and unignored files for "worktree"),
    made importable as `tessera` with its mapped sub-packages linked in."""
    if ref == "worktree":
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        ).stdout.decode()
        for name in filter(None, listed.split("\0")):
            source = ROOT / name
            if source.is_file() and not source.is_symlink():
                (dest / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, dest / name)
    else:
        archive = subprocess.run(["git", "archive", ref], cwd=ROOT, capture_output=True, check=True).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(dest, filter="data")
    mapping = tomllib.loads((dest / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    for package, folder in mapping.items():
        if package.startswith("tessera.") and not (dest / "tessera" / package.split(".", 1)[1]).exists():
            (dest / "tessera" / package.split(".", 1)[1]).symlink_to(dest / folder, target_is_directory=True)


def pytest(copy: Path, args: tuple[str, ...], timeout: float) -> tuple[str, float, str]:
    """('pass' | 'fail' | 'timeout' | 'error', seconds, output tail) for `pytest args` in the copy."""
    env = {
        **os.environ,
        "PYTHONPATH": str(copy),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-p", "no:randomly", *args]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", time.perf_counter() - start, ""
    tail = (proc.stdout + proc.stderr)[-3000:]
    # 0 passed, 1 tests failed, 2 interrupted (e.g. an import error the mutant caused); 5 means
    # nothing was collected, which is a broken selection rather than a caught mutant
    outcome = {0: "pass", 1: "fail", 2: "fail"}.get(proc.returncode, "error")
    return outcome, time.perf_counter() - start, tail


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", default="", help="comma-separated mutant names")
    parser.add_argument(
        "--ref",
        default="HEAD",
        help="the git revision to mutate (default HEAD), or 'worktree' for a copy of the working tree",
    )
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per test run")
    parser.add_argument("--list", action="store_true", help="print the mutants and exit")
    parser.add_argument("--json-out", type=Path, help="also write the JSON record here")
    args = parser.parse_args(argv)

    chosen = [m for m in MUTANTS if not args.only or m.name in args.only.split(",")]
    unknown = set(filter(None, args.only.split(","))) - {m.name for m in MUTANTS}
    if unknown:
        parser.error(f"unknown mutant(s): {', '.join(sorted(unknown))}")
    if args.list:
        for m in chosen:
            print(f"{m.name:45} {m.area:10} {m.path:22} {' '.join(m.tests)}")
        return 0

    with tempfile.TemporaryDirectory(prefix="tessera-mutants-") as tmp:
        copy = Path(tmp)
        export(args.ref, copy)
        problems = []
        for m in chosen:
            count = (copy / m.path).read_text().count(m.find)
            if count != 1:
                problems.append(
                    f"{m.name}: the line to mutate occurs {count} times in {m.path} at {args.ref}"
                )
        if problems:
            print("\n".join(problems), file=sys.stderr)
            return 2

        baseline: dict[tuple[str, ...], str] = {}
        for tests in dict.fromkeys(m.tests for m in chosen):
            outcome, seconds, tail = pytest(copy, tests, args.timeout)
            baseline[tests] = outcome
            print(f"baseline {' '.join(tests)}: {outcome} ({seconds:.0f} s)", flush=True)
            if outcome != "pass":
                print(tail, file=sys.stderr)

        rows = []
        for m in chosen:
            if baseline[m.tests] != "pass":
                rows.append({"mutant": m.name, "area": m.area, "result": "baseline-failed", "seconds": 0.0})
                continue
            target = copy / m.path
            original = target.read_text()
            target.write_text(original.replace(m.find, m.replace))
            try:
                outcome, seconds, tail = pytest(copy, m.tests, args.timeout)
            finally:
                target.write_text(original)
            result = {"fail": "caught", "timeout": "caught (timeout)", "pass": "SURVIVED", "error": "error"}[
                outcome
            ]
            rows.append({"mutant": m.name, "area": m.area, "result": result, "seconds": round(seconds, 1)})
            print(f"{m.name:45} {result:16} {seconds:6.1f} s   {' '.join(m.tests)}", flush=True)
            if outcome == "error":
                print(tail, file=sys.stderr)

    print()
    print(f"{'mutant':45} {'area':10} {'result':16}")
    for r in rows:
        print(f"{r['mutant']:45} {r['area']:10} {r['result']:16}")
    survivors = [r["mutant"] for r in rows if r["result"] == "SURVIVED"]
    broken = [r["mutant"] for r in rows if r["result"] in ("error", "baseline-failed")]
    record = {
        "tool": "mutants",
        "ref": args.ref,
        "mutants": len(rows),
        "caught": sum(r["result"].startswith("caught") for r in rows),
        "survived": survivors,
        "not_run": broken,
        "results": rows,
    }
    print(json.dumps(record))
    if args.json_out:
        args.json_out.write_text(json.dumps(record, indent=1))
    return 1 if survivors or broken else 0


if __name__ == "__main__":
    raise SystemExit(main())
