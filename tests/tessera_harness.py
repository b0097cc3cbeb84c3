"""Test harness for the API tests: a real `tessera serve` process on loopback (`Server`),
a WebSocket event recorder, the test node packs and small HTTP/PNG helpers.

(A module of its own, not conftest.py: tests/browser has a conftest.py too, so
`from conftest import …` would be ambiguous.) Nothing here sleeps to synchronise: every
wait polls the API (or the event stream) until a condition holds, with a deadline.
"""

from __future__ import annotations

import asyncio
import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
TERMINAL = ("success", "error", "interrupted", "cancelled")

# A node pack used by the API tests. Sleep is an output node that takes `steps` short
# steps, reporting progress (and optionally a preview) after each; it logs what it did in
# output/sleep_log.txt so tests can see what really ran, in which order.
TESTING_PACK = '''
"""Test nodes: Sleep (progress, preview, interruption), Fail, Gate (slow validation), PickVAE (model dropdown)."""
import os
import time

from PIL import Image

from tessera.node import Input, Interrupted, Node, NodeError, Output, Result


def _log(ctx, line):
    with open(ctx.output_dir / "sleep_log.txt", "a") as f:
        f.write(line + "\\n")


class Sleep(Node):
    """Sleep in short steps, reporting progress after each one."""

    category = "testing"
    is_output = True
    inputs = (
        Input("steps", "INT", default=5, min=1, max=100000),
        Input("step_seconds", "FLOAT", default=0.01, min=0.0, max=5.0),
        Input("label", "STRING", default="", link="widget"),
        Input("preview", "BOOLEAN", default=False),
        Input("gate", "STRING", default="", link="widget"),
    )
    outputs = ()

    def execute(self, ctx, steps, step_seconds, label, preview, gate):
        """With `gate` (a file path), the node finishes only once that file exists, so a test
        decides when a prompt may end instead of racing a timer."""
        _log(ctx, f"start {label}")
        for i in range(steps):
            time.sleep(step_seconds)
            picture = Image.new("RGB", (8, 4), (255, 0, 0)) if preview and i == 0 else None
            try:
                ctx.progress(i + 1, steps, preview=picture)
                while gate and i == steps - 1 and not os.path.exists(gate):
                    time.sleep(0.01)
                    ctx.check_interrupted()
            except Interrupted:
                _log(ctx, f"interrupted {label} at {i + 1}")
                raise
        _log(ctx, f"done {label}")
        return Result(ui={"slept": [label]})


class Fail(Node):
    """Always fails, blaming its `reason` input."""

    category = "testing"
    is_output = True
    inputs = (Input("reason", "STRING", default="deliberate failure", link="widget"),)
    outputs = ()

    def execute(self, ctx, reason):
        raise NodeError(reason, input="reason")


class Gate(Node):
    """An output node whose fingerprint (computed while the workflow is checked) waits until
    the file named by `gate` exists in the input folder: a validation as slow as a test wants."""

    category = "testing"
    is_output = True
    inputs = (Input("gate", "STRING", default="gate", link="widget"),)
    outputs = ()

    @classmethod
    def fingerprint(cls, ctx, inputs):
        path = ctx.input_dir / inputs["gate"]
        deadline = time.monotonic() + 60
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        return inputs["gate"]

    def execute(self, ctx, gate):
        return Result(ui={"gate": [gate]})


class PickVAE(Node):
    """Choose a VAE file (a model-folder dropdown)."""

    category = "testing"
    inputs = (Input("vae_name", "STRING", model_folder="vae", link="widget"),)
    outputs = (Output("name", "STRING"),)

    def execute(self, ctx, vae_name):
        return (vae_name,)
'''

BROKEN_PACK = '''
from tessera.node import Node, Output


class HalfDefined(Node):
    """Defined before the pack fails: must never be registered."""

    outputs = (Output("x", "INT"),)

    def execute(self, ctx):
        return (1,)


raise RuntimeError("broken_pack fails on import on purpose")
'''


