"""Reliability and hostile requests (issue 14): storage faults never kill the worker, budgets
refuse what cannot fit before any work starts, no write follows a symlink, tokens are real,
JSON is strict both ways, wrong methods answer 405, and checking a graph never blocks the
event loop.

Storage faults are injected into a server running in this process (`LocalServer`): while
the "disk" is full, every fsync fails with ENOSPC (file writers and the health probe) and
the queue database raises SQLITE_FULL at each of its write sites.
"""

from __future__ import annotations

import asyncio
import errno
import gzip
import http.client
import io
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest
from PIL import Image
from tessera_harness import PYTHON, Server, free_port, multipart, png_bytes, png_text_chunks, wait_until

from tessera.budgets import Budgets, allocation_issues
from tessera.registry import default_registry
from tessera.workflow import CURRENT_VERSION

STORE_WRITES = ("add", "claim_next", "finish", "probe", "cancel")


def unique() -> str:
    return uuid.uuid4().hex[:10]


def workflow(nodes: dict, **extra) -> dict:
    return {"version": CURRENT_VERSION, "nodes": nodes, **extra}


def sleep_wf(label: str, steps: int = 1, step_seconds: float = 0.0) -> dict:
    return workflow(
        {"1": {"type": "Sleep", "inputs": {"steps": steps, "step_seconds": step_seconds, "label": label}}}
    )


def save_wf(prefix: str, width: int = 8, height: int = 6, batch: int = 1, **extra) -> dict:
    """SolidColor → SaveImage (`batch` is SolidColor's batch_size)."""
    return workflow(
        {
            "1": {"type": "SolidColor", "inputs": {"width": width, "height": height, "batch_size": batch}},
            "2": {
                "type": "SaveImage",
                "inputs": {"images": {"node": "1", "output": "image"}, "filename_prefix": prefix},
            },
        },
        **extra,
    )


def strict_json(data: bytes):
    """Parse as a browser's JSON.parse would: NaN and Infinity are errors."""

    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(data, parse_constant=refuse)


# -- a server in this process, for fault injection -------------------------------------------------
class LocalServer:
    """A TesseraServer on a thread of the test process; `http` is the harness's HTTP client."""

    def __init__(self, root: Path, custom_nodes: Path, **budgets):
        from aiohttp import web

        from tessera.server import ServerConfig, TesseraServer

        self.web = web
        self.http = Server(root)
        self.http.port = free_port()
        config = ServerConfig(
            port=self.http.port,
            models_dir=self.http.models_dir,
            output_dir=self.http.output_dir,
            input_dir=self.http.input_dir,
            user_dir=self.http.user_dir,
            device="cpu",
            **({"budgets": Budgets(**budgets)} if budgets else {}),
        )
        self.server = TesseraServer(config, default_registry(custom_nodes))
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        assert self._ready.wait(30), "the in-process server did not start"

    def _serve(self):
        asyncio.set_event_loop(self.loop)
        self.runner = self.web.AppRunner(self.server.make_app())
        self.loop.run_until_complete(self.runner.setup())
        self.loop.run_until_complete(self.web.TCPSite(self.runner, "127.0.0.1", self.http.port).start())
        self._ready.set()
        self.loop.run_forever()

    def stop(self):
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(30)

    def health(self) -> dict:
        return self.http.get_json("/api/system")


class DiskFull:
    """Switchable storage faults: `files` makes every fsync fail with ENOSPC, `database` makes
    every write of the queue database raise SQLITE_FULL."""

    def __init__(self, monkeypatch, store):
        self.files = self.database = False
        real_fsync = os.fsync

        def fsync(fd):
            if self.files:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_fsync(fd)

        monkeypatch.setattr(os, "fsync", fsync)
        for name in (n for n in STORE_WRITES if hasattr(store, n)):
            real = getattr(store, name)

            def write(*args, _real=real, **kwargs):
                if self.database:
                    raise sqlite3.OperationalError("database or disk is full")
                return _real(*args, **kwargs)

            monkeypatch.setattr(store, name, write)

    def fill(self):
        self.files = self.database = True

    def free(self):
        self.files = self.database = False


