"""Shared fixtures for the API tests: the `server` factory (real `tessera serve` processes on
loopback), the shared `api` server, the `custom_nodes` pack folder and a WebSocket `recorder`.
The harness itself (Server, EventRecorder, helpers) is in tessera_harness.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from tessera_harness import NEEDED_BY, SERVERS, EventRecorder, Server, ready_server, write_custom_nodes

# -- fixtures --------------------------------------------------------------------------------
_STARTED: list[Server] = []  # every server process the `server` factory made this session


@pytest.fixture(autouse=True)
def _no_unhandled_server_errors(request):
    """Fail a test during which any of our servers logged an unhandled exception (a 500)."""
    if not {"server", "prelaunched"} & set(request.fixturenames):
        yield
        return
    marks = {id(s): len(s.log_text()) for s in _STARTED}
    yield
    for s in _STARTED:
        new = s.log_text()[marks.get(id(s), 0) :]
        # aiohttp also logs requests its own parser refuses with a 400 (no Host header); those
        # never reach Tessera's code, so only blocks whose traceback passes through it count
        blocks = new.split("Error handling request")[1:]
        failed = [b for b in blocks if f"{os.sep}tessera{os.sep}" in b]
        assert not failed, f"server {s.root.name} failed a request:\n{failed[0][-4000:]}"


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module (`pytestmark = pytest.mark.usefixtures("one_thread")`): its
    tensors are tiny, and OpenMP threads waiting on each other make CPU-bound tests many times
    slower when another process keeps a core busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def custom_nodes(tmp_path_factory) -> Path:
    """A custom_nodes folder: `testing_pack.py` (Sleep, Fail, PickVAE) and a pack that fails to import."""
    return write_custom_nodes(tmp_path_factory.mktemp("custom_nodes"))


@pytest.fixture(scope="session")
def server(tmp_path_factory, custom_nodes):
    """Factory: `server(name, token=None, root=None, custom_nodes_dir=...)` starts a real
    server process on loopback and returns its `Server` (base URL, folders, HTTP helpers).
    Every process it started is stopped at the end of the session."""
    started: list[Server] = []

    def start(
        name: str = "server",
        *,
        token: str | None = None,
        root: Path | None = None,
        custom_nodes_dir: Path | None | str = "default",
        extra_args: tuple = (),
        wait: bool = True,
    ) -> Server:
        """wait=False launches the process and returns at once: call `wait_ready()` (starts overlap)."""
        folder = root or tmp_path_factory.mktemp(name)
        packs = custom_nodes if custom_nodes_dir == "default" else custom_nodes_dir
        s = Server(folder, packs, token, extra_args)
        started.append(s)
        _STARTED.append(s)
        s.launch()
        return s.wait_ready() if wait else s

    yield start
    for s in started:  # stop them all at once
        s.signal_stop()
    for s in started:
        s.stop()


@pytest.fixture(scope="session")
def prelaunched(request, server) -> dict[str, Server]:
    """Launch at once every server process the selected tests will need, so that their
    interpreter start-ups (importing torch) overlap instead of queueing one after another."""
    wanted = set()
    for item in request.session.items:
        for fixture, keys in NEEDED_BY.items():
            if fixture in getattr(item, "fixturenames", ()):
                wanted.update(keys)
    return {key: server(**{**SERVERS[key], "wait": False}) for key in SERVERS if key in wanted}


@pytest.fixture(scope="session")
def api(prelaunched, server) -> Server:
    """One shared server for the API and security tests (with the test node packs)."""
    return ready_server(prelaunched, server, "api")


@pytest.fixture
def restart_server(prelaunched, server) -> Server:
    """A server of its own, for the test that kills and restarts it."""
    return ready_server(prelaunched, server, "restart")


@pytest.fixture
def recorder(api):
    rec = EventRecorder(api)
    yield rec
    rec.close()


@pytest.fixture
def idle_api(api):
    """The shared server, with an empty queue before and after the test."""
    api.wait_idle()
    yield api
    api.interrupt_all()


def pytest_collection_modifyitems(config, items):
    """Browser tests run last: Playwright's sync API keeps an event loop running in the main
    thread for the whole session, and tests that call `asyncio.run` (third-party clients, the
    fake hub) cannot run after it has started."""
    items.sort(key=lambda item: "browser" in item.path.parts)
