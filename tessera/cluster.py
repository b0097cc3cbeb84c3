"""Scale-out on Ray: one server and its SQLite queue, prompts run by worker actors.

`tessera serve --workers ray` starts a local Ray head (and `--worker-cpus N` CPU workers, or
one per GPU); `--workers HOST:PORT` or `ray://HOST:PORT` joins a running cluster, whose
machines add workers with `tessera worker --address …`. Each worker is a Ray actor running
our own `Executor`, with its own model manager and output cache, one prompt at a time.

The server stays the only owner of the queue and history. `ClusterDispatcher` replaces the
in-process `PromptWorker`: it claims the oldest pending prompt when a worker is free, picks
the worker that already holds the prompt's model files (else the least loaded), and follows
the run by polling the actor for its events, in order; the events go to `/ws` unchanged.
Output files are streamed back with their `executed` event and written into the server's
output folder (or, with a shared folder, written there by the worker); every file is noted
in `cluster.sqlite`, so a worker that dies mid-prompt has its files removed before the prompt
runs once more elsewhere (then it fails, naming both workers), and a restarted server
re-attaches to runs still in progress instead of starting them again.

The worker actor itself is tessera/worker.py. Ray is imported only by these two modules, and
only when a cluster is asked for.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import socket
import sqlite3
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tessera.queue import FINAL_EVENTS, STORAGE_ERRORS, PromptStore, StorageHealth, describe_storage_error
from tessera.security import is_loopback
from tessera.worker import ACTOR_PREFIX, WorkerSettings, gpu_count, output_refs, ref_key, spawn_workers

log = logging.getLogger("tessera.cluster")
NAMESPACE = "tessera"
MAX_ATTEMPTS = 2  # a prompt whose worker dies runs once more, on another worker
POLL_TIMEOUT = 120.0  # a worker silent for this long is treated as lost
OUTPUT_MODES = ("stream", "shared")


class ClusterError(Exception):
    """A cluster setting that cannot work (said in one line by the CLI)."""


# -- addresses and the token -------------------------------------------------------------------
def parse_workers(spec: str) -> tuple[str, str | None]:
    """`ray` (a local head) or `ray://HOST:PORT` / `HOST:PORT` (a cluster) -> (address for ray.init, host)."""
    if spec == "ray":
        return "local", None
    match = re.fullmatch(r"(ray://)?(\[[^\]]+\]|[^:/\s]+):(\d{1,5})", spec)
    if not match:
        raise ClusterError(f"--workers {spec!r}: expected 'ray', 'ray://HOST:PORT' or HOST:PORT")
    return spec, match.group(2).strip("[]")


def check_token(host: str | None, token: str | None, what: str) -> None:
    """Workers run whatever the head sends them: a head reachable beyond loopback needs a token."""
    if host is not None and not is_loopback(host) and not token:
        raise ClusterError(
            f"{what} {host} is not a loopback address: workers run any code the head sends, so a "
            "cluster token is required (--cluster-token TOKEN or TESSERA_CLUSTER_TOKEN, the same on "
            "the head, the server and every worker)"
        )


def ray_environment(token: str | None) -> None:
    """Settings Ray reads from the environment (this process and the daemons it starts)."""
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    if token:
        os.environ["RAY_AUTH_MODE"] = "token"
        os.environ["RAY_AUTH_TOKEN"] = token


def connect(spec: str, token: str | None, cpus: int = 0, gpus: int | None = None):
    """ray.init for a local head (bound to 127.0.0.1, no dashboard) or an existing cluster."""
    address, host = parse_workers(spec)
    check_token(host, token, "the cluster head")
    ray_environment(token)
    import ray

    if ray.is_initialized():
        return ray
    try:
        if address == "local":
            ray.init(
                _node_ip_address="127.0.0.1",
                include_dashboard=False,
                namespace=NAMESPACE,
                num_cpus=cpus,
                num_gpus=gpus,
                log_to_driver=True,
                configure_logging=False,
            )
        else:
            _join(ray, address)
    except Exception as e:  # Ray raises ConnectionError, RuntimeError, ValueError …
        raise ClusterError(f"cannot connect to the Ray cluster at {spec}: {e}") from None
    return ray


def _join(ray, address: str, tries: int = 3) -> None:
    """ray.init on an existing cluster; through ray://, tried again (the head starts a Ray Client
    server for each connection, and that start can fail on a busy head)."""
    for attempt in range(1, tries + 1):
        try:
            ray.init(address=address, namespace=NAMESPACE, log_to_driver=True, configure_logging=False)
            return
        except Exception:
            if not address.startswith("ray://") or attempt == tries:
                raise
            log.warning("Ray Client connection to %s failed (try %d of %d)", address, attempt, tries)
            time.sleep(2.0)


# -- scheduling ---------------------------------------------------------------------------------
@dataclass
class WorkerState:
    """What the server knows of one worker."""

    name: str
    handle: object = None
    info: dict = field(default_factory=dict)
    models: set = field(default_factory=set)  # model file keys of the prompts it ran
    running: str | None = None
    runs: int = 0


def choose_worker(free: list[WorkerState], models: set[str]) -> tuple[WorkerState, str]:
    """The free worker holding most of `models` (affinity), else the least loaded; and why."""
    best = min(free, key=lambda w: (-len(models & w.models), len(w.models), w.runs, w.name))
    held = sorted(models & best.models)
    return best, (f"affinity: holds {', '.join(held)}" if held else "least loaded")


def prompt_models(workflow: dict, registry, models_dir: Path) -> set[str]:
    """The model files a workflow uses, by identity: `folder/name@size:mtime`."""
    keys = set()
    for node in workflow.get("nodes", {}).values():
        cls = registry.get(node.get("type"))
        inputs = node.get("inputs", {})
        for i in cls.inputs if cls is not None else ():
            name = inputs.get(i.name)
            if i.model_folder and isinstance(name, str):
                try:
                    stat = (Path(models_dir) / i.model_folder / name).stat()
                    identity = f"{stat.st_size}:{stat.st_mtime_ns}"
                except OSError:
                    identity = "missing"
                keys.add(f"{i.model_folder}/{name}@{identity}")
    return keys


# -- the files a worker produced ----------------------------------------------------------------
class PublishedFiles:
    """Which server file each worker file became, per prompt attempt (kept across restarts)."""

    def __init__(self, path: Path):
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        with self._lock:
            self._db.executescript(
                """
                CREATE TABLE IF NOT EXISTS published (
                    worker TEXT NOT NULL, worker_ref TEXT NOT NULL, server_ref TEXT NOT NULL,
                    prompt_id TEXT NOT NULL, attempt INTEGER NOT NULL, PRIMARY KEY (worker, worker_ref));
                CREATE TABLE IF NOT EXISTS attempts (
                    prompt_id TEXT PRIMARY KEY, count INTEGER NOT NULL, workers TEXT NOT NULL);
                """
            )

    def lookup(self, worker: str, worker_ref: str) -> str | None:
        with self._lock:
            row = self._db.execute(
                "SELECT server_ref FROM published WHERE worker=? AND worker_ref=?", (worker, worker_ref)
            ).fetchone()
        return row[0] if row else None

    def add(self, worker: str, worker_ref: str, server_ref: str, prompt_id: str, attempt: int) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO published VALUES (?, ?, ?, ?, ?)",
                (worker, worker_ref, server_ref, prompt_id, attempt),
            )

    def take_attempt(self, prompt_id: str, attempt: int) -> list[str]:
        """Forget the files of one attempt and return their server names (to delete them)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT server_ref FROM published WHERE prompt_id=? AND attempt=?", (prompt_id, attempt)
            ).fetchall()
            self._db.execute("DELETE FROM published WHERE prompt_id=? AND attempt=?", (prompt_id, attempt))
        return [r[0] for r in rows]

    def attempts(self, prompt_id: str) -> tuple[int, list[str]]:
        with self._lock:
            row = self._db.execute(
                "SELECT count, workers FROM attempts WHERE prompt_id=?", (prompt_id,)
            ).fetchone()
        return (row[0], json.loads(row[1])) if row else (0, [])

    def begin_attempt(self, prompt_id: str, worker: str) -> int:
        count, workers = self.attempts(prompt_id)
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO attempts VALUES (?, ?, ?)",
                (prompt_id, count + 1, json.dumps([*workers, worker])),
            )
        return count + 1

    def undo_attempt(self, prompt_id: str) -> None:
        """The last attempt never started (its worker was already gone): it does not count."""
        count, workers = self.attempts(prompt_id)
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO attempts VALUES (?, ?, ?)",
                (prompt_id, max(0, count - 1), json.dumps(workers[:-1])),
            )

    def close(self) -> None:
        with self._lock:
            self._db.close()