def write_custom_nodes(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "testing_pack.py").write_text(TESTING_PACK)
    (folder / "broken_pack.py").write_text(BROKEN_PACK)
    return folder


# -- small helpers -------------------------------------------------------------------------
def wait_until(condition, timeout: float = 20.0, interval: float = 0.02, message: str = "condition"):
    """Poll `condition()` until it returns a truthy value; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png_bytes(size=(4, 3), color=(10, 200, 30), fmt="PNG") -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format=fmt)
    return buffer.getvalue()


def multipart(
    field: str, filename: str | bytes, data: bytes, content_type: str = "image/png"
) -> tuple[bytes, str]:
    """A multipart/form-data body with one file field (the file name is sent verbatim)."""
    boundary = "tessera" + uuid.uuid4().hex
    name = filename if isinstance(filename, bytes) else filename.encode("utf-8")
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="'.encode()
        + name
        + f'"\r\nContent-Type: {content_type}\r\n\r\n'.encode()
    )
    return head + data + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def snapshot(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, tuple[int, int]]:
    """{relative path: (size, mtime_ns)} of every entry under `folder` (symlinks not followed).

    `skip` holds path prefixes ("in/" skips that folder and everything in it); logs are skipped."""
    found = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if rel.endswith(".log") or any(rel == s.rstrip("/") or rel.startswith(s) for s in skip):
            continue
        st = path.lstat()
        found[rel] = (st.st_size, st.st_mtime_ns)
    return found


def png_text_chunks(data: bytes) -> dict[str, str]:
    """The tEXt chunks of a PNG file (keyword -> text), read by hand."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG file"
    chunks, pos = {}, 8
    while pos < len(data):
        length = int.from_bytes(data[pos : pos + 4], "big")
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        if kind == b"tEXt":
            key, _, text = body.partition(b"\x00")
            chunks[key.decode("latin-1")] = text.decode("latin-1")
        pos += 12 + length
    return chunks


@dataclass
class Response:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def json(self):
        return json.loads(self.body)


