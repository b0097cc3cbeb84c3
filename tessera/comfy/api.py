"""ComfyUI's HTTP and WebSocket API, served beside ours on ComfyUI's paths.

Prompts arrive in ComfyUI's API format, are converted (`convert`), checked exactly as
/api/prompt checks a workflow, and join the same queue; the worker's events are translated
into ComfyUI's messages (`status`, `execution_start`, `execution_cached`, `executing`,
`progress`, `executed`, `execution_success` / `execution_error` / `execution_interrupted`,
then `executing` with node null) for the sockets of the submitting `clientId`. The server's
guard (Host, Origin, token) covers every route; files go through the same confined handlers.
"""

from __future__ import annotations

import asyncio
import gc
import io
import json
import platform
import struct
import sys
import time
import uuid
from collections import OrderedDict
from pathlib import Path

import aiohttp
import torch
from aiohttp import web
from PIL import Image

import tessera
from tessera.comfy.convert import file_classifier, to_tessera
from tessera.comfy.mapping import COMFY_TYPES, RULES, Rule
from tessera.node import Input, Node
from tessera.paths import MODEL_FOLDERS, UnsafePathError, confined_path
from tessera.queue import STORAGE_ERRORS, TERMINAL, QueueError, describe_storage_error
from tessera.workflow import InvalidWorkflow, migrate, schema_issues

MAX_CLIENT_ID = 200
KEPT_PROMPTS = 1000  # ComfyUI prompts remembered for /queue and /history (their Tessera form is stored)
PREVIEW_IMAGE, PNG = 1, 2  # ComfyUI's binary frame: event type, image format, then the image
MISSING = object()
FINAL_KINDS = ("execution_success", "execution_error", "execution_interrupted")


def _current(workflow: dict) -> dict:
    """An older Tessera workflow upgraded to the current version; refused if it is no workflow document."""
    upgraded = migrate(workflow)
    issues = schema_issues(upgraded)
    if issues:
        raise InvalidWorkflow(issues)
    return upgraded


FOLDER_ALIASES = {"unet": "diffusion_models", "clip": "text_encoders"}


def _now_ms() -> int:
    return int(time.time() * 1000)


def _display(node_id: object) -> object:
    """The ComfyUI node an added node (`id:suffix`) stands for."""
    return node_id.split(":")[0] if isinstance(node_id, str) else node_id


def feature_flags() -> dict:
    """What this server supports of ComfyUI's optional protocol features (answered on /features
    and to a client's `feature_flags` socket message): previews are plain PNG frames (type 1,
    no metadata), uploads stop at 20 MiB, there is no node-replacement table and no asset store."""
    from tessera.server import MAX_UPLOAD_BYTES

    return {
        "supports_preview_metadata": False,
        "max_upload_size": MAX_UPLOAD_BYTES,
        "node_replacements": False,
        "assets": False,
    }


def _safetensors_metadata(path: Path) -> dict:
    """The `__metadata__` of a safetensors header, read without the tensors."""
    with path.open("rb") as f:
        size = struct.unpack("<Q", f.read(8))[0]
        if size > 100 << 20:
            raise ValueError(f"a header of {size:,} bytes")
        header = json.loads(f.read(size))
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return metadata if isinstance(metadata, dict) else {}


def _is_feature_flags(text: str) -> bool:
    try:
        message = json.loads(text)
    except (ValueError, RecursionError):
        return False
    return isinstance(message, dict) and message.get("type") == "feature_flags"


def _comfy_type(kind: str) -> str:
    return COMFY_TYPES.get(kind, kind)