def write_new(output_dir: Path, key: str, data: bytes) -> str:
    """Write `data` under `key` in the output folder, or under the next free counter if taken."""
    from tessera.paths import write_confined

    folder, _, name = key.rpartition("/")
    match = re.fullmatch(r"(.*)_(\d{5})(\.\w+)", name)
    stem, number, suffix = match.groups() if match else (Path(name).stem, "0", Path(name).suffix)
    for n in range(int(number), int(number) + 100_000):
        candidate = name if n == int(number) else f"{stem}_{n:05d}{suffix}"
        target = f"{folder}/{candidate}" if folder else candidate
        try:
            write_confined(output_dir, target, lambda f: f.write(data), exclusive=True)
            return target
        except FileExistsError:
            continue
    raise FileExistsError(f"no free name for {key} in the output folder")


# -- the dispatcher -------------------------------------------------------------------------------
@dataclass
class ClusterConfig:
    workers: str  # "ray", "ray://HOST:PORT" or "HOST:PORT"
    worker_cpus: int = 0
    outputs: str = "stream"  # "stream": files travel back; "shared": workers write to output_dir
    token: str | None = None
    custom_nodes_dir: str | None = None
    vram_budget: int | None = None
    settings: WorkerSettings | None = None  # for the workers a local head starts


