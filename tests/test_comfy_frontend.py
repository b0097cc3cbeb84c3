"""The routes ComfyUI's own frontend needs, served by `tessera serve --frontend comfyui` under
/comfyui/ (tessera/comfy/frontend.py): settings that persist across a restart, user files
confined to the user folder, the jobs list, the truthful lists, and the same guards as the rest."""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest
import websockets
from tessera_harness import ROOT, Server, wait_until

MODELS = ROOT / "models"
API = "/comfyui/api"
AR_PROMPT = {  # a 2x2 token grid: the quickest prompt the shipped models run
    "1": {"class_type": "LoadARModel", "inputs": {"file": "tessera-ar-tiny.safetensors"}},
    "2": {"class_type": "LoadVQModel", "inputs": {"file": "tessera-vq-f8.safetensors"}},
    "3": {"class_type": "LoadTextEncoder", "inputs": {"file": "tessera-text-encoder.safetensors"}},
    "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red star", "clip": ["3", 0]}},
    "5": {
        "class_type": "ARGenerateTokens",
        "inputs": {"model": ["1", 0], "positive": ["4", 0], "width": 2, "height": 2, "cfg": 1.0, "seed": 5},
    },
    "6": {"class_type": "VQDecode", "inputs": {"vq": ["2", 0], "tokens": ["5", 0]}},
    "7": {"class_type": "SaveImage", "inputs": {"filename_prefix": "jobs", "images": ["6", 0]}},
}


@pytest.fixture(scope="module")
def front(server) -> Server:
    return server("comfy-frontend", extra_args=("--models-dir", str(MODELS), "--frontend", "comfyui"))


def post(s: Server, path: str, body: object, **kw):
    return s.request("POST", path, json_body=body, **kw)


def test_root_leads_to_the_frontend_and_our_editor_stays_the_default(front, api):
    r = front.get("/?token=")
    assert r.status == 302 and r.headers["Location"] == "/comfyui/?token="
    page = front.get("/comfyui/")
    assert page.status == 200 and b"<title>ComfyUI</title>" in page.body
    assert "connect-src 'self'" in page.headers["Content-Security-Policy"]  # no calls to comfy.org
    assert front.get("/assets/favicon.ico").status == 200  # asked for at the root by the page
    # our own API is untouched beside it, and a default server has no /comfyui at all
    assert "items" in front.get_json("/api/history")
    assert api.get("/").status == 200 and b"<title>ComfyUI</title>" not in api.get("/").body
    assert api.get("/comfyui/").status == 404


def test_settings_persist_across_a_restart(front):
    assert (
        post(front, f"{API}/settings", {"Comfy.ColorPalette": "light", "Comfy.Sidebar.Size": 3}).status == 200
    )
    assert post(front, f"{API}/settings/Comfy.Locale", "fr").status == 200
    assert post(front, f"{API}/settings", [1, 2]).status == 400
    front.stop()
    front.start()
    settings = front.get_json(f"{API}/settings")
    assert {k: settings[k] for k in ("Comfy.ColorPalette", "Comfy.Sidebar.Size", "Comfy.Locale")} == {
        "Comfy.ColorPalette": "light",
        "Comfy.Sidebar.Size": 3,
        "Comfy.Locale": "fr",
    }
    assert front.get_json(f"{API}/settings/Comfy.Locale") == "fr"
    assert front.get_json(f"{API}/settings/Comfy.Unknown") is None
    stored = json.loads((front.user_dir / "comfyui" / "default" / "comfy.settings.json").read_text())
    assert stored["Comfy.Locale"] == "fr"
    assert front.get_json(f"{API}/users") == {"storage": "server", "migrated": True}
    assert post(front, f"{API}/users", {"username": "eve"}).status == 400  # one user, said so


