"""ComfyUI's API served by Tessera, driven by an unmodified third-party client from PyPI
(`comfy-api-simplified`: requests + websockets) for a diffusion and an autoregressive workflow
on the built-in models, with the WebSocket messages checked in ComfyUI's order."""

from __future__ import annotations

import asyncio
import io
import json
import uuid

import pytest
import requests
import websockets
from comfy_api_simplified import ComfyApiWrapper, ComfyWorkflowWrapper
from PIL import Image
from tessera_harness import ROOT

MODELS = ROOT / "models"

DIFFUSION = {  # ComfyUI node types where the table maps them, our own where ComfyUI has none
    "1": {
        "class_type": "UNETLoader",
        "inputs": {"unet_name": "tessera-dit-tiny.safetensors", "weight_dtype": "default"},
    },
    "2": {"class_type": "VAELoader", "inputs": {"vae_name": "tessera-vae-f8.safetensors"}},
    "3": {"class_type": "LoadTextEncoder", "inputs": {"file": "tessera-text-encoder.safetensors"}},
    "4": {
        "class_type": "CLIPTextEncode",
        "inputs": {"text": "a red star at the top left on a blue background", "clip": ["3", 0]},
    },
    "5": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["3", 0]}},
    "6": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
    "7": {
        "class_type": "KSampler",
        "inputs": {
            "seed": 1,
            "steps": 3,
            "cfg": 4.0,
            "sampler_name": "euler",
            "scheduler": "simple",
            "denoise": 1.0,
            "model": ["1", 0],
            "positive": ["4", 0],
            "negative": ["5", 0],
            "latent_image": ["6", 0],
        },
    },
    "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["2", 0]}},
    "9": {
        "class_type": "SaveImage",
        "inputs": {"filename_prefix": "comfy_diffusion", "images": ["8", 0]},
        "_meta": {"title": "Save Image"},
    },
}
AUTOREGRESSIVE = {  # our AR nodes under their own names, as /object_info lists them
    "1": {"class_type": "LoadARModel", "inputs": {"file": "tessera-ar-tiny.safetensors"}},
    "2": {"class_type": "LoadVQModel", "inputs": {"file": "tessera-vq-f8.safetensors"}},
    "3": {"class_type": "LoadTextEncoder", "inputs": {"file": "tessera-text-encoder.safetensors"}},
    "4": {
        "class_type": "CLIPTextEncode",
        "inputs": {"text": "a red star at the top left on a blue background", "clip": ["3", 0]},
    },
    "6": {
        "class_type": "ARGenerateTokens",
        "inputs": {
            "model": ["1", 0],
            "positive": ["4", 0],
            "vq": ["2", 0],
            "width": 4,
            "height": 4,
            "cfg": 1.0,
            "seed": 3,
            "top_k": 0,
            "preview_every": 0,
        },
    },
    "7": {"class_type": "VQDecode", "inputs": {"vq": ["2", 0], "tokens": ["6", 0]}},
    "8": {
        "class_type": "SaveImage",
        "inputs": {"filename_prefix": "comfy_ar", "images": ["7", 0]},
        "_meta": {"title": "Save Image"},
    },
}


for graph in (DIFFUSION, AUTOREGRESSIVE):  # ComfyUI's "Save (API)" writes a title on every node
    for node in graph.values():
        node.setdefault("_meta", {"title": node["class_type"]})


@pytest.fixture(scope="module")
def comfy(server):
    return server("comfy", extra_args=("--models-dir", str(MODELS)))  # with the test pack's Sleep node


def client(s) -> ComfyApiWrapper:
    return ComfyApiWrapper(f"http://127.0.0.1:{s.port}")


def watch(s, prompt: dict) -> tuple[str, list]:
    """Queue through the client with our clientId and record every message up to `executing` null."""
    client_id = uuid.uuid4().hex

    async def run():
        async with websockets.connect(f"ws://127.0.0.1:{s.port}/ws?clientId={client_id}") as ws:
            first = json.loads(await ws.recv())
            prompt_id = client(s).queue_prompt(prompt, client_id)["prompt_id"]
            messages = [first]
            while True:
                message = await asyncio.wait_for(ws.recv(), 120)
                messages.append(message if isinstance(message, bytes) else json.loads(message))
                data = messages[-1]["data"] if isinstance(messages[-1], dict) else {}
                if messages[-1] != message and messages[-1]["type"] == "executing" and data["node"] is None:
                    return prompt_id, messages

    return asyncio.run(run())


