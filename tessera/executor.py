"""Running a compiled plan: cached outputs, released intermediates, one event stream.

Each step either reuses a cache entry (same key: same type, constants, fingerprint and
upstream keys) or executes its node; intermediates leave this run's working set after
their last consumer. Everything the outside world sees leaves through `emit(type, data)`.
"""

from __future__ import annotations

import functools
import json
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tessera.cache import OutputCache
from tessera.device import compute_dtype, resolve_device
from tessera.engines.checkpoint import CheckpointError
from tessera.engines.layouts import detect_family, stored_keys
from tessera.model_manager import ModelManager
from tessera.node import ExecutionContext, Interrupted, NodeError, Result
from tessera.paths import UnsafePathError, confined_path, example_inputs_dir
from tessera.plan import Plan, compile_plan
from tessera.registry import NodeRegistry
from tessera.workflow import InvalidWorkflow, WorkflowIssue, validate

Emit = Callable[[str, dict], None]
INPUT_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def _loadable(root: Path, name: str) -> bool:
    """Listed only if the loader would accept it (a link out of the folder would be refused)."""
    try:
        confined_path(root, name, suffixes=(".safetensors",))
    except UnsafePathError:
        return False
    return True


def file_family(path: Path) -> str:
    """The kind of model a file holds, read from its header once per version of the file."""
    stat = path.stat()
    return _family(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=1024)
def _family(path: str, _mtime_ns: int, _size: int) -> str:
    try:
        return detect_family(stored_keys(path))
    except (CheckpointError, OSError):  # listed after the loader's own family; loading it says why
        return "unknown model"


@dataclass
class RunResult:
    status: str  # "success" | "error" | "interrupted"
    outputs: dict = field(default_factory=dict)  # node id -> ui dict (e.g. {"images": [...]})
    errors: list = field(default_factory=list)
    timings: dict = field(default_factory=dict)  # node id -> seconds
    executed: list = field(default_factory=list)
    cached: list = field(default_factory=list)


