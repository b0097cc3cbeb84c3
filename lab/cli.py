"""`tessera train KIND …`: command-line dispatch to the training recipes in `tessera.lab.training`.

The whole recipe is one command with a wall-clock budget (see models/README.md):

    tessera train defaults --minutes 60                        # on a 2-core CPU, about an hour
    tessera train defaults --device cuda --minutes 6.8 --workers 5 \
        --text-encoder models/text_encoders/tessera-text-encoder.safetensors   # how the shipped files were made

It runs `text-encoder` (unless one is given), then `vae` ‖ `vq` ‖ `var-vq`, then `dit` ‖ `ar` ‖ `var`
(paced to the same number of steps on the same examples), then the four demo adapters (`lora`,
`controlnet` for each engine), each stage as parallel processes sharing a deadline. Every stage is also a command of its own:

    tessera train text-encoder                    # 700 x 64 captions, fp32 (bf16 autocast hurt it)
    tessera train vae & tessera train vq          # --steps/--batch, or --deadline to pace to a time
    tessera train dit & tessera train ar          # the same stream; --init-from continues a trained file
    tessera train var-vq && tessera train var     # the next-scale pair (lab/next_scale_training.py)
    tessera train vae --init-from models/vae/tessera-vae-f8.safetensors --decoder-only --seed 1
    tessera train eval                            # held-out prompt adherence of the shipped generators

Outputs default to the shipped `models/` layout; progress goes to stdout and to a JSON-lines log
under artifacts/train/, with a resumable state file beside it (`--resume-from` continues it).
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from pathlib import Path

from tessera.paths import default_models_dir

# kind: (file key, steps, batch, bf16 autocast)
KINDS = {
    "text-encoder": ("text_encoder", 700, 64, False),
    "vae": ("vae", 2000, 16, True),
    "vq": ("vq", 2000, 16, True),
    "dit": ("dit", 1000, 32, True),
    "ar": ("ar", 1000, 32, True),
    "var-vq": ("msvq", 2000, 16, True),  # the next-scale pair (lab.next_scale_training)
    "var": ("var", 1000, 32, True),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tessera train", description="Train the built-in default models.")
    sub = parser.add_subparsers(dest="kind", required=True)
    for kind, (_, steps, batch, autocast) in KINDS.items():
        p = sub.add_parser(kind, help=f"train the {kind} (defaults: {steps} steps of {batch})")
        p.add_argument("--steps", type=int, default=steps)
        p.add_argument("--batch", type=int, default=batch)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument(
            "--threads",
            type=int,
            default=1,
            help="torch CPU threads (default 1: two runs side by side beat one run on two threads)",
        )
        p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the recipe's)")
        p.add_argument("--warmup", type=int, default=None, help="warmup steps (default: the recipe's)")
        p.add_argument("--models-dir", type=Path, default=default_models_dir())
        p.add_argument(
            "--out", type=Path, default=None, help="output .safetensors (default: the shipped file)"
        )
        p.add_argument(
            "--resume-from", type=Path, default=None, help="a state file written by an earlier run"
        )
        p.add_argument("--state", type=Path, default=None, help="where to write the resumable state")
        p.add_argument(
            "--log", type=Path, default=None, help="JSON-lines log (default under artifacts/train/)"
        )
        _device_arguments(p)
        p.add_argument(
            "--workers",
            type=int,
            default=0,
            help="processes rendering batches ahead (default 0: in the loop)",
        )
        p.add_argument(
            "--pace-dir",
            type=Path,
            default=None,
            help="with --deadline: runs sharing this folder take the same number of steps (the slowest's pace)",
        )
        p.add_argument("--pace-peers", type=int, default=1, help="how many runs share --pace-dir")
        p.add_argument("--ckpt-every", type=int, default=200)
        p.add_argument("--log-every", type=int, default=10)
        _snapshot_arguments(p)
        p.add_argument(
            "--autocast",
            action=argparse.BooleanOptionalAction,
            default=None,
            help="bf16 autocast (default: "
            + ("on where bf16 is fast: a GPU, a CPU with AMX or AVX512-BF16)" if autocast else "off)"),
        )
        if kind in ("vae", "vq", "dit", "ar", "var-vq", "var"):
            p.add_argument(
                "--init-from", type=Path, default=None, help="start from a trained .safetensors file"
            )
        if kind in ("vae", "vq", "var-vq"):
            p.add_argument(
                "--decoder-only",
                action="store_true",
                help="freeze the encoder (latent space / token map unchanged) and train the decoder",
            )
        if kind in ("dit", "ar", "var"):
            p.add_argument("--text-encoder", type=Path, default=None, help="frozen text encoder file")
        if kind == "dit":
            p.add_argument("--vae", type=Path, default=None)
        if kind == "ar":
            p.add_argument("--vq", type=Path, default=None)
        if kind == "var-vq":
            p.add_argument(
                "--convs-from",
                type=Path,
                default=None,
                help="start the encoder/decoder from a trained raster VQ's convolutions (tessera train vq)",
            )
        if kind == "var":
            p.add_argument("--msvq", type=Path, default=None, help="the multi-scale VQ tokenizer (var-vq)")
    from tessera.lab import adapter_training as A

    for kind, (add_own, steps, batch, lr, what) in {
        "lora": (A.lora_arguments, A.TrainSettings().steps, A.TrainSettings().batch, A.TrainSettings().lr,
                 "the demo LoRA teaching 'giant' on the built-in DiT or GPT"),
        "controlnet": (A.controlnet_arguments, A.TrainSettings().steps, A.TrainSettings().batch, 3e-4,
                       "a demo edges -> scene ControlNet for the built-in DiT or GPT"),
    }.items():  # fmt: skip
        p = sub.add_parser(kind, help=f"train {what} (defaults: {steps} steps of {batch})")
        p.add_argument("--steps", type=int, default=steps)
        p.add_argument("--batch", type=int, default=batch)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
        p.add_argument("--lr", type=float, default=lr, help=f"peak learning rate (default {lr:g})")
        p.add_argument("--models-dir", type=Path, default=default_models_dir())
        p.add_argument(
            "--out", type=Path, default=None, help="output .safetensors (default: the shipped file)"
        )
        _device_arguments(p)
        p.add_argument("--autocast", action=argparse.BooleanOptionalAction, default=None,
                       help="bf16 autocast (default: on where bf16 is fast: a GPU, a CPU with AMX or AVX512-BF16)")  # fmt: skip
        p.add_argument("--state", type=Path, default=None, help="where to write the resumable state")
        p.add_argument(
            "--resume-from", type=Path, default=None, help="a state file written by an earlier run"
        )
        p.add_argument("--ckpt-every", type=int, default=200)
        p.add_argument("--log", type=Path, default=None, help="JSON-lines log (default: printed only)")
        p.add_argument("--log-every", type=int, default=A.TrainSettings().log_every)
        p.add_argument("--warmup", type=int, default=None, help="warmup steps (default: 5%% of the steps)")
        add_own(p)
    ev = sub.add_parser("eval", help="score the shipped generators on held-out captions (lab.scorers)")
    ev.add_argument("--models-dir", type=Path, default=default_models_dir())
    ev.add_argument("--n", type=int, default=48, help="held-out captions per scene kind")
    ev.add_argument("--which", default="dit,ar", help="generators to score: dit, ar, var (comma-separated)")
    ev.add_argument("--kinds", default="shape,relation,word,texture")
    ev.add_argument("--threads", type=int, default=2)
    ev.add_argument("--device", default="cpu", help="cpu or cuda")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--dit", default="{}", help='JSON sampler settings, e.g. \'{"steps": 20, "cfg": 4}\'')
    ev.add_argument("--ar", default="{}", help='JSON decoding settings, e.g. \'{"cfg": 3, "top_k": 0}\'')
    ev.add_argument("--var", default="{}", help='JSON next-scale settings, e.g. \'{"cfg": 3, "top_k": 0}\'')
    ev.add_argument("--json-out", type=Path, default=None)
    cv = sub.add_parser(
        "curves", help="learning curves: held-out scores of every snapshot (--snapshots), plotted"
    )
    cv.add_argument("--snapshot-dir", type=Path, default=Path("artifacts") / "train" / "snapshots")
    cv.add_argument("--n", type=int, default=32, help="held-out captions per scene kind")
    cv.add_argument("--kinds", default="shape,relation,word,texture")
    cv.add_argument("--threads", type=int, default=1)
    cv.add_argument("--device", default="cpu", help="cpu or cuda")
    cv.add_argument("--seed", type=int, default=0)
    cv.add_argument("--dit", default="{}", help="JSON sampler settings, as for eval")
    cv.add_argument("--ar", default="{}", help="JSON decoding settings, as for eval")
    cv.add_argument("--json-out", type=Path, default=None, help="default: SNAPSHOT_DIR/curves.json")
    cv.add_argument("--plot", type=Path, default=None, help="default: SNAPSHOT_DIR/curves.png")
    rc = sub.add_parser(
        "defaults",
        help="the whole recipe in one time budget: vae+vq, then dit+ar (same examples), then the demo adapters",
    )
    rc.add_argument("--models-dir", type=Path, default=default_models_dir(), help="where the files go")
    rc.add_argument("--minutes", type=float, default=60.0, help="wall-clock budget for all stages")
    rc.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    rc.add_argument("--workers", type=int, default=0, help="batch-rendering processes per run")
    rc.add_argument("--seed", type=int, default=0)
    rc.add_argument(
        "--text-encoder",
        type=Path,
        default=None,
        help="reuse this trained text encoder (default: train one first, ~13 CPU-minutes)",
    )
    _snapshot_arguments(rc, "of the DiT and the GPT (the learning curves of the pair)")
    return parser


def _snapshot_arguments(p: argparse.ArgumentParser, what: str = "") -> None:
    """--snapshots and --snapshot-dir: the learning-curve snapshots of `lab.training.fit`."""
    p.add_argument(
        "--snapshots",
        type=_fractions,
        default=(),
        help=f"save snapshots {what} at these fractions of the step budget, e.g. 0.25,0.5,1 "
        "(each a complete models folder DIR/<fraction>/ for --models-dir)",
    )
    p.add_argument("--snapshot-dir", type=Path, default=None, help="DIR (default: artifacts/train/snapshots)")


def _fractions(text: str) -> tuple[float, ...]:
    try:
        fractions = tuple(float(f) for f in text.split(",") if f.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text!r}") from None
    if not fractions or any(not 0 < f <= 1 for f in fractions):
        raise argparse.ArgumentTypeError(f"fractions must lie in (0, 1]: {text!r}")
    return fractions


GENERATORS = ("dit", "ar", "var")  # one per paradigm: diffusion, next-token, next-scale

# The recipe's stages: runs side by side, their batch on CPU / on a GPU, and their share of the budget.
RECIPE = (
    ((("vae", "vae"), ("vq", "vq"), ("var-vq", "var-vq")), (16, 64), 0.27),
    ((("dit", "dit"), ("ar", "ar"), ("var", "var")), (32, 128), 0.52),
    (
        (
            ("lora", "lora --engine dit"),
            ("lora", "lora --engine gpt"),
            ("controlnet", "controlnet --engine dit"),
            (
                "controlnet",
                "controlnet --engine gpt --lr 2e-3 --head-steps 800",
            ),  # the shipped file's settings
        ),
        (16, 64),
        0.21,
    ),
)


def train_defaults(args: argparse.Namespace) -> None:
    """Run the recipe stage by stage, each stage's runs as parallel processes with a shared deadline.

    Every run paces itself to its stage's deadline (`--deadline`), the DiT and the GPT through one
    pace folder so they take the same number of steps on the same examples. Files are written to
    a staging folder beside `--models-dir` and moved into it only when every stage has succeeded,
    so a failed run never leaves a VAE and a DiT that do not belong together.
    """
    import os
    import shutil
    import time

    from tessera.lab.training import DEFAULT_FILES

    target, work = args.models_dir, Path("artifacts") / "train"
    models = target.with_name(target.name + ".training")
    shutil.rmtree(models, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    te = models / DEFAULT_FILES["text_encoder"]
    started, budget = time.time(), args.minutes * 60
    if args.text_encoder:
        from tessera.engines.checkpoint import CheckpointError
        from tessera.engines.text_encoder import load_text_encoder

        try:  # a bad file fails here, named, before minutes of other stages
            load_text_encoder(args.text_encoder)
        except (CheckpointError, OSError) as e:
            raise SystemExit(f"tessera train defaults: --text-encoder {args.text_encoder}: {e}") from None
        te.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(args.text_encoder, te)
    elif not args.text_encoder:
        _run_stage(
            [("text-encoder", ["text-encoder", "--models-dir", str(models), "--seed", str(args.seed)])], work
        )
        budget -= time.time() - started
    try:
        _run_recipe(args, models, work, budget)
    except SystemExit as failure:
        raise SystemExit(f"{failure}; {target} is unchanged (partial results in {models})") from None
    for made in sorted(models.rglob("*.safetensors")):
        destination = target / made.relative_to(models)
        destination.parent.mkdir(parents=True, exist_ok=True)
        os.replace(made, destination)
    shutil.rmtree(models)
    print(f"recipe done in {(time.time() - started) / 60:.1f} min; files under {target}", flush=True)


def _run_recipe(args: argparse.Namespace, models: Path, work: Path, budget: float) -> None:
    """The stages after the text encoder, each with its share of `budget` seconds."""
    import os
    import shutil
    import time

    gpu = args.device.startswith("cuda")
    deadline = time.time()
    for runs, (cpu_batch, gpu_batch), share in RECIPE:
        deadline += share * budget
        pace = work / f"pace-{os.getpid()}-{runs[0][0]}"
        shutil.rmtree(pace, ignore_errors=True)
        commands = []
        for kind, spec in runs:
            cmd = [*spec.split(), "--models-dir", str(models), "--device", args.device]
            cmd += ["--deadline", f"{deadline:.1f}", "--batch", str(gpu_batch if gpu else cpu_batch)]
            cmd += ["--steps", "1000000", "--seed", str(args.seed)]
            if kind in KINDS:
                # a resumable state every 200 CPU steps; on a GPU (100x faster) writing it would dominate
                cmd += [
                    "--workers",
                    str(args.workers),
                    "--threads",
                    "1",
                    "--ckpt-every",
                    "5000" if gpu else "200",
                ]
            if kind in GENERATORS:  # paced in lockstep: the same steps on the same examples
                cmd += ["--pace-dir", str(pace), "--pace-peers", str(sum(k in GENERATORS for k, _ in runs))]
                if args.snapshots and kind in ("dit", "ar"):
                    cmd += ["--snapshots", ",".join(f"{f:g}" for f in args.snapshots)]
                    cmd += ["--snapshot-dir", str(args.snapshot_dir or work / "snapshots")]
            commands.append((re.sub(r" --engine (\w+).*", r"-\1", spec), cmd))  # "controlnet-gpt"
        _run_stage(commands, work)


def _run_stage(commands: list[tuple[str, list[str]]], work: Path) -> None:
    """Run named `tessera train …` commands side by side; stop with the log tail of any that failed."""
    import subprocess

    procs = []
    for name, cmd in commands:
        log = work / f"{name}.out"
        print(f"$ tessera train {shlex.join(cmd)}   (log: {log})", flush=True)
        out = log.open("w")
        procs.append(
            (
                name,
                log,
                out,
                subprocess.Popen(
                    [sys.executable, "-m", "tessera.cli", "train", *cmd], stdout=out, stderr=subprocess.STDOUT
                ),
            )
        )
    failed = []
    for name, log, out, proc in procs:
        proc.wait()
        out.close()
        tail = log.read_text().strip().splitlines()[-3:]
        print(f"[{name}] exit {proc.returncode}: " + " | ".join(tail), flush=True)
        if proc.returncode:
            failed.append(name)
    if failed:
        raise SystemExit(f"tessera train defaults: {', '.join(failed)} failed (logs in {work})")


def _device_arguments(p: argparse.ArgumentParser) -> None:
    """--device and --deadline, shared with the adapter trainers."""
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument(
        "--deadline",
        type=float,
        default=None,
        help="wall-clock time (Unix seconds) by which training must end: --steps becomes a cap and "
        "the run paces itself to finish in time (the card records the steps it took)",
    )


ADAPTER_KINDS = ("lora", "controlnet")  # trained on the built-in models by lab.adapter_training


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.kind in ADAPTER_KINDS:
        from tessera.lab import adapter_training

        (adapter_training.run_lora if args.kind == "lora" else adapter_training.run_controlnet)(args)
        return 0
    import torch

    from tessera.lab import training as T

    if args.kind == "defaults":
        train_defaults(args)
        return 0
    if args.kind == "curves":
        from tessera.lab import learning_curves as L

        torch.set_num_threads(args.threads)
        try:
            curves = L.evaluate_snapshots(args.snapshot_dir, args.n, args.seed, args.kinds.split(","),
                                          json.loads(args.dit), json.loads(args.ar), args.device)  # fmt: skip
        except FileNotFoundError as e:
            raise SystemExit(f"tessera train curves: {e}") from None
        out = args.json_out or args.snapshot_dir / "curves.json"
        out.write_text(json.dumps(curves, indent=1) + "\n")
        for row in L.curve_table(curves):
            print(f"{row['scene']:>9} {row['measure']:>14} {row['kind']:>3}: "
                  + "  ".join(f"{f:.2f}->{v:.3f}" for f, v in zip(row["fractions"], row["values"])))  # fmt: skip
        print(f"wrote {out} and {L.plot_curves(curves, args.plot or args.snapshot_dir / 'curves.png')}")
        return 0
    if args.kind == "eval":
        torch.set_num_threads(args.threads)
        report = T.evaluate(
            args.models_dir,
            args.n,
            args.seed,
            json.loads(args.dit),
            json.loads(args.ar),
            args.which.split(","),
            args.kinds.split(","),
            device=args.device,
            var_kwargs=json.loads(args.var),
        )
        text = json.dumps(report, indent=1)
        print(text)
        if args.json_out:
            args.json_out.parent.mkdir(parents=True, exist_ok=True)
            args.json_out.write_text(text + "\n")
        return 0

    file_key = KINDS[args.kind][0]
    models = args.models_dir
    out = args.out or models / T.DEFAULT_FILES[file_key]
    options = T.RunOptions(
        out=out,
        steps=args.steps,
        batch=args.batch,
        seed=args.seed,
        threads=args.threads,
        lr=args.lr,
        warmup=args.warmup,
        resume_from=args.resume_from,
        state=args.state,
        log=args.log,
        ckpt_every=args.ckpt_every,
        log_every=args.log_every,
        autocast=T.bf16_is_fast(args.device) and KINDS[args.kind][3]
        if args.autocast is None
        else args.autocast,
        command="tessera train " + shlex.join(argv),
        device=args.device,
        workers=args.workers,
        deadline=args.deadline,
        pace_dir=args.pace_dir,
        pace_peers=args.pace_peers,
        snapshots=args.snapshots,
        snapshot_dir=args.snapshot_dir,
    )
    if args.kind == "text-encoder":
        card = T.train_text_encoder(options)
    elif args.kind == "vae":
        card = T.train_vae(options, init_from=args.init_from, decoder_only=args.decoder_only)
    elif args.kind == "vq":
        card = T.train_vq(options, init_from=args.init_from, decoder_only=args.decoder_only)
    elif args.kind == "dit":
        card = T.train_dit(
            options,
            args.text_encoder or models / T.DEFAULT_FILES["text_encoder"],
            args.vae or models / T.DEFAULT_FILES["vae"],
            init_from=args.init_from,
        )
    elif args.kind == "ar":
        card = T.train_ar(
            options,
            args.text_encoder or models / T.DEFAULT_FILES["text_encoder"],
            args.vq or models / T.DEFAULT_FILES["vq"],
            init_from=args.init_from,
        )
    else:
        from tessera.lab import next_scale_training as NS

        if args.kind == "var-vq":
            card = NS.train_msvq(
                options, init_from=args.init_from, decoder_only=args.decoder_only, convs_from=args.convs_from
            )
        else:
            card = NS.train_var(
                options,
                args.text_encoder or models / T.DEFAULT_FILES["text_encoder"],
                args.msvq or models / T.DEFAULT_FILES["msvq"],
                init_from=args.init_from,
            )
    print(
        f"wrote {out}: {json.dumps({k: card[k] for k in ('steps', 'examples_seen', 'wall_time_s', 'final_loss')})}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
