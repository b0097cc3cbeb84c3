"""The aiohttp server: the HTTP API, the WebSocket event stream and the editor's files.

Routes follow docs/API.md. Request bodies are strict, bounded JSON; validation runs on a
thread pool so a large graph never stalls the event loop. The executor runs on the
worker thread; its events are handed to the event loop and sent only to the WebSockets
of the client that submitted the prompt (and to those subscribed to everything).
"""

from __future__ import annotations

import asyncio
import io
import json
import math
import os
import platform
import re
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import torch
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from PIL import Image

import tessera
from tessera.budgets import Budgets, OutputQuota, allocation_issues, node_count_issues
from tessera.cache import OutputCache
from tessera.comfy.api import ComfyAPI
from tessera.comfy.frontend import ComfyFrontend
from tessera.compile import compile_info
from tessera.executor import Executor
from tessera.images import check_pixels, configure_image_limits, too_many_pixels
from tessera.openapi import openapi_document
from tessera.paths import (
    MODEL_FOLDERS,
    SOURCE_ROOT,
    UnsafePathError,
    confined_path,
    find_input,
    templates_dir,
    write_confined,
)
from tessera.queue import (
    FINAL_EVENTS,
    STORAGE_ERRORS,
    PromptStore,
    PromptWorker,
    QueueError,
    StorageHealth,
    describe_storage_error,
)
from tessera.registry import NodeRegistry
from tessera.security import RequestGuard
from tessera.workflow import InvalidWorkflow, migrate, schema_issues

MAX_UPLOAD_BYTES = 20 << 20
MULTIPART_OVERHEAD = 1 << 16  # boundaries and part headers around a file of up to MAX_UPLOAD_BYTES
MAX_JSON_DEPTH = 64  # a workflow is a few levels deep; deeper bodies are refused before anything walks them
MAX_INT_DIGITS = 40  # seeds fit in 20 digits; a 5,000-digit integer is refused, not converted
MAX_CLIENT_ID = 200
GIL_SWITCH_SECONDS = 0.0005
OFF_LOOP_BYTES = 64 << 10  # larger bodies are parsed on the check pool, not the event loop
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
    budgets: Budgets = field(default_factory=Budgets)
    cluster: object | None = None  # a tessera.cluster.ClusterConfig: prompts run on Ray workers
    frontend: str = "tessera"  # or "comfyui": ComfyUI's own editor (tessera.comfy.frontend)


class Refused(Exception):
    """A request refused with a 4xx (or 503) JSON answer `{"error": message, ...}`."""

    def __init__(self, status: int, message: str, close: bool = False, **extra):
        super().__init__(message)
        self.status, self.message, self.close, self.extra = status, message, close, extra


def _finite(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def dumps(value: object) -> str:
    """Standard JSON only: a non-finite float (never accepted on input) would be written as null."""
    try:
        return json.dumps(value, allow_nan=False)
    except ValueError:
        return json.dumps(_finite(value), allow_nan=False)


def json_response(data: object, status: int = 200, **kwargs) -> web.Response:
    return web.json_response(data, status=status, dumps=dumps, **kwargs)


def error(message: str, status: int = 400, **extra) -> web.Response:
    return json_response({"error": message, **extra}, status=status)


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(
            f"an integer of {len(text.lstrip('-')):,} digits is too long (at most {MAX_INT_DIGITS})"
        )
    return int(text)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:40]} is out of the range of a finite number")
    return value


def _too_deep(value: object) -> bool:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            return True
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return False


