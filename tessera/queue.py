"""The prompt queue and its history, kept in SQLite so nothing accepted is lost.

A prompt is written to the database before its id is returned to the client. Prompts
that were running when the process died go back to the front of the queue on start.

Storage can fail under the worker (a full disk, a read-only remount). It never kills the
worker: the prompt that hit the fault is recorded as failed (retrying until its record can
be written), `StorageHealth` says why the server is unhealthy, and no further prompt is
started until a test write succeeds again; then the queue resumes by itself.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import tempfile
import threading
import time
import uuid
from pathlib import Path

log = logging.getLogger("tessera.queue")
STORAGE_ERRORS = (sqlite3.Error, OSError)
PROBE_BYTES = 64 << 10  # a test write this large must succeed before the queue resumes

TERMINAL = ("success", "error", "interrupted", "cancelled")
FINAL_EVENTS = ("execution_success", "execution_error", "execution_interrupted")

SCHEMA = """
CREATE TABLE IF NOT EXISTS prompts (
    number INTEGER PRIMARY KEY AUTOINCREMENT,
    prompt_id TEXT UNIQUE NOT NULL,
    client_id TEXT,
    status TEXT NOT NULL,
    workflow TEXT NOT NULL,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    outputs TEXT NOT NULL DEFAULT '{}',
    errors TEXT NOT NULL DEFAULT '[]',
    timings TEXT NOT NULL DEFAULT '{}',
    cached TEXT NOT NULL DEFAULT '[]'
);
CREATE INDEX IF NOT EXISTS prompts_status ON prompts(status, number);
CREATE TABLE IF NOT EXISTS health (id INTEGER PRIMARY KEY, checked REAL NOT NULL);
"""


class QueueError(Exception):
    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


class PromptStore:
    """Queue + history in one table; every method is safe to call from any thread."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(SCHEMA)
            # A prompt that was running when the process stopped is run again.
            self._db.execute("UPDATE prompts SET status='pending', started=NULL WHERE status='running'")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def probe(self) -> None:
        """A real write to the database (raises the storage error if it cannot be made)."""
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO health (id, checked) VALUES (1, ?)", (time.time(),))

    def owner(self, prompt_id: str) -> str | None:
        """The client_id a prompt was submitted with (None if it had none or is unknown)."""
        with self._lock:
            row = self._db.execute("SELECT client_id FROM prompts WHERE prompt_id=?", (prompt_id,)).fetchone()
        return row["client_id"] if row else None

    def add(self, workflow: dict, client_id: str | None = None) -> dict:
        prompt_id = uuid.uuid4().hex
        with self._lock:
            cursor = self._db.execute(
                "INSERT INTO prompts (prompt_id, client_id, status, workflow, created) VALUES (?, ?, 'pending', ?, ?)",
                (prompt_id, client_id, json.dumps(workflow), time.time()),
            )
        return {"prompt_id": prompt_id, "number": cursor.lastrowid}

    def claim_next(self) -> dict | None:
        """Mark the oldest pending prompt as running and return it."""
        with self._lock:
            row = self._db.execute(
                "SELECT * FROM prompts WHERE status='pending' ORDER BY number LIMIT 1"
            ).fetchone()
            if row is None:
                return None
            self._db.execute(
                "UPDATE prompts SET status='running', started=? WHERE number=?", (time.time(), row["number"])
            )
        return self.get(row["prompt_id"])

    def claim(self, prompt_id: str) -> dict | None:
        """Mark one pending prompt as running (a cluster re-attaching to a run in progress)."""
        with self._lock:
            cursor = self._db.execute(
                "UPDATE prompts SET status='running', started=? WHERE prompt_id=? AND status='pending'",
                (time.time(), prompt_id),
            )
        return self.get(prompt_id) if cursor.rowcount else None

    def requeue(self, prompt_id: str) -> None:
        """Put a running prompt back in the queue; it keeps its number, so it is next."""
        with self._lock:
            self._db.execute(
                "UPDATE prompts SET status='pending', started=NULL WHERE prompt_id=? AND status='running'",
                (prompt_id,),
            )

    def finish(
        self, prompt_id: str, status: str, outputs: dict, errors: list, timings: dict, cached: list
    ) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE prompts SET status=?, finished=?, outputs=?, errors=?, timings=?, cached=? WHERE prompt_id=?",
                (
                    status,
                    time.time(),
                    json.dumps(outputs),
                    json.dumps(errors),
                    json.dumps(timings),
                    json.dumps(cached),
                    prompt_id,
                ),
            )

    def cancel(self, prompt_id: str) -> None:
        with self._lock:
            row = self._db.execute("SELECT status FROM prompts WHERE prompt_id=?", (prompt_id,)).fetchone()
            if row is None:
                raise QueueError(f"no prompt '{prompt_id}'", 404)
            if row["status"] != "pending":
                raise QueueError(
                    f"prompt '{prompt_id}' is {row['status']}, only pending prompts can be cancelled", 409
                )
            self._db.execute(
                "UPDATE prompts SET status='cancelled', finished=? WHERE prompt_id=?",
                (time.time(), prompt_id),
            )

    def cancel_pending(self, client_id: str | None = None) -> list[str]:
        """Cancel every pending prompt (only `client_id`'s, when given); returns their ids."""
        where, args = (
            ("status='pending' AND client_id=?", (client_id,)) if client_id else ("status='pending'", ())
        )
        with self._lock:
            ids = [
                r["prompt_id"] for r in self._db.execute(f"SELECT prompt_id FROM prompts WHERE {where}", args)
            ]
            self._db.execute(
                f"UPDATE prompts SET status='cancelled', finished=? WHERE {where}", (time.time(), *args)
            )
        return ids

    def get(self, prompt_id: str) -> dict | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM prompts WHERE prompt_id=?", (prompt_id,)).fetchone()
        return _entry(row) if row else None

    def items(self, status: str) -> list[dict]:
        with self._lock:
            rows = self._db.execute(
                "SELECT prompt_id, number, status, created FROM prompts WHERE status=? ORDER BY number",
                (status,),
            ).fetchall()
        return [dict(r) for r in rows]

    def history(self, limit: int = 100) -> list[dict]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM prompts ORDER BY number DESC LIMIT ?", (limit,)).fetchall()
        return [_entry(r) for r in rows]

    def remaining(self) -> int:
        with self._lock:
            (count,) = self._db.execute(
                "SELECT COUNT(*) FROM prompts WHERE status IN ('pending', 'running')"
            ).fetchone()
        return count


