"""Request guards and file-name confinement, against a real server process on loopback:
CSRF (Origin / Sec-Fetch-Site), DNS rebinding (Host), the access token, and path traversal
through /api/view, upload file names and saved-workflow names."""

from __future__ import annotations

import base64
import json
import os
import re
import uuid
from urllib.parse import quote

import pytest
from tessera_harness import EventRecorder, multipart, png_bytes, ready_server, snapshot, wait_until

SECRET_COLOR = (13, 37, 171)


def sleep_wf(label: str, steps: int = 1, step_seconds: float = 0.0) -> dict:
    return {
        "version": 1,
        "nodes": {
            "1": {"type": "Sleep", "inputs": {"steps": steps, "step_seconds": step_seconds, "label": label}}
        },
    }


def history_state(api) -> list[tuple[str, str]]:
    return [(e["prompt_id"], e["status"]) for e in api.get_json("/api/history?limit=10000")["items"]]


def upload_request(api, filename, data, headers=None):
    body, ctype = multipart("image", filename, data)
    return api.request(
        "POST", "/api/upload/image", body=body, headers={"Content-Type": ctype, **(headers or {})}
    )


def ws_handshake(api, path="/ws", headers=None, host=True):
    key = base64.b64encode(os.urandom(16)).decode()
    return api.request(
        "GET",
        path,
        host=host,
        headers={
            "Connection": "Upgrade",
            "Upgrade": "websocket",
            "Sec-WebSocket-Key": key,
            "Sec-WebSocket-Version": "13",
            **(headers or {}),
        },
    )


# -- CSRF --------------------------------------------------------------------------------------
ATTACKS = {
    "foreign Origin": lambda api: {"Origin": "http://evil.example"},
    "Origin null": lambda api: {"Origin": "null"},
    "Sec-Fetch-Site cross-site": lambda api: {"Sec-Fetch-Site": "cross-site"},
    "Origin on another port": lambda api: {"Origin": f"http://127.0.0.1:{api.port + 1}"},
    "look-alike Origin": lambda api: {"Origin": f"http://127.0.0.1:{api.port}.evil.example"},
    "https Origin of another host": lambda api: {"Origin": "https://localhost.evil.example"},
}


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_cross_site_writes_are_refused_and_change_nothing(idle_api, attack):
    api = idle_api
    headers = ATTACKS[attack](api)
    keep = f"csrf_keep_{uuid.uuid4().hex[:8]}"
    assert api.request("PUT", f"/api/workflows/{keep}", json_body=sleep_wf("keep")).status == 200
    before_history, before_in = history_state(api), snapshot(api.input_dir)
    before_workflows = snapshot(api.user_dir / "workflows")
    label = uuid.uuid4().hex
    refused = [
        api.request("POST", "/api/prompt", json_body={"workflow": sleep_wf(label)}, headers=headers),
        api.request("POST", "/api/validate", json_body={"workflow": sleep_wf(label)}, headers=headers),
        api.request("PUT", "/api/workflows/csrf_new", json_body=sleep_wf(label), headers=headers),
        api.request("DELETE", f"/api/workflows/{keep}", headers=headers),
        upload_request(api, f"csrf_{label}.png", png_bytes(), headers=headers),
        api.request("POST", "/api/interrupt", json_body={}, headers=headers),
        api.request("DELETE", "/api/queue/whatever", headers=headers),
        ws_handshake(api, headers=headers),
    ]
    for r in refused:
        assert r.status == 403, (r.status, r.body)
        assert "refused" in r.json()["error"]
    assert history_state(api) == before_history
    assert api.get_json("/api/queue") == {"running": [], "pending": []}
    assert snapshot(api.input_dir) == before_in
    assert snapshot(api.user_dir / "workflows") == before_workflows
    assert f"start {label}" not in api.sleep_log()
    assert api.request("DELETE", f"/api/workflows/{keep}").status == 200


def test_cross_site_cannot_cancel_or_interrupt(idle_api):
    api = idle_api
    gate = api.submit(sleep_wf(uuid.uuid4().hex, steps=3000, step_seconds=0.01))
    api.wait_status(gate, ("running",))
    pending = api.submit(sleep_wf(uuid.uuid4().hex))
    for make in ATTACKS.values():
        headers = make(api)
        assert api.request("DELETE", f"/api/queue/{pending}", headers=headers).status == 403
        assert (
            api.request("POST", "/api/interrupt", json_body={"prompt_id": gate}, headers=headers).status
            == 403
        )
    assert api.entry(gate)["status"] == "running" and api.entry(pending)["status"] == "pending"
    # the same requests from the server's own page succeed
    own = {"Origin": api.origin, "Sec-Fetch-Site": "same-origin"}
    assert api.request("DELETE", f"/api/queue/{pending}", headers=own).json() == {"cancelled": pending}
    assert api.request("POST", "/api/interrupt", json_body={"prompt_id": gate}, headers=own).json() == {
        "interrupted": gate
    }
    assert api.wait_status(gate)["status"] == "interrupted"