def parse_json(raw: bytes) -> object:
    """Strict JSON: UTF-8, no NaN/Infinity, bounded integers and nesting; Refused(400) naming the problem."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise Refused(400, "request body is not valid JSON (not UTF-8)") from None
    try:
        value = json.loads(
            text, parse_constant=_no_constant, parse_int=_bounded_int, parse_float=_finite_float
        )
    except RecursionError:
        raise Refused(
            400, f"request body is not valid JSON: nested more than {MAX_JSON_DEPTH} levels deep"
        ) from None
    except ValueError as e:  # JSONDecodeError and the parse hooks above
        raise Refused(400, f"request body is not valid JSON: {e}") from None
    if _too_deep(value):
        raise Refused(400, f"request body is not valid JSON: nested more than {MAX_JSON_DEPTH} levels deep")
    return value


async def read_body(request: web.Request, limit: int) -> bytes:
    """The (decoded) body, at most `limit` bytes; Refused(413) beyond it, Refused(400) if it cannot be read."""
    if request.content_length is not None and request.content_length > limit:
        raise Refused(413, f"request body is larger than {limit:,} bytes (tessera serve --max-body-mb)")
    chunks, total = [], 0
    try:
        while chunk := await request.content.read(1 << 16):
            total += len(chunk)
            if total > limit:
                raise Refused(
                    413, f"request body is larger than {limit:,} bytes (tessera serve --max-body-mb)"
                )
            chunks.append(chunk)
    except (HttpProcessingError, web.RequestPayloadError, ValueError, EOFError) as e:
        request.content.feed_eof()  # nothing more is read from this connection; it closes after the answer
        raise Refused(
            400, f"request body could not be read ({_first_line(e)}); check its Content-Encoding", close=True
        ) from None
    return b"".join(chunks)


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return " ".join(lines[:2]) or type(e).__name__


@dataclass
class Listener:
    """One WebSocket: the client it belongs to, and whether it asked for every prompt's events."""

    client_id: str | None
    everything: bool = False


async def _routed_methods(request: web.Request) -> set[str]:
    """Methods the API routes take at this path (the editor's static files under "/" would
    otherwise add their GET and HEAD to every path)."""
    methods: set[str] = set()
    for resource in request.app.router.resources():
        if not isinstance(resource, web.StaticResource):
            methods |= (await resource.resolve(request))[1]
    return methods


def _not_allowed(request: web.Request, methods: set[str]) -> web.Response:
    allowed = ", ".join(sorted(methods))
    return json_response(
        {"error": f"{request.method} is not allowed here (allowed: {allowed})"},
        405,
        headers={"Allow": allowed},
    )


@web.middleware
async def refusals(request: web.Request, handler):
    """`Refused` becomes its JSON answer; the router's own 404/405 under /api answer JSON too."""
    if request.path.startswith("/api/") and isinstance(request.match_info.route.resource, web.StaticResource):
        routed = await _routed_methods(request)  # an API path, asked with a method it lacks
        if routed:
            return _not_allowed(request, routed)
        return error(f"no route {request.path}", 404)  # not an editor file either
    try:
        response = await handler(request)
    except Refused as e:
        response = error(e.message, e.status, **e.extra)
        if e.close:
            response.force_close()
        return response
    except web.HTTPMethodNotAllowed as e:
        return _not_allowed(request, await _routed_methods(request) or e.allowed_methods)
    except web.HTTPNotFound:
        if request.path.startswith("/api/"):
            return error(f"no route {request.path}", 404)
        raise
    return response


