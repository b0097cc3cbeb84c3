"""The HTTP and WebSocket API (docs/API.md) against a real `tessera serve` process on loopback."""

from __future__ import annotations

import io
import json
import re
import uuid

import pytest
from PIL import Image
from tessera_harness import (
    ROOT,
    EventRecorder,
    multipart,
    png_bytes,
    png_text_chunks,
    preview_header,
    snapshot,
    wait_until,
)

from tessera.workflow import CURRENT_VERSION

MIB = 1 << 20


# -- workflow builders -----------------------------------------------------------------------
def link(node: str, output: str = "image") -> dict:
    return {"node": node, "output": output}


def solid(width=8, height=6, red=0.2, green=0.4, blue=0.6) -> dict:
    return {
        "type": "SolidColor",
        "inputs": {"width": width, "height": height, "red": red, "green": green, "blue": blue},
    }


def save(images: dict, prefix: str = "tessera") -> dict:
    return {"type": "SaveImage", "inputs": {"images": images, "filename_prefix": prefix}}


def workflow(nodes: dict) -> dict:
    return {"version": CURRENT_VERSION, "nodes": nodes}


def sleep_wf(label: str, steps: int = 1, step_seconds: float = 0.0, preview: bool = False) -> dict:
    return workflow(
        {
            "1": {
                "type": "Sleep",
                "inputs": {"steps": steps, "step_seconds": step_seconds, "label": label, "preview": preview},
            }
        }
    )


def unique() -> str:
    return uuid.uuid4().hex[:10]


def history_state(api) -> list[tuple[str, str]]:
    return [(e["prompt_id"], e["status"]) for e in api.get_json("/api/history?limit=10000")["items"]]


# -- catalogue, models, system, docs ------------------------------------------------------------
def test_nodes_catalogue(api):
    body = api.get_json("/api/nodes")
    nodes = body["nodes"]
    for name in ("SolidColor", "ImageInvert", "SaveImage", "LoadImage", "Int", "Seed", "Sleep", "Fail"):
        assert name in nodes, name
    keys = {"type", "category", "description", "version", "is_output", "inputs", "outputs", "input_schema"}
    for name, info in nodes.items():
        assert keys <= set(info), name
        assert info["type"] == name
    width = next(i for i in nodes["SolidColor"]["inputs"] if i["name"] == "width")
    assert width == {
        "name": "width",
        "type": "INT",
        "optional": False,
        "link": "either",
        "default": 64,
        "min": 1,
        "max": 8192,
    }
    method = next(i for i in nodes["ImageScale"]["inputs"] if i["name"] == "method")
    assert method["choices"] == ["nearest", "bilinear", "bicubic", "area"] and method["link"] == "widget"
    image = nodes["LoadImage"]["inputs"][0]
    assert image["widget"] == "image_upload" and image["link"] == "widget"
    assert nodes["SaveImage"]["is_output"] is True and nodes["SolidColor"]["is_output"] is False
    assert nodes["SolidColor"]["outputs"] == [{"name": "image", "type": "IMAGE"}]
    # the description is the docstring's first line: the test pack's own Sleep node says what to expect
    assert nodes["Sleep"]["description"] == "Sleep in short steps, reporting progress after each one."
    assert all(info["description"] and "\n" not in info["description"] for info in nodes.values())
    schema = nodes["SaveImage"]["input_schema"]
    assert (
        schema["type"] == "object"
        and schema["required"] == ["images"]
        and schema["additionalProperties"] is False
    )
    assert {"IMAGE", "INT", "FLOAT", "STRING", "BOOLEAN", "MASK"} <= set(body["types"])
    assert body["types"] == sorted(body["types"])
    # the broken pack is reported by name and skipped; the class it defined before failing is not registered
    broken = [name for name in body["failed_packs"] if "broken_pack.py" in name]
    assert broken == ["custom_nodes/broken_pack.py"]
    assert "fails on import on purpose" in body["failed_packs"][broken[0]]
    assert "HalfDefined" not in nodes
    assert not any("testing_pack" in name for name in body["failed_packs"])
    assert "broken_pack.py failed to load and was skipped" in api.log_text()