@pytest.mark.parametrize(
    ("prompt", "size"),
    [(DIFFUSION, (64, 64)), (AUTOREGRESSIVE, (32, 32))],
    ids=["diffusion", "autoregressive"],
)
def test_third_party_client_runs_the_workflow_and_fetches_the_image(comfy, prompt, size):
    images = client(comfy).queue_and_wait_images(
        ComfyWorkflowWrapper(json.loads(json.dumps(prompt))), "Save Image"
    )
    (data,) = images.values()
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG" and image.size == size


@pytest.mark.parametrize("prompt", [DIFFUSION, AUTOREGRESSIVE], ids=["diffusion", "autoregressive"])
def test_websocket_messages_come_in_comfyui_order(comfy, prompt):
    prompt = json.loads(json.dumps(prompt))
    sampler = prompt["7"] if prompt["7"]["class_type"] == "KSampler" else prompt["6"]
    sampler["inputs"]["seed"] += 100  # a seed the other tests did not use: the sampler runs (not cached)
    prompt_id, messages = watch(comfy, prompt)
    assert messages[0]["type"] == "status" and "queue_remaining" in messages[0]["data"]["status"]["exec_info"]
    mine = [m for m in messages[1:] if isinstance(m, dict) and m["data"].get("prompt_id") == prompt_id]
    kinds = [m["type"] for m in mine]
    assert kinds[0] == "execution_start"
    assert kinds[-2:] == ["execution_success", "executing"] and mine[-1]["data"]["node"] is None
    assert "progress" in kinds
    executing = [m["data"]["node"] for m in mine if m["type"] == "executing"][:-1]
    assert set(executing) <= set(prompt)  # ComfyUI's node ids
    progress = [m["data"] for m in mine if m["type"] == "progress"]
    assert all(p["node"] in prompt and 0 < p["value"] <= p["max"] for p in progress)
    executed = [m["data"] for m in mine if m["type"] == "executed"]
    (save,) = [e for e in executed if prompt[e["node"]]["class_type"] == "SaveImage"]
    (ref,) = save["output"]["images"]
    history = requests.get(f"http://127.0.0.1:{comfy.port}/history/{prompt_id}").json()[prompt_id]
    assert history["status"] == {
        "status_str": "success",
        "completed": True,
        "messages": history["status"]["messages"],
    }
    assert history["outputs"][save["node"]]["images"] == [ref]
    assert history["prompt"][1] == prompt_id and history["prompt"][2] == prompt
    assert client(comfy).get_image(ref["filename"], ref["subfolder"], ref["type"]).startswith(b"\x89PNG")


def test_object_info_lists_comfyui_nodes_and_our_ar_nodes(comfy):
    info = client(comfy).get_object_info()
    ksampler = info["KSampler"]
    assert ksampler["input"]["required"]["sampler_name"][0] == [
        "euler",
        "euler_ancestral",
        "heun",
        "dpmpp_2m",
    ]
    assert ksampler["input"]["required"]["scheduler"][0] == ["simple", "beta"]
    assert ksampler["input"]["required"]["model"] == ["MODEL", {}] and ksampler["output"] == ["LATENT"]
    assert info["UNETLoader"]["input"]["required"]["unet_name"][0] == ["tessera-dit-tiny.safetensors"]
    ar = info["ARGenerateTokens"]
    assert ar["input"]["required"]["model"] == ["AR_MODEL", {}] and ar["output"] == ["TOKENS"]
    assert ar["input"]["required"]["seed"][1]["control_after_generate"] is True
    assert info["LoadDiffusionModel"]["output"] == ["MODEL"]  # ComfyUI's type name, so the sockets connect
    assert client(comfy).get_object_info("KSamplerAdvanced")["KSamplerAdvanced"]["input"]["required"][
        "add_noise"
    ] == [["enable"], {}]


def test_an_unsupported_scheduler_is_a_node_error_listing_the_supported_ones(comfy):
    prompt = json.loads(json.dumps(DIFFUSION))
    prompt["7"]["inputs"]["scheduler"] = "karras"
    answer = requests.post(f"http://127.0.0.1:{comfy.port}/prompt", json={"prompt": prompt})
    assert answer.status_code == 400
    body = answer.json()
    assert body["error"]["type"] == "prompt_outputs_failed_validation"
    (error,) = body["node_errors"]["7"]["errors"]
    assert "karras" in error["message"] and "simple, beta" in error["message"]
    assert body["node_errors"]["7"]["class_type"] == "KSampler"