@pytest.fixture
def local(tmp_path, custom_nodes):
    s = LocalServer(tmp_path, custom_nodes)
    yield s
    s.stop()


@pytest.fixture
def disk(local, monkeypatch):
    return DiskFull(monkeypatch, local.server.store)


# -- 1. storage faults ---------------------------------------------------------------------------------
def test_full_disk_never_kills_the_worker_and_the_queue_resumes_with_nothing_lost(local, disk):
    api = local.http
    running = api.submit(sleep_wf(unique(), steps=30, step_seconds=0.02))
    wait_until(lambda: api.entry(running)["status"] == "running", message="the first prompt to start")
    queued = [api.submit(save_wf(f"full{unique()}/img")), api.submit(sleep_wf(unique()))]
    disk.fill()  # the running prompt cannot be recorded when it ends

    health = wait_until(lambda: (h := local.health()) and not h["healthy"] and h, message="healthy: false")
    assert "database or disk is full" in health["health"]
    assert api.entry(running)["status"] == "running"  # kept, not lost, while its record cannot be written
    refused = api.request("POST", "/api/prompt", json_body={"workflow": sleep_wf("x")})
    assert refused.status == 503 and "not queued" in refused.json()["error"]
    assert local.server.worker._thread.is_alive()

    disk.free()
    for pid in (running, *queued):
        assert api.wait_status(pid)["status"] == "success", pid
    assert local.health()["healthy"] is True and local.health()["health"] is None
    ref = api.entry(queued[0])["outputs"]["2"]["images"][0]
    assert (api.output_dir / ref["subfolder"] / ref["filename"]).is_file()
    assert api.submit(sleep_wf(unique())) and local.server.worker._thread.is_alive()


def test_a_node_that_hits_a_full_disk_fails_by_name_and_pauses_the_queue(local, disk):
    api = local.http
    disk.files = True  # the output folder is full; the queue database is not
    failed = api.submit(save_wf(f"nospace{unique()}/img"))
    entry = api.wait_status(failed)
    assert entry["status"] == "error"
    (error,) = entry["errors"]
    assert (
        error["node"] == "2" and error["input"] == "images" and "No space left on device" in error["message"]
    )
    health = local.health()
    assert health["healthy"] is False and "No space left on device" in health["health"]
    waiting = api.submit(sleep_wf(unique()))
    assert api.entry(waiting)["status"] == "pending"  # no prompt starts until a test write succeeds
    assert not [p for p in api.output_dir.rglob("*") if p.is_file() and "nospace" in str(p)]  # no half file

    disk.files = False
    assert api.wait_status(waiting)["status"] == "success"
    assert local.health()["healthy"] is True


@pytest.mark.parametrize("site", ["claim_next", "finish"])
def test_each_queue_write_site_survives_a_fault(local, monkeypatch, site):
    api = local.http
    store = local.server.store
    real = getattr(store, site)
    failures = {"left": 3}

    def flaky(*args, **kwargs):
        if failures["left"] > 0:
            failures["left"] -= 1
            raise sqlite3.OperationalError("disk I/O error")
        return real(*args, **kwargs)

    monkeypatch.setattr(store, site, flaky)
    pid = api.submit(sleep_wf(unique()))
    assert api.wait_status(pid)["status"] == "success"
    assert failures["left"] == 0 and local.server.worker._thread.is_alive()
    wait_until(lambda: local.health()["healthy"], message="healthy again")


