"""The `tessera` command: serve, run, validate, nodes, train, bench."""

from __future__ import annotations

import argparse
import json
import os
import runpy
import secrets
import sys
from pathlib import Path

from tessera.paths import SOURCE_ROOT, default_models_dir


def _dirs(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--models-dir",
        type=Path,
        default=default_models_dir(),
        help="models folder (default: the shipped models/)",
    )
    parser.add_argument("--output-dir", type=Path, default=Path("output"))
    parser.add_argument("--input-dir", type=Path, default=Path("input"))
    parser.add_argument(
        "--device", default="auto", help="auto (CUDA if present, else CPU), cpu, cuda, cuda:N"
    )
    parser.add_argument(
        "--compile",
        choices=("off", "default", "max"),
        default=None,
        help="torch.compile the DiT blocks and the AR decode step (default: off on CPU, default on CUDA)",
    )


def _cluster_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--worker-cpus", type=int, default=0, help="CPU workers on this machine (one thread each)"
    )
    parser.add_argument(
        "--cluster-token",
        default=os.environ.get("TESSERA_CLUSTER_TOKEN"),
        help="the Ray cluster's token (default: $TESSERA_CLUSTER_TOKEN); required beyond loopback",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tessera", description="Node-based image generation: diffusion and autoregressive."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="start the editor and HTTP API")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8188)
    serve.add_argument("--listen", metavar="HOST", help="listen on a non-loopback address (requires a token)")
    serve.add_argument(
        "--token", help="access token (generated and printed when --listen is used without one)"
    )
    serve.add_argument(
        "--user-dir", type=Path, default=Path("user"), help="queue database and saved workflows"
    )
    serve.add_argument("--custom-nodes-dir", type=Path, default=Path("custom_nodes"))
    serve.add_argument(
        "--frontend",
        choices=("tessera", "comfyui"),
        default="tessera",
        help="the editor at /: ours, or ComfyUI's own (under /comfyui/; pip install 'tessera[comfyui]')",
    )
    serve.add_argument("--cache-ram-gb", type=float, default=8.0, help="byte budget of cached outputs in RAM")
    serve.add_argument(
        "--cache-vram-gb", type=float, default=16.0, help="byte budget of cached outputs on the GPU"
    )
    serve.add_argument(
        "--vram-budget",
        metavar="SIZE",
        help="model weights kept on the GPU, e.g. 12GiB (default: free "
        "memory minus 2 GiB); least recently used models go to pinned RAM, larger ones stream their blocks",
    )
    limits = serve.add_argument_group(
        "budgets (a request over one is refused with a 4xx before any work starts)"
    )
    limits.add_argument(
        "--max-body-mb", type=float, default=4.0, help="largest JSON request body (413 beyond)"
    )
    limits.add_argument("--max-nodes", type=int, default=10_000, help="nodes per workflow")
    limits.add_argument(
        "--max-image-pixels", type=int, default=8192 * 8192, help="pixels per image (made or loaded)"
    )
    limits.add_argument("--max-batch-pixels", type=int, default=1 << 28, help="pixels per batch of images")
    limits.add_argument(
        "--output-quota-gb", type=float, default=50.0, help="size of the output folder (0: no quota)"
    )
    limits.add_argument(
        "--max-embedded-workflow-kb",
        type=float,
        default=256.0,
        help="largest workflow copied into each PNG; larger ones are referenced by prompt id",
    )
    _dirs(serve)
    _cluster_flags(serve)
    serve.add_argument(
        "--workers",
        metavar="ray|ray://HOST:PORT",
        help="run prompts on Ray workers: 'ray' starts a local head, HOST:PORT or ray://HOST:PORT joins "
        "a cluster (pip install 'tessera[cluster]'); the queue and history stay here",
    )
    serve.add_argument(
        "--worker-outputs",
        choices=("stream", "shared"),
        default="stream",
        help="workers send their output files back (stream), or write them into --output-dir, "
        "a folder they share at the same path (shared)",
    )

    worker = sub.add_parser("worker", help="add this machine's workers to a Tessera cluster (Ray)")
    worker.add_argument("--address", required=True, help="the Ray head, HOST:PORT or ray://HOST:PORT")
    worker.add_argument(
        "--work-dir", type=Path, help="where streamed outputs are staged (default: a temporary folder)"
    )
    worker.add_argument("--custom-nodes-dir", type=Path, default=Path("custom_nodes"))
    worker.add_argument(
        "--cache-ram-gb", type=float, default=8.0, help="byte budget of cached outputs in RAM"
    )
    worker.add_argument(
        "--vram-budget", metavar="SIZE", help="model weights kept on each GPU, e.g. 12GiB (as for serve)"
    )
    worker.add_argument("--gpus", type=int, help="GPU workers (default: one per GPU)")
    worker.add_argument("--models-dir", type=Path, default=default_models_dir())
    worker.add_argument("--input-dir", type=Path, default=Path("input"))
    _cluster_flags(worker)

    run = sub.add_parser("run", help="run a workflow (.json, or a .png made by Tessera) headless")
    run.add_argument("workflow", type=Path)
    run.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NODE.INPUT=VALUE",
        help="override an input (JSON value or text)",
    )
    run.add_argument("--out", type=Path, help="output folder (default: output/)")
    run.add_argument("--quiet", action="store_true")
    run.add_argument(
        "--vram-budget", metavar="SIZE", help="model weights kept on the GPU, e.g. 12GiB (as for serve)"
    )
    _dirs(run)

    validate = sub.add_parser("validate", help="check a workflow without running it")
    validate.add_argument("workflow", type=Path)
    validate.add_argument("--models-dir", type=Path, default=default_models_dir())

    nodes = sub.add_parser("nodes", help="list the registered node types")
    nodes.add_argument("--json", action="store_true", help="print the full catalogue as JSON")

    train = sub.add_parser(
        "train", help="train a built-in model (see `tessera train --help`)", add_help=False
    )
    train.add_argument("args", nargs=argparse.REMAINDER)
    bench = sub.add_parser(
        "bench",
        help="run a benchmark from bench/ (executor, diffusion, autoregressive, paradigms)",
        add_help=False,
    )
    bench.add_argument("args", nargs=argparse.REMAINDER)

    convert = sub.add_parser(
        "convert", help="convert a PyTorch pickle (.pt/.pth/.bin/.ckpt) to .safetensors, explicitly"
    )
    convert.add_argument("input", type=Path, help="a PyTorch pickle: .pt, .pth, .bin or .ckpt")
    convert.add_argument("output", type=Path, help="the .safetensors file to write")
    convert.add_argument(
        "--config", default="{}", help="JSON settings the tensors cannot tell, e.g. '{\"n_head\": 20}'"
    )
    convert.add_argument("--force", action="store_true", help="replace an existing output file")

    comfy = sub.add_parser(
        "import", help="convert a ComfyUI workflow (API or UI JSON, or a ComfyUI PNG) to a Tessera workflow"
    )
    comfy.add_argument(
        "input", type=Path, help="a ComfyUI workflow .json (API or UI format) or a PNG saved by ComfyUI"
    )
    comfy.add_argument("output", type=Path, help="the Tessera workflow .json to write")
    comfy.add_argument(
        "--models-dir",
        type=Path,
        default=default_models_dir(),
        help="tells CLIP from T5 files by their headers",
    )

    models = sub.add_parser(
        "models", help="list the real models Tessera runs, or pull one from the Hugging Face Hub"
    )
    models_sub = models.add_subparsers(dest="action", required=True)
    models_sub.add_parser("list", help="the catalogue, with what is installed").add_argument(
        "--models-dir", type=Path, default=default_models_dir()
    )
    pull = models_sub.add_parser(
        "pull", help="download (resumably, checksum-verified) the files of one model"
    )
    pull.add_argument("name", help="a name from `tessera models list`")
    pull.add_argument("--models-dir", type=Path, default=default_models_dir())
    return parser