def test_user_files_are_written_listed_moved_and_confined(front):
    workflow = json.dumps({"nodes": [], "links": [], "version": 0.4}).encode()
    r = front.request(
        "POST", f"{API}/userdata/workflows%2Fmine.json?overwrite=true&full_info=true", body=workflow
    )
    assert r.status == 200 and r.json()["path"] == "workflows/mine.json" and r.json()["size"] == len(workflow)
    assert (
        front.request("POST", f"{API}/userdata/workflows%2Fmine.json?overwrite=false", body=b"{}").status
        == 409
    )
    listed = front.get_json(f"{API}/userdata?dir=workflows&recurse=true&split=false&full_info=true")
    assert [f["path"] for f in listed] == ["mine.json"]
    assert front.get_json(f"{API}/userdata?dir=workflows&split=true") == [["mine.json", "mine.json"]]
    got = front.get(f"{API}/userdata/workflows%2Fmine.json")
    assert got.body == workflow and got.headers["Content-Disposition"] == "attachment"
    moved = front.request("POST", f"{API}/userdata/workflows%2Fmine.json/move/workflows%2Fold%2Fmine.json")
    assert moved.status == 200 and moved.json() == "workflows/old/mine.json"
    onto_a_folder = front.request("POST", f"{API}/userdata/workflows%2Fold%2Fmine.json/move/workflows")
    assert onto_a_folder.status == 409
    assert front.get(f"{API}/userdata/workflows%2Fmine.json").status == 404
    assert front.request("DELETE", f"{API}/userdata/workflows%2Fold%2Fmine.json").status == 204
    assert front.get_json(f"{API}/userdata?dir=workflows&recurse=true") == []
    # nothing outside the user's folder: not the queue database beside it, not an absolute path
    for name in ("..%2F..%2Fqueue.sqlite", "%2Fetc%2Fpasswd", "workflows%2F..%2F..%2Fx"):
        assert front.get(f"{API}/userdata/{name}").status == 403
        refused = front.request("POST", f"{API}/userdata/{name}", body=b"x")
        assert refused.status == 403 and "file name" in refused.json()["error"]
    assert front.get(f"{API}/userdata?dir=..").status == 403
    assert not (front.user_dir / "x").exists() and (front.user_dir / "queue.sqlite").stat().st_size > 0


def test_truthful_lists_and_an_unsupported_route(front):
    assert front.get_json(f"{API}/extensions") == []
    assert front.get_json(f"{API}/embeddings") == []
    assert front.get_json(f"{API}/i18n") == {}
    assert front.get_json(f"{API}/workflow_templates") == {}
    assert front.get_json(f"{API}/global_subgraphs") == {}
    assert front.get_json(f"{API}/features")["max_upload_size"] == 20 << 20
    folders = {f["name"] for f in front.get_json(f"{API}/experiment/models")}
    assert {"ar_models", "vq_models", "diffusion_models"} <= folders
    files = front.get_json(f"{API}/experiment/models/vq_models")
    assert {"name": "tessera-vq-f8.safetensors", "pathIndex": 0} in files
    assert [f["name"] for f in files] == front.get_json("/models/vq_models")
    assert front.get(f"{API}/experiment/models/nope").status == 404
    r = front.get(f"{API}/assets?limit=1")
    assert r.status == 404 and "not supported by Tessera" in r.json()["error"]
    # the compatible API itself is there too, under the prefix
    assert "ARGenerateTokens" in front.get_json(f"{API}/object_info")


def test_jobs_list_a_finished_prompt_with_its_image(front):
    r = post(front, f"{API}/prompt", {"prompt": AR_PROMPT, "client_id": "jobs-test"})
    assert r.status == 200, r.body
    prompt_id = r.json()["prompt_id"]
    wait_until(lambda: front.get_json(f"/api/history/{prompt_id}")["status"] == "success", 60)
    jobs = front.get_json(f"{API}/jobs?status=completed,failed&limit=5")
    job = next(j for j in jobs["jobs"] if j["id"] == prompt_id)
    assert job["status"] == "completed" and job["outputs_count"] == 1
    assert job["preview_output"]["nodeId"] == "7" and job["preview_output"]["mediaType"] == "images"
    assert job["execution_end_time"] >= job["execution_start_time"] >= job["create_time"] - 1000
    assert jobs["pagination"]["total"] >= 1
    assert front.get_json(f"{API}/jobs?status=pending,in_progress")["jobs"] == []
    detail = front.get_json(f"{API}/jobs/{prompt_id}")
    assert detail["workflow"]["prompt"]["5"]["class_type"] == "ARGenerateTokens"
    image = detail["outputs"]["7"]["images"][0]
    assert front.get(f"{API}/view?filename={image['filename']}&type=output").status == 200
    assert front.get(f"{API}/jobs/nope").status == 404
    assert post(front, f"{API}/jobs/cancel", {"job_ids": "x"}).status == 400


def test_the_frontend_socket_names_its_client_and_keeps_comfyui_order(front):
    """The frontend connects without a clientId: the server gives one (sid) and the prompts it
    submits with that id report to it; a rerun's cached SaveImage output follows execution_cached."""

    async def run() -> list[list[dict]]:
        runs = []
        async with websockets.connect(f"ws://{front.host}/comfyui/ws") as ws:
            first = json.loads(await ws.recv())
            sid = first["data"]["sid"]
            await ws.send(json.dumps({"type": "feature_flags", "data": {"supports_preview_metadata": True}}))
            assert json.loads(await ws.recv())["type"] == "feature_flags"
            for _ in range(2):
                post(front, f"{API}/prompt", {"prompt": AR_PROMPT, "client_id": sid})
                messages = []
                while not messages or messages[-1]["type"] != "executing" or messages[-1]["data"]["node"]:
                    message = await asyncio.wait_for(ws.recv(), 60)
                    if isinstance(message, str) and json.loads(message)["type"] != "status":
                        messages.append(json.loads(message))
                runs.append(messages)
        return runs

    first, rerun = asyncio.run(run())
    assert [m["type"] for m in first][0] == "execution_start"
    assert any(m["type"] == "executed" and m["data"]["node"] == "7" for m in first)
    assert [m["type"] for m in rerun] == [
        "execution_start",
        "execution_cached",
        "executed",
        "execution_success",
        "executing",
    ]