def test_server_write_routes_answer_503_on_a_full_disk(local, disk):
    api = local.http
    disk.fill()
    body, ctype = multipart("image", "full.png", png_bytes())
    answers = {
        "prompt": api.request("POST", "/api/prompt", json_body={"workflow": sleep_wf("x")}),
        "upload": api.request("POST", "/api/upload/image", body=body, headers={"Content-Type": ctype}),
        "workflow": api.request("PUT", "/api/workflows/full", json_body=sleep_wf("x")),
    }
    for route, r in answers.items():
        assert r.status == 503, (route, r.status, r.body)
        assert "No space left on device" in r.json()["error"] or "disk is full" in r.json()["error"]
    assert not list(api.input_dir.iterdir()) and not list((api.user_dir / "workflows").iterdir())
    disk.free()
    assert api.request("PUT", "/api/workflows/full", json_body=sleep_wf("x")).status == 200


def test_start_on_unusable_storage_is_one_clear_line(tmp_path):
    user = tmp_path / "user"
    (user / "queue.sqlite").mkdir(parents=True)  # the database cannot be opened
    proc = subprocess.run(
        [
            PYTHON,
            "-m",
            "tessera",
            "serve",
            "--port",
            str(free_port()),
            "--user-dir",
            str(user),
            "--output-dir",
            str(tmp_path / "out"),
            "--input-dir",
            str(tmp_path / "in"),
            "--device",
            "cpu",
            "--custom-nodes-dir",
            str(tmp_path / "none"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tessera: cannot start: the queue database"), proc.stderr


# -- 2 and 6. budgets ---------------------------------------------------------------------------------
BUDGET_ARGS = (
    "--max-body-mb",
    "0.05",
    "--max-nodes",
    "50",
    "--max-image-pixels",
    "4096",
    "--max-batch-pixels",
    "8192",
    "--max-embedded-workflow-kb",
    "1",
)


@pytest.fixture(scope="module")
def budgeted(server):
    """A server with small budgets: 51,200-byte bodies, 50 nodes, 4,096 pixels per image, 8,192
    per batch, workflows over 1 KiB referenced from PNGs instead of copied."""
    return server("budgets", extra_args=BUDGET_ARGS)


def history_ids(api) -> list[str]:
    return [e["prompt_id"] for e in api.get_json("/api/history?limit=10000")["items"]]


def test_request_body_over_the_cap_is_413(budgeted):
    before = history_ids(budgeted)
    big = save_wf("x", ui={"notes": "x" * 60_000})
    r = budgeted.request("POST", "/api/prompt", json_body={"workflow": big})
    assert r.status == 413 and "larger than 52,428 bytes" in r.json()["error"]
    # the same body sent in chunks, without a Content-Length, is counted as it arrives
    conn = http.client.HTTPConnection("127.0.0.1", budgeted.port, timeout=20)
    try:
        data = json.dumps({"workflow": big}).encode()
        conn.request(
            "POST",
            "/api/prompt",
            body=iter([data[i : i + 4096] for i in range(0, len(data), 4096)]),
            headers={"Host": budgeted.host, "Content-Type": "application/json"},
            encode_chunked=True,
        )
        response = conn.getresponse()
        assert response.status == 413 and "larger than" in json.loads(response.read())["error"]
    finally:
        conn.close()
    assert history_ids(budgeted) == before


def test_node_count_over_the_cap_is_refused_before_validation(budgeted):
    nodes = {str(i): {"type": "NoSuchType"} for i in range(51)}
    r = budgeted.request("POST", "/api/prompt", json_body={"workflow": workflow(nodes)})
    assert r.status == 400
    (issue,) = r.json()["errors"]  # not 51 "unknown node type" issues: the graph was never walked
    assert "51 nodes, over the limit of 50" in issue["reason"] and "--max-nodes" in issue["reason"]


@pytest.mark.parametrize(
    "size, where, words",
    [
        ((100, 100, 1), "width", "over the limit of 4,096 per image"),
        ((64, 64, 3), "batch_size", "over the limit of 8,192 per batch"),
    ],
)
def test_pixel_budgets_name_the_node_and_input(budgeted, size, where, words):
    w, h, batch = size
    before = history_ids(budgeted)
    r = budgeted.request("POST", "/api/prompt", json_body={"workflow": save_wf("px", w, h, batch)})
    assert r.status == 400
    (issue,) = r.json()["errors"]
    assert issue["node"] == "1" and issue["input"] == where and words in issue["reason"]
    assert history_ids(budgeted) == before


def test_allocations_that_cannot_fit_in_free_memory_are_refused():
    registry = default_registry(None)
    wf = save_wf("mem", 2048, 2048, 16)
    roomy = Budgets(max_image_pixels=1 << 30, max_batch_pixels=1 << 40)
    (issue,) = allocation_issues(wf, registry, roomy, free=1 << 30)
    assert (
        issue.node == "1"
        and issue.input == "width"
        and "more than the 1.0 GiB of free memory" in issue.reason
    )
    assert allocation_issues(wf, registry, roomy, free=64 << 30) == []
    # a latent counts as the images it becomes
    latent = workflow(
        {"1": {"type": "EmptyLatent", "inputs": {"width": 4096, "height": 4096, "batch_size": 8}}}
    )
    assert [i.node for i in allocation_issues(latent, registry, roomy, free=1 << 30)] == ["1"]


def test_decompression_bombs_are_refused_before_decoding(tmp_path, budgeted):
    from tessera.images import open_image

    bomb = tmp_path / "bomb.png"
    Image.new("1", (12000, 12000)).save(bomb)  # ~20 KB that decodes to 144 megapixels
    assert bomb.stat().st_size < 100_000
    with pytest.raises(ValueError, match="144,000,000 pixels|decompression bomb"):
        open_image(bomb)
    # through the server, with its 4,096-pixel budget: refused when queued, naming node and input,
    # and refused as an upload
    name = f"big_{unique()}.png"
    (budgeted.input_dir / name).write_bytes(png_bytes((100, 100)))
    wf = workflow(
        {
            "1": {"type": "LoadImage", "inputs": {"image": name}},
            "2": {"type": "PreviewImage", "inputs": {"images": {"node": "1", "output": "image"}}},
        }
    )
    r = budgeted.request("POST", "/api/prompt", json_body={"workflow": wf})
    assert r.status == 400
    (issue,) = r.json()["errors"]
    assert issue["node"] == "1" and issue["input"] == "image" and "over the limit of 4,096" in issue["reason"]
    body, ctype = multipart("image", "big.png", png_bytes((100, 100)))
    r = budgeted.request("POST", "/api/upload/image", body=body, headers={"Content-Type": ctype})
    assert r.status == 413 and "over the limit of 4,096" in r.json()["error"]


def test_a_large_workflow_is_not_copied_into_every_image(budgeted):
    label = unique()
    wf = save_wf(f"embed{label}/img", 8, 6, batch=4, ui={"notes": "n" * 5000})
    pid = budgeted.submit(wf)
    entry = budgeted.wait_status(pid)
    assert entry["status"] == "success" and entry["workflow"] == wf  # kept once, in the history
    refs = entry["outputs"]["2"]["images"]
    assert len(refs) == 4
    for ref in refs:
        data = (budgeted.output_dir / ref["subfolder"] / ref["filename"]).read_bytes()
        chunks = png_text_chunks(data)
        assert "workflow" not in chunks and chunks["tessera_prompt"] == pid
        assert len(data) < 2000
    small = save_wf(f"embed{label}/small")
    ref = budgeted.wait_status(budgeted.submit(small))["outputs"]["2"]["images"][0]
    assert (
        json.loads(
            png_text_chunks((budgeted.output_dir / ref["subfolder"] / ref["filename"]).read_bytes())[
                "workflow"
            ]
        )
        == small
    )


def test_output_quota_refuses_new_prompts_with_409(tmp_path, custom_nodes):
    local = LocalServer(tmp_path, custom_nodes, output_quota_bytes=100)
    try:
        api = local.http
        assert api.wait_status(api.submit(save_wf("quota/img")))["status"] == "success"  # now over 100 bytes
        r = api.request("POST", "/api/prompt", json_body={"workflow": save_wf("quota/img")})
        assert r.status == 409 and "quota" in r.json()["error"] and "--output-quota-gb" in r.json()["error"]
        assert len(list((api.output_dir / "quota").iterdir())) == 1
    finally:
        local.stop()


# -- 3. no symlink is followed ----------------------------------------------------------------------
@pytest.fixture
def outside(api):
    """A folder outside the server's folders, with a file a planted link points at."""
    folder = api.root / f"outside_{unique()}"
    folder.mkdir()
    (folder / "victim.txt").write_text("UNTOUCHED")
    yield folder
    # the shared server's folders get back to how they were: no planted link stays behind
    for served in (api.output_dir, api.input_dir, api.user_dir, api.models_dir):
        for path in list(served.rglob("*")):
            if path.is_symlink() and str(os.readlink(path)).startswith(str(folder)):
                path.unlink()
    shutil.rmtree(folder)


def test_save_image_never_writes_through_a_planted_link(idle_api, outside):
    api = idle_api
    prefix = f"plant{unique()}"
    for name in (f"{prefix}_00001.png.part", f".{prefix}_00001.png.part"):
        (api.output_dir / name).symlink_to(outside / "victim.txt")
    entry = api.wait_status(api.submit(save_wf(prefix)))
    assert entry["status"] == "success"
    ref = entry["outputs"]["2"]["images"][0]
    path = api.output_dir / ref["filename"]
    assert path.is_file() and not path.is_symlink()
    assert (outside / "victim.txt").read_text() == "UNTOUCHED"


def test_save_image_prefix_through_a_linked_folder_creates_nothing_outside(idle_api, outside):
    api = idle_api
    link = f"linkdir{unique()}"
    (api.output_dir / link).symlink_to(outside)
    try:
        entry = api.wait_status(api.submit(save_wf(f"{link}/made/img")))
        assert entry["status"] == "error"
        (error,) = entry["errors"]
        assert (
            error["node"] == "2"
            and error["input"] == "filename_prefix"
            and "leaves its folder" in error["message"]
        )
        assert sorted(p.name for p in outside.iterdir()) == ["victim.txt"]
    finally:
        (api.output_dir / link).unlink()


def test_upload_never_writes_through_a_planted_link(idle_api, outside):
    api = idle_api
    stem = f"up{unique()}"
    for name in (f"{stem}.png", f"{stem}.png.part", f"{stem}_2.png.part"):
        (api.input_dir / name).symlink_to(outside / "victim.txt")
    data = png_bytes((3, 3), (9, 9, 9))
    body, ctype = multipart("image", f"{stem}.png", data)
    r = api.request("POST", "/api/upload/image", body=body, headers={"Content-Type": ctype})
    assert r.status == 200
    stored = api.input_dir / r.json()["name"]
    assert stored.name != f"{stem}.png" and stored.read_bytes() == data and not stored.is_symlink()
    assert (outside / "victim.txt").read_text() == "UNTOUCHED"


def test_saved_workflows_never_write_through_or_read_a_link(idle_api, outside):
    api = idle_api
    folder = api.user_dir / "workflows"
    name = f"wf{unique()}"
    (folder / f"{name}.json.part").symlink_to(outside / "victim.txt")
    assert api.request("PUT", f"/api/workflows/{name}", json_body=sleep_wf("x")).status == 200
    assert (outside / "victim.txt").read_text() == "UNTOUCHED"
    assert not (folder / f"{name}.json").is_symlink()
    # a saved name that is a link out of the folder: 400 for every method, nothing touched
    evil = f"evil{unique()}"
    (folder / f"{evil}.json").symlink_to(outside / "victim.txt")
    for method, body in (("GET", None), ("PUT", sleep_wf("x")), ("DELETE", None)):
        r = api.request(method, f"/api/workflows/{evil}", json_body=body)
        assert r.status == 400 and "leaves its folder" in r.json()["error"], (method, r.status, r.body)
    assert (outside / "victim.txt").read_text() == "UNTOUCHED" and (folder / f"{evil}.json").is_symlink()


def test_models_lists_only_files_the_loader_accepts(api, outside):
    (outside / "outside.safetensors").write_bytes(b"x")
    link = api.models_dir / "vae" / f"linked{unique()}.safetensors"
    link.parent.mkdir(exist_ok=True)
    link.symlink_to(outside / "outside.safetensors")
    try:
        assert link.name not in api.get_json("/api/models")["vae"]
    finally:
        link.unlink()


# -- 4. tokens ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("token", ["", "short-token"])
def test_empty_or_short_tokens_are_refused_at_start(tmp_path, token):
    proc = subprocess.run(
        [
            PYTHON,
            "-m",
            "tessera",
            "serve",
            "--port",
            str(free_port()),
            "--token",
            token,
            "--user-dir",
            str(tmp_path / "user"),
            "--output-dir",
            str(tmp_path / "out"),
            "--input-dir",
            str(tmp_path / "in"),
            "--device",
            "cpu",
            "--custom-nodes-dir",
            str(tmp_path / "none"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert (
        proc.stderr.strip()
        == f"tessera: the access token must have at least 16 characters (got {len(token)})"
    )


# -- 5 and 7. strict JSON, 400s, 405s ------------------------------------------------------------------
NON_STANDARD = {
    "NaN": b'{"workflow": {"version": 1, "nodes": {"1": {"type": "Sleep", "inputs": {"step_seconds": NaN}}}}}',
    "Infinity": b'{"workflow": {"version": 1, "nodes": {"1": {"type": "Sleep", "inputs": {"step_seconds": Infinity}}}}}',
    "-Infinity": b'{"workflow": {"version": 1, "nodes": {"1": {"type": "Sleep", "inputs": {"step_seconds": -Infinity}}}}}',
    "overflowing float": b'{"workflow": {"version": 1, "nodes": {"1": {"type": "Sleep", "inputs": {"step_seconds": 1e999}}}}}',
    "980 levels": b'{"workflow": ' + b"[" * 980 + b"]" * 980 + b"}",
    "5,000-digit integer": b'{"workflow": {"version": 1, "nodes": {"1": {"type": "Sleep", "inputs": {"steps": '
    + b"9" * 5000
    + b"}}}}}",
    "invalid UTF-8": b'{"workflow": "\xff\xfe"}',
}


@pytest.mark.parametrize("case", list(NON_STANDARD))
def test_non_standard_json_is_refused_with_400(idle_api, case):
    api = idle_api
    before = history_ids(api)
    for route in ("/api/prompt", "/api/validate"):
        r = api.request("POST", route, body=NON_STANDARD[case], headers={"Content-Type": "application/json"})
        assert r.status == 400, (case, route, r.status, r.body[:300])
        assert "not valid JSON" in r.json()["error"]
    assert history_ids(api) == before
    for response in (api.get("/api/history?limit=10000"), api.get("/api/queue")):
        strict_json(response.body)


def test_non_finite_float_constants_are_invalid_anywhere():
    from tessera.workflow import InvalidWorkflow, validate

    registry = default_registry(None)
    wf = workflow(
        {
            "1": {"type": "SolidColor", "inputs": {"red": float("nan")}},
            "2": {"type": "SaveImage", "inputs": {"images": {"node": "1", "output": "image"}}},
        }
    )
    with pytest.raises(InvalidWorkflow) as caught:
        validate(wf, registry)
    (issue,) = caught.value.issues
    assert (issue.node, issue.input) == ("1", "red") and "not a finite number" in issue.reason


def test_undecodable_content_encoding_is_400(idle_api):
    api = idle_api
    for body in (b"\x1f\x8b this is not gzip", gzip.compress(b"{broken json")):
        r = api.request(
            "POST",
            "/api/prompt",
            body=body,
            headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
        )
        assert r.status == 400, r.body
        assert "error" in r.json()
    ok = api.request(
        "POST",
        "/api/validate",
        body=gzip.compress(json.dumps({"workflow": sleep_wf("gz")}).encode()),
        headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
    )
    assert ok.status == 200 and ok.json() == {"valid": True}


@pytest.mark.parametrize(
    "method, path, allowed",
    [
        ("POST", "/api/nodes", "GET, HEAD"),
        ("PUT", "/api/prompt", "POST"),
        ("DELETE", "/api/system", "GET, HEAD"),
        ("POST", "/api/history/abc", "GET, HEAD"),
    ],
)
def test_wrong_methods_answer_405_with_allow(api, method, path, allowed):
    r = api.request(method, path, json_body={})
    assert r.status == 405, (r.status, r.body)
    assert set(r.headers["Allow"].split(", ")) >= set(allowed.split(", "))
    assert method in r.json()["error"]


def test_openapi_lists_every_status_code_a_route_answers(api):
    paths = api.get_json("/api/openapi.json")["paths"]
    expect = {
        ("/api/prompt", "post"): {"200", "400", "401", "403", "409", "413", "503"},
        ("/api/queue/{prompt_id}", "delete"): {"404", "409"},
        ("/api/history/{prompt_id}", "get"): {"404"},
        ("/api/workflows/{name}", "get"): {"404", "422"},
        ("/api/upload/image", "post"): {"413"},
        ("/ws", "get"): {"101"},
    }
    for (path, method), codes in expect.items():
        assert codes <= set(paths[path][method]["responses"]), (path, method)


# -- 9. checking a graph runs off the event loop ------------------------------------------------------
def test_a_slow_validation_does_not_block_other_requests(api):
    gate = f"gate_{unique()}"
    answer = {}
    wf = workflow({"1": {"type": "Gate", "inputs": {"gate": gate}}})
    thread = threading.Thread(
        target=lambda: answer.update(
            r=api.request("POST", "/api/validate", json_body={"workflow": wf}, timeout=90)
        )
    )
    thread.start()
    try:
        for _ in range(5):  # answered while the validation waits on its gate
            assert api.get("/api/queue", timeout=10).status == 200
        assert thread.is_alive()
    finally:
        (api.input_dir / gate).write_text("open")
        thread.join(90)
    assert answer["r"].status == 200 and answer["r"].json() == {"valid": True}


def test_ten_thousand_nodes_validate_within_the_default_cap(api):
    nodes = {str(i): {"type": "SolidColor", "inputs": {"width": 8, "height": 8}} for i in range(9_999)}
    nodes["out"] = {"type": "PreviewImage", "inputs": {"images": {"node": "0", "output": "image"}}}
    r = api.request("POST", "/api/validate", json_body={"workflow": workflow(nodes)}, timeout=120)
    assert r.status == 200, r.body[:300]
    nodes["extra"] = {"type": "SolidColor"}
    r = api.request("POST", "/api/validate", json_body={"workflow": workflow(nodes)})
    assert r.status == 400 and "10,001 nodes" in r.json()["errors"][0]["reason"]


def test_png_reader_names_the_prompt_of_an_unembedded_workflow(tmp_path):
    from PIL import PngImagePlugin

    from tessera.images import read_workflow_from_png

    info = PngImagePlugin.PngInfo()
    info.add_text("tessera_prompt", "abc123")
    buffer = io.BytesIO()
    Image.new("RGB", (2, 2)).save(buffer, format="PNG", pnginfo=info)
    (tmp_path / "ref.png").write_bytes(buffer.getvalue())
    with pytest.raises(ValueError, match="history of prompt abc123"):
        read_workflow_from_png(tmp_path / "ref.png")


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