class TesseraServer:
    def __init__(self, config: ServerConfig, registry: NodeRegistry):
        self.config = config
        self.registry = registry
        self.budgets = config.budgets
        try:
            self.guard = RequestGuard(config.host, config.port, config.token)
        except ValueError as e:
            raise SystemExit(f"tessera: {e}") from None
        configure_image_limits(self.budgets.max_image_pixels, self.budgets.embedded_workflow_bytes)
        try:  # a full or read-only disk at start: one clear line, not a traceback
            for folder in (config.output_dir, config.input_dir, config.user_dir / "workflows"):
                folder.mkdir(parents=True, exist_ok=True)
            self.store = PromptStore(config.user_dir / "queue.sqlite")
        except STORAGE_ERRORS as e:
            raise SystemExit(f"tessera: cannot start: {describe_storage_error(e)}") from None
        cache = OutputCache(config.cache_ram_bytes, config.cache_vram_bytes)
        self.executor = Executor(
            registry, config.models_dir, config.input_dir, config.output_dir, config.device, cache
        )
        self.health = StorageHealth(self.store, [config.output_dir, config.user_dir])
        self.quota = OutputQuota(config.output_dir, self.budgets.output_quota_bytes)
        self.listeners: dict[web.WebSocketResponse, Listener] = {}
        self.owners: dict[str, str | None] = {}  # prompt id -> the client_id it was submitted with
        self.event_hooks: list[Callable[[str, dict], None]] = []  # other event consumers (the ComfyUI API)
        self.loop: asyncio.AbstractEventLoop | None = None
        # Validation and compilation: off the event loop, two at a time at most.
        self.checks = ThreadPoolExecutor(max_workers=2, thread_name_prefix="tessera-validate")
        if config.cluster is not None:  # Ray is imported only when a cluster is asked for
            from tessera.cluster import dispatcher_for

            self.worker = dispatcher_for(self)
        else:
            self.worker = PromptWorker(
                self.store, self.executor, self.emit_threadsafe, self.health, self.quota
            )

    # -- events ---------------------------------------------------------------------------
    def emit_threadsafe(self, kind: str, data: dict) -> None:
        if self.loop is None or self.loop.is_closed():
            return
        for hook in self.event_hooks:
            hook(kind, data)
        if kind == "preview":
            buffer = io.BytesIO()
            data["image"].save(buffer, format="PNG")
            header = json.dumps(
                {"prompt_id": data["prompt_id"], "node": data["node"], "format": "png"}
            ).encode()
            frame: str | bytes = len(header).to_bytes(4, "big") + header + buffer.getvalue()
        else:
            frame = dumps({"type": kind, "data": data})
        self.loop.call_soon_threadsafe(self._deliver, frame, data.get("prompt_id"), kind in FINAL_EVENTS)

    def _owner(self, prompt_id: str) -> str | None:
        if prompt_id not in self.owners:  # e.g. a prompt queued before a restart
            self.owners[prompt_id] = self.store.owner(prompt_id)
        return self.owners[prompt_id]

    def _deliver(self, frame: str | bytes, prompt_id: str | None, final: bool) -> None:
        """A prompt's events go to its own client's sockets and to those subscribed to all;
        events about no prompt (the queue's length) go to everyone."""
        owner = self._owner(prompt_id) if prompt_id else None
        for ws, listener in list(self.listeners.items()):
            if ws.closed:
                self.listeners.pop(ws, None)
                continue
            if prompt_id and not listener.everything and (owner is None or listener.client_id != owner):
                continue
            send = ws.send_bytes(frame) if isinstance(frame, bytes) else ws.send_str(frame)
            asyncio.ensure_future(send).add_done_callback(lambda f: f.exception())
        if final and prompt_id:
            self.owners.pop(prompt_id, None)

    # -- app ------------------------------------------------------------------------------
    def make_app(self) -> web.Application:
        app = web.Application(
            middlewares=[self.guard.middleware, refusals],
            client_max_size=MAX_UPLOAD_BYTES + MULTIPART_OVERHEAD,
        )
        r = app.router
        r.add_get("/api/nodes", self.nodes)
        r.add_post("/api/validate", self.validate)
        r.add_post("/api/prompt", self.prompt)
        r.add_get("/api/queue", self.queue)
        r.add_delete("/api/queue/{prompt_id}", self.cancel)
        r.add_delete("/api/queue", self.clear_pending)
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
        comfy = ComfyAPI(self)
        comfy.register(app)  # ComfyUI's routes; its /ws serves ours unless ?clientId= is given
        if self.config.frontend == "comfyui":  # ComfyUI's editor under /comfyui/, and / leads there
            ComfyFrontend(self, comfy).register(app)
        else:
            r.add_get("/", self.index)
        if WEB_DIR.is_dir():
            r.add_static("/", WEB_DIR, follow_symlinks=False)
        app.on_startup.append(self._on_startup)
        app.on_shutdown.append(self._on_shutdown)
        return app

    async def _on_startup(self, app) -> None:
        # While a check thread validates a large graph it holds the GIL; the event loop gets
        # it back within this interval (Python's default, 5 ms, is paid several times per request).
        sys.setswitchinterval(GIL_SWITCH_SECONDS)
        self.loop = asyncio.get_running_loop()
        self.worker.start()

    async def _on_shutdown(self, app) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.worker.stop)
        for ws in list(self.listeners):
            await ws.close()
        self.checks.shutdown(wait=False, cancel_futures=True)
        self.store.close()

    async def _off_loop(self, function, *args):
        return await asyncio.get_running_loop().run_in_executor(self.checks, function, *args)

    async def _read_json(self, request: web.Request) -> object:
        raw = await read_body(request, self.budgets.max_body_bytes)
        return parse_json(raw) if len(raw) < OFF_LOOP_BYTES else await self._off_loop(parse_json, raw)

    # -- handlers -------------------------------------------------------------------------
    async def index(self, request):
        page = WEB_DIR / "index.html"
        if not page.is_file():
            return web.Response(
                text="Tessera API is running; the editor (web/) is not installed.", content_type="text/plain"
            )
        return web.FileResponse(page)

    async def nodes(self, request):
        files = self.executor.model_files
        images = self.executor.input_images
        catalogue = {name: cls.info(files, images) for name, cls in sorted(self.registry.nodes.items())}
        types = sorted(
            {i["type"] for n in catalogue.values() for i in n["inputs"]}
            | {o["type"] for n in catalogue.values() for o in n["outputs"]}
        )
        return json_response({"nodes": catalogue, "types": types, "failed_packs": self.registry.failed_packs})

    def _checked(self, body: object) -> dict:
        """Budgets, graph, fingerprints and an output node: what /api/prompt, /api/validate and
        `tessera validate` all check. Runs on the `checks` pool."""
        if not isinstance(body, dict) or "workflow" not in body:
            raise InvalidWorkflow([])
        issues = node_count_issues(body["workflow"], self.budgets)
        if issues:
            raise InvalidWorkflow(issues)
        workflow = self.executor.validate(body["workflow"])
        issues = allocation_issues(workflow, self.registry, self.budgets)
        if issues:
            raise InvalidWorkflow(issues)
        self.executor.compile(workflow)
        return workflow

    async def validate(self, request):
        body = await self._read_json(request)
        try:
            await self._off_loop(self._checked, body)
        except InvalidWorkflow as e:
            return self._invalid(e)
        return json_response({"valid": True})

    async def prompt(self, request):
        body = await self._read_json(request)
        client_id = body.get("client_id") if isinstance(body, dict) else None
        if client_id is not None and (not isinstance(client_id, str) or len(client_id) > MAX_CLIENT_ID):
            return error(f"client_id must be a string of at most {MAX_CLIENT_ID} characters")
        try:
            workflow = await self._off_loop(self._checked, body)
        except InvalidWorkflow as e:
            return self._invalid(e)
        over = self.quota.problem()
        if over:
            return error(over, 409)
        try:
            item = await self._off_loop(self.store.add, workflow, client_id)
        except STORAGE_ERRORS as e:
            self.health.failed(describe_storage_error(e))
            return error(f"the prompt was not queued: {describe_storage_error(e)}", 503)
        self.owners[item["prompt_id"]] = client_id
        self.worker.notify()
        self.emit_threadsafe("status", {"queue_remaining": self.store.remaining()})
        return json_response(item)

    @staticmethod
    def _invalid(e: InvalidWorkflow):
        issues = [i.to_json() for i in e.issues] or [
            {"node": None, "input": None, "reason": 'body must be {"workflow": {...}}'}
        ]
        return error("invalid workflow", 400, errors=issues)

    async def queue(self, request):
        running = self.store.items("running")
        if self.config.cluster is not None:  # which worker runs each prompt, and why it was chosen
            assigned = self.worker.assignments()
            for item in running:
                item.update(assigned.get(item["prompt_id"], {}))
        return json_response({"running": running, "pending": self.store.items("pending")})

    async def cancel(self, request):
        prompt_id = request.match_info["prompt_id"]
        client_id = request.query.get("client_id")
        try:  # a client that names itself may cancel only its own prompts (events are scoped the same way)
            owner = self.store.owner(prompt_id)
            if client_id and owner and client_id != owner:
                return error(f"prompt '{prompt_id}' was queued by another client", 403)
            self.store.cancel(prompt_id)
        except QueueError as e:
            return error(str(e), e.status)
        except STORAGE_ERRORS as e:
            return error(f"the prompt was not cancelled: {describe_storage_error(e)}", 503)
        self.owners.pop(prompt_id, None)  # a cancelled prompt sends no more events
        self.emit_threadsafe("status", {"queue_remaining": self.store.remaining()})
        return json_response({"cancelled": prompt_id})

    async def clear_pending(self, request):
        """Cancel the pending prompts (only those of `?client_id=`, when given); the running one stays."""
        try:
            cancelled = self.store.cancel_pending(request.query.get("client_id") or None)
        except STORAGE_ERRORS as e:
            return error(f"the queue was not cleared: {describe_storage_error(e)}", 503)
        self.emit_threadsafe("status", {"queue_remaining": self.store.remaining()})
        return json_response({"cancelled": cancelled})

    async def interrupt(self, request):
        body = await self._read_json(request) if request.can_read_body else {}
        prompt_id = body.get("prompt_id") if isinstance(body, dict) else None
        if prompt_id is not None and not isinstance(prompt_id, str):
            return error("prompt_id must be a string")
        return json_response({"interrupted": self.worker.interrupt(prompt_id)})

    async def history(self, request):
        try:
            limit = max(1, min(int(request.query.get("limit", "100")), 10_000))
        except ValueError:
            return error("limit must be an integer")
        return json_response({"items": self.store.history(limit)})

    async def history_entry(self, request):
        entry = self.store.get(request.match_info["prompt_id"])
        if entry is None:
            return error("no such prompt", 404)
        return json_response(entry)

    async def models(self, request):
        return json_response({folder: self.executor.model_files(folder) for folder in MODEL_FOLDERS})

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
        return web.FileResponse(
            path, headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}
        )

    async def upload(self, request):
        too_large = f"upload is larger than {MAX_UPLOAD_BYTES >> 20} MiB"
        if (
            request.content_length is not None
            and request.content_length > MAX_UPLOAD_BYTES + MULTIPART_OVERHEAD
        ):
            return error(too_large, 413)
        try:
            form = await request.post()
        except (
            HttpProcessingError,
            web.RequestPayloadError,
        ):  # e.g. a NUL byte in a part header, a bad encoding
            return error("the upload is not a well-formed multipart/form-data body")
        except (ValueError, web.HTTPRequestEntityTooLarge):
            return error(too_large, 413)
        field = form.get("image")
        if not isinstance(field, web.FileField):
            return error("multipart field 'image' with a file is required")
        data = field.file.read(MAX_UPLOAD_BYTES + 1)
        if len(data) > MAX_UPLOAD_BYTES:
            return error(too_large, 413)
        try:
            with Image.open(io.BytesIO(data)) as picture:
                fmt, size = picture.format, picture.size
                picture.verify()
        except Image.DecompressionBombError as e:
            return error(str(too_many_pixels(field.filename or "upload", e)), 413)
        except Exception:
            return error("the upload is not a readable image")
        if fmt not in ("PNG", "JPEG", "WEBP"):
            return error(f"{fmt} images are not accepted (PNG, JPEG or WebP)")
        try:
            check_pixels(field.filename or "upload", *size)
        except ValueError as e:
            return error(str(e), 413)
        stem = UPLOAD_NAME.sub("_", Path(field.filename or "upload").stem).strip("._")[:80] or "upload"
        suffix = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp"}[fmt]
        try:
            name = await self._off_loop(self._store_upload, stem, suffix, data)
        except STORAGE_ERRORS as e:
            return error(f"the upload was not stored: {describe_storage_error(e)}", 503)
        return json_response({"name": name, "subfolder": "", "type": "input"})

    def _store_upload(self, stem: str, suffix: str, data: bytes) -> str:
        """Store under the first free name (or reuse an identical file); never through a link."""
        folder = self.config.input_dir
        for counter in range(1, 10_000):
            name = f"{stem}{suffix}" if counter == 1 else f"{stem}_{counter}{suffix}"
            path = folder / name
            if path.is_symlink() or (path.exists() and not path.is_file()):
                continue
            if path.exists():
                if path.stat().st_size == len(data) and path.read_bytes() == data:
                    return name  # the same picture uploaded again: reuse it
                continue
            try:
                write_confined(folder, name, lambda f: f.write(data), exclusive=True)
            except FileExistsError:
                continue
            return name
        raise Refused(409, f"too many uploads named {stem}{suffix}; rename the file")

    def _workflow_path(self, request) -> Path:
        """The unresolved path of a saved workflow (a link there is never written or deleted through)."""
        name = request.match_info["name"]
        if not WORKFLOW_NAME.match(name) or name.endswith("."):
            raise Refused(400, f"workflow name {name!r} may use letters, digits, spaces, '_', '-', '.'")
        folder = self.config.user_dir / "workflows"
        try:
            confined_path(folder, f"{name}.json")
        except UnsafePathError as e:
            raise Refused(400, str(e)) from None
        return folder / f"{name}.json"

    async def workflow_list(self, request):
        folder = self.config.user_dir / "workflows"
        return json_response({"workflows": sorted(p.stem for p in folder.glob("*.json"))})

    async def workflow_get(self, request):
        path = self._workflow_path(request)
        if not path.is_file():
            return error("no such workflow", 404)
        try:
            document = parse_json(path.read_bytes())
            return json_response(migrate(document) if isinstance(document, dict) else document)
        except Refused as e:
            return error(
                f"saved workflow '{path.stem}' is not valid JSON ({e.message}); PUT a new version to replace it",
                422,
            )
        except InvalidWorkflow as e:
            return error(f"saved workflow '{path.stem}' cannot be opened: {e.issues[0].reason}", 422)

    async def workflow_put(self, request):
        path = self._workflow_path(request)
        body = await self._read_json(request)
        issues = await self._off_loop(schema_issues, body)
        if issues:  # a work in progress may fail graph checks, but must be a workflow document
            return error("not a workflow document", 400, errors=[i.to_json() for i in issues])
        text = json.dumps(body, indent=1).encode()
        try:
            await self._off_loop(write_confined, path.parent, path.name, lambda f: f.write(text))
        except UnsafePathError as e:
            return error(str(e), 400)
        except STORAGE_ERRORS as e:
            return error(f"the workflow was not saved: {describe_storage_error(e)}", 503)
        return json_response({"saved": path.stem})

    async def workflow_delete(self, request):
        path = self._workflow_path(request)
        if not path.is_file():
            return error("no such workflow", 404)
        try:
            path.unlink()  # the link itself, if it is one
        except STORAGE_ERRORS as e:
            return error(f"the workflow was not deleted: {describe_storage_error(e)}", 503)
        return json_response({"deleted": path.stem})

    async def templates(self, request):
        folder = templates_dir()
        found = {}
        for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
            try:
                found[path.stem] = json.loads(path.read_text())
            except json.JSONDecodeError:
                continue
        return json_response({"templates": found})

    async def system(self, request):
        info = system_info(self.executor)
        info["healthy"], info["health"] = self.health.ok, self.health.reason
        b = self.budgets
        info["budgets"] = {
            "max_body_bytes": b.max_body_bytes,
            "max_nodes": b.max_nodes,
            "max_image_pixels": b.max_image_pixels,
            "max_batch_pixels": b.max_batch_pixels,
            "output_quota_bytes": b.output_quota_bytes,
            "embedded_workflow_bytes": b.embedded_workflow_bytes,
        }
        info["output_bytes"] = self.quota.used
        if self.config.cluster is not None:
            info["cluster"] = self.worker.describe()  # its workers, the models each holds
        return json_response(info)

    async def openapi(self, request):
        return json_response(openapi_document(request.app))

    async def websocket(self, request):
        client_id = request.query.get("client_id") or None
        if client_id is not None and len(client_id) > MAX_CLIENT_ID:
            return error(f"client_id must be at most {MAX_CLIENT_ID} characters")
        ws = web.WebSocketResponse(heartbeat=30)
        if not ws.can_prepare(request).ok:
            return error("this route takes a WebSocket upgrade (GET /ws?client_id=…)", 400)
        await ws.prepare(request)
        listener = Listener(client_id, everything=request.query.get("subscribe") == "all")
        self.listeners[ws] = listener
        await ws.send_str(dumps({"type": "status", "data": {"queue_remaining": self.store.remaining()}}))
        try:
            async for message in ws:
                if message.type == aiohttp.WSMsgType.ERROR:
                    break
                if message.type == aiohttp.WSMsgType.TEXT and self._subscribe(listener, message.data):
                    await ws.send_str(
                        dumps(
                            {"type": "subscribed", "data": {"scope": "all" if listener.everything else "own"}}
                        )
                    )
        finally:
            self.listeners.pop(ws, None)
        return ws

    @staticmethod
    def _subscribe(listener: Listener, text: str) -> bool:
        """`{"type": "subscribe", "data": {"scope": "all" | "own"}}` switches what a socket receives."""
        try:
            message = json.loads(text)
        except (ValueError, RecursionError):
            return False
        if (
            isinstance(message, dict)
            and message.get("type") == "subscribe"
            and isinstance(message.get("data"), dict)
        ):
            scope = message["data"].get("scope")
            if scope in ("all", "own"):
                listener.everything = scope == "all"
                return True
        return False


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
    memory["models"] = executor.models.state()  # VRAM budget and where each loaded model is
    return {
        "versions": {
            "tessera": tessera.__version__,
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "aiohttp": aiohttp.__version__,
        },
        "platform": platform.platform(),
        "device": str(executor.device),
        "dtype": str(executor.dtype).removeprefix("torch."),
        "memory": memory,
        "attention_backend": attention_backend(),
        "compile": compile_info(),  # mode, compile seconds, one record per compiled shape
    }