def test_the_same_guards_cover_the_comfyui_routes(comfy):
    base = f"http://127.0.0.1:{comfy.port}"
    cross = requests.post(
        f"{base}/prompt", json={"prompt": DIFFUSION}, headers={"Origin": "http://evil.example"}
    )
    assert cross.status_code == 403
    assert requests.get(f"{base}/object_info", headers={"Host": "rebound.example:80"}).status_code == 403
    escape = requests.get(f"{base}/view", params={"filename": "../user/queue.sqlite", "type": "output"})
    assert escape.status_code == 400
    assert requests.get(f"{base}/models/checkpoints").json() == []
    assert requests.get(f"{base}/models/unet").json() == ["tessera-dit-tiny.safetensors"]
    stats = client(comfy).get_system_stats()
    assert stats["devices"][0]["type"] == "cpu" and stats["system"]["ram_total"] > 0


def test_queue_shows_the_running_prompt_and_interrupt_stops_it(comfy):
    base = f"http://127.0.0.1:{comfy.port}"
    client_id = uuid.uuid4().hex
    sleep = {
        "1": {"class_type": "Sleep", "inputs": {"steps": 100000, "step_seconds": 0.01, "label": "comfy"}}
    }

    async def run():
        async with websockets.connect(f"ws://127.0.0.1:{comfy.port}/ws?clientId={client_id}") as ws:
            prompt_id = requests.post(
                f"{base}/prompt", json={"prompt": sleep, "client_id": client_id}
            ).json()["prompt_id"]
            seen, asked = [], False
            while True:
                message = json.loads(await asyncio.wait_for(ws.recv(), 60))
                seen.append(message)
                if (
                    message["type"] == "progress" and not asked
                ):  # running: in the queue's running list; stop it
                    asked = True
                    running = requests.get(f"{base}/queue").json()["queue_running"]
                    assert [(r[1], r[2]) for r in running] == [(prompt_id, sleep)]
                    assert (
                        requests.post(f"{base}/interrupt", json={"prompt_id": prompt_id}).status_code == 200
                    )
                if message["type"] == "executing" and message["data"]["node"] is None:
                    return prompt_id, seen

    prompt_id, seen = asyncio.run(run())
    kinds = [m["type"] for m in seen if m["data"].get("prompt_id") == prompt_id]
    assert kinds[-2:] == ["execution_interrupted", "executing"]
    assert seen[-2]["data"]["node_id"] == "1" and seen[-2]["data"]["node_type"] == "Sleep"
    entry = requests.get(f"{base}/history/{prompt_id}").json()[prompt_id]
    assert entry["status"]["status_str"] == "error" and not entry["status"]["completed"]
    assert requests.get(f"{base}/history/no-such-prompt").json() == {}


def test_upload_an_image_then_its_mask(comfy, tmp_path):
    picture = tmp_path / "photo.png"
    Image.new("RGB", (8, 6), (10, 200, 30)).save(picture)
    uploaded = client(comfy).upload_image(picture)
    assert uploaded == {"name": "photo.png", "subfolder": "", "type": "input"}
    mask = io.BytesIO()
    Image.new("RGBA", (4, 3), (0, 0, 0, 77)).save(mask, format="PNG")
    answer = requests.post(
        f"http://127.0.0.1:{comfy.port}/upload/mask",
        files={"image": ("clipspace-mask.png", mask.getvalue(), "image/png")},
        data={"original_ref": json.dumps({"filename": "photo.png", "subfolder": "", "type": "input"})},
    )
    assert answer.status_code == 200, answer.text
    name = answer.json()["name"]
    data = client(comfy).get_image(name, "", "input")
    with Image.open(io.BytesIO(data)) as masked:
        assert masked.size == (8, 6) and masked.mode == "RGBA"
        assert masked.getpixel((3, 3)) == (10, 200, 30, 77)  # the original's colour, the mask's alpha
    outside = requests.post(
        f"http://127.0.0.1:{comfy.port}/upload/mask",
        files={"image": ("m.png", mask.getvalue(), "image/png")},
        data={"original_ref": json.dumps({"filename": "../user/queue.sqlite", "type": "input"})},
    )
    assert outside.status_code == 400
