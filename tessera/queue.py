"""The prompt queue and its history, kept in SQLite so nothing accepted is lost.

A prompt is written to the database before its id is returned to the client. Prompts
that were running when the process died go back to the front of the queue on start.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from pathlib import Path

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
            row = self._db.execute("SELECT * FROM prompts WHERE status='pending' ORDER BY number LIMIT 1").fetchone()
            if row is None:
                return None
            self._db.execute("UPDATE prompts SET status='running', started=? WHERE number=?", (time.time(), row["number"]))
        return self.get(row["prompt_id"])

    def finish(self, prompt_id: str, status: str, outputs: dict, errors: list, timings: dict, cached: list) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE prompts SET status=?, finished=?, outputs=?, errors=?, timings=?, cached=? WHERE prompt_id=?",
                (status, time.time(), json.dumps(outputs), json.dumps(errors), json.dumps(timings), json.dumps(cached), prompt_id),
            )

    def cancel(self, prompt_id: str) -> None:
        with self._lock:
            row = self._db.execute("SELECT status FROM prompts WHERE prompt_id=?", (prompt_id,)).fetchone()
            if row is None:
                raise QueueError(f"no prompt '{prompt_id}'", 404)
            if row["status"] != "pending":
                raise QueueError(f"prompt '{prompt_id}' is {row['status']}, only pending prompts can be cancelled", 409)
            self._db.execute("UPDATE prompts SET status='cancelled', finished=? WHERE prompt_id=?", (time.time(), prompt_id))

    def get(self, prompt_id: str) -> dict | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM prompts WHERE prompt_id=?", (prompt_id,)).fetchone()
        return _entry(row) if row else None

    def items(self, status: str) -> list[dict]:
        with self._lock:
            rows = self._db.execute(
                "SELECT prompt_id, number, status, created FROM prompts WHERE status=? ORDER BY number", (status,)
            ).fetchall()
        return [dict(r) for r in rows]

    def history(self, limit: int = 100) -> list[dict]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM prompts ORDER BY number DESC LIMIT ?", (limit,)).fetchall()
        return [_entry(r) for r in rows]

    def remaining(self) -> int:
        with self._lock:
            (count,) = self._db.execute("SELECT COUNT(*) FROM prompts WHERE status IN ('pending', 'running')").fetchone()
        return count


def _entry(row: sqlite3.Row) -> dict:
    entry = dict(row)
    for key in ("workflow", "outputs", "errors", "timings", "cached"):
        entry[key] = json.loads(entry[key])
    entry.pop("client_id", None)
    return entry


class PromptWorker:
    """One thread that runs queued prompts in order through the executor."""

    def __init__(self, store: PromptStore, executor, emit):
        self.store, self.executor, self.emit = store, executor, emit
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
        while not self._stop.is_set():
            self._wake.wait(timeout=1.0)
            self._wake.clear()
            while not self._stop.is_set():
                item = self.store.claim_next()
                if item is None:
                    break
                self._run(item)

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

        try:
            stop_now = lambda: self._stop.is_set() or self._interrupted == prompt_id  # noqa: E731
            result = self.executor.run(item["workflow"], prompt_id, emit, stop_now)
        except Exception as e:  # a bug in the runtime itself: record it, keep serving
            error = {"node": None, "node_type": None, "input": None, "message": repr(e)}
            self.store.finish(prompt_id, "error", {}, [error], {}, [])
            final.append(("execution_error", {"prompt_id": prompt_id, **error}))
        else:
            if self._stop.is_set() and result.status == "interrupted":
                return  # shutting down: left 'running', so it is run again at the next start
            self.store.finish(prompt_id, result.status, result.outputs, result.errors, result.timings, result.cached)
        finally:
            with self._lock:
                self._running = None
            for kind, data in final:
                self.emit(kind, data)
        self.emit("status", {"queue_remaining": self.store.remaining()})