def test_same_origin_writes_are_allowed(idle_api):
    api = idle_api
    own = {"Origin": api.origin, "Sec-Fetch-Site": "same-origin"}
    pid = api.request(
        "POST", "/api/prompt", json_body={"workflow": sleep_wf(uuid.uuid4().hex)}, headers=own
    ).json()["prompt_id"]
    assert api.wait_status(pid)["status"] == "success"
    name = f"own_{uuid.uuid4().hex[:8]}"
    assert api.request("PUT", f"/api/workflows/{name}", json_body=sleep_wf("x"), headers=own).status == 200
    assert api.request("DELETE", f"/api/workflows/{name}", headers=own).status == 200
    r = upload_request(api, f"{name}.png", png_bytes(), headers=own)
    assert r.status == 200 and (api.input_dir / r.json()["name"]).is_file()
    assert ws_handshake(api, headers={"Origin": api.origin}).status == 101
    # a page on another site may send a GET, but is never granted reading it through CORS
    r = api.get("/api/queue", headers={"Origin": "http://evil.example"})
    assert r.status == 200 and "Access-Control-Allow-Origin" not in r.headers


# -- Host header (DNS rebinding) ----------------------------------------------------------------
@pytest.mark.parametrize(
    "host",
    [
        "evil.com",
        "evil.com:{port}",
        "127.0.0.1:{other}",
        "localhost.evil.com:{port}",
        "127.0.0.1",
        "attacker.example:80",
        "",
        None,
    ],
)
def test_foreign_host_is_refused(idle_api, host):
    api = idle_api
    headers = {"Host": host.format(port=api.port, other=api.port + 1)} if host is not None else {}
    for path in ("/api/system", "/api/history", "/", "/api/openapi.json"):
        r = api.request("GET", path, headers=headers, host=host is not None)
        assert r.status in (400, 403), (path, r.status)
        assert b"versions" not in r.body and b"items" not in r.body
    assert ws_handshake(api, headers=headers, host=host is not None).status in (400, 403)
    # a rebound page's POST carries a matching Origin; it is still refused
    before = history_state(api)
    label = uuid.uuid4().hex
    origin = {"Origin": f"http://{headers['Host']}"} if headers.get("Host") else {}
    r = api.request(
        "POST",
        "/api/prompt",
        json_body={"workflow": sleep_wf(label)},
        headers={**headers, **origin},
        host=host is not None,
    )
    assert r.status in (400, 403)
    assert history_state(api) == before and f"start {label}" not in api.sleep_log()


@pytest.mark.parametrize("host", ["127.0.0.1:{port}", "localhost:{port}", "LOCALHOST:{port}", "[::1]:{port}"])
def test_own_host_names_are_accepted(api, host):
    r = api.get("/api/system", headers={"Host": host.format(port=api.port)})
    assert r.status == 200 and "versions" in r.json()


# -- access token ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def guarded(prelaunched, server):
    """Two servers: `--host 127.0.0.1 --token SECRET-token-123`, and `--listen 0.0.0.0` with no token."""
    both = {key: ready_server(prelaunched, server, key) for key in ("token", "listen")}
    yield both
    for s in both.values():
        s.signal_stop()


@pytest.fixture
def token_server(guarded):
    return guarded["token"]


def test_token_is_required(token_server):
    s = token_server
    no = {"Authorization": None}
    r = s.get("/api/system", headers=no)
    assert r.status == 401 and "token" in r.json()["error"]
    r = s.get("/", headers=no)
    assert r.status == 401 and b"token" in r.body
    for wrong in ("Bearer WRONG", "Bearer ", "Basic U0VDUkVU", "SECRET-token-1234", "Bearer SECRET-token-12"):
        assert s.get("/api/system", headers={"Authorization": wrong}).status == 401, wrong
    assert s.get("/api/system?token=WRONG", headers=no).status == 401
    assert "Set-Cookie" not in s.get("/api/system?token=WRONG", headers=no).headers
    assert s.get("/api/system", headers={"Authorization": "Bearer SECRET-token-123"}).status == 200
    assert s.get("/api/system", headers={**no, "Cookie": "tessera_token=WRONG"}).status == 401
    assert ws_handshake(s, headers=no).status == 401


