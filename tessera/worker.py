"""A cluster worker: one Ray actor running our executor, with its own model manager and output cache.

The dispatcher (tessera/cluster.py) starts a prompt with `start`, then follows it with `poll`,
which hands back the run's events in order (each `executed` event with the bytes of the files
that node wrote, when outputs are streamed) and, once it ends, its result. The run happens on
a thread of its own, so `poll` and `interrupt` are answered while it runs: an interrupt is seen
at the prompt's next step. One prompt at a time; the last one is kept until the next starts,
so a restarted server can pick up a run that ended while it was away.

Nothing here imports Ray at module level: the class is made a Ray actor by `worker_class`.
"""

from __future__ import annotations

import os
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path

ACTOR_PREFIX = "tessera-worker-"
POLL_SECONDS = 0.5  # how long one poll waits on the worker for new events


@dataclass
class WorkerSettings:
    models_dir: str
    input_dir: str
    work_dir: str  # streamed outputs are staged here before they travel to the server
    custom_nodes_dir: str | None = None
    device: str = "cpu"
    threads: int = 1
    cache_ram_bytes: int = 2 << 30
    cache_vram_bytes: int = 8 << 30
    vram_budget: int | None = None


@dataclass
class _Run:
    prompt_id: str
    attempt: int
    events: list = field(default_factory=list)  # (kind, data, files) in the order they happened
    result: dict | None = None
    interrupted: bool = False


def output_refs(ui: object) -> list[dict]:
    """The output-folder file references in a node's ui dict ({"filename", "subfolder", "type"})."""
    found = []
    for items in ui.values() if isinstance(ui, dict) else ():
        for ref in items if isinstance(items, list) else ():
            if isinstance(ref, dict) and ref.get("type") == "output" and isinstance(ref.get("filename"), str):
                found.append(ref)
    return found


def ref_key(ref: dict) -> str:
    return f"{ref['subfolder']}/{ref['filename']}" if ref.get("subfolder") else ref["filename"]