def _entry(row: sqlite3.Row) -> dict:
    entry = dict(row)
    for key in ("workflow", "outputs", "errors", "timings", "cached"):
        entry[key] = json.loads(entry[key])
    entry.pop("client_id", None)
    return entry


class StorageHealth:
    """Whether the server can write what it must (queue database, output and user folders)."""

    def __init__(self, store: PromptStore, folders: list[Path]):
        self.store, self.folders = store, folders
        self.reason: str | None = None
        self._lock = threading.Lock()

    @property
    def ok(self) -> bool:
        return self.reason is None

    def failed(self, reason: str) -> None:
        with self._lock:
            if self.reason != reason:
                log.error("storage fault, queue paused: %s", reason)
            self.reason = reason

    def probe(self) -> bool:
        """Try a small write everywhere; healthy again (and True) only if all succeed."""
        try:
            for folder in self.folders:
                with tempfile.NamedTemporaryFile(dir=folder, prefix=".tessera-probe.") as f:
                    f.write(b"\0" * PROBE_BYTES)
                    f.flush()
                    os.fsync(f.fileno())
            self.store.probe()
        except STORAGE_ERRORS as e:
            self.failed(describe_storage_error(e))
            return False
        with self._lock:
            if self.reason is not None:
                log.warning("storage writes succeed again, queue resumes")
            self.reason = None
        return True


def describe_storage_error(e: BaseException) -> str:
    if isinstance(e, sqlite3.Error):
        return f"the queue database cannot be written ({e})"
    if isinstance(e, OSError):
        where = f" ({e.filename})" if e.filename else ""
        return f"a storage write failed: {e.strerror or e}{where}"
    return str(e)