# -- the server process --------------------------------------------------------------------
@dataclass
class Server:
    """One `python -m tessera serve` process and its folders (all under `root`)."""

    root: Path
    custom_nodes_dir: Path | None = None
    token: str | None = None
    extra_args: tuple = ()
    port: int = 0
    proc: subprocess.Popen | None = None
    starts: int = 0
    _log: object = field(default=None, repr=False)
    _log_start: int = 0

    def __post_init__(self):
        self.models_dir = self.root / "models"
        self.output_dir = self.root / "out"
        self.input_dir = self.root / "in"
        self.user_dir = self.root / "user"
        self.log_path = self.root / "server.log"
        for folder in (self.models_dir, self.output_dir, self.input_dir, self.user_dir):
            folder.mkdir(parents=True, exist_ok=True)

    # process control
    def command(self, port: int) -> list[str]:
        cmd = [
            PYTHON,
            "-m",
            "tessera",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--models-dir",
            str(self.models_dir),
            "--output-dir",
            str(self.output_dir),
            "--input-dir",
            str(self.input_dir),
            "--user-dir",
            str(self.user_dir),
            "--device",
            "cpu",
            "--custom-nodes-dir",
            str(self.custom_nodes_dir or (self.root / "no_custom_nodes")),
        ]
        if self.token:
            cmd += ["--token", self.token]
        return cmd + list(self.extra_args)

    def launch(self) -> Server:
        """Start the process without waiting for it (see `wait_ready`)."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self._close_log()
        self.port = free_port()
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - the process writes to it until stopped
        self._log_start = self.log_path.stat().st_size
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            self.command(self.port), cwd=self.root, stdout=self._log, stderr=subprocess.STDOUT, env=env
        )
        self.starts += 1
        return self

    def wait_ready(self, timeout: float = 90.0) -> Server:
        """Poll until the server answers HTTP (any status); relaunch if its port was taken meanwhile."""
        for _attempt in range(3):
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    self.request("GET", "/api/system", timeout=2)
                    return self
                except OSError:
                    time.sleep(0.05)
            if self.proc.poll() is None:
                self.kill()
                raise AssertionError(f"server did not answer within {timeout}s:\n{self.log_text()}")
            this_run = self.log_text()[self._log_start :]
            if "address already in use" not in this_run.lower():
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{this_run}")
            self.launch()
        raise AssertionError("could not find a free port")

    def start(self, timeout: float = 90.0) -> Server:
        return self.launch().wait_ready(timeout)

    def signal_stop(self) -> None:
        """Ask for a graceful stop (Ctrl-C) without waiting."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)

    def stop(self, timeout: float = 20.0) -> None:
        """Graceful stop (Ctrl-C), SIGKILL if it does not exit in time."""
        self.signal_stop()
        if self.proc is not None:
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._close_log()

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs at all."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._close_log()

    def _close_log(self):
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # HTTP
    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def origin(self) -> str:
        return self.url

    def auth(self) -> dict:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def request(
        self, method, path, body=None, headers=None, json_body=None, timeout=20, host=True
    ) -> Response:
        """Send exactly this request (the path is not normalised or re-encoded)."""
        headers = {**self.auth(), **(headers or {})}
        if json_body is not None:
            body = json.dumps(json_body).encode()
            headers.setdefault("Content-Type", "application/json")
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
            names = {k.lower() for k in headers}
            if host and "host" not in names:
                conn.putheader("Host", self.host)
            for k, v in headers.items():
                if v is not None:
                    conn.putheader(k, v)
            if body is not None:
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body)
            response = conn.getresponse()
            return Response(response.status, response.headers, response.read())
        finally:
            conn.close()

    def get(self, path, **kw) -> Response:
        return self.request("GET", path, **kw)

    def get_json(self, path) -> dict:
        r = self.get(path)
        assert r.status == 200, (path, r.status, r.body[:500])
        return r.json()

    # prompts
    def submit(self, workflow: dict, **kw) -> str:
        """Queue a workflow as client "pytest" (the EventRecorder's default) unless told otherwise."""
        kw.setdefault("client_id", "pytest")
        r = self.request("POST", "/api/prompt", json_body={"workflow": workflow, **kw})
        assert r.status == 200, (r.status, r.body[:1000])
        return r.json()["prompt_id"]

    def entry(self, prompt_id: str) -> dict:
        return self.get_json(f"/api/history/{prompt_id}")

    def wait_status(self, prompt_id: str, statuses=TERMINAL, timeout: float = 30.0) -> dict:
        def reached():
            e = self.entry(prompt_id)
            return e if e["status"] in statuses else None

        return wait_until(reached, timeout, message=f"prompt {prompt_id} to reach {statuses}")

    def wait_idle(self, timeout: float = 30.0) -> None:
        def idle():
            q = self.get_json("/api/queue")
            return not q["running"] and not q["pending"]

        wait_until(idle, timeout, message="an empty queue")

    def interrupt_all(self) -> None:
        """Cancel everything pending, interrupt what runs, wait for the queue to empty."""
        q = self.get_json("/api/queue")
        for item in q["pending"]:
            self.request("DELETE", f"/api/queue/{item['prompt_id']}")
        self.request("POST", "/api/interrupt", json_body={})
        self.wait_idle()

    def sleep_log(self) -> list[str]:
        path = self.output_dir / "sleep_log.txt"
        return path.read_text().splitlines() if path.exists() else []