def test_model_folders_and_live_choices(api):
    (api.models_dir / "vae" / "sub").mkdir(parents=True, exist_ok=True)
    (api.models_dir / "vae" / "first.safetensors").write_bytes(b"x")
    (api.models_dir / "vae" / "sub" / "nested.safetensors").write_bytes(b"x")
    (api.models_dir / "vae" / "notes.txt").write_text("not a model")
    (api.models_dir / "diffusion_models").mkdir(exist_ok=True)
    (api.models_dir / "diffusion_models" / "tiny.safetensors").write_bytes(b"x")
    models = api.get_json("/api/models")
    assert set(models) == {
        "diffusion_models",
        "checkpoints",
        "vae",
        "text_encoders",
        "loras",
        "controlnet",
        "vq_models",
        "ar_models",
    }
    assert models["vae"] == ["first.safetensors", "sub/nested.safetensors"]
    assert models["diffusion_models"] == ["tiny.safetensors"] and models["loras"] == []

    def choices():
        info = api.get_json("/api/nodes")["nodes"]["PickVAE"]
        return info["inputs"][0]["choices"], info["input_schema"]["properties"]["vae_name"]["enum"]

    assert choices() == (["first.safetensors", "sub/nested.safetensors"],) * 2
    (api.models_dir / "vae" / "added.safetensors").write_bytes(b"x")  # the choices are the files there *now*
    assert choices()[0] == ["added.safetensors", "first.safetensors", "sub/nested.safetensors"]
    picked = workflow(
        {"1": {"type": "PickVAE", "inputs": {"vae_name": "added.safetensors"}}, "2": {"type": "Sleep"}}
    )
    ok = api.request("POST", "/api/validate", json_body={"workflow": picked})
    assert ok.status == 200 and ok.json() == {"valid": True}


def test_system(api):
    body = api.get_json("/api/system")
    assert {"versions", "device", "memory", "attention_backend"} <= set(body)
    assert {"tessera", "python", "torch", "aiohttp"} <= set(body["versions"])
    assert body["device"] == "cpu" and isinstance(body["attention_backend"], str)
    assert body["memory"]["ram_total"] > 0 and "cache" in body["memory"]


def test_templates(api):
    body = api.get_json("/api/templates")
    # every shipped workflow is valid JSON (json.loads raises otherwise) and is served as it is on disk
    shipped = {p.stem: json.loads(p.read_text()) for p in (ROOT / "workflows").glob("*.json")}
    assert {"text_to_image_diffusion", "text_to_image_autoregressive"} <= set(shipped)
    assert body["templates"] == shipped


DOCUMENTED_ROUTES = {
    ("get", "/api/nodes"),
    ("post", "/api/validate"),
    ("post", "/api/prompt"),
    ("get", "/api/queue"),
    ("delete", "/api/queue/{prompt_id}"),
    ("delete", "/api/queue"),
    ("post", "/api/interrupt"),
    ("get", "/api/history"),
    ("get", "/api/history/{prompt_id}"),
    ("get", "/api/models"),
    ("get", "/api/view"),
    ("post", "/api/upload/image"),
    ("get", "/api/workflows"),
    ("get", "/api/workflows/{name}"),
    ("put", "/api/workflows/{name}"),
    ("delete", "/api/workflows/{name}"),
    ("get", "/api/templates"),
    ("get", "/api/system"),
    ("get", "/api/openapi.json"),
    ("post", "/api/import"),
    ("get", "/ws"),
}


def test_openapi_describes_every_documented_route(api):
    doc = api.get_json("/api/openapi.json")
    assert doc["openapi"] == "3.1.0" and doc["info"]["title"] == "Tessera"
    described = {(method, path) for path, ops in doc["paths"].items() for method in ops}
    assert DOCUMENTED_ROUTES <= described
    # every route named in docs/API.md is in this test's list (so the list cannot drift from the docs)
    text = (ROOT / "docs" / "API.md").read_text()
    in_docs = {
        (m.lower(), re.sub(r"\{\w+\}", "{}", p))
        for m, p in re.findall(r"`(GET|POST|PUT|DELETE) (/api/[^`\s]*)`", text)
    }
    listed = {(m, re.sub(r"\{\w+\}", "{}", p)) for m, p in DOCUMENTED_ROUTES}
    assert in_docs and in_docs <= listed
    assert "Workflow" in doc["components"]["schemas"]
    assert doc["paths"]["/api/prompt"]["post"]["requestBody"]["required"] is True
    assert {p["name"] for p in doc["paths"]["/api/view"]["get"]["parameters"]} == {
        "filename",
        "type",
        "subfolder",
    }


def test_index_serves_the_editor(api):
    r = api.get("/")
    assert r.status == 200
    assert r.headers["Content-Type"].startswith(("text/html", "text/plain"))


# -- validation ------------------------------------------------------------------------------
VALID = workflow({"1": solid(), "2": save(link("1"), "never")})