class WorkerLost(Exception):
    pass


class ClusterDispatcher:
    """Runs queued prompts on Ray worker actors; the same interface as the in-process PromptWorker."""

    def __init__(
        self,
        store: PromptStore,
        emit,
        config: ClusterConfig,
        output_dir: Path,
        user_dir: Path,
        registry,
        models_dir: Path,
        health: StorageHealth | None = None,
        quota=None,
    ):
        if config.outputs not in OUTPUT_MODES:
            raise ClusterError(
                f"--worker-outputs {config.outputs!r}: expected one of {', '.join(OUTPUT_MODES)}"
            )
        self.store, self.emit, self.config = store, emit, config
        self.output_dir, self.registry, self.models_dir = Path(output_dir).resolve(), registry, models_dir
        self.health = health or StorageHealth(store, [])
        self.quota = quota
        self.local = config.workers == "ray"
        if self.local and not config.token:
            config.token = secrets.token_urlsafe(24)  # Ray's daemons listen beyond loopback
        gpus = gpu_count() if self.local else 0
        # A local head offers the whole machine, so `tessera worker` can add workers to it too.
        cpus = max(config.worker_cpus + gpus, os.cpu_count() or 1)
        self.ray = connect(config.workers, config.token, cpus=cpus, gpus=gpus)
        self.address = self.ray.get_runtime_context().gcs_address
        self.published = PublishedFiles(Path(user_dir) / "cluster.sqlite")
        self._local_handles = []
        if self.local:
            settings = config.settings or WorkerSettings(
                str(models_dir), "input", str(Path(user_dir) / "workers")
            )
            self._local_handles = spawn_workers("local", settings, config.worker_cpus, gpus, detached=False)
        self.workers: dict[str, WorkerState] = {}
        self._probing: dict[str, tuple[object, object]] = {}  # name -> (handle, info ref)
        self._gone: set[str] = set()
        self.assigned: dict[str, dict] = {}  # prompt id -> {"worker", "reason", "attempt"}
        self._interrupts: set[str] = set()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._attached = threading.Event()
        self._drivers: list[threading.Thread] = []
        self._thread = threading.Thread(target=self._loop, name="tessera-dispatcher", daemon=True)

    # -- the PromptWorker interface ------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def notify(self) -> None:
        self._wake.set()

    @property
    def running(self) -> str | None:
        with self._lock:
            return next(iter(self.assigned), None)

    def interrupt(self, prompt_id: str | None = None) -> str | None:
        """Interrupt `prompt_id` where it runs (with none given: every running prompt; the oldest is returned)."""
        with self._lock:
            targets = [p for p in self.assigned if prompt_id is None or p == prompt_id]
            self._interrupts.update(targets)
            workers = [(p, self.workers.get(self.assigned[p]["worker"])) for p in targets]
            handles = [(p, w.handle) for p, w in workers if w is not None]
        for p, handle in handles:
            handle.interrupt.remote(p)
        return targets[0] if targets else None

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=30)
        for driver in list(self._drivers):
            driver.join(timeout=30)
        self.published.close()
        try:
            self.ray.shutdown()
        except Exception:  # already gone: nothing left to release
            log.exception("ray.shutdown failed")

    # -- what /api/queue and /api/system show ----------------------------------------------------
    def assignments(self) -> dict[str, dict]:
        with self._lock:
            return {p: dict(a) for p, a in self.assigned.items()}

    def describe(self) -> dict:
        with self._lock:
            workers = [
                {
                    "name": w.name,
                    "host": w.info.get("host"),
                    "pid": w.info.get("pid"),
                    "device": w.info.get("device"),
                    "vram_budget": w.info.get("vram_budget"),
                    "running": w.running,
                    "runs": w.runs,
                    "models": sorted(w.models),
                    "loaded": w.info.get("loaded", []),
                }
                for w in sorted(self.workers.values(), key=lambda w: w.name)
            ]
        return {
            "address": self.address,
            "outputs": self.config.outputs,
            "attached": self._attached.is_set(),
            "workers": workers,
        }

    # -- discovery -------------------------------------------------------------------------------
    def _discover(self) -> None:
        """Probe named worker actors not seen before; add those that answer."""
        try:
            names = [n for n in self.ray.util.list_named_actors() if n.startswith(ACTOR_PREFIX)]
        except Exception:
            log.exception("could not list the cluster's workers")
            return
        with self._lock:  # an idle worker no longer listed has gone away
            for name in [n for n, w in self.workers.items() if n not in names and w.running is None]:
                del self.workers[name]
        for name in names:
            if name in self.workers or name in self._probing or name in self._gone:
                continue
            try:
                handle = self.ray.get_actor(name, namespace=NAMESPACE)
                self._probing[name] = (handle, handle.info.remote())
            except Exception:
                continue
        if not self._probing:
            return
        refs = [ref for _, ref in self._probing.values()]
        ready, _ = self.ray.wait(refs, num_returns=len(refs), timeout=0)
        for name, (handle, ref) in list(self._probing.items()):
            if ref not in ready:
                continue
            del self._probing[name]
            try:
                info = self.ray.get(ref)
            except Exception as e:
                log.warning("worker %s did not start: %s", name, e)
                self._gone.add(name)
                continue
            with self._lock:
                self.workers[name] = WorkerState(name, handle, info)
            log.info("worker %s joined (%s on %s)", name, info["device"], info["host"])
            if info.get("run"):
                self._reattach(self.workers[name], info["run"]["prompt_id"])

    def _reattach(self, worker: WorkerState, prompt_id: str) -> None:
        """A run the previous server started: follow it if its prompt is still due, else stop it."""
        item = self.store.claim(prompt_id)
        if item is None:
            worker.handle.interrupt.remote(prompt_id, True)
            return
        attempt, _ = self.published.attempts(prompt_id)
        log.info("re-attached to prompt %s on %s", prompt_id, worker.name)
        self._follow(worker, item, max(attempt, 1), "re-attached after a server restart", started=True)

    # -- the loop --------------------------------------------------------------------------------
    def _loop(self) -> None:
        deadline = time.monotonic() + POLL_TIMEOUT
        listed = 0.0
        while not self._stop.is_set():
            try:
                if self._probing or time.monotonic() - listed > 1.0:
                    listed = time.monotonic()
                    self._discover()
                # At start, workers listed in the cluster answer first, so a run in progress is
                # re-attached to rather than dispatched a second time.
                if not self._attached.is_set() and (not self._probing or time.monotonic() > deadline):
                    self._attached.set()
                if self._attached.is_set():
                    self._dispatch()
            except STORAGE_ERRORS as e:
                self.health.failed(describe_storage_error(e))
            except Exception:
                log.exception("the dispatcher hit an unexpected error; it keeps serving")
            self._wake.wait(0.25)
            self._wake.clear()

    def _dispatch(self) -> None:
        while not self._stop.is_set():
            if not self.health.ok and not self.health.probe():
                return
            with self._lock:
                free = [w for w in self.workers.values() if w.running is None]
            if not free:
                return
            item = self.store.claim_next()
            if item is None:
                return
            models = prompt_models(item["workflow"], self.registry, self.models_dir)
            worker, reason = choose_worker(free, models)
            attempt = self.published.begin_attempt(item["prompt_id"], worker.name)
            self._follow(worker, item, attempt, reason, models=models)

    def _follow(self, worker, item, attempt, reason, models=frozenset(), started=False) -> None:
        prompt_id = item["prompt_id"]
        with self._lock:
            worker.running = prompt_id
            self.assigned[prompt_id] = {"worker": worker.name, "reason": reason, "attempt": attempt}
        driver = threading.Thread(
            target=self._drive, args=(worker, item, attempt, set(models), started), daemon=True
        )
        self._drivers = [d for d in self._drivers if d.is_alive()] + [driver]
        driver.start()

    # -- one prompt on one worker -------------------------------------------------------------------
    def _drive(self, worker: WorkerState, item: dict, attempt: int, models: set, started: bool) -> None:
        prompt_id = item["prompt_id"]
        final: list[tuple[str, dict]] = []
        stored, lost, written = False, False, {}
        self.emit("status", {"queue_remaining": self.store.remaining()})
        try:
            over = self.quota.problem() if self.quota is not None else None
            if over:
                error = {"node": None, "node_type": None, "input": None, "message": over}
                stored = self._record(prompt_id, "error", {}, [error], {}, [])
                final.append(("execution_error", {"prompt_id": prompt_id, **error}))
                return
            shared = str(self.output_dir) if self.config.outputs == "shared" else None
            if not started:
                try:
                    self._call(worker.handle.start.remote(prompt_id, attempt, item["workflow"], shared))
                except WorkerLost:  # gone before the prompt reached it: not an attempt
                    self.published.undo_attempt(prompt_id)
                    attempt = 0
                    raise
            result = self._events(worker, prompt_id, attempt, final)
            if result is None:  # shutting down: the worker dropped it; it runs again at the next start
                return
            outputs = {node: self._map_ui(worker, ui) for node, ui in result["outputs"].items()}
            written = outputs
            if result["status"] == "error":
                self.health.probe()
            stored = self._record(
                prompt_id, result["status"], outputs, result["errors"], result["timings"], result["cached"]
            )
            if result["status"] == "success":
                worker.models |= models
        except WorkerLost as e:
            lost = True
            final.clear()
            self._lost(worker, item, attempt, str(e))
        except Exception as e:  # a bug in the dispatcher or a worker's runtime: recorded, the queue goes on
            log.exception("prompt %s failed outside its nodes", prompt_id)
            error = {"node": None, "node_type": None, "input": None, "message": repr(e)}
            final[:] = [("execution_error", {"prompt_id": prompt_id, **error})]
            stored = self._record(prompt_id, "error", {}, [error], {}, [])
        finally:
            with self._lock:
                worker.running = None
                worker.runs += 0 if lost else 1
                self.assigned.pop(prompt_id, None)
                self._interrupts.discard(prompt_id)
            if self.quota is not None:
                self.quota.after_prompt(written)
            for kind, data in final if stored else []:
                self.emit(kind, data)
            self.emit("status", {"queue_remaining": self.store.remaining()})
            self._wake.set()
        if not lost:  # what it now holds, for /api/system
            try:
                worker.info = self.ray.get(worker.handle.info.remote(), timeout=10)
            except Exception:
                log.debug("worker %s did not report its state", worker.name)

    def _call(self, ref, timeout: float = POLL_TIMEOUT):
        from ray.exceptions import GetTimeoutError, RayActorError

        try:
            return self.ray.get(ref, timeout=timeout)
        except (RayActorError, GetTimeoutError) as e:
            raise WorkerLost(type(e).__name__) from None
        except Exception as e:  # e.g. ActorUnavailableError, or the worker refused the start
            if "Actor" in type(e).__name__:
                raise WorkerLost(type(e).__name__) from None
            raise

    def _events(self, worker: WorkerState, prompt_id: str, attempt: int, final: list) -> dict | None:
        """Forward the run's events in order until it ends; its result (None if dropped on shutdown)."""
        since = 0
        while True:
            if self._stop.is_set():
                worker.handle.interrupt.remote(prompt_id, True)
                return None
            reply = self._call(worker.handle.poll.remote(prompt_id, since))
            if not reply["known"]:
                raise WorkerLost("the worker no longer knows this prompt")
            for kind, data, files in reply["events"]:
                since += 1
                if kind == "executed":
                    data["output"] = self._map_ui(worker, data["output"], files, prompt_id, attempt)
                if kind in FINAL_EVENTS:
                    final.append((kind, data))
                else:
                    self.emit(kind, data)
            if reply["result"] is not None:
                return reply["result"]

    def _map_ui(self, worker, ui: dict, files: dict | None = None, prompt_id: str = "", attempt: int = 0):
        """Worker file names -> server file names; new streamed files are written here, once."""
        for ref in output_refs(ui):
            key = ref_key(ref)
            mapped = self.published.lookup(worker.name, key)
            if mapped is None and files is not None and (key in files or self.config.outputs == "shared"):
                mapped = write_new(self.output_dir, key, files[key]) if key in files else key
                self.published.add(worker.name, key, mapped, prompt_id, attempt)
            if mapped is not None:
                ref["subfolder"], _, ref["filename"] = mapped.rpartition("/")
        return ui

    def _lost(self, worker: WorkerState, item: dict, attempt: int, why: str) -> None:
        """The worker died (or went silent): undo its files, then run the prompt once more or fail it."""
        prompt_id = item["prompt_id"]
        log.warning("worker %s lost while running prompt %s (%s)", worker.name, prompt_id, why)
        with self._lock:
            self.workers.pop(worker.name, None)
            self._gone.add(worker.name)
        try:
            self.ray.kill(worker.handle)  # a silent worker must never finish the prompt too
        except Exception:
            pass
        for name in self.published.take_attempt(prompt_id, attempt):
            try:
                (self.output_dir / name).unlink()
            except FileNotFoundError:
                pass
        count, names = self.published.attempts(prompt_id)
        if count < MAX_ATTEMPTS and prompt_id not in self._interrupts:
            self.store.requeue(prompt_id)
            return
        if prompt_id in self._interrupts:  # it was being stopped anyway
            if self._record(prompt_id, "interrupted", {}, [], {}, []):
                self.emit("execution_interrupted", {"prompt_id": prompt_id, "node": None})
            return
        message = (
            f"the worker running this prompt died ({' then '.join(names)}); "
            f"it was tried {count} times and is not retried again"
        )
        error = {"node": None, "node_type": None, "input": None, "message": message}
        if self._record(prompt_id, "error", {}, [error], {}, []):
            self.emit("execution_error", {"prompt_id": prompt_id, **error})

    def _record(self, prompt_id, status, outputs, errors, timings, cached) -> bool:
        delay = 0.05
        while True:
            try:
                self.store.finish(prompt_id, status, outputs, errors, timings, cached)
                return True
            except STORAGE_ERRORS as e:
                self.health.failed(describe_storage_error(e))
            if self._stop.wait(delay):
                return False
            delay = min(delay * 2, 2.0)
            self.health.probe()