# -- WebSocket recorder ----------------------------------------------------------------------
class EventRecorder:
    """Connects to /ws on a background thread and records every frame.

    JSON frames become `(type, data)`; binary frames become `("binary", bytes)`. The server
    sends a socket only the events of its own client's prompts (`subscribe="all"`: every prompt's).
    """

    def __init__(
        self,
        server: Server,
        client_id: str = "pytest",
        headers: dict | None = None,
        subscribe: str | None = None,
    ):
        self.server = server
        self.events: list[tuple[str, object]] = []
        self._cond = threading.Condition()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop = asyncio.new_event_loop()
        self._closing: asyncio.Event | None = None
        self._url = f"{server.url}/ws?client_id={client_id}" + (
            f"&subscribe={subscribe}" if subscribe else ""
        )
        self._headers = {**server.auth(), **(headers or {})}
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        if not self._ready.wait(20):
            raise AssertionError("WebSocket did not connect")
        if self._error:
            raise self._error
        # the server greets every socket with a status frame
        self.wait_for(lambda k, d: k == "status", timeout=10)

    def _run(self):
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._main())

    async def _main(self):
        import aiohttp

        self._closing = asyncio.Event()
        try:
            async with (
                aiohttp.ClientSession() as session,
                session.ws_connect(self._url, headers=self._headers) as ws,
            ):
                self._ws = ws
                self._ready.set()
                reader = asyncio.ensure_future(self._read(ws))
                await self._closing.wait()
                reader.cancel()
        except BaseException as e:  # noqa: BLE001 - reported to the test thread
            self._error = e
            self._ready.set()

    async def _read(self, ws):
        import aiohttp

        async for message in ws:
            if message.type == aiohttp.WSMsgType.TEXT:
                frame = json.loads(message.data)
                event = (frame["type"], frame["data"])
            elif message.type == aiohttp.WSMsgType.BINARY:
                event = ("binary", message.data)
            else:
                break
            with self._cond:
                self.events.append(event)
                self._cond.notify_all()

    def wait_for(self, predicate, timeout: float = 20.0, start: int = 0):
        """The first recorded event (from index `start`) with predicate(type, data) true."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for event in self.events[start:]:
                    if predicate(*event):
                        return event
                left = deadline - time.monotonic()
                if left <= 0:
                    kinds = [k for k, _ in self.events[start:]]
                    raise AssertionError(f"timed out waiting for an event; saw {kinds[-40:]}")
                self._cond.wait(left)

    def of_prompt(self, prompt_id: str) -> list[tuple[str, object]]:
        """Events about one prompt, in order (binary previews included)."""
        found = []
        with self._cond:
            events = list(self.events)
        for kind, data in events:
            if kind == "binary":
                header = preview_header(data)
                if header["prompt_id"] == prompt_id:
                    found.append((kind, data))
            elif isinstance(data, dict) and data.get("prompt_id") == prompt_id:
                found.append((kind, data))
        return found

    def send(self, message: dict, timeout: float = 10.0) -> None:
        """Send a JSON frame; for a subscription, wait for the server's `subscribed` answer."""
        start = len(self.events)
        asyncio.run_coroutine_threadsafe(self._ws.send_str(json.dumps(message)), self._loop).result(timeout)
        if message.get("type") == "subscribe":
            scope = message["data"]["scope"]
            self.wait_for(lambda k, d: k == "subscribed" and d == {"scope": scope}, timeout, start)

    def close(self):
        if self._closing is not None:
            self._loop.call_soon_threadsafe(self._closing.set)
        self._thread.join(10)


def preview_header(frame: bytes) -> dict:
    n = int.from_bytes(frame[:4], "big")
    return json.loads(frame[4 : 4 + n])


# -- which servers the tests use ---------------------------------------------------------------
# The servers the test modules use, by key: the factory's arguments.
SERVERS = {
    "api": {"name": "api"},
    "token": {"name": "token", "token": "SECRET-token-123"},
    "listen": {"name": "listen", "custom_nodes_dir": None, "extra_args": ("--listen", "0.0.0.0")},
    "restart": {"name": "restart"},
}
# Which fixtures need which of them.
NEEDED_BY = {"api": ("api",), "guarded": ("token", "listen"), "restart_server": ("restart",)}


def ready_server(prelaunched: dict, server, key: str) -> Server:
    """The prelaunched server `key` once it answers (started now if it was not prelaunched)."""
    if key not in prelaunched:
        prelaunched[key] = server(**{**SERVERS[key], "wait": False})
    return prelaunched[key].wait_ready()