INVALID = {
    "unknown node type": (
        workflow({"1": {"type": "NoSuchNode"}, "2": save(link("1"))}),
        [("1", None, "unknown node type 'NoSuchNode'")],
    ),
    "missing required input": (
        workflow({"1": {"type": "SaveImage", "inputs": {}}}),
        [("1", "images", "missing required input")],
    ),
    "dangling link (missing node)": (workflow({"1": save(link("9"))}), [("1", "images", "missing node '9'")]),
    "dangling link (missing output)": (
        workflow({"1": solid(), "2": save(link("1", "pixels"))}),
        [("2", "images", "has no output 'pixels'")],
    ),
    "link type mismatch": (
        workflow({"1": {"type": "Int", "inputs": {"value": 3}}, "2": save(link("1", "value"))}),
        [("2", "images", "type mismatch: Int.value is INT, input needs IMAGE")],
    ),
    "cycle": (
        workflow(
            {
                "1": {"type": "ImageInvert", "inputs": {"image": link("2")}},
                "2": {"type": "ImageInvert", "inputs": {"image": link("1")}},
                "3": save(link("2")),
            }
        ),
        [("1", None, "cycle")],
    ),
    "value below minimum": (
        workflow({"1": solid(width=0), "2": save(link("1"))}),
        [("1", "width", "out of range (must be at least 1)")],
    ),
    "value above maximum": (
        workflow({"1": solid(red=1.5), "2": save(link("1"))}),
        [("1", "red", "out of range (must be at most 1.0)")],
    ),
    "not in choices": (
        workflow(
            {
                "1": solid(),
                "2": {"type": "ImageScale", "inputs": {"image": link("1"), "method": "lanczos"}},
                "3": save(link("2")),
            }
        ),
        [("2", "method", "'lanczos' is not one of the choices")],
    ),
    "model file not in choices": (
        workflow({"1": {"type": "PickVAE", "inputs": {"vae_name": "../../etc/passwd"}}}),
        [("1", "vae_name", "is not one of the choices")],
    ),
    "wrong JSON type (string for INT)": (
        workflow({"1": solid(width="8"), "2": save(link("1"))}),
        [("1", "width", "wrong JSON type (expected integer)")],
    ),
    "wrong JSON type (float for INT)": (
        workflow({"1": solid(width=8.0), "2": save(link("1"))}),
        [("1", "width", "wrong JSON type (expected integer)")],
    ),
    "wrong JSON type (string for BOOLEAN)": (
        workflow({"1": {"type": "Boolean", "inputs": {"value": "yes"}}}),
        [("1", "value", "wrong JSON type (expected boolean)")],
    ),
    "wrong JSON type (bool for FLOAT)": (
        workflow({"1": solid(red=True), "2": save(link("1"))}),
        [("1", "red", "wrong JSON type (expected number)")],
    ),
    "constant where a link is needed": (
        workflow({"1": save(5)}),
        [("1", "images", "needs a link from a IMAGE output")],
    ),
    "link into a widget-only input": (
        workflow(
            {
                "1": {"type": "String", "inputs": {"value": "x"}},
                "2": solid(),
                "3": {
                    "type": "SaveImage",
                    "inputs": {"images": link("2"), "filename_prefix": link("1", "value")},
                },
            }
        ),
        [("3", "filename_prefix", "cannot take a link")],
    ),
    "unknown input": (
        workflow({"1": {"type": "SolidColor", "inputs": {"depth": 3}}, "2": save(link("1"))}),
        [("1", "depth", "SolidColor has no input 'depth'")],
    ),
    "node without type": (workflow({"1": {"inputs": {}}}), [("1", None, "'type' is a required property")]),
    "version of the wrong JSON type": (
        {"version": "1", "nodes": {"1": solid()}},
        [(None, None, "is not of type 'integer'")],
    ),
}


def assert_issues(body: dict, expected: list[tuple]) -> None:
    assert body["error"] == "invalid workflow"
    issues = body["errors"]
    for issue in issues:
        assert set(issue) == {"node", "input", "reason"}, issue
    assert len(issues) == len(expected), issues
    for (node, name, reason), issue in zip(expected, issues):
        if node == "1" and reason == "cycle":  # either node of the loop may be named
            assert issue["node"] in ("1", "2"), issue
        else:
            assert issue["node"] == node, issue
        assert issue["input"] == name, issue
        assert reason in issue["reason"], issue


def test_validate_accepts_a_valid_workflow(api):
    r = api.request("POST", "/api/validate", json_body={"workflow": VALID})
    assert r.status == 200 and r.json() == {"valid": True}


@pytest.mark.parametrize("case", list(INVALID))
def test_validation_error(idle_api, case):
    api = idle_api
    wf, expected = INVALID[case]
    r = api.request("POST", "/api/validate", json_body={"workflow": wf})
    assert r.status == 400, r.body
    assert_issues(r.json(), expected)
    # the same workflow is refused by /api/prompt and runs nothing
    before_history, before_out = history_state(api), snapshot(api.output_dir)
    r = api.request("POST", "/api/prompt", json_body={"workflow": wf})
    assert r.status == 400
    assert_issues(r.json(), expected)
    assert api.get_json("/api/queue") == {"running": [], "pending": []}
    assert history_state(api) == before_history
    assert snapshot(api.output_dir) == before_out


def test_every_problem_is_reported_at_once(api):
    wf = workflow(
        {
            "1": solid(width=0, blue="x"),
            "2": {"type": "ImageScale", "inputs": {"image": link("1"), "method": "lanczos"}},
            "3": save(link("2", "nope")),
            "4": {"type": "Nope"},
        }
    )
    r = api.request("POST", "/api/validate", json_body={"workflow": wf})
    assert r.status == 400
    found = {(i["node"], i["input"]) for i in r.json()["errors"]}
    assert found == {("1", "width"), ("1", "blue"), ("2", "method"), ("3", "images"), ("4", None)}


