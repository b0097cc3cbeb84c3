"""Browser tests: a real `tessera serve` process and Debian's Chromium driven by Playwright.

Needs `apt-get install -y chromium`, `npm ci --prefix web` and `pip install playwright`
(no browser download; pytest-playwright is not needed). A missing requirement fails the
tests with the command that installs it: a skipped browser test would hide a broken editor.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from tessera_harness import TESTING_PACK
from tiny_models import write_tiny_models

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("TESSERA_CHROMIUM", "/usr/bin/chromium")
LITEGRAPH = ROOT / "web" / "node_modules" / "@comfyorg" / "litegraph" / "dist" / "litegraph.es.js"
SCREENS = ROOT / "artifacts" / "screens"
VIEWPORT = {"width": 1280, "height": 800}
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _missing() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "pip install playwright"
    if not Path(CHROMIUM).exists():
        return f"apt-get install -y chromium ({CHROMIUM} not found)"
    if not LITEGRAPH.exists():
        return "npm ci --prefix web (web/node_modules is missing)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, root: Path):
        self.root = root
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.models = root / "models"
        self.output = root / "out"
        self.log = root / "server.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        cmd = [
            sys.executable,
            "-m",
            "tessera",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--models-dir",
            str(self.models),
            "--output-dir",
            str(self.output),
            "--input-dir",
            str(self.root / "in"),
            "--user-dir",
            str(self.root / "user"),
            "--device",
            "cpu",
            "--custom-nodes-dir",
            str(self.root / "custom_nodes"),
        ]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            cmd, cwd=self.root, env=env, stdout=self.log.open("w"), stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tessera serve exited:\n{self.log.read_text()}")
            try:
                with urllib.request.urlopen(f"{self.url}/api/nodes", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"tessera serve did not answer in 60 s:\n{self.log.read_text()}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # a clean aiohttp shutdown
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture(scope="session")
def editor_server(tmp_path_factory):
    """One `tessera serve` process for all browser tests, with tiny models in its models folder."""
    if _missing():
        pytest.fail(f"browser tests need: {_missing()}")
    root = tmp_path_factory.mktemp("tessera-browser")
    write_tiny_models(root / "models")
    # the API tests' Sleep node: a run that lasts as long as a test needs (reload mid-run, queue)
    (root / "custom_nodes").mkdir()
    (root / "custom_nodes" / "testing_pack.py").write_text(TESTING_PACK)
    srv = Server(root)
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def chromium_browser():
    """Debian's Chromium, headless, started once for the session."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


class ConsoleErrors:
    """Console errors and uncaught exceptions of a page; a test may allow an expected one."""

    def __init__(self):
        self.seen: list[tuple[str, str]] = []  # (text, url)
        self.allowed: list[tuple[str, str]] = []

    def allow(self, url_part: str, text_part: str) -> None:
        """Allows errors whose source URL contains url_part and text contains text_part
        (the browser logs every 4xx answer as a console error, also the expected ones)."""
        self.allowed.append((url_part, text_part))

    def unexpected(self) -> list[str]:
        return [
            f"{text} ({url})"
            for text, url in self.seen
            if not any(u in url and t in text for u, t in self.allowed)
        ]


@pytest.fixture
def console_errors():
    return ConsoleErrors()


@pytest.fixture
def editor(chromium_browser, editor_server, console_errors):
    """The editor in a fresh browser context (empty storage) at 1280x800, loaded and ready;
    fails the test on any console error or uncaught exception in the page."""
    context = chromium_browser.new_context(viewport=VIEWPORT, accept_downloads=True)
    page = context.new_page()

    def on_console(message):
        if message.type == "error":
            console_errors.seen.append((message.text, (message.location or {}).get("url", "")))

    page.on("console", on_console)
    page.on("pageerror", lambda e: console_errors.seen.append((f"uncaught: {e}", "")))
    page.set_default_timeout(15_000)
    page.goto(editor_server.url + "/")
    page.wait_for_selector("body[data-ready=true]")
    yield page
    context.close()
    unexpected = console_errors.unexpected()
    assert not unexpected, "console errors:\n" + "\n".join(unexpected)


@pytest.fixture(scope="session")
def screens():
    SCREENS.mkdir(parents=True, exist_ok=True)
    return SCREENS


def pytest_configure(config):
    # Playwright uses Debian's Chromium; it must never download a browser of its own.
    os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