class ComfyAPI:
    def __init__(self, server):
        self.server = server
        self.sockets: dict[web.WebSocketResponse, str] = {}
        self.prompts: OrderedDict[str, dict] = OrderedDict()  # prompt id -> ComfyUI prompt, extra_data
        self.held: dict[str, list] = {}  # prompt id -> `executed` messages waiting for its next event
        self.free_after: list[bool] = []  # /free asked while a prompt ran: its free_memory flag
        self.classify = file_classifier(server.config.models_dir)

    def routes(self) -> list[tuple[str, str, object]]:
        """(method, path, handler) of ComfyUI's HTTP routes; served at the root and, for
        ComfyUI's own frontend, again under /comfyui/api (tessera.comfy.frontend)."""
        return [
            ("GET", "/prompt", self.prompt_info),
            ("POST", "/prompt", self.prompt),
            ("GET", "/queue", self.queue),
            ("POST", "/queue", self.queue_edit),
            ("GET", "/history", self.history),
            ("GET", "/history/{prompt_id}", self.history_entry),
            ("GET", "/view", self.server.view),
            ("POST", "/upload/image", self.server.upload),
            ("POST", "/upload/mask", self.upload_mask),
            ("POST", "/interrupt", self.interrupt),
            ("GET", "/object_info", self.object_info),
            ("GET", "/object_info/{node_class}", self.object_info_one),
            ("GET", "/system_stats", self.system_stats),
            ("GET", "/models", self.model_folders),
            ("GET", "/models/{folder}", self.models),
            ("GET", "/view_metadata/{folder}", self.view_metadata),
            ("GET", "/embeddings", self.embeddings),
            ("POST", "/free", self.free),
            ("GET", "/extensions", self.extensions),
        ]

    def register(self, app: web.Application) -> None:
        r = app.router
        for method, path, handler in self.routes():
            r.add_route(method, path, handler)
        r.add_get("/ws", self.websocket)  # ours too: without ?clientId= it is Tessera's event stream
        r.add_post("/api/import", self.import_document)
        self.server.event_hooks.append(self._on_event)  # every event also reaches ComfyUI sockets

    def _on_event(self, kind: str, data: dict) -> None:
        """Called in the emitting thread: translate the event for ComfyUI sockets on the loop."""
        prompt_id = data.get("prompt_id")
        if self.free_after and kind in FINAL_KINDS:  # the worker's thread, done with the cache
            flags = []
            while self.free_after:
                flags.append(self.free_after.pop())
            self._free(any(flags))
        owner = (
            self.server.owners.get(prompt_id, MISSING) if prompt_id else None
        )  # before a final event drops it
        loop = self.server.loop
        if loop is not None and not loop.is_closed() and self.sockets:
            loop.call_soon_threadsafe(self._translate, kind, dict(data), owner)

    # -- prompts -------------------------------------------------------------------------------
    def convert(self, document: object) -> dict:
        return to_tessera(document, self.server.registry, self.classify)

    def _checked(self, prompt: dict) -> dict:
        return self.server._checked({"workflow": self.convert(prompt)})

    async def prompt_info(self, request):
        return self._json({"exec_info": {"queue_remaining": self.server.store.remaining()}})

    async def prompt(self, request):
        body = await self.server._read_json(request)
        if not isinstance(body, dict) or not isinstance(body.get("prompt"), dict):
            return self._error(
                "invalid_prompt",
                'the body must be {"prompt": {node_id: {"class_type", "inputs"}}, "client_id"}',
            )
        client_id = body.get("client_id")
        if client_id is not None and (not isinstance(client_id, str) or len(client_id) > MAX_CLIENT_ID):
            return self._error(
                "invalid_prompt", f"client_id must be a string of at most {MAX_CLIENT_ID} characters"
            )
        extra = body.get("extra_data") if isinstance(body.get("extra_data"), dict) else {}
        try:
            workflow = await self.server._off_loop(self._checked, body["prompt"])
        except InvalidWorkflow as e:
            return self._invalid(e, body["prompt"])
        over = self.server.quota.problem()
        if over:
            return self._error("output_quota", over, status=409)
        try:
            item = await self.server._off_loop(self.server.store.add, workflow, client_id)
        except STORAGE_ERRORS as e:
            self.server.health.failed(describe_storage_error(e))
            return self._error(
                "storage", f"the prompt was not queued: {describe_storage_error(e)}", status=503
            )
        self.prompts[item["prompt_id"]] = {"prompt": body["prompt"], "extra_data": extra}
        while len(self.prompts) > KEPT_PROMPTS:
            self.prompts.popitem(last=False)
        self.server.owners[item["prompt_id"]] = client_id
        self.server.worker.notify()
        self.server.emit_threadsafe("status", {"queue_remaining": self.server.store.remaining()})
        return self._json({"prompt_id": item["prompt_id"], "number": item["number"], "node_errors": {}})

    def _invalid(self, e: InvalidWorkflow, prompt: dict):
        """ComfyUI's validation answer: one `error`, and `node_errors` by node id."""
        node_errors: dict = {}
        loose = []
        for issue in e.issues:
            entry = {
                "type": "value_not_valid" if issue.input else "invalid_node",
                "message": issue.reason,
                "details": f"{issue.input}: {issue.reason}" if issue.input else issue.reason,
                "extra_info": {"input_name": issue.input} if issue.input else {},
            }
            node = _display(issue.node)
            if node is None:
                loose.append(issue.reason)
                continue
            kind = (prompt.get(node) or {}).get("class_type") if isinstance(prompt.get(node), dict) else None
            target = node_errors.setdefault(node, {"errors": [], "dependent_outputs": [], "class_type": kind})
            target["errors"].append(entry)
        details = "; ".join(loose + [str(i) for i in e.issues if i.node is not None])
        return self._json(
            {
                "error": {
                    "type": "prompt_outputs_failed_validation",
                    "message": "Prompt outputs failed validation",
                    "details": details,
                    "extra_info": {},
                },
                "node_errors": node_errors,
            },
            400,
        )

    def _error(self, kind: str, message: str, status: int = 400):
        return self._json(
            {"error": {"type": kind, "message": message, "details": "", "extra_info": {}}, "node_errors": {}},
            status,
        )

    @staticmethod
    def _json(data: object, status: int = 200) -> web.Response:
        from tessera.server import json_response

        return json_response(data, status)

    # -- queue and history ---------------------------------------------------------------------
    def _as_api(self, workflow: dict) -> dict:
        """A stored Tessera workflow in the API format (prompts queued through /api/prompt)."""
        nodes = workflow.get("nodes", {})
        api = {}
        for node_id, node in nodes.items():
            inputs = {}
            for name, value in node.get("inputs", {}).items():
                if isinstance(value, dict) and "node" in value:
                    cls = self.server.registry.get(nodes.get(value["node"], {}).get("type"))
                    names = [o.name for o in cls.outputs] if cls else []
                    value = [value["node"], names.index(value["output"]) if value["output"] in names else 0]
                inputs[name] = value
            api[node_id] = {"class_type": node.get("type"), "inputs": inputs}
        return api

    def _is_output(self, kind: object) -> bool:
        if not isinstance(kind, str):
            return False
        return (
            RULES[kind].output_node
            if kind in RULES
            else getattr(self.server.registry.get(kind), "is_output", False)
        )

    def _queue_item(self, item: dict, workflow: dict | None = None) -> list:
        """ComfyUI's queue entry: [number, prompt_id, prompt, extra_data, output node ids]."""
        known = self.prompts.get(item["prompt_id"])
        if known is None:
            if workflow is None:
                workflow = (self.server.store.get(item["prompt_id"]) or {}).get("workflow", {})
            known = {"prompt": self._as_api(workflow), "extra_data": {}}
        outputs = [
            i
            for i, n in known["prompt"].items()
            if isinstance(n, dict) and self._is_output(n.get("class_type"))
        ]
        return [item["number"], item["prompt_id"], known["prompt"], known["extra_data"], outputs]

    async def queue(self, request):
        store = self.server.store
        return self._json(
            {
                "queue_running": [self._queue_item(i) for i in store.items("running")],
                "queue_pending": [self._queue_item(i) for i in store.items("pending")],
            }
        )

    async def queue_edit(self, request):
        body = await self.server._read_json(request)
        if not isinstance(body, dict):
            return self._error(
                "invalid_request", 'the body must be {"clear": true} or {"delete": [prompt ids]}'
            )
        try:
            if body.get("clear") is True:
                self.server.store.cancel_pending()
            for prompt_id in body.get("delete") or []:
                if isinstance(prompt_id, str):
                    try:
                        self.server.store.cancel(prompt_id)
                    except QueueError:
                        pass  # ComfyUI ignores ids that are not pending
        except STORAGE_ERRORS as e:
            return self._error(
                "storage", f"the queue was not changed: {describe_storage_error(e)}", status=503
            )
        self.server.emit_threadsafe("status", {"queue_remaining": self.server.store.remaining()})
        return web.Response(status=200)

    def _history_entry(self, entry: dict) -> dict:
        outputs: dict = {}
        for node_id, ui in entry.get("outputs", {}).items():
            target = outputs.setdefault(_display(node_id), {})
            for key, value in ui.items():
                target[key] = target.get(key, []) + value if isinstance(value, list) else value
        status = entry["status"]
        started = {
            "prompt_id": entry["prompt_id"],
            "timestamp": int((entry.get("started") or entry["created"]) * 1000),
        }
        ended = {"prompt_id": entry["prompt_id"], "timestamp": int((entry.get("finished") or 0) * 1000)}
        final = {
            "success": "execution_success",
            "error": "execution_error",
            "interrupted": "execution_interrupted",
        }
        messages = [["execution_start", started]]
        if status in final:
            errors = entry.get("errors") or []
            if errors:
                ended.update(self._error_data(errors[0], entry["prompt_id"]))
            messages.append([final[status], ended])
        item = self._queue_item(
            {"number": entry["number"], "prompt_id": entry["prompt_id"]}, entry.get("workflow", {})
        )
        return {
            "prompt": item,
            "outputs": outputs,
            "status": {
                "status_str": "success" if status == "success" else "error",
                "completed": status == "success",
                "messages": messages,
            },
            "meta": {
                n: {"node_id": n, "display_node": n, "parent_node": None, "real_node_id": n} for n in outputs
            },
        }

    async def history(self, request):
        try:
            limit = max(1, min(int(request.query.get("max_items", "200")), 10_000))
        except ValueError:
            return self._error("invalid_request", "max_items must be an integer")
        entries = [
            e
            for e in self.server.store.history(limit)
            if e["status"] in TERMINAL and e["status"] != "cancelled"
        ]
        return self._json({e["prompt_id"]: self._history_entry(e) for e in reversed(entries)})

    async def history_entry(self, request):
        entry = self.server.store.get(request.match_info["prompt_id"])
        if entry is None or entry["status"] not in TERMINAL or entry["status"] == "cancelled":
            return self._json({})
        return self._json({entry["prompt_id"]: self._history_entry(entry)})

    async def interrupt(self, request):
        body = await self.server._read_json(request) if request.can_read_body else {}
        prompt_id = body.get("prompt_id") if isinstance(body, dict) else None
        self.server.worker.interrupt(prompt_id if isinstance(prompt_id, str) else None)
        return web.Response(status=200)

    # -- files ---------------------------------------------------------------------------------
    async def upload_mask(self, request):
        """ComfyUI's mask upload: the original image (`original_ref`) with the upload's alpha as its alpha."""
        from tessera.server import MAX_UPLOAD_BYTES, error

        try:
            form = await request.post()
        except (ValueError, web.HTTPRequestEntityTooLarge, aiohttp.http_exceptions.HttpProcessingError):
            return error("the upload is not a well-formed multipart/form-data body within 20 MiB")
        field, ref = form.get("image"), form.get("original_ref")
        if not isinstance(field, web.FileField) or not isinstance(ref, str):
            return error("multipart fields 'image' (a file) and 'original_ref' (JSON) are required")
        try:
            ref = json.loads(ref)
            roots = {"input": self.server.config.input_dir, "output": self.server.config.output_dir}
            root = roots[ref.get("type", "input")]
            name = f"{ref['subfolder']}/{ref['filename']}" if ref.get("subfolder") else ref["filename"]
            original_path = confined_path(root, name, (".png", ".jpg", ".jpeg", ".webp"))
        except (ValueError, KeyError, TypeError, AttributeError, UnsafePathError) as e:
            return error(f"original_ref must name an input or output image ({e})")
        data = field.file.read(MAX_UPLOAD_BYTES + 1)
        if len(data) > MAX_UPLOAD_BYTES:
            return error(f"upload is larger than {MAX_UPLOAD_BYTES >> 20} MiB", 413)
        if not original_path.is_file():
            return error("original_ref: no such file", 404)
        try:
            from tessera.images import open_image

            original = open_image(original_path).convert("RGBA")
            with Image.open(io.BytesIO(data)) as mask:
                alpha = mask.convert("RGBA").getchannel("A").resize(original.size)
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            return error(f"the mask or the original is not a readable image ({e})")
        original.putalpha(alpha)
        buffer = io.BytesIO()
        original.save(buffer, format="PNG")
        stem = Path(field.filename or "mask").stem
        stem = "".join(c if c.isalnum() or c in "_.-" else "_" for c in stem).strip("._")[:80] or "mask"
        try:
            stored = await self.server._off_loop(self.server._store_upload, stem, ".png", buffer.getvalue())
        except STORAGE_ERRORS as e:
            return error(f"the upload was not stored: {describe_storage_error(e)}", 503)
        return self._json({"name": stored, "subfolder": "", "type": "input"})

    def _folders(self) -> list[str]:
        """The models folders: the listed ones and every folder a loader reads (e.g. checkpoints)."""
        used = {
            i.model_folder
            for cls in self.server.registry.nodes.values()
            for i in cls.inputs
            if i.model_folder
        }
        return list(MODEL_FOLDERS) + sorted(used - set(MODEL_FOLDERS))

    async def free(self, request):
        """ComfyUI's `/free {"unload_models": true, "free_memory": true}`: the cached node outputs go,
        the loaded models among them (the next run loads them again); `free_memory` also returns
        freed device memory to the driver. Done now when the queue is empty (prompts are only added
        on this loop, so none can start meanwhile), else when the running prompt ends, on the
        worker's thread (the cache is the worker's)."""
        body = await self.server._read_json(request) if request.can_read_body else {}
        if not isinstance(body, dict):
            return self._error(
                "invalid_request", 'the body must be {"unload_models": bool, "free_memory": bool}'
            )
        if not (body.get("unload_models") or body.get("free_memory")):
            return web.Response(status=200)
        if self.server.store.remaining() == 0:
            self._free(bool(body.get("free_memory")))
        else:
            self.free_after.append(bool(body.get("free_memory")))
        return web.Response(status=200)

    def _free(self, free_memory: bool) -> None:
        self.server.executor.cache.clear()
        if free_memory:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    async def view_metadata(self, request):
        """The metadata of a model file's safetensors header (ours carry their config and card)."""
        folder = FOLDER_ALIASES.get(request.match_info["folder"], request.match_info["folder"])
        if folder not in self._folders():
            return self._json({"error": f"no models folder '{folder}'"}, 404)
        try:
            path = confined_path(
                self.server.config.models_dir / folder, request.query.get("filename", ""), (".safetensors",)
            )
        except UnsafePathError as e:
            return self._json({"error": str(e)}, 400)
        if not path.is_file():
            return self._json({"error": f"no model file '{request.query.get('filename')}' in {folder}"}, 404)
        try:
            metadata = await self.server._off_loop(_safetensors_metadata, path)
        except (OSError, ValueError, struct.error) as e:
            return self._json({"error": f"{path.name} is not a readable safetensors file ({e})"}, 400)
        return self._json(metadata)

    async def embeddings(self, request):
        """Textual-inversion embeddings by name: no Tessera text encoder loads any."""
        return self._json([])

    async def extensions(self, request):
        """URLs of node packs' web extensions (JavaScript): Tessera's node packs ship none."""
        return self._json([])

    async def model_folders(self, request):
        return self._json(self._folders())

    async def models(self, request):
        folder = request.match_info["folder"]
        folder = FOLDER_ALIASES.get(folder, folder)
        if folder not in self._folders():
            return self._json(
                {"error": f"no models folder '{folder}' (folders: {', '.join(self._folders())})"}, 404
            )
        return self._json(self.server.executor.model_files(folder))

    async def import_document(self, request):
        """For the editor's drop handler: a ComfyUI document (API, UI, or a PNG's chunks), or a
        Tessera workflow of an older version, as a workflow of the current version."""
        body = await self.server._read_json(request)
        convert = _current if isinstance(body, dict) and isinstance(body.get("nodes"), dict) else self.convert
        try:
            workflow = await self.server._off_loop(convert, body)
        except InvalidWorkflow as e:
            return self._json(
                {"error": "not an importable ComfyUI workflow", "errors": [i.to_json() for i in e.issues]},
                400,
            )
        return self._json({"workflow": workflow})

    # -- catalogue and system ------------------------------------------------------------------
    def _widget(self, spec: Input, choices: list | None = None) -> list:
        options: dict = {}
        if spec.default is not None:
            options["default"] = spec.default
        for key in ("min", "max", "step"):
            if getattr(spec, key) is not None:
                options[key] = getattr(spec, key)
        if spec.multiline:
            options["multiline"] = True
        if spec.widget == "seed":
            options["control_after_generate"] = True
        if spec.widget == "image_upload":
            options["image_upload"] = True
        if choices is None and spec.model_folder:
            choices = spec.model_choices(self.server.executor.model_files)
        if choices is None and spec.widget == "image_upload":
            choices = self.server.executor.input_images()
        if choices is None and spec.choices:
            choices = list(spec.choices)
        if choices is not None:
            options.pop("min", None), options.pop("max", None), options.pop("step", None)
            if options.get("default") not in choices:
                options.pop("default", None)
            return [list(choices), options]
        return [spec.type, options]

    def _info(self, name: str, cls: type[Node]) -> dict:
        required, optional = {}, {}
        for spec in cls.inputs:
            entry = self._widget(spec) if spec.accepts_constant else [_comfy_type(spec.type), {}]
            (optional if spec.optional else required)[spec.name] = entry
        return self._entry(
            name,
            required,
            optional,
            [_comfy_type(o.type) for o in cls.outputs],
            [o.name for o in cls.outputs],
            cls.category,
            cls.description(),
            cls.__module__,
            cls.is_output,
        )

    def _mapped_info(self, name: str, rule: Rule) -> dict:
        cls = self.server.registry.get(rule.type)
        required, optional = {}, {}
        for comfy, ours in rule.inputs.items():
            target = optional if comfy in rule.optional else required
            if comfy in rule.link_types:
                target[comfy] = [rule.link_types[comfy], {}]
            elif comfy in ("clip_name1", "clip_name2"):
                target[comfy] = [self.server.executor.model_files("text_encoders"), {}]
            elif cls is not None and cls.input(ours) is not None:
                spec = cls.input(ours)
                target[comfy] = self._widget(spec, list(rule.values[comfy]) if comfy in rule.values else None)
        for comfy, allowed in rule.accepted.items():
            target = optional if comfy in rule.optional else required
            if comfy in rule.widget_specs:
                target[comfy] = rule.widget_specs[comfy]
            elif comfy in ("start_at_step", "end_at_step"):
                target[comfy] = [
                    "INT",
                    {"default": 0 if comfy == "start_at_step" else 10000, "min": 0, "max": 10000},
                ]
            elif comfy in ("overlap", "temporal_size", "temporal_overlap"):
                target[comfy] = [
                    "INT",
                    {"default": {"overlap": 64, "temporal_size": 64, "temporal_overlap": 8}[comfy], "min": 0},
                ]
            elif comfy == "upload":
                continue  # LoadImage's upload button is the `image_upload` option of `image`
            elif comfy == "type" and allowed is None:
                target[comfy] = [["stable_diffusion", "sd3", "flux", "pixart"], {}]
            elif allowed is not None:
                target[comfy] = [list(allowed), {}]
        # ComfyUI names most outputs by their type; ControlNetApplyAdvanced's are positive, negative.
        names = (
            ["positive", "negative"]
            if name == "ControlNetApplyAdvanced"
            else list(rule.output_names or rule.output_types)
        )
        if rule.folded:
            description = f"ComfyUI's {name}: its settings go to the DiTSampler of its SamplerCustomAdvanced"
        elif not rule.type:
            description = f"ComfyUI's {name}: passes the model on (see docs/COMFYUI.md)"
        else:
            description = f"ComfyUI's {name}, run as Tessera's {rule.type}" + (
                f": {cls.description()}" if cls else ""
            )
        return self._entry(
            name,
            required,
            optional,
            list(rule.output_types),
            names,
            cls.category if cls else "comfyui",
            description,
            "tessera.comfy",
            rule.output_node,
        )

    @staticmethod
    def _entry(
        name, required, optional, output, output_name, category, description, module, output_node
    ) -> dict:
        return {
            "input": {"required": required, "optional": optional},
            "input_order": {"required": list(required), "optional": list(optional)},
            "output": output,
            "output_is_list": [False] * len(output),
            "output_name": output_name,
            "name": name,
            "display_name": name,
            "description": description,
            "python_module": module,
            "category": category,
            "output_node": output_node,
            "deprecated": False,
            "experimental": False,
        }

    def catalogue(self) -> dict:
        found = {name: self._info(name, cls) for name, cls in sorted(self.server.registry.nodes.items())}
        found.update({name: self._mapped_info(name, rule) for name, rule in RULES.items()})
        return found

    async def object_info(self, request):
        return self._json(self.catalogue())

    async def object_info_one(self, request):
        name = request.match_info["node_class"]
        if name in RULES:
            return self._json({name: self._mapped_info(name, RULES[name])})
        cls = self.server.registry.get(name)
        return self._json({name: self._info(name, cls)} if cls is not None else {})

    async def system_stats(self, request):
        from tessera.server import system_info

        info = system_info(self.server.executor)
        memory, device = info["memory"], self.server.executor.device
        return self._json(
            {
                "system": {
                    "os": platform.system().lower(),
                    "ram_total": memory.get("ram_total", 0),
                    "ram_free": memory.get("ram_free", 0),
                    "comfyui_version": f"tessera {tessera.__version__}",
                    "python_version": sys.version,
                    "pytorch_version": info["versions"]["torch"],
                    "embedded_python": False,
                    # ComfyUI's flag for "no API (comfy.org) nodes": true here, and its frontend
                    # reads it from argv to make no calls to comfy.org
                    "argv": ["tessera", "serve", "--disable-api-nodes"],
                },
                "devices": [
                    {
                        "name": str(device),
                        "type": device.type,
                        "index": device.index or 0,
                        "vram_total": memory.get("vram_total", 0),
                        "vram_free": memory.get("vram_free", 0),
                        "torch_vram_total": memory.get("vram_total", 0),
                        "torch_vram_free": memory.get("vram_free", 0),
                    }
                ],
            }
        )

    # -- WebSocket -----------------------------------------------------------------------------
    async def websocket(self, request):
        if "clientId" not in request.query:
            return await self.server.websocket(request)
        return await self.comfy_socket(request, request.query["clientId"] or uuid.uuid4().hex)

    async def comfy_socket(self, request, client_id: str):
        """ComfyUI's event socket for `client_id` (told to the client as `sid` in the first message)."""
        if len(client_id) > MAX_CLIENT_ID:
            return self._json({"error": f"clientId must be at most {MAX_CLIENT_ID} characters"}, 400)
        ws = web.WebSocketResponse(heartbeat=30, max_msg_size=1 << 20)
        if not ws.can_prepare(request).ok:
            return self._json({"error": "this route takes a WebSocket upgrade (GET /ws?clientId=…)"}, 400)
        await ws.prepare(request)
        self.sockets[ws] = client_id
        remaining = self.server.store.remaining()
        await ws.send_str(
            json.dumps(
                {
                    "type": "status",
                    "data": {"status": {"exec_info": {"queue_remaining": remaining}}, "sid": client_id},
                }
            )
        )
        try:
            async for message in ws:
                if message.type == aiohttp.WSMsgType.ERROR:
                    break
                if message.type == aiohttp.WSMsgType.TEXT and _is_feature_flags(message.data):
                    await ws.send_str(json.dumps({"type": "feature_flags", "data": feature_flags()}))
        finally:
            self.sockets.pop(ws, None)
        return ws

    def _class_type(self, prompt_id: str | None, node: object, ours: str | None) -> str | None:
        """The ComfyUI class_type of a node of a prompt submitted here; else our node type."""
        graph = (self.prompts.get(prompt_id) or {}).get("prompt", {})
        return (graph.get(node) or {}).get("class_type", ours) if isinstance(graph.get(node), dict) else ours

    def _error_data(self, error: dict, prompt_id: str | None) -> dict:
        return {
            "node_id": _display(error.get("node")),
            "node_type": self._class_type(prompt_id, _display(error.get("node")), error.get("node_type")),
            "executed": [],
            "exception_message": error.get("message", ""),
            "exception_type": "NodeError" if error.get("input") else "Error",
            "traceback": [],
            "current_inputs": {"input": error.get("input")} if error.get("input") else {},
            "current_outputs": {},
        }

    def _translate(self, kind: str, data: dict, owner: object) -> None:
        """One Tessera event as ComfyUI's message(s), sent to the submitting client's sockets."""
        prompt_id = data.get("prompt_id")
        node = _display(data.get("node"))
        messages: list[str | bytes] = []
        if kind == "status":
            messages.append(
                {
                    "type": "status",
                    "data": {"status": {"exec_info": {"queue_remaining": data.get("queue_remaining", 0)}}},
                }
            )
        elif kind in ("execution_start", "execution_success"):
            messages.append({"type": kind, "data": {"prompt_id": prompt_id, "timestamp": _now_ms()}})
        elif kind == "execution_cached":
            nodes = list(dict.fromkeys(_display(n) for n in data.get("nodes", [])))
            messages.append(
                {"type": kind, "data": {"nodes": nodes, "prompt_id": prompt_id, "timestamp": _now_ms()}}
            )
        elif kind == "executing":
            messages.append(
                {"type": kind, "data": {"node": node, "display_node": node, "prompt_id": prompt_id}}
            )
        elif kind == "progress":
            messages.append(
                {
                    "type": kind,
                    "data": {
                        "value": data.get("value"),
                        "max": data.get("max"),
                        "prompt_id": prompt_id,
                        "node": node,
                    },
                }
            )
        elif kind == "executed":
            messages.append(
                {
                    "type": kind,
                    "data": {
                        "node": node,
                        "display_node": node,
                        "output": data.get("output", {}),
                        "prompt_id": prompt_id,
                    },
                }
            )
        elif kind == "execution_error":
            messages.append(
                {
                    "type": kind,
                    "data": {
                        "prompt_id": prompt_id,
                        "timestamp": _now_ms(),
                        **self._error_data(data, prompt_id),
                    },
                }
            )
        elif kind == "execution_interrupted":
            messages.append(
                {
                    "type": kind,
                    "data": {
                        "prompt_id": prompt_id,
                        "node_id": node,
                        "node_type": self._class_type(prompt_id, node, data.get("node_type")),
                        "executed": [],
                        "timestamp": _now_ms(),
                    },
                }
            )
        elif kind == "preview" and self._wants_previews(prompt_id):
            buffer = io.BytesIO()
            data["image"].save(buffer, format="PNG")
            messages.append(struct.pack(">II", PREVIEW_IMAGE, PNG) + buffer.getvalue())
        if kind in ("execution_success", "execution_error", "execution_interrupted"):
            messages.append(
                {"type": "executing", "data": {"node": None, "display_node": None, "prompt_id": prompt_id}}
            )
        if prompt_id and kind == "executed":
            # Held until the prompt's next event: a cached node's UI comes after `execution_cached`
            # in ComfyUI (our executor announces a run of cached nodes when it ends).
            self.held.setdefault(prompt_id, []).extend(messages)
            return
        if prompt_id and prompt_id in self.held:
            held = self.held.pop(prompt_id)
            messages = messages + held if kind == "execution_cached" else held + messages
        if owner is MISSING:  # e.g. a prompt queued before a restart
            owner = self.server.store.owner(prompt_id)
        for ws, client_id in list(self.sockets.items()):
            if ws.closed:
                self.sockets.pop(ws, None)
                continue
            if owner is not None and client_id != owner:
                continue
            for message in messages:
                send = (
                    ws.send_bytes(message) if isinstance(message, bytes) else ws.send_str(json.dumps(message))
                )
                asyncio.ensure_future(send).add_done_callback(lambda f: f.exception())

    def _wants_previews(self, prompt_id: str | None) -> bool:
        """As ComfyUI (whose default is --preview-method none): binary previews only for prompts whose
        extra_data asks for a preview_method."""
        extra = (self.prompts.get(prompt_id) or {}).get("extra_data", {})
        return extra.get("preview_method") not in (None, "none", "default")