def test_malformed_request_bodies(idle_api):
    api = idle_api
    before = history_state(api)
    for route in ("/api/validate", "/api/prompt"):
        r = api.request("POST", route, body=b"{not json", headers={"Content-Type": "application/json"})
        assert r.status == 400 and "not valid JSON" in r.json()["error"]
        for body in ({"nodes": {}}, [1, 2], "workflow"):
            r = api.request("POST", route, json_body=body)
            assert r.status == 400 and r.json()["errors"][0]["node"] is None
    # graph-valid, but refused before queueing, by /api/validate and /api/prompt alike:
    # nothing to run, and a LoadImage whose file is not there
    missing = f"missing_{unique()}.png"
    for wf, expected in (
        (workflow({"1": solid()}), (None, None, "no output node")),
        (
            workflow({"1": {"type": "LoadImage", "inputs": {"image": missing}}, "2": save(link("1"))}),
            ("1", "image", f"input image '{missing}' does not exist"),
        ),
    ):
        for route in ("/api/validate", "/api/prompt"):
            r = api.request("POST", route, json_body={"workflow": wf})
            assert r.status == 400, (route, r.body)
            assert_issues(r.json(), [expected])
    assert history_state(api) == before


# -- running prompts: events, outputs, history, view -----------------------------------------
def test_prompt_events_outputs_and_cache(idle_api, recorder):
    api = idle_api
    label = unique()
    wf = workflow(
        {
            "1": solid(width=8, height=6, red=0.2, green=0.4, blue=0.6),
            "2": {"type": "ImageInvert", "inputs": {"image": link("1")}},
            "3": save(link("2"), f"events{label}/run"),
            "4": {
                "type": "Sleep",
                "inputs": {"steps": 3, "step_seconds": 0.0, "label": label, "preview": True},
            },
        }
    )
    start = len(recorder.events)
    r = api.request("POST", "/api/prompt", json_body={"workflow": wf, "client_id": "pytest"})
    assert r.status == 200
    item = r.json()
    assert set(item) == {"prompt_id", "number"} and isinstance(item["number"], int)
    pid = item["prompt_id"]
    recorder.wait_for(lambda k, d: k == "execution_success" and d["prompt_id"] == pid, start=start)
    recorder.wait_for(lambda k, d: k == "status" and d["queue_remaining"] == 0, start=start)
    assert any(k == "status" and d["queue_remaining"] >= 1 for k, d in recorder.events[start:])

    events = recorder.of_prompt(pid)
    kinds = [k for k, _ in events if k not in ("progress", "binary")]
    assert kinds == [
        "execution_start",
        "executing",
        "executing",
        "executing",
        "executed",
        "executing",
        "executed",
        "execution_success",
    ]
    assert [d["node"] for k, d in events if k == "executing"] == ["1", "2", "3", "4"]
    progress = [d for k, d in events if k == "progress"]
    assert [(p["node"], p["value"], p["max"]) for p in progress] == [("4", 1, 3), ("4", 2, 3), ("4", 3, 3)]
    # the preview: 4-byte big-endian header length, JSON header, then PNG bytes
    previews = [d for k, d in events if k == "binary"]
    assert len(previews) == 1
    frame = previews[0]
    header = preview_header(frame)
    assert header == {"prompt_id": pid, "node": "4", "format": "png"}
    image_bytes = frame[4 + int.from_bytes(frame[:4], "big") :]
    assert image_bytes[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(io.BytesIO(image_bytes)) as picture:
        assert picture.size == (8, 4) and picture.convert("RGB").getpixel((0, 0)) == (255, 0, 0)
    assert [k for k, _ in events].index("binary") > [k for k, _ in events].index("progress")

    executed = {d["node"]: d["output"] for k, d in events if k == "executed"}
    ref = executed["3"]["images"][0]
    assert ref == {"filename": "run_00001.png", "subfolder": f"events{label}", "type": "output"}
    assert executed["4"] == {"slept": [label]}

    entry = api.entry(pid)  # stored before the final event was sent: no polling needed
    assert entry["status"] == "success" and entry["prompt_id"] == pid and entry["number"] == item["number"]
    assert entry["workflow"] == wf
    assert entry["outputs"] == {"3": {"images": [ref]}, "4": {"slept": [label]}}
    assert entry["errors"] == [] and entry["cached"] == []
    assert set(entry["timings"]) == {"1", "2", "3", "4"} and all(t >= 0 for t in entry["timings"].values())
    assert entry["created"] <= entry["started"] <= entry["finished"]

    # the file: a PNG with the workflow in a tEXt chunk, served by /api/view
    path = api.output_dir / ref["subfolder"] / ref["filename"]
    data = path.read_bytes()
    assert json.loads(png_text_chunks(data)["workflow"]) == wf
    with Image.open(path) as picture:
        assert picture.size == (8, 6) and picture.getpixel((3, 3)) == (204, 153, 102)
    r = api.get(f"/api/view?filename={ref['filename']}&subfolder={ref['subfolder']}&type=output")
    assert r.status == 200 and r.body == data
    assert r.headers["Content-Type"] == "image/png" and r.headers["X-Content-Type-Options"] == "nosniff"

    # run again with only the file name prefix changed: 1, 2 and 4 come from the cache
    wf2 = json.loads(json.dumps(wf))
    wf2["nodes"]["3"]["inputs"]["filename_prefix"] = f"events{label}/again"
    start = len(recorder.events)
    pid2 = api.submit(wf2)
    recorder.wait_for(lambda k, d: k == "execution_success" and d["prompt_id"] == pid2, start=start)
    events = recorder.of_prompt(pid2)
    assert [d["node"] for k, d in events if k == "executing"] == ["3"]
    cached_events = [d["nodes"] for k, d in events if k == "execution_cached"]
    assert cached_events == [["1", "2"], ["4"]]
    assert [k for k, _ in events].index("execution_cached") < [k for k, _ in events].index("executing")
    assert not [k for k, _ in events if k in ("progress", "binary")]
    entry2 = api.entry(pid2)
    assert entry2["cached"] == ["1", "2", "4"] and set(entry2["timings"]) == {"3"}
    assert entry2["outputs"]["3"]["images"][0]["filename"] == "again_00001.png"
    assert api.sleep_log().count(f"start {label}") == 1  # the Sleep node really did not run again


def test_execution_error_event_and_history(idle_api, recorder):
    api = idle_api
    reason = f"boom {unique()}"
    start = len(recorder.events)
    pid = api.submit(workflow({"1": {"type": "Fail", "inputs": {"reason": reason}}}))
    _, data = recorder.wait_for(lambda k, d: k == "execution_error" and d["prompt_id"] == pid, start=start)
    assert data == {"prompt_id": pid, "node": "1", "node_type": "Fail", "input": "reason", "message": reason}
    entry = api.entry(pid)  # stored before the event was sent
    assert entry["status"] == "error" and entry["outputs"] == {}
    error = entry["errors"][0]
    assert {k: error[k] for k in ("node", "node_type", "input", "message")} == {
        "node": "1",
        "node_type": "Fail",
        "input": "reason",
        "message": reason,
    }
    assert not any(k == "execution_success" for k, _ in recorder.of_prompt(pid))


def test_history_list_and_entry(idle_api):
    api = idle_api
    ids = [api.submit(sleep_wf(unique())) for _ in range(3)]
    for pid in ids:
        assert api.wait_status(pid)["status"] == "success"
    items = api.get_json("/api/history?limit=2")["items"]
    assert [i["prompt_id"] for i in items] == ids[::-1][:2]  # newest first
    full = api.get_json("/api/history")["items"]
    numbers = [i["number"] for i in full]
    assert numbers == sorted(numbers, reverse=True)
    keys = {
        "prompt_id",
        "number",
        "status",
        "created",
        "started",
        "finished",
        "workflow",
        "outputs",
        "errors",
        "timings",
        "cached",
    }
    assert keys <= set(full[0])
    assert api.entry(ids[0])["workflow"] == full[[i["prompt_id"] for i in full].index(ids[0])]["workflow"]
    assert api.get("/api/history?limit=many").status == 400
    r = api.get("/api/history/does-not-exist")
    assert r.status == 404 and "error" in r.json()


# -- queue -------------------------------------------------------------------------------------
def test_queue_order_cancel_and_conflicts(idle_api):
    api = idle_api
    gate_label = unique()
    gate = api.submit(sleep_wf(gate_label, steps=3000, step_seconds=0.01))
    api.wait_status(gate, ("running",))
    labels = [unique() for _ in range(3)]
    ids = [api.submit(sleep_wf(label)) for label in labels]
    queue = api.get_json("/api/queue")
    assert [i["prompt_id"] for i in queue["running"]] == [gate]
    assert [i["prompt_id"] for i in queue["pending"]] == ids
    for item in queue["pending"]:
        assert set(item) == {"prompt_id", "number", "status", "created"} and item["status"] == "pending"
    assert [i["number"] for i in queue["pending"]] == sorted(i["number"] for i in queue["pending"])

    # cancel the middle one: it leaves the queue and never runs
    r = api.request("DELETE", f"/api/queue/{ids[1]}")
    assert r.status == 200 and r.json() == {"cancelled": ids[1]}
    assert [i["prompt_id"] for i in api.get_json("/api/queue")["pending"]] == [ids[0], ids[2]]
    assert api.request("DELETE", f"/api/queue/{ids[1]}").status == 409  # already cancelled
    assert api.request("DELETE", f"/api/queue/{gate}").status == 409  # running
    r = api.request("DELETE", "/api/queue/no-such-prompt")
    assert r.status == 404 and "error" in r.json()

    r = api.request("POST", "/api/interrupt", json_body={})
    assert r.status == 200 and r.json() == {"interrupted": gate}
    for pid in (ids[0], ids[2]):
        assert api.wait_status(pid)["status"] == "success"
    assert api.entry(gate)["status"] == "interrupted"
    cancelled = api.entry(ids[1])
    assert cancelled["status"] == "cancelled" and cancelled["started"] is None and cancelled["outputs"] == {}
    assert api.request("DELETE", f"/api/queue/{ids[0]}").status == 409  # finished

    log = api.sleep_log()
    assert f"start {labels[1]}" not in log
    order = [log.index(f"start {label}") for label in (gate_label, labels[0], labels[2])]
    assert order == sorted(order)
    first, third = api.entry(ids[0]), api.entry(ids[2])
    assert api.entry(gate)["finished"] <= first["started"] <= first["finished"] <= third["started"]


def test_interrupt_stops_within_one_step(idle_api, recorder):
    api = idle_api
    assert api.request("POST", "/api/interrupt").json() == {"interrupted": None}  # nothing is running
    label, steps, step_seconds = unique(), 2000, 0.02
    start = len(recorder.events)
    pid = api.submit(sleep_wf(label, steps=steps, step_seconds=step_seconds))
    recorder.wait_for(lambda k, d: k == "progress" and d["prompt_id"] == pid and d["value"] >= 3, start=start)
    # naming another prompt interrupts nothing
    r = api.request("POST", "/api/interrupt", json_body={"prompt_id": "someone-else"})
    assert r.json() == {"interrupted": None}
    assert api.entry(pid)["status"] == "running"

    r = api.request("POST", "/api/interrupt", json_body={"prompt_id": pid})
    assert r.status == 200 and r.json() == {"interrupted": pid}
    _, data = recorder.wait_for(
        lambda k, d: k == "execution_interrupted" and d["prompt_id"] == pid, start=start, timeout=10
    )
    assert data == {"prompt_id": pid, "node": "1"}
    entry = api.entry(pid)  # stored before the event was sent
    assert entry["status"] == "interrupted" and entry["outputs"] == {}
    # the node stopped at its next progress report: that step reported nothing, no later step ran
    stopped = [line for line in api.sleep_log() if line.startswith(f"interrupted {label} at ")]
    assert len(stopped) == 1 and f"done {label}" not in api.sleep_log()
    stopped_at = int(stopped[0].rsplit(" ", 1)[1])
    values = [d["value"] for k, d in recorder.of_prompt(pid) if k == "progress"]
    assert values == list(range(1, stopped_at)) and stopped_at < steps
    assert not any(k == "execution_success" for k, _ in recorder.of_prompt(pid))


# -- uploads -----------------------------------------------------------------------------------
def upload(api, filename, data, content_type="image/png", field="image", **kw):
    body, ctype = multipart(field, filename, data, content_type)
    return api.request(
        "POST", "/api/upload/image", body=body, headers={"Content-Type": ctype, **kw.pop("headers", {})}, **kw
    )


def test_upload_png_is_stored_and_usable_by_load_image(idle_api):
    api = idle_api
    stem = f"photo_{unique()}"
    data = png_bytes((4, 3), (10, 200, 30))
    r = upload(api, f"{stem}.png", data)
    assert r.status == 200 and r.json() == {"name": f"{stem}.png", "subfolder": "", "type": "input"}
    assert (api.input_dir / f"{stem}.png").read_bytes() == data
    view = api.get(f"/api/view?filename={stem}.png&type=input")
    assert view.status == 200 and view.body == data

    wf = workflow(
        {
            "1": {"type": "LoadImage", "inputs": {"image": f"{stem}.png"}},
            "2": {"type": "ImageInvert", "inputs": {"image": link("1")}},
            "3": save(link("2"), f"loaded_{stem}"),
        }
    )
    entry = api.wait_status(api.submit(wf))
    assert entry["status"] == "success", entry["errors"]
    ref = entry["outputs"]["3"]["images"][0]
    with Image.open(api.output_dir / ref["subfolder"] / ref["filename"]) as picture:
        assert picture.size == (4, 3) and picture.getpixel((1, 1)) == (245, 55, 225)


def test_upload_names_reuse_and_collisions(idle_api):
    api = idle_api
    stem = f"same_{unique()}"
    first, second = png_bytes(color=(1, 2, 3)), png_bytes(color=(4, 5, 6))
    assert upload(api, f"{stem}.png", first).json()["name"] == f"{stem}.png"
    # the same bytes again: the stored file is reused
    assert upload(api, f"{stem}.png", first).json()["name"] == f"{stem}.png"
    # different bytes under the same name: a new name, the first file untouched
    assert upload(api, f"{stem}.png", second).json()["name"] == f"{stem}_2.png"
    assert upload(api, f"{stem}.png", second).json()["name"] == f"{stem}_2.png"
    assert (api.input_dir / f"{stem}.png").read_bytes() == first
    assert (api.input_dir / f"{stem}_2.png").read_bytes() == second
    assert sorted(p.name for p in api.input_dir.glob(f"{stem}*")) == [f"{stem}.png", f"{stem}_2.png"]
    # the suffix follows the real format, not the name sent
    jpeg = png_bytes(fmt="JPEG")
    assert upload(api, f"{stem}.png", jpeg, "image/jpeg").json()["name"] == f"{stem}.jpg"
    webp = png_bytes(fmt="WEBP")
    assert upload(api, f"w{stem}", webp, "image/webp").json()["name"] == f"w{stem}.webp"
    assert not list(api.input_dir.glob("*.part"))


@pytest.mark.parametrize("kind", ["text", "GIF", "BMP", "truncated", "no file field"])
def test_upload_refuses_non_images(idle_api, kind):
    api = idle_api
    before = snapshot(api.input_dir)
    name = f"bad_{unique()}.png"
    if kind == "text":
        r = upload(api, name, b"hello, this is not an image\n", "text/plain")
    elif kind == "truncated":
        r = upload(api, name, png_bytes()[:30])
    elif kind == "no file field":
        r = upload(api, name, png_bytes(), field="picture")
    else:
        r = upload(api, name, png_bytes(fmt=kind), f"image/{kind.lower()}")
    assert r.status == 400, r.body
    message = r.json()["error"]
    if kind in ("GIF", "BMP"):
        assert kind in message and all(f in message for f in ("PNG", "JPEG", "WebP")), message
    assert snapshot(api.input_dir) == before


def padded_png(total: int) -> bytes:
    """A valid PNG of exactly `total` bytes (an ancillary private chunk pads it)."""
    import zlib

    base = png_bytes()
    pad = total - len(base) - 12
    chunk = pad.to_bytes(4, "big") + b"prVt" + b"\0" * pad
    chunk += zlib.crc32(b"prVt" + b"\0" * pad).to_bytes(4, "big")
    iend = base.rindex(b"IEND") - 4
    data = base[:iend] + chunk + base[iend:]
    assert len(data) == total
    return data


def test_upload_size_limit(idle_api):
    api = idle_api
    before = snapshot(api.input_dir)
    name = f"big_{unique()}.png"
    # one byte over 20 MiB: 413 (declared Content-Length)
    r = upload(api, name, padded_png(20 * MIB + 1), timeout=60)
    assert r.status == 413 and "20 MiB" in r.json()["error"]
    # far over, sent chunked (no Content-Length): 413 as well
    body, ctype = multipart("image", name, b"\0" * (21 * MIB))
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", api.port, timeout=60)
    try:
        conn.request(
            "POST",
            "/api/upload/image",
            body=iter([body[i : i + MIB] for i in range(0, len(body), MIB)]),
            headers={"Content-Type": ctype, "Host": api.host},
            encode_chunked=True,
        )
        response = conn.getresponse()
        assert response.status == 413, response.read()
    finally:
        conn.close()
    assert snapshot(api.input_dir) == before
    # exactly 20 MiB is accepted
    data = padded_png(20 * MIB)
    r = upload(api, name, data, timeout=60)
    assert r.status == 200, r.body
    assert (api.input_dir / r.json()["name"]).read_bytes() == data
    (api.input_dir / r.json()["name"]).unlink()


# -- saved workflows ---------------------------------------------------------------------------
def test_saved_workflows_crud(idle_api):
    api = idle_api
    name = f"My flow-{unique()}.v2"
    quoted = name.replace(" ", "%20")
    assert name not in api.get_json("/api/workflows")["workflows"]
    assert api.get(f"/api/workflows/{quoted}").status == 404
    doc = workflow({"1": solid(), "2": save(link("1"))}) | {
        "ui": {"viewport": {"offset": [1, 2], "scale": 1.5}}
    }
    doc["nodes"]["1"]["ui"] = {"pos": [40, 60], "size": [260, 80], "title": "Colour"}
    r = api.request("PUT", f"/api/workflows/{quoted}", json_body=doc)
    assert r.status == 200 and r.json() == {"saved": name}
    assert name in api.get_json("/api/workflows")["workflows"]
    assert api.get_json(f"/api/workflows/{quoted}") == doc
    assert json.loads((api.user_dir / "workflows" / f"{name}.json").read_text()) == doc
    # a work in progress may fail graph checks, but must be a workflow document
    wip = workflow({"1": {"type": "NotInstalledYet"}})
    assert api.request("PUT", f"/api/workflows/{quoted}", json_body=wip).status == 200
    assert api.get_json(f"/api/workflows/{quoted}") == wip
    r = api.request("PUT", f"/api/workflows/{quoted}", json_body={"nodes": {}})
    assert r.status == 400 and r.json()["error"] == "not a workflow document"
    assert (
        api.request(
            "PUT", f"/api/workflows/{quoted}", body=b"{oops", headers={"Content-Type": "application/json"}
        ).status
        == 400
    )
    assert api.get_json(f"/api/workflows/{quoted}") == wip  # the refused writes changed nothing
    r = api.request("DELETE", f"/api/workflows/{quoted}")
    assert r.status == 200 and r.json() == {"deleted": name}
    assert api.get(f"/api/workflows/{quoted}").status == 404
    assert api.request("DELETE", f"/api/workflows/{quoted}").status == 404
    assert name not in api.get_json("/api/workflows")["workflows"]
    assert not list((api.user_dir / "workflows").glob("*.part"))


# -- websocket basics ---------------------------------------------------------------------------
def test_websocket_events_are_scoped_to_the_submitting_client(idle_api):
    """Each socket gets the events of its own client's prompts only (ComfyUI's client_id), the
    queue length goes to everyone, and a socket that subscribes to all sees every prompt."""
    api = idle_api
    one, two, watcher = (
        EventRecorder(api, "one"),
        EventRecorder(api, "two"),
        EventRecorder(api, "watcher", subscribe="all"),
    )
    try:
        assert one.events[0] == ("status", {"queue_remaining": 0})
        pid_one = api.submit(sleep_wf(unique(), steps=2, preview=True), client_id="one")
        pid_two = api.submit(sleep_wf(unique(), steps=2), client_id="two")
        anonymous = api.submit(sleep_wf(unique()), client_id=None)
        for rec, pid in ((one, pid_one), (two, pid_two), (watcher, anonymous)):
            rec.wait_for(lambda k, d, pid=pid: k == "execution_success" and d["prompt_id"] == pid)
        one.wait_for(lambda k, d: k == "status" and d["queue_remaining"] == 0)
        two.wait_for(lambda k, d: k == "status" and d["queue_remaining"] == 0)

        def prompts_seen(rec):
            seen = set()
            for kind, data in list(rec.events):
                if kind == "binary":
                    seen.add(preview_header(data)["prompt_id"])
                elif "prompt_id" in data:
                    seen.add(data["prompt_id"])
            return seen

        assert prompts_seen(one) == {pid_one} and ("binary" in [k for k, _ in one.events])
        assert prompts_seen(two) == {pid_two}
        assert prompts_seen(watcher) >= {pid_one, pid_two, anonymous}
        assert any(
            k == "status" and d["queue_remaining"] >= 1 for k, d in two.events
        )  # summaries reach everyone
    finally:
        for rec in (one, two, watcher):
            rec.close()
    wait_until(lambda: api.entry(pid_one)["status"] == "success", message="success")


def test_websocket_subscription_can_change(idle_api):
    api = idle_api
    rec = EventRecorder(api, "switcher")
    try:
        rec.send({"type": "subscribe", "data": {"scope": "all"}})
        pid = api.submit(sleep_wf(unique()), client_id="someone-else")
        rec.wait_for(lambda k, d: k == "execution_success" and d["prompt_id"] == pid)
        rec.send({"type": "subscribe", "data": {"scope": "own"}})
        start = len(rec.events)
        other = api.submit(sleep_wf(unique()), client_id="someone-else")
        mine = api.submit(sleep_wf(unique()), client_id="switcher")
        rec.wait_for(lambda k, d: k == "execution_success" and d["prompt_id"] == mine, start=start)
        assert api.entry(other)["status"] == "success"  # queued first, so it finished first
        assert not [e for e in rec.events[start:] if e[0] != "status" and e[1].get("prompt_id") == other]
    finally:
        rec.close()


def test_older_workflows_open_migrated(idle_api):
    """A version-1 workflow (renamed inputs `batch`, `model_name`) opens at the current version,
    whether saved on the server or imported from a file: nothing the user set is dropped."""
    from tessera.workflow import CURRENT_VERSION

    v1 = {
        "version": 1,
        "nodes": {"1": {"type": "SolidColor", "inputs": {"width": 8, "height": 8, "batch": 3}}},
    }
    name = f"old-{unique()}"
    (idle_api.user_dir / "workflows").mkdir(parents=True, exist_ok=True)
    (idle_api.user_dir / "workflows" / f"{name}.json").write_text(json.dumps(v1))
    for got in (
        idle_api.get_json(f"/api/workflows/{name}"),
        idle_api.request("POST", "/api/import", json_body=v1).json()["workflow"],
    ):
        assert got["version"] == CURRENT_VERSION
        assert got["nodes"]["1"]["inputs"] == {"width": 8, "height": 8, "batch_size": 3}
    r = idle_api.request(
        "POST", "/api/import", json_body={"version": 1, "nodes": {"1": {"inputs": {}}}}
    )  # a node without a type
    assert r.status == 400 and r.json()["errors"]
    newer = {"version": CURRENT_VERSION + 1, "nodes": {}}
    (idle_api.user_dir / "workflows" / f"{name}.json").write_text(json.dumps(newer))
    r = idle_api.get(f"/api/workflows/{name}")
    assert r.status == 422 and "newer" in r.json()["error"]


def test_editor_writes_the_runtime_workflow_version():
    from tessera.workflow import CURRENT_VERSION

    text = (ROOT / "web" / "js" / "graph-format.js").read_text()
    assert re.search(r"export const WORKFLOW_VERSION = (\d+);", text).group(1) == str(CURRENT_VERSION)