class PromptWorker:
    """One thread that runs queued prompts in order through the executor."""

    def __init__(self, store: PromptStore, executor, emit, health: StorageHealth | None = None, quota=None):
        self.store, self.executor, self.emit = store, executor, emit
        self.health = health or StorageHealth(store, [])
        self.quota = quota
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._running: str | None = None
        self._interrupted: str | None = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="tessera-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=30)

    def notify(self) -> None:
        self._wake.set()

    @property
    def running(self) -> str | None:
        return self._running

    def interrupt(self, prompt_id: str | None = None) -> str | None:
        """Interrupt the running prompt (only if it is `prompt_id`, when given).

        The request names the prompt it saw running, so one that lands just as that prompt
        ends cannot interrupt the next.
        """
        with self._lock:
            running = self._running
            if running is None or (prompt_id is not None and prompt_id != running):
                return None
            self._interrupted = running
        return running

    def _loop(self) -> None:
        backoff = 0.05
        while not self._stop.is_set():
            self._wake.wait(timeout=1.0 if self.health.ok else backoff)
            self._wake.clear()
            try:
                while not self._stop.is_set():
                    if not self.health.ok and not self.health.probe():
                        break  # wait, then test again: the queue resumes once writes succeed
                    backoff = 0.05
                    item = self.store.claim_next()
                    if item is None:
                        break
                    self._run(item)
            except STORAGE_ERRORS as e:
                self.health.failed(describe_storage_error(e))
            except Exception:  # a bug in the worker itself must not stop the queue
                log.exception("the prompt worker hit an unexpected error; it keeps serving")
            if not self.health.ok:
                backoff = min(backoff * 2, 2.0)

    def _record(
        self, prompt_id: str, status: str, outputs: dict, errors: list, timings: dict, cached: list
    ) -> bool:
        """Store a finished prompt, retrying through storage faults; False if stopped first."""
        delay = 0.05
        while True:
            try:
                self.store.finish(prompt_id, status, outputs, errors, timings, cached)
                return True
            except STORAGE_ERRORS as e:
                self.health.failed(describe_storage_error(e))
            if self._stop.wait(delay):
                return False  # left 'running': it runs again at the next start
            delay = min(delay * 2, 2.0)
            self.health.probe()

    def _run(self, item: dict) -> None:
        prompt_id = item["prompt_id"]
        with self._lock:
            self._running = prompt_id
        self.emit("status", {"queue_remaining": self.store.remaining()})
        # The event that ends a prompt is sent once its history entry is stored, so a client
        # that fetches /api/history/{id} on that event finds the finished entry.
        final: list[tuple[str, dict]] = []

        def emit(kind: str, data: dict) -> None:
            if kind in FINAL_EVENTS:
                final.append((kind, data))
            else:
                self.emit(kind, data)

        stored = False
        written: dict = {}
        try:
            over_quota = self.quota.problem() if self.quota is not None else None
            if over_quota:
                error = {"node": None, "node_type": None, "input": None, "message": over_quota}
                stored = self._record(prompt_id, "error", {}, [error], {}, [])
                final.append(("execution_error", {"prompt_id": prompt_id, **error}))
                return
            try:
                stop_now = lambda: self._stop.is_set() or self._interrupted == prompt_id  # noqa: E731
                result = self.executor.run(item["workflow"], prompt_id, emit, stop_now)
            except Exception as e:  # a bug in the runtime itself: record it, keep serving
                error = {"node": None, "node_type": None, "input": None, "message": repr(e)}
                stored = self._record(prompt_id, "error", {}, [error], {}, [])
                final.append(("execution_error", {"prompt_id": prompt_id, **error}))
                return
            written = result.outputs
            if self._stop.is_set() and result.status == "interrupted":
                return  # shutting down: left 'running', so it is run again at the next start
            if result.status == "error":
                self.health.probe()  # a node that failed on a full disk pauses the queue until writes succeed
            stored = self._record(
                prompt_id, result.status, result.outputs, result.errors, result.timings, result.cached
            )
        finally:
            with self._lock:
                self._running = None
            if self.quota is not None:
                self.quota.after_prompt(written)
            for kind, data in final if stored else []:
                self.emit(kind, data)
            if stored:
                self.emit("status", {"queue_remaining": self.store.remaining()})