def load_workflow(path: Path, models_dir: Path | None = None) -> dict:
    """A Tessera workflow from a .json or a PNG; ComfyUI workflows and PNGs are converted."""
    from tessera.comfy import convert as comfy
    from tessera.images import read_workflow_from_png

    if not path.is_file():
        raise SystemExit(f"tessera: {path}: no such file")
    document = comfy.read_png(path) if path.suffix.lower() == ".png" else None
    if path.suffix.lower() == ".png" and document is None:
        try:
            return read_workflow_from_png(path)
        except ValueError as e:
            raise SystemExit(f"tessera: {e}") from None
    if document is None:
        try:
            document = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SystemExit(f"tessera: {path}: not valid JSON ({e})") from None
    if not comfy.is_comfy_document(document):
        return document
    from tessera.workflow import InvalidWorkflow

    classify = comfy.file_classifier(models_dir or default_models_dir())
    try:
        return comfy.to_tessera(document, _registry(), classify)
    except InvalidWorkflow as e:
        raise SystemExit("\n".join(f"tessera: {path}: {i}" for i in e.issues)) from None


def cmd_import(args) -> int:
    workflow = load_workflow(args.input, args.models_dir)
    args.output.write_text(json.dumps(workflow, indent=1) + "\n")
    print(f"{args.output}: {len(workflow['nodes'])} nodes")
    return 0