class Executor:
    def __init__(
        self,
        registry: NodeRegistry,
        models_dir: Path,
        input_dir: Path,
        output_dir: Path,
        device: str = "auto",
        cache: OutputCache | None = None,
        models: ModelManager | None = None,
    ):
        self.registry = registry
        self.models_dir, self.input_dir, self.output_dir = Path(models_dir), Path(input_dir), Path(output_dir)
        self.device = resolve_device(device)
        self.dtype = compute_dtype(self.device)
        self.cache = cache or OutputCache()
        self.models = models or ModelManager(self.device)  # puts a node's input models on the device

    def model_files(self, folder: str, family: str | None = None) -> list[str]:
        """The loadable `.safetensors` files of a models folder, sorted; those holding `family`
        (from their tensor names) first when one is given."""
        root = self.models_dir / folder
        if not root.is_dir():
            return []
        names = sorted(
            name
            for p in root.rglob("*.safetensors")
            if p.is_file() and _loadable(root, name := p.relative_to(root).as_posix())
        )
        if family:
            names.sort(key=lambda name: file_family(root / name) != family)  # stable: names stay sorted
        return names

    def input_images(self) -> list[str]:
        """The images LoadImage can pick: the input folder's, then the shipped examples'."""
        names = set()
        for root in (self.input_dir, example_inputs_dir()):
            if root.is_dir():
                names.update(
                    p.relative_to(root).as_posix()
                    for p in root.rglob("*")
                    if p.is_file() and p.suffix.lower() in INPUT_IMAGE_SUFFIXES
                )
        return sorted(names)

    def validate(self, workflow: object) -> dict:
        return validate(workflow, self.registry, self.model_files)

    def context(self, node_id: str = "", **kwargs) -> ExecutionContext:
        return ExecutionContext(
            self.device,
            self.dtype,
            self.models_dir,
            self.input_dir,
            self.output_dir,
            node_id=node_id,
            **kwargs,
        )

    def compile(self, workflow: dict, targets: list[str] | None = None) -> Plan:
        """Compile a validated workflow; a failing fingerprint or describe hook is reported on its node."""

        def fingerprint(cls, node_id, constants):
            ctx = self.context(node_id)
            try:
                files = [
                    ctx.model_file_identity(i.model_folder, constants[i.name])
                    for i in cls.inputs
                    if i.model_folder and isinstance(constants.get(i.name), str)
                ]
                return json.dumps([cls.fingerprint(ctx, constants), files])
            except Exception as e:
                raise InvalidWorkflow([WorkflowIssue(node_id, getattr(e, "input", None), str(e))]) from None

        def describe(cls, node_id, constants, upstream):
            try:
                return cls.describe(self.context(node_id), constants, upstream)
            except Exception as e:
                raise InvalidWorkflow([WorkflowIssue(node_id, getattr(e, "input", None), str(e))]) from None

        return compile_plan(workflow, self.registry, fingerprint, targets, describe)

    def run(
        self,
        workflow: object,
        prompt_id: str = "",
        emit: Emit | None = None,
        is_interrupted: Callable[[], bool] = lambda: False,
        targets: list[str] | None = None,
    ) -> RunResult:
        """Validate, compile and execute; never raises for a node's failure (it is in the result)."""
        emit = emit or (lambda kind, data: None)
        try:
            workflow = self.validate(workflow)
            plan = self.compile(workflow, targets)
        except InvalidWorkflow as e:
            errors = [
                {"node": i.node, "node_type": None, "input": i.input, "message": i.reason} for i in e.issues
            ]
            emit("execution_error", {"prompt_id": prompt_id, **errors[0]})
            return RunResult("error", errors=errors)
        emit("execution_start", {"prompt_id": prompt_id})
        with torch.inference_mode():
            return self._execute(plan, workflow, prompt_id, emit, is_interrupted)

    def _execute(self, plan, workflow, prompt_id, emit, is_interrupted) -> RunResult:
        result = RunResult("success")
        values: dict[str, tuple] = {}
        current = {"node": None}

        def on_progress(node_id, value, total, preview):
            emit("progress", {"prompt_id": prompt_id, "node": node_id, "value": value, "max": total})
            if preview is not None:
                emit("preview", {"prompt_id": prompt_id, "node": node_id, "image": preview})

        ctx = self.context(
            prompt_id=prompt_id, workflow=workflow, on_progress=on_progress, is_interrupted=is_interrupted
        )
        cached_now: list[str] = []
        for index, step in enumerate(plan.steps):
            current["node"] = step.node_id
            try:
                ctx.check_interrupted()
                entry = self.cache.get(step.cache_key)
                if entry is not None:
                    result.cached.append(step.node_id)
                    cached_now.append(step.node_id)
                    outputs, ui = entry.outputs, entry.ui
                else:
                    if cached_now:
                        emit("execution_cached", {"prompt_id": prompt_id, "nodes": cached_now})
                        cached_now = []
                    emit("executing", {"prompt_id": prompt_id, "node": step.node_id})
                    ctx.node_id = step.node_id
                    inputs = dict(step.constants)
                    for name, (up, out) in step.links.items():
                        inputs[name] = values[up][self._output_index(plan, up, out)]
                    started = time.perf_counter()
                    self.models.prepare(inputs.values(), ctx.progress)  # moves show as this node's progress
                    outputs, ui = self._call(step, ctx, inputs)
                    self.models.adopt(outputs, f"{step.node_class.type_name} {step.node_id}")
                    result.timings[step.node_id] = time.perf_counter() - started
                    result.executed.append(step.node_id)
                    self.cache.put(step.cache_key, outputs, ui)
                if ui:
                    result.outputs[step.node_id] = ui
                    emit("executed", {"prompt_id": prompt_id, "node": step.node_id, "output": ui})
                values[step.node_id] = outputs
            except Interrupted:
                result.status = "interrupted"
                emit("execution_interrupted", {"prompt_id": prompt_id, "node": step.node_id})
                return result
            except Exception as e:
                error = {
                    "node": step.node_id,
                    "node_type": step.node_class.type_name,
                    "input": getattr(e, "input", None) if isinstance(e, NodeError) else None,
                    "message": str(e) or type(e).__name__,
                    "traceback": "" if isinstance(e, NodeError) else traceback.format_exc(limit=6),
                }
                result.status = "error"
                result.errors.append(error)
                emit(
                    "execution_error",
                    {"prompt_id": prompt_id, **{k: v for k, v in error.items() if k != "traceback"}},
                )
                return result
            for up, _ in step.links.values():
                if plan.steps[self._position(plan, up)].release_after == index:
                    values.pop(up, None)
        if cached_now:
            emit("execution_cached", {"prompt_id": prompt_id, "nodes": cached_now})
        emit("execution_success", {"prompt_id": prompt_id})
        return result

    @staticmethod
    def _call(step, ctx, inputs) -> tuple[tuple, dict]:
        returned = step.node_class().execute(ctx, **inputs)
        if isinstance(returned, Result):
            outputs, ui = tuple(returned.outputs), returned.ui
        else:
            outputs, ui = tuple(returned) if returned is not None else (), {}
        if len(outputs) != len(step.node_class.outputs):
            raise RuntimeError(
                f"{step.node_class.type_name} returned {len(outputs)} outputs, declares {len(step.node_class.outputs)}"
            )
        return outputs, ui

    @staticmethod
    def _output_index(plan: Plan, node_id: str, output: str) -> int:
        cls = plan.steps[Executor._position(plan, node_id)].node_class
        return [o.name for o in cls.outputs].index(output)

    @staticmethod
    def _position(plan: Plan, node_id: str) -> int:
        return plan.index[node_id]