def test_query_token_sets_a_cookie(token_server):
    s = token_server
    no = {"Authorization": None}
    r = s.get("/?token=SECRET-token-123", headers=no)
    assert r.status == 200
    cookie = r.headers["Set-Cookie"]
    assert cookie.startswith("tessera_token=SECRET-token-123")
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    # the cookie alone now authorises the API and the WebSocket
    jar = {"Cookie": "tessera_token=SECRET-token-123", **no}
    assert s.get("/api/system", headers=jar).status == 200
    assert ws_handshake(s, headers=jar).status == 101
    assert ws_handshake(s, path="/ws?token=SECRET-token-123", headers=no).status == 101


def test_token_guards_writes_and_keeps_origin_checks(token_server):
    s = token_server
    label = uuid.uuid4().hex
    r = s.request(
        "POST", "/api/prompt", json_body={"workflow": sleep_wf(label)}, headers={"Authorization": None}
    )
    assert r.status == 401
    assert s.get_json("/api/history")["items"] == []
    # the right token does not excuse a cross-site request
    r = s.request(
        "POST",
        "/api/prompt",
        json_body={"workflow": sleep_wf(label)},
        headers={"Origin": "http://evil.example"},
    )
    assert r.status == 403 and s.get_json("/api/history")["items"] == []
    rec = EventRecorder(s)  # Bearer header on the WebSocket
    try:
        pid = s.submit(sleep_wf(label))
        rec.wait_for(lambda k, d: k == "execution_success" and d["prompt_id"] == pid)
    finally:
        rec.close()
    assert s.entry(pid)["status"] == "success"


def test_listen_on_all_interfaces_generates_a_token(guarded):
    s = guarded["listen"]
    printed = wait_until(
        lambda: re.search(r"\?token=([A-Za-z0-9_\-]+)", s.log_text()), 10, message="the token line"
    )
    token = printed.group(1)
    assert len(token) >= 24
    assert s.get("/api/system").status == 401
    assert s.get("/api/system", headers={"Authorization": "Bearer "}).status == 401
    assert s.get("/api/system", headers={"Authorization": f"Bearer {token}"}).status == 200
    # any Host may reach a server listening on all interfaces, so the token is what guards it
    assert s.get("/api/system", headers={"Host": "evil.com"}).status == 401
    assert s.request("POST", "/api/prompt", json_body={"workflow": sleep_wf("x")}).status == 401
    assert s.get("/api/history", headers={"Authorization": f"Bearer {token}"}).json()["items"] == []


# -- path traversal --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trap(api):
    """Secrets outside the server's folders, and symlinks inside them that point at the secrets."""
    root = api.root
    secret = png_bytes((5, 5), SECRET_COLOR)
    (root / "secret.png").write_bytes(secret)
    (root / "secret.txt").write_text("TOP-SECRET-TEXT")
    (root / "user" / "sentinel.json").write_text(json.dumps(sleep_wf("SENTINEL-WORKFLOW")))
    for folder in (api.output_dir, api.input_dir):
        for name, target in (("leak.png", root / "secret.png"), ("leakdir", root)):
            if not (folder / name).is_symlink():
                (folder / name).symlink_to(target)
    (api.output_dir / "notes.txt").write_text("not an image")
    yield {"secret": secret, "root": root}
    for folder in (api.output_dir, api.input_dir):
        for name in ("leak.png", "leakdir"):
            (folder / name).unlink()


def secret_leaked(body: bytes, trap) -> bool:
    return (
        trap["secret"] in body
        or b"TOP-SECRET-TEXT" in body
        or b"SENTINEL-WORKFLOW" in body
        or b"root:x:0:0" in body
    )


VIEW_QUERIES = {
    "dot-dot": "filename=..",
    "dot-dot file": "filename=../secret.png",
    "two levels up": "filename=../../secret.png",
    "absolute path": "filename=/etc/passwd",
    "absolute path to the secret": "filename={root}/secret.png",
    "percent-encoded dot-dot": "filename=%2e%2e%2fsecret.png",
    "double-encoded dot-dot": "filename=%252e%252e%252fsecret.png",
    "backslash": "filename=..%5Csecret.png",
    "NUL byte": "filename=secret.png%00.png",
    "NUL byte in subfolder": "subfolder=..%00&filename=secret.png",
    "Windows absolute path": "filename=C:%5Csecret.png",
    "Windows drive with slash": "filename=C:/secret.png",
    "home folder": "filename=~/secret.png",
    "symlink to a file outside": "filename=leak.png",
    "symlink to a folder outside": "subfolder=leakdir&filename=secret.png",
    "subfolder dot-dot": "subfolder=..&filename=secret.png",
    "subfolder absolute": "subfolder={root}&filename=secret.png",
    "encoded slashes": "filename=x%2F..%2F..%2Fsecret.png",
    "encoded slashes in subfolder": "subfolder=a%2F..%2F..&filename=secret.png",
    "dot segment": "subfolder=.&filename=leak.png",
    "over-long name": "filename=" + "a" * 5000 + ".png",
    "over-long component": "filename=" + "a" * 300 + ".png",
    "very deep path": "filename=" + "a/" * 2000 + "x.png",
    "type is a path": "type=..%2F..&filename=secret.png",
    "input dot-dot": "type=input&filename=../secret.png",
    "input symlink": "type=input&filename=leak.png",
    "input symlinked folder": "type=input&subfolder=leakdir&filename=secret.png",
    "not an image": "filename=notes.txt",
    "secret text": "filename=../secret.txt",
}