def dispatcher_for(server) -> ClusterDispatcher:
    """The dispatcher of a `TesseraServer` whose config asks for a cluster (a clear exit if it cannot be)."""
    c = server.config
    config = c.cluster
    if config.settings is None:
        config.settings = WorkerSettings(
            str(Path(c.models_dir).resolve()),
            str(Path(c.input_dir).resolve()),
            str((Path(c.user_dir) / "workers").resolve()),
            custom_nodes_dir=str(Path(config.custom_nodes_dir).resolve())
            if config.custom_nodes_dir
            else None,
            cache_ram_bytes=c.cache_ram_bytes,
            cache_vram_bytes=c.cache_vram_bytes,
            vram_budget=config.vram_budget,
        )
    try:
        return ClusterDispatcher(
            server.store,
            server.emit_threadsafe,
            config,
            c.output_dir,
            c.user_dir,
            server.registry,
            c.models_dir,
            server.health,
            server.quota,
        )
    except ClusterError as e:
        raise SystemExit(f"tessera: {e}") from None


# -- `tessera worker` ------------------------------------------------------------------------------
def run_worker(address: str, token: str | None, settings: WorkerSettings, cpus: int, gpus: int | None) -> int:
    """Add this machine's workers to a cluster and keep them until Ctrl-C (or SIGTERM)."""
    import signal

    if address.startswith("ray://") or address == "ray":
        raise ClusterError(
            f"--address {address!r}: a worker joins through this machine's own Ray node; run "
            "`ray start --address HEAD:PORT` here, then `tessera worker --address HEAD:PORT`"
        )
    ray = connect(address, token)
    gpus = gpu_count() if gpus is None else gpus
    if cpus == 0 and gpus == 0:
        cpus = 1
    node = ray.get_runtime_context().get_node_id()
    prefix = f"{socket.gethostname()}-{os.getpid()}"
    handles = spawn_workers(prefix, settings, cpus, gpus, detached=True, node=node)
    infos = ray.get([h.info.remote() for h in handles])
    for info in infos:
        print(f"tessera worker {info['name']}: {info['device']}, pid {info['pid']}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    for h in handles:
        ray.kill(h)
    ray.shutdown()
    return 0


def default_work_dir() -> str:
    return str(Path(tempfile.gettempdir()) / "tessera-worker")