class WorkerRuntime:
    """The body of one worker actor: an executor with its own model manager and output cache."""

    def __init__(self, name: str, settings: WorkerSettings):
        import torch

        from tessera.cache import OutputCache
        from tessera.executor import Executor
        from tessera.model_manager import ModelManager
        from tessera.registry import default_registry

        torch.set_num_threads(settings.threads)
        self.name, self.settings = name, settings
        self.staging = Path(settings.work_dir) / name
        self.staging.mkdir(parents=True, exist_ok=True)
        custom = Path(settings.custom_nodes_dir) if settings.custom_nodes_dir else None
        cache = OutputCache(settings.cache_ram_bytes, settings.cache_vram_bytes)
        self.executor = Executor(
            default_registry(custom),
            Path(settings.models_dir),
            Path(settings.input_dir),
            self.staging,
            settings.device,
            cache,
        )
        if settings.vram_budget is not None:
            self.executor.models = ModelManager(self.executor.device, settings.vram_budget)
        self._run: _Run | None = None
        self._cond = threading.Condition()

    def info(self) -> dict:
        """Who this worker is and what it holds (shown in /api/system, used to re-attach)."""
        import ray

        with self._cond:
            run = self._run
            current = None if run is None else {"prompt_id": run.prompt_id, "done": run.result is not None}
        state = self.executor.models.state()
        return {
            "name": self.name,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "node": ray.get_runtime_context().get_node_id(),
            "device": str(self.executor.device),
            "vram_budget": state["budget"],
            "loaded": [m["name"] for m in state["models"]],
            "cache": self.executor.cache.usage(),
            "run": current,
        }

    def start(self, prompt_id: str, attempt: int, workflow: dict, shared_output: str | None) -> None:
        with self._cond:
            if self._run is not None and self._run.result is None:
                raise RuntimeError(f"worker {self.name} is running prompt {self._run.prompt_id}")
            self._run = run = _Run(prompt_id, attempt)
        out = Path(shared_output) if shared_output else self.staging
        threading.Thread(target=self._execute, args=(run, workflow, out), daemon=True).start()

    def _execute(self, run: _Run, workflow: dict, out: Path) -> None:
        from tessera.executor import RunResult

        self.executor.output_dir = out  # one prompt at a time: where this one writes
        stream = out == self.staging

        def emit(kind: str, data: dict) -> None:
            files = self._take_files(data.get("output")) if stream and kind == "executed" else {}
            with self._cond:
                run.events.append((kind, data, files))
                self._cond.notify_all()

        try:
            result = self.executor.run(workflow, run.prompt_id, emit, lambda: run.interrupted)
        except Exception as e:  # a bug in the runtime: reported like the in-process worker does
            error = {"node": None, "node_type": None, "input": None, "message": repr(e)}
            emit("execution_error", {"prompt_id": run.prompt_id, **error})
            result = RunResult("error", errors=[error])
        with self._cond:
            run.result = {
                "status": result.status,
                "outputs": result.outputs,
                "errors": result.errors,
                "timings": result.timings,
                "cached": result.cached,
            }
            self._cond.notify_all()

    def _take_files(self, ui: object) -> dict[str, bytes]:
        """The bytes of the files a node just wrote; the staged copy is emptied, not deleted, so the
        file name stays taken and this worker never names two files alike."""
        files = {}
        for ref in output_refs(ui):
            path = self.staging / ref_key(ref)
            if path.is_file() and path.stat().st_size:
                files[ref_key(ref)] = path.read_bytes()
                os.truncate(path, 0)
        return files

    def poll(self, prompt_id: str, since: int, wait: float = POLL_SECONDS) -> dict:
        """Events of the run from index `since` (waiting up to `wait` s for one), and its result once done."""
        with self._cond:
            run = self._run
            if run is None or run.prompt_id != prompt_id:
                return {"known": False, "events": [], "result": None}
            if len(run.events) <= since and run.result is None:
                self._cond.wait(wait)
            return {"known": True, "events": run.events[since:], "result": run.result}

    def interrupt(self, prompt_id: str, forget: bool = False) -> bool:
        """Stop the run at its next step; `forget` also drops it (a server going down on purpose)."""
        with self._cond:
            run = self._run
            if run is None or run.prompt_id != prompt_id:
                return False
            run.interrupted = True
            if forget:
                self._run = None
            return True


def worker_class(cpus: float = 1, gpus: float = 0):
    """The Ray actor class of a worker, sized by the resources it takes."""
    import ray

    # Threaded: polls and interrupts are answered while a prompt runs on its own thread.
    return ray.remote(num_cpus=cpus, num_gpus=gpus, max_concurrency=8, max_restarts=0)(WorkerRuntime)


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def spawn_workers(
    prefix: str, settings: WorkerSettings, cpus: int, gpus: int, detached: bool, node: str | None = None
) -> list:
    """One actor per GPU (device cuda), plus `cpus` CPU actors of one thread each; returns handles."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    strategy = (
        {} if node is None else {"scheduling_strategy": NodeAffinitySchedulingStrategy(node, soft=False)}
    )
    lifetime = {"lifetime": "detached"} if detached else {}
    handles = []
    for i in range(gpus):
        gpu = dict(vars(settings), device="cuda")
        cls = worker_class(cpus=1, gpus=1)
        name = f"{ACTOR_PREFIX}{prefix}-gpu{i}"
        handles.append(cls.options(name=name, **lifetime, **strategy).remote(name, WorkerSettings(**gpu)))
    for i in range(cpus):
        cpu = dict(vars(settings), device="cpu", threads=1)
        name = f"{ACTOR_PREFIX}{prefix}-cpu{i}"
        handles.append(
            worker_class(cpus=1)
            .options(name=name, **lifetime, **strategy)
            .remote(name, WorkerSettings(**cpu))
        )
    return handles