@pytest.mark.parametrize("case", list(VIEW_QUERIES))
def test_view_refuses_traversal(api, trap, case):
    query = VIEW_QUERIES[case].format(root=quote(str(trap["root"]), safe=""))
    r = api.get(f"/api/view?{query}")
    # decoded once, the double-encoded name is a plain (missing) file name in output/: 404
    assert r.status == (404 if case == "double-encoded dot-dot" else 400), (case, r.status, r.body[:200])
    assert "error" in r.json()
    assert not secret_leaked(r.body, trap)


@pytest.mark.parametrize(
    "path",
    [
        "/../secret.png",
        "/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        "/..%2F..%2F..%2Fetc%2Fpasswd",
        "/js/..%2F..%2F..%2Fsecret.png",
        "//etc/passwd",
        "/%2Fetc%2Fpasswd",
    ],
)
def test_static_files_refuse_traversal(api, trap, path):
    r = api.get(path)
    assert r.status == 404, (path, r.status)
    assert not secret_leaked(r.body, trap)


UPLOAD_NAMES = [
    "../escape.png",
    "../../escape.png",
    "..\\..\\escape.png",
    "{root}/abs_escape.png",
    "C:\\escape.png",
    "..",
    "%2e%2e%2fescape.png",
    "in/../../escape.png",
    "x" * 1000 + ".png",
    b"nul\x00escape.png",
    "/etc/passwd",
    "leakdir/escape.png",
    "leak.png",
    "....png",
    ".hidden.png",
]


@pytest.mark.parametrize("name", UPLOAD_NAMES, ids=lambda n: repr(n)[:40])
def test_upload_names_stay_in_the_input_folder(idle_api, trap, name):
    api = idle_api
    if isinstance(name, str):
        name = name.format(root=trap["root"])
    outside = snapshot(trap["root"], skip=("in/", "user/queue.sqlite"))
    leak_target = (trap["root"] / "secret.png").read_bytes()
    data = png_bytes((3, 3), (1, 2, 3))
    r = upload_request(api, name, data)
    assert r.status in (200, 400), r.body
    if r.status == 200:
        stored = r.json()["name"]
        assert (
            re.fullmatch(r"[A-Za-z0-9_.\-]{1,100}", stored)
            and ".." not in stored
            and not stored.startswith(".")
        ), stored
        assert stored != "leak.png"  # never written through the symlink
        assert (api.input_dir / stored).read_bytes() == data and not (api.input_dir / stored).is_symlink()
    assert snapshot(trap["root"], skip=("in/", "user/queue.sqlite")) == outside
    assert (trap["root"] / "secret.png").read_bytes() == leak_target
    assert not [p for p in trap["root"].parent.rglob("*escape*") if api.input_dir not in p.parents]


WORKFLOW_NAMES = [
    "..",
    ".",
    "%2e%2e",
    "..%2Fsentinel",
    "%2e%2e%2fsentinel",
    "%2e%2e%2F%2e%2e%2Fsecret",
    "a%2Fb",
    "..%5Csentinel",
    "a%00b",
    "C:%5Csentinel",
    "%2Fetc%2Fpasswd",
    "x" * 101,
    ".hidden",
    "a/b",
    "trailing.",
    "%20leading",
    "..%2F..%2F" + "x" * 300,
]


@pytest.mark.parametrize("name", WORKFLOW_NAMES, ids=lambda n: n[:30])
def test_workflow_names_are_confined(idle_api, trap, name):
    api = idle_api
    before = snapshot(trap["root"], skip=("user/queue.sqlite",))
    path = f"/api/workflows/{name}"
    # a real '/' matches no route at all; every other name reaches the handler and is refused
    refused = (404, 405) if name == "a/b" else (400,)
    r = api.get(path)
    assert r.status in refused and not secret_leaked(r.body, trap), (name, r.status)
    r = api.request("PUT", path, json_body=sleep_wf("EVIL"))
    assert r.status in refused, (name, r.status)
    r = api.request("DELETE", path)
    assert r.status in refused, (name, r.status)
    assert snapshot(trap["root"], skip=("user/queue.sqlite",)) == before
    assert (trap["root"] / "user" / "sentinel.json").is_file()
    assert "EVIL" not in json.dumps(api.get_json("/api/workflows"))