def apply_overrides(workflow: dict, overrides: list[str]) -> dict:
    """Apply `NODE.INPUT=VALUE` settings; VALUE is parsed as JSON, else kept as text."""
    for item in overrides:
        target, sep, raw = item.partition("=")
        node_id, dot, name = target.partition(".")
        if not sep or not dot or not node_id or not name:
            raise SystemExit(f"tessera: --set {item!r}: expected NODE.INPUT=VALUE")
        node = workflow.get("nodes", {}).get(node_id)
        if node is None:
            raise SystemExit(f"tessera: --set {item!r}: the workflow has no node '{node_id}'")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node.setdefault("inputs", {})[name] = value
    return workflow


def _registry():
    from tessera.registry import default_registry

    registry = default_registry(Path("custom_nodes"))
    for name, problem in registry.failed_packs.items():
        print(f"tessera: node pack {name} failed to load and was skipped:\n{problem}", file=sys.stderr)
    return registry


def _set_compile(mode: str | None, device) -> None:
    from tessera.compile import set_compile_mode

    chosen = set_compile_mode(mode, device)
    if chosen != "off":
        print(
            f"tessera: compiling DiT blocks and the AR decode step ({chosen}); each new shape compiles on "
            "first use",
            file=sys.stderr,
        )


def cmd_run(args) -> int:
    from tessera.executor import Executor
    from tessera.model_manager import ModelManager, parse_bytes
    from tessera.progress import ProgressPrinter

    try:
        vram_budget = None if args.vram_budget is None else parse_bytes(args.vram_budget)
    except ValueError as e:
        raise SystemExit(f"tessera run: --vram-budget: {e}") from None
    workflow = apply_overrides(load_workflow(args.workflow, args.models_dir), args.set)
    out = args.out or args.output_dir
    executor = Executor(_registry(), args.models_dir, args.input_dir, out, args.device)
    if vram_budget is not None:
        executor.models = ModelManager(executor.device, vram_budget)
    _set_compile(args.compile, executor.device)
    printer = ProgressPrinter(sys.stderr, enabled=not args.quiet)
    result = executor.run(workflow, "cli", printer)
    printer.close()
    for ui in result.outputs.values():
        for image in ui.get("images", []):
            print(out / image["subfolder"] / image["filename"])
    if result.status != "success":
        for e in result.errors:
            where = (
                f"node {e['node']}"
                + (f" ({e['node_type']})" if e.get("node_type") else "")
                + (f", input '{e['input']}'" if e.get("input") else "")
            )
            print(f"tessera: {where}: {e['message']}", file=sys.stderr)
        if result.status == "interrupted":
            print("tessera: interrupted", file=sys.stderr)
        return 1
    return 0


def cmd_validate(args) -> int:
    from tessera.executor import Executor
    from tessera.workflow import InvalidWorkflow

    executor = Executor(_registry(), args.models_dir, Path("input"), Path("output"), "cpu")
    try:
        workflow = executor.validate(load_workflow(args.workflow, args.models_dir))
        plan = executor.compile(workflow)
    except InvalidWorkflow as e:
        for issue in e.issues:
            print(f"{args.workflow}: {issue}", file=sys.stderr)
        return 1
    print(f"{args.workflow}: valid ({len(workflow['nodes'])} nodes, {len(plan.steps)} to run)")
    return 0


def cmd_nodes(args) -> int:
    registry = _registry()
    if args.json:
        print(json.dumps({n: c.info() for n, c in sorted(registry.nodes.items())}, indent=1))
        return 0
    for name, cls in sorted(registry.nodes.items(), key=lambda kv: (kv[1].category, kv[0])):
        ins = ", ".join(f"{i.name}:{i.type}" for i in cls.inputs)
        outs = ", ".join(f"{o.name}:{o.type}" for o in cls.outputs)
        print(f"{cls.category:24} {name:22} ({ins}) -> ({outs})")
    return 0


