"""Resource budgets a request must fit before any work starts: nodes per graph, pixels per
image and per batch, memory for the images a graph will make, and the output folder's quota.

Each is a `tessera serve` flag; a workflow over one is refused with a 4xx naming the node
and input, instead of being queued and failing (or exhausting the machine) later.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from tessera.registry import NodeRegistry
from tessera.workflow import WorkflowIssue

BYTES_PER_PIXEL = 3 * 4  # an IMAGE is float32 RGB
WORKING_COPIES = 2  # a node's output and the tensor it is made from are alive at once
SMALL_ALLOCATION = 256 << 20  # below this an allocation is never refused: free memory is only a snapshot
SIZED_OUTPUTS = ("IMAGE", "LATENT", "MASK")  # nodes with width/height inputs and such outputs allocate images


@dataclass
class Budgets:
    max_body_bytes: int = 4 << 20
    max_nodes: int = 10_000
    max_image_pixels: int = 8192 * 8192
    max_batch_pixels: int = 1 << 28
    output_quota_bytes: int | None = 50 << 30
    embedded_workflow_bytes: int = 256 << 10


def available_memory() -> int | None:
    """Bytes of RAM the kernel says a new allocation can get (MemAvailable), if known."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def node_count_issues(body: object, budgets: Budgets) -> list[WorkflowIssue]:
    """Checked before anything else looks at the graph, so a huge one costs nothing."""
    nodes = body.get("nodes") if isinstance(body, dict) else None
    if isinstance(nodes, dict) and len(nodes) > budgets.max_nodes:
        return [
            WorkflowIssue(
                None,
                None,
                f"the workflow has {len(nodes):,} nodes, over the limit of "
                f"{budgets.max_nodes:,} (tessera serve --max-nodes)",
            )
        ]
    return []


def allocation_issues(
    workflow: dict, registry: NodeRegistry, budgets: Budgets, free: int | None = None
) -> list[WorkflowIssue]:
    """Pixels and memory of every image or latent whose size the graph states as constants."""
    issues = []
    free = available_memory() if free is None else free
    for node_id, node in workflow["nodes"].items():
        cls = registry.get(node["type"])
        if cls is None or not any(o.type in SIZED_OUTPUTS for o in cls.outputs):
            continue
        given = node.get("inputs", {})
        sizes = {}
        for name in ("width", "height", "batch", "batch_size"):
            spec = cls.input(name)
            value = given.get(name, spec.default if spec is not None else None)
            if spec is not None and isinstance(value, int):
                sizes[name] = value
        if "width" not in sizes or "height" not in sizes:
            continue
        pixels = sizes["width"] * sizes["height"]
        batch = sizes.get("batch", sizes.get("batch_size", 1))
        if pixels > budgets.max_image_pixels:
            issues.append(
                WorkflowIssue(
                    node_id,
                    "width",
                    f"{sizes['width']}×{sizes['height']} is {pixels:,} pixels, over the "
                    f"limit of {budgets.max_image_pixels:,} per image (--max-image-pixels)",
                )
            )
        elif pixels * batch > budgets.max_batch_pixels:
            where = "batch" if cls.input("batch") is not None else "batch_size"
            issues.append(
                WorkflowIssue(
                    node_id,
                    where,
                    f"{batch} × {pixels:,} pixels is over the limit of "
                    f"{budgets.max_batch_pixels:,} per batch (--max-batch-pixels)",
                )
            )
        elif free is not None and (need := pixels * batch * BYTES_PER_PIXEL * WORKING_COPIES) > max(
            free, SMALL_ALLOCATION
        ):
            issues.append(
                WorkflowIssue(
                    node_id,
                    "width",
                    f"{batch} image(s) of {sizes['width']}×{sizes['height']} need about "
                    f"{need / 2**30:.1f} GiB, more than the {free / 2**30:.1f} GiB of free memory",
                )
            )
    return issues


class OutputQuota:
    """Bytes used under the output folder: measured by walking it now and then (deleted files
    count again), and between walks by adding the images each prompt wrote."""

    REWALK_SECONDS = 30.0

    def __init__(self, folder: Path, limit: int | None):
        self.folder, self.limit = folder, limit
        self._used: int | None = None
        self._walked = 0.0
        self._lock = threading.Lock()

    def after_prompt(self, outputs: dict) -> None:
        """Account for what a finished prompt wrote (its `ui` images)."""
        if self._used is None or time.monotonic() - self._walked > self.REWALK_SECONDS:
            self.refresh()
            return
        added = 0
        for ui in outputs.values():
            for ref in ui.get("images", []) if isinstance(ui, dict) else []:
                if isinstance(ref, dict) and ref.get("type") == "output":
                    try:
                        added += (self.folder / ref.get("subfolder", "") / ref["filename"]).stat().st_size
                    except (OSError, KeyError, TypeError):
                        continue
        with self._lock:
            self._used += added

    def refresh(self) -> int:
        total, stack = 0, [str(self.folder)]
        while stack:
            try:
                with os.scandir(stack.pop()) as entries:
                    for entry in entries:
                        if entry.is_dir(follow_symlinks=False):
                            stack.append(entry.path)
                        elif entry.is_file(follow_symlinks=False):
                            total += entry.stat(follow_symlinks=False).st_size
            except OSError:
                continue
        with self._lock:
            self._used, self._walked = total, time.monotonic()
        return total

    @property
    def used(self) -> int:
        return self.refresh() if self._used is None else self._used

    def problem(self) -> str | None:
        """Why nothing more may be written there, or None while under the quota."""
        if self.limit is None or self.used < self.limit:
            return None
        return (
            f"the output folder holds {self.used / 2**30:.2f} GiB, at its quota of {self.limit / 2**30:.2f} GiB "
            "(tessera serve --output-quota-gb); delete outputs to queue more"
        )