def test_the_guards_cover_the_prefix(front, server):
    evil = {"Origin": "http://evil.example"}
    assert post(front, f"{API}/settings", {"Comfy.Locale": "xx"}, headers=evil).status == 403
    assert front.get_json(f"{API}/settings").get("Comfy.Locale") != "xx"
    assert front.get(f"{API}/settings", headers={"Host": "rebound.example:80"}).status == 403
    upgrade = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13"}
    key = {"Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}
    assert front.get("/comfyui/ws", headers={**upgrade, **key, **evil}).status == 403
    guarded = server(
        "comfy-frontend-token",
        token="SECRET-token-" + uuid.uuid4().hex[:8],
        extra_args=("--models-dir", str(MODELS), "--frontend", "comfyui"),
    )
    token = guarded.token
    guarded.token = None  # requests without it
    assert guarded.get(f"{API}/settings").status == 401
    assert guarded.get("/comfyui/").status == 401
    assert guarded.get(f"/comfyui/?token={token}").status == 200


def test_object_info_describes_the_custom_sampler_family(front):
    info = front.get_json(f"{API}/object_info/SamplerCustomAdvanced")["SamplerCustomAdvanced"]
    assert info["output_name"] == ["output", "denoised_output"] and info["output"] == ["LATENT", "LATENT"]
    assert info["input"]["required"]["guider"] == ["GUIDER", {}]
    select = front.get_json(f"{API}/object_info/KSamplerSelect")["KSamplerSelect"]
    assert select["input"]["required"]["sampler_name"][0] == ["euler", "euler_ancestral", "heun", "dpmpp_2m"]
    noise = front.get_json(f"{API}/object_info/RandomNoise")["RandomNoise"]["input"]["required"]
    assert noise["noise_seed"][1]["control_after_generate"] is True
    shift = front.get_json(f"{API}/object_info/ModelSamplingFlux")["ModelSamplingFlux"]["input"]["required"]
    assert shift["max_shift"][1]["default"] == 1.15 and shift["width"][0] == "INT"


def test_free_drops_the_loaded_models_and_the_lists_are_served_at_the_root_too(front):
    r = post(front, "/prompt", {"prompt": AR_PROMPT, "client_id": "free-test"})
    prompt_id = r.json()["prompt_id"]
    wait_until(lambda: front.get_json(f"/api/history/{prompt_id}")["status"] == "success", 60)
    assert front.get_json("/api/system")["memory"]["cache"]  # the models and outputs are cached
    assert post(front, "/free", {"unload_models": True, "free_memory": True}).status == 200
    assert front.get_json("/api/system")["memory"]["cache"] == {}
    again = post(front, "/prompt", {"prompt": AR_PROMPT, "client_id": "free-test"}).json()["prompt_id"]
    wait_until(lambda: front.get_json(f"/api/history/{again}")["status"] == "success", 60)
    assert front.get_json(f"/api/history/{again}")["cached"] == []  # loaded and run again
    assert post(front, "/free", ["x"]).status == 400
    assert front.get_json("/embeddings") == [] and front.get_json("/extensions") == []


def test_a_missing_frontend_package_names_the_extra_to_install(monkeypatch):
    from tessera.comfy import frontend

    monkeypatch.setattr(frontend.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SystemExit, match=r"pip install 'tessera\[comfyui\]'"):
        frontend.static_dir()


def test_view_metadata_reads_a_model_files_header(front, tmp_path):
    meta = front.get_json("/view_metadata/ar_models?filename=tessera-ar-tiny.safetensors")
    assert json.loads(meta["tessera.config"])["vocab_size"] > 0 and "tessera.card" in meta
    assert front.get_json(f"{API}/view_metadata/ar_models?filename=tessera-ar-tiny.safetensors") == meta
    assert front.get("/view_metadata/ar_models?filename=missing.safetensors").status == 404
    assert front.get("/view_metadata/ar_models?filename=..%2F..%2Fpyproject.toml").status == 400
    assert front.get("/view_metadata/nope?filename=x.safetensors").status == 404
