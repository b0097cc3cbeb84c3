"""Learning curves: every held-out metric of the generators at each training-budget snapshot.

`tessera train dit|ar --snapshots 0.25,0.5,1 --snapshot-dir DIR` leaves one complete models folder
per fraction (`DIR/0.25/…`, see `lab.training.fit`). `evaluate_snapshots` runs the held-out
evaluation (`lab.training.evaluate`) on each of them for the paradigms whose snapshot is there,
beside what the run had cost by then (`snapshot-<kind>.json`: steps, examples seen, CPU time,
training FLOPs); `plot_curves` draws each metric against the examples seen, one line per
paradigm, so a claim can be checked at every budget rather than at one.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from . import synthetic

PARADIGMS = ("dit", "ar")
LABELS = {"dit": "DiT (diffusion)", "ar": "GPT (autoregressive)"}
MEASURES = ("mean_attribute", "all")


def snapshot_folders(snapshot_dir: Path) -> list[tuple[float, Path]]:
    """(fraction, folder) of every snapshot under `snapshot_dir`, by fraction."""
    snapshot_dir = Path(snapshot_dir)
    if not snapshot_dir.is_dir():
        raise FileNotFoundError(f"snapshot folder {snapshot_dir} does not exist")
    found = []
    for folder in snapshot_dir.iterdir():
        if folder.is_dir() and list(folder.glob("snapshot-*.json")):
            try:
                found.append((float(folder.name), folder))
            except ValueError:
                continue
    if not found:
        raise FileNotFoundError(f"no snapshots (folders holding snapshot-<kind>.json) under {snapshot_dir}")
    return sorted(found)


def evaluate_snapshots(
    snapshot_dir: Path,
    n_per_kind: int = 32,
    seed: int = 0,
    kinds: Sequence[str] = synthetic.KINDS,
    dit_kwargs: dict | None = None,
    ar_kwargs: dict | None = None,
    device: str = "cpu",
) -> dict:
    """Held-out scores of every snapshot, with its training facts: {"points": [{fraction, kind,
    step, examples_seen, cpu_time_s, train_flops, scores}, …]}, one point per paradigm and fraction."""
    from .training import evaluate

    points = []
    for fraction, folder in snapshot_folders(snapshot_dir):
        facts = {k: json.loads((folder / f"snapshot-{k}.json").read_text()) for k in PARADIGMS
                 if (folder / f"snapshot-{k}.json").exists()}  # fmt: skip
        if not facts:
            continue
        report = evaluate(folder, n_per_kind, seed, dit_kwargs, ar_kwargs, which=tuple(facts), kinds=kinds,
                          device=device)  # fmt: skip
        for kind, fact in facts.items():
            scores = {k: v for k, v in report[kind].items() if isinstance(v, dict)}
            points.append({
                "fraction": fraction, "kind": kind, "step": fact["step"],
                "examples_seen": fact["examples_seen"], "cpu_time_s": fact["cpu_time_s"],
                "train_flops": fact.get("train_flops", {}).get("flops"), "parameters": fact.get("parameters"),
                "settings": report[kind]["settings"], "seconds": report[kind]["seconds"], "scores": scores,
            })  # fmt: skip
    return {"snapshot_dir": str(snapshot_dir), "n_per_kind": n_per_kind, "seed": seed, "points": points}


def curve_table(curves: dict) -> list[dict]:
    """One row per (scene kind, measure, paradigm): the metric at each fraction, in fraction order."""
    rows: dict[tuple, dict] = {}
    for p in sorted(curves["points"], key=lambda p: p["fraction"]):
        for scene, scores in p["scores"].items():
            for measure in MEASURES:
                if measure in scores:
                    row = rows.setdefault((scene, measure, p["kind"]), {
                        "scene": scene, "measure": measure, "kind": p["kind"], "fractions": [],
                        "examples_seen": [], "values": [],
                    })  # fmt: skip
                    row["fractions"].append(p["fraction"])
                    row["examples_seen"].append(p["examples_seen"])
                    row["values"].append(scores[measure])
    return list(rows.values())


def plot_curves(curves: dict, out: Path, title: str = "") -> Path:
    """A PNG with one panel per (scene kind, measure): the metric against examples seen, a line per paradigm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = curve_table(curves)
    if not table:
        raise ValueError("no evaluated snapshots to plot")
    panels = sorted({(r["scene"], r["measure"]) for r in table}, key=lambda k: (synthetic.KINDS.index(k[0])
                    if k[0] in synthetic.KINDS else 99, MEASURES.index(k[1])))  # fmt: skip
    cols = 4
    rows_n = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(3.2 * cols, 2.6 * rows_n), squeeze=False)
    for ax, (scene, measure) in zip(axes.flat, panels):
        for r in table:
            if (r["scene"], r["measure"]) == (scene, measure):
                ax.plot(r["examples_seen"], r["values"], marker="o", label=LABELS.get(r["kind"], r["kind"]))
        ax.set_title(f"{scene}: {'mean per attribute' if measure == 'mean_attribute' else 'all correct'}",
                     fontsize=9)  # fmt: skip
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("training examples seen", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(
        title or f"held-out metrics vs training budget (n = {curves['n_per_kind']} per kind)", fontsize=10
    )
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
