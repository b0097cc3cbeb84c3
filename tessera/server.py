"""The aiohttp server: the HTTP API, the WebSocket event stream and the editor's files.

Routes follow docs/API.md. The executor runs on the worker thread; its events are
handed to the event loop and broadcast to every connected WebSocket.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import platform
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import torch
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from PIL import Image

import tessera
from tessera.cache import OutputCache
from tessera.executor import Executor
from tessera.openapi import openapi_document
from tessera.paths import MODEL_FOLDERS, SOURCE_ROOT, UnsafePathError, confined_path, find_input, templates_dir
from tessera.queue import PromptStore, PromptWorker, QueueError
from tessera.registry import NodeRegistry
from tessera.security import RequestGuard
from tessera.workflow import InvalidWorkflow, schema_issues

MAX_UPLOAD_BYTES = 20 << 20
MULTIPART_OVERHEAD = 1 << 16  # boundaries and part headers around a file of up to MAX_UPLOAD_BYTES
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
WORKFLOW_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.\-]{0,99}$")
UPLOAD_NAME = re.compile(r"[^A-Za-z0-9_.\-]")
WEB_DIR = SOURCE_ROOT / "web"


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8188
    models_dir: Path = SOURCE_ROOT / "models"
    output_dir: Path = Path("output")
    input_dir: Path = Path("input")
    user_dir: Path = Path("user")
    device: str = "auto"
    token: str | None = None
    cache_ram_bytes: int = 8 << 30
    cache_vram_bytes: int = 16 << 30


def error(message: str, status: int = 400, **extra) -> web.Response:
    return web.json_response({"error": message, **extra}, status=status)


async def read_json(request: web.Request) -> object:
    try:
        return await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise web.HTTPBadRequest(text=json.dumps({"error": "request body is not valid JSON"}), content_type="application/json")


class TesseraServer:
    def __init__(self, config: ServerConfig, registry: NodeRegistry):
        self.config = config
        self.registry = registry
        for folder in (config.output_dir, config.input_dir, config.user_dir / "workflows"):
            folder.mkdir(parents=True, exist_ok=True)
        cache = OutputCache(config.cache_ram_bytes, config.cache_vram_bytes)
        self.executor = Executor(registry, config.models_dir, config.input_dir, config.output_dir, config.device, cache)
        self.store = PromptStore(config.user_dir / "queue.sqlite")
        self.sockets: set[web.WebSocketResponse] = set()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.worker = PromptWorker(self.store, self.executor, self.emit_threadsafe)
        self.guard = RequestGuard(config.host, config.port, config.token)

    # -- events ---------------------------------------------------------------------------
    def emit_threadsafe(self, kind: str, data: dict) -> None:
        if self.loop is None or self.loop.is_closed():
            return
        if kind == "preview":
            buffer = io.BytesIO()
            data["image"].save(buffer, format="PNG")
            header = json.dumps({"prompt_id": data["prompt_id"], "node": data["node"], "format": "png"}).encode()
            frame: str | bytes = len(header).to_bytes(4, "big") + header + buffer.getvalue()
        else:
            frame = json.dumps({"type": kind, "data": data})
        self.loop.call_soon_threadsafe(self._broadcast, frame)

    def _broadcast(self, frame: str | bytes) -> None:
        for ws in list(self.sockets):
            if ws.closed:
                self.sockets.discard(ws)
                continue
            send = ws.send_bytes(frame) if isinstance(frame, bytes) else ws.send_str(frame)
            asyncio.ensure_future(send).add_done_callback(lambda f: f.exception())

    # -- app ------------------------------------------------------------------------------
    def make_app(self) -> web.Application:
        app = web.Application(middlewares=[self.guard.middleware], client_max_size=MAX_UPLOAD_BYTES + MULTIPART_OVERHEAD)
        r = app.router
        r.add_get("/api/nodes", self.nodes)
        r.add_post("/api/validate", self.validate)
        r.add_post("/api/prompt", self.prompt)
        r.add_get("/api/queue", self.queue)
        r.add_delete("/api/queue/{prompt_id}", self.cancel)
        r.add_post("/api/interrupt", self.interrupt)
        r.add_get("/api/history", self.history)
        r.add_get("/api/history/{prompt_id}", self.history_entry)
        r.add_get("/api/models", self.models)
        r.add_get("/api/view", self.view)
        r.add_post("/api/upload/image", self.upload)
        r.add_get("/api/workflows", self.workflow_list)
        r.add_get("/api/workflows/{name}", self.workflow_get)
        r.add_put("/api/workflows/{name}", self.workflow_put)
        r.add_delete("/api/workflows/{name}", self.workflow_delete)
        r.add_get("/api/templates", self.templates)
        r.add_get("/api/system", self.system)
        r.add_get("/api/openapi.json", self.openapi)
        r.add_get("/ws", self.websocket)
        r.add_get("/", self.index)
        if WEB_DIR.is_dir():
            r.add_static("/", WEB_DIR, follow_symlinks=False)
        app.on_startup.append(self._on_startup)
        app.on_shutdown.append(self._on_shutdown)
        return app

    async def _on_startup(self, app) -> None:
        self.loop = asyncio.get_running_loop()
        self.worker.start()

    async def _on_shutdown(self, app) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.worker.stop)
        for ws in list(self.sockets):
            await ws.close()
        self.store.close()

    # -- handlers -------------------------------------------------------------------------
    async def index(self, request):
        page = WEB_DIR / "index.html"
        if not page.is_file():
            return web.Response(text="Tessera API is running; the editor (web/) is not installed.", content_type="text/plain")
        return web.FileResponse(page)

    async def nodes(self, request):
        files = self.executor.model_files
        catalogue = {name: cls.info(files) for name, cls in sorted(self.registry.nodes.items())}
        types = sorted({i["type"] for n in catalogue.values() for i in n["inputs"]} | {o["type"] for n in catalogue.values() for o in n["outputs"]})
        return web.json_response({"nodes": catalogue, "types": types, "failed_packs": self.registry.failed_packs})

    def _validated(self, body: object) -> dict:
        if not isinstance(body, dict) or "workflow" not in body:
            raise InvalidWorkflow([])
        return self.executor.validate(body["workflow"])

    async def validate(self, request):
        body = await read_json(request)
        try:  # the same checks /api/prompt makes (and `tessera validate`): graph, fingerprints, an output node
            self.executor.compile(self._validated(body))
        except InvalidWorkflow as e:
            return self._invalid(e)
        return web.json_response({"valid": True})

    async def prompt(self, request):
        body = await read_json(request)
        try:
            workflow = self._validated(body)
            self.executor.compile(workflow)  # fingerprints and "no output node" are checked before queueing
        except InvalidWorkflow as e:
            return self._invalid(e)
        client_id = body.get("client_id") if isinstance(body.get("client_id"), str) else None
        item = self.store.add(workflow, client_id)
        self.worker.notify()
        self.emit_threadsafe("status", {"queue_remaining": self.store.remaining()})
        return web.json_response(item)

    @staticmethod
    def _invalid(e: InvalidWorkflow):
        issues = [i.to_json() for i in e.issues] or [{"node": None, "input": None, "reason": "body must be {\"workflow\": {...}}"}]
        return error("invalid workflow", 400, errors=issues)

    async def queue(self, request):
        return web.json_response({"running": self.store.items("running"), "pending": self.store.items("pending")})

    async def cancel(self, request):
        prompt_id = request.match_info["prompt_id"]
        try:
            self.store.cancel(prompt_id)
        except QueueError as e:
            return error(str(e), e.status)
        self.emit_threadsafe("status", {"queue_remaining": self.store.remaining()})
        return web.json_response({"cancelled": prompt_id})

    async def interrupt(self, request):
        body = await read_json(request) if request.can_read_body else {}
        prompt_id = body.get("prompt_id") if isinstance(body, dict) else None
        return web.json_response({"interrupted": self.worker.interrupt(prompt_id)})

    async def history(self, request):
        try:
            limit = max(1, min(int(request.query.get("limit", "100")), 10_000))
        except ValueError:
            return error("limit must be an integer")
        return web.json_response({"items": self.store.history(limit)})

    async def history_entry(self, request):
        entry = self.store.get(request.match_info["prompt_id"])
        if entry is None:
            return error("no such prompt", 404)
        return web.json_response(entry)

    async def models(self, request):
        return web.json_response({folder: self.executor.model_files(folder) for folder in MODEL_FOLDERS})

    async def view(self, request):
        kind = request.query.get("type", "output")
        roots = {"output": self.config.output_dir, "input": self.config.input_dir}
        if kind not in roots:
            return error("type must be 'output' or 'input'")
        subfolder = request.query.get("subfolder", "")
        filename = request.query.get("filename", "")
        name = f"{subfolder}/{filename}" if subfolder else filename
        try:
            path = confined_path(roots[kind], name, IMAGE_SUFFIXES)
            if kind == "input":
                path = find_input(roots[kind], name)
        except UnsafePathError as e:
            return error(str(e), 400)
        if not path.is_file():
            return error("no such file", 404)
        return web.FileResponse(path, headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"})

    async def upload(self, request):
        if request.content_length is not None and request.content_length > MAX_UPLOAD_BYTES + MULTIPART_OVERHEAD:
            return error(f"upload is larger than {MAX_UPLOAD_BYTES >> 20} MiB", 413)
        try:
            form = await request.post()
        except HttpProcessingError:  # e.g. a part header with a NUL byte in the file name
            return error("the upload is not a well-formed multipart/form-data body")
        except (ValueError, web.HTTPRequestEntityTooLarge):
            return error(f"upload is larger than {MAX_UPLOAD_BYTES >> 20} MiB", 413)
        field = form.get("image")
        if not isinstance(field, web.FileField):
            return error("multipart field 'image' with a file is required")
        data = field.file.read(MAX_UPLOAD_BYTES + 1)
        if len(data) > MAX_UPLOAD_BYTES:
            return error(f"upload is larger than {MAX_UPLOAD_BYTES >> 20} MiB", 413)
        try:
            with Image.open(io.BytesIO(data)) as picture:
                fmt = picture.format
                picture.verify()
        except Exception:
            return error("the upload is not a readable image")
        if fmt not in ("PNG", "JPEG", "WEBP"):
            return error(f"{fmt} images are not accepted (PNG, JPEG or WebP)")
        stem = UPLOAD_NAME.sub("_", Path(field.filename or "upload").stem).strip("._")[:80] or "upload"
        suffix = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp"}[fmt]
        name = f"{stem}{suffix}"
        counter = 1
        while (self.config.input_dir / name).exists():
            if (self.config.input_dir / name).read_bytes() == data:
                break  # the same picture uploaded again: reuse it
            counter += 1
            name = f"{stem}_{counter}{suffix}"
        path = confined_path(self.config.input_dir, name)
        tmp = path.with_name(path.name + ".part")
        tmp.write_bytes(data)
        tmp.replace(path)
        return web.json_response({"name": name, "subfolder": "", "type": "input"})

    def _workflow_path(self, request) -> Path:
        name = request.match_info["name"]
        if not WORKFLOW_NAME.match(name) or name.endswith("."):
            raise web.HTTPBadRequest(
                text=json.dumps({"error": f"workflow name {name!r} may use letters, digits, spaces, '_', '-', '.'"}),
                content_type="application/json",
            )
        return confined_path(self.config.user_dir / "workflows", f"{name}.json")

    async def workflow_list(self, request):
        folder = self.config.user_dir / "workflows"
        return web.json_response({"workflows": sorted(p.stem for p in folder.glob("*.json"))})

    async def workflow_get(self, request):
        path = self._workflow_path(request)
        if not path.is_file():
            return error("no such workflow", 404)
        try:
            return web.json_response(json.loads(path.read_text()))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return error(f"saved workflow '{path.stem}' is not valid JSON ({e}); PUT a new version to replace it", 422)

    async def workflow_put(self, request):
        path = self._workflow_path(request)
        body = await read_json(request)
        issues = schema_issues(body)
        if issues:  # a work in progress may fail graph checks, but must be a workflow document
            return error("not a workflow document", 400, errors=[i.to_json() for i in issues])
        tmp = path.with_name(path.name + ".part")
        tmp.write_text(json.dumps(body, indent=1))
        tmp.replace(path)
        return web.json_response({"saved": path.stem})

    async def workflow_delete(self, request):
        path = self._workflow_path(request)
        if not path.is_file():
            return error("no such workflow", 404)
        path.unlink()
        return web.json_response({"deleted": path.stem})

    async def templates(self, request):
        folder = templates_dir()
        found = {}
        for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
            try:
                found[path.stem] = json.loads(path.read_text())
            except json.JSONDecodeError:
                continue
        return web.json_response({"templates": found})

    async def system(self, request):
        return web.json_response(system_info(self.executor))

    async def openapi(self, request):
        return web.json_response(openapi_document(request.app))

    async def websocket(self, request):
        ws = web.WebSocketResponse(heartbeat=30)
        await ws.prepare(request)
        self.sockets.add(ws)
        await ws.send_str(json.dumps({"type": "status", "data": {"queue_remaining": self.store.remaining()}}))
        try:
            async for message in ws:
                if message.type == aiohttp.WSMsgType.ERROR:
                    break
        finally:
            self.sockets.discard(ws)
        return ws


def attention_backend() -> str:
    try:
        from tessera.engines.attention import attention_backend_name
    except ImportError:
        return "torch-sdpa"
    return attention_backend_name()


def system_info(executor: Executor) -> dict:
    memory: dict = {}
    try:
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        available = os.sysconf("SC_AVPHYS_PAGES")
        memory["ram_total"], memory["ram_free"] = pages * page_size, available * page_size
    except (ValueError, OSError, AttributeError):
        pass
    if executor.device.type == "cuda":
        free, total = torch.cuda.mem_get_info(executor.device)
        memory["vram_total"], memory["vram_free"] = total, free
    memory["cache"] = executor.cache.usage()
    return {
        "versions": {"tessera": tessera.__version__, "python": sys.version.split()[0], "torch": torch.__version__, "aiohttp": aiohttp.__version__},
        "platform": platform.platform(),
        "device": str(executor.device),
        "dtype": str(executor.dtype).removeprefix("torch."),
        "memory": memory,
        "attention_backend": attention_backend(),
    }