def cmd_serve(args) -> int:
    from aiohttp import web

    from tessera.budgets import Budgets
    from tessera.model_manager import ModelManager, parse_bytes
    from tessera.registry import default_registry
    from tessera.security import is_loopback
    from tessera.server import ServerConfig, TesseraServer

    try:
        vram_budget = None if args.vram_budget is None else parse_bytes(args.vram_budget)
    except ValueError as e:
        raise SystemExit(f"tessera serve: --vram-budget: {e}") from None
    host = args.listen or args.host
    token = args.token
    if not is_loopback(host) and token is None:
        token = secrets.token_urlsafe(24)
    registry = default_registry(args.custom_nodes_dir)
    for name, problem in registry.failed_packs.items():
        print(f"tessera: node pack {name} failed to load and was skipped:\n{problem}", file=sys.stderr)
    config = ServerConfig(
        host=host,
        port=args.port,
        models_dir=args.models_dir,
        output_dir=args.output_dir,
        input_dir=args.input_dir,
        user_dir=args.user_dir,
        device=args.device,
        token=token,
        cache_ram_bytes=int(args.cache_ram_gb * 2**30),
        cache_vram_bytes=int(args.cache_vram_gb * 2**30),
        frontend=args.frontend,
        cluster=_cluster_config(args, vram_budget),
        budgets=Budgets(
            max_body_bytes=int(args.max_body_mb * 2**20),
            max_nodes=args.max_nodes,
            max_image_pixels=args.max_image_pixels,
            max_batch_pixels=args.max_batch_pixels,
            output_quota_bytes=int(args.output_quota_gb * 2**30) or None,
            embedded_workflow_bytes=int(args.max_embedded_workflow_kb * 1024),
        ),
    )
    server = TesseraServer(config, registry)
    _set_compile(args.compile, server.executor.device)
    if vram_budget is not None:
        server.executor.models = ModelManager(server.executor.device, vram_budget)
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else shown}:{args.port}/" + (
        f"?token={token}" if token else ""
    )
    print(f"Tessera {server.executor.device} — open {url}", flush=True)
    if config.cluster is not None:
        print(
            f"Tessera cluster at {server.worker.address}: add workers with `tessera worker --address "
            f"{server.worker.address} --cluster-token {config.cluster.token}`",
            flush=True,
        )
    web.run_app(server.make_app(), host=host, port=args.port, print=None, handle_signals=True)
    return 0


def _cluster_config(args, vram_budget: int | None):
    if args.workers is None:
        return None
    from tessera.cluster import ClusterConfig

    return ClusterConfig(
        args.workers,
        worker_cpus=args.worker_cpus,
        outputs=args.worker_outputs,
        token=args.cluster_token,
        custom_nodes_dir=str(args.custom_nodes_dir) if args.custom_nodes_dir.is_dir() else None,
        vram_budget=vram_budget,
    )


def cmd_worker(args) -> int:
    from tessera.cluster import ClusterError, WorkerSettings, default_work_dir, run_worker
    from tessera.model_manager import parse_bytes

    try:
        vram_budget = None if args.vram_budget is None else parse_bytes(args.vram_budget)
    except ValueError as e:
        raise SystemExit(f"tessera worker: --vram-budget: {e}") from None
    settings = WorkerSettings(
        str(args.models_dir.resolve()),
        str(args.input_dir.resolve()),
        str((args.work_dir or Path(default_work_dir())).resolve()),
        custom_nodes_dir=str(args.custom_nodes_dir.resolve()) if args.custom_nodes_dir.is_dir() else None,
        cache_ram_bytes=int(args.cache_ram_gb * 2**30),
        vram_budget=vram_budget,
    )
    try:
        return run_worker(args.address, args.cluster_token, settings, args.worker_cpus, args.gpus)
    except ClusterError as e:
        raise SystemExit(f"tessera worker: {e}") from None


def cmd_script(folder: str, args: list[str]) -> int:
    """Run bench/NAME.py or the trainer with the remaining arguments."""
    if folder == "train":
        from tessera.lab.cli import main as train_main

        return train_main(args) or 0
    if not args or args[0] in ("-h", "--help"):
        names = sorted(p.stem for p in (SOURCE_ROOT / "bench").glob("*.py"))
        print(f"usage: tessera bench NAME [ARGS…]   NAME is one of: {', '.join(names)}")
        return 0
    script = SOURCE_ROOT / "bench" / f"{args[0]}.py"
    if not script.is_file():
        raise SystemExit(f"tessera: no benchmark '{args[0]}' in {script.parent}")
    sys.argv = [str(script), *args[1:]]
    runpy.run_path(str(script), run_name="__main__")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return cmd_serve(args)
    if args.command == "run":
        return cmd_run(args)
    if args.command == "worker":
        return cmd_worker(args)
    if args.command == "validate":
        return cmd_validate(args)
    if args.command == "nodes":
        return cmd_nodes(args)
    if args.command == "import":
        return cmd_import(args)
    if args.command == "convert":
        from tessera.convert import main as convert_main

        return convert_main(args)
    if args.command == "models":
        from tessera.hub import main as models_main

        return models_main(args)
    return cmd_script(args.command, args.args)


if __name__ == "__main__":
    sys.exit(main())
