"""ComfyUI's own web frontend (`comfyui-frontend-package` from PyPI), served by Tessera.

`tessera serve --frontend comfyui` mounts it under /comfyui/ and redirects / there; our own
editor stays the default otherwise and its files stay where they are.

Why a prefix: the frontend derives its API base from the page's path
(`location.pathname` without its last segment) and calls `<base>/api/<route>` and
`<base>/ws`. Served at the root it would call /api/prompt, /api/queue, /api/history, ... which
are Tessera's own routes with other shapes. Served at /comfyui/ it calls /comfyui/api/prompt
and /comfyui/ws, where this module mounts ComfyUI's compatible API (the same handlers as the
root's /prompt, /queue, ...) plus the routes only the frontend asks for: settings, user data,
users, the jobs list, feature flags, model folders, translations and the template/subgraph lists.
Those are small real handlers backed by `<user dir>/comfyui/default/` (ComfyUI's single-user
layout): settings persist in comfy.settings.json, user files (saved workflows, ...) are files
there, confined like every other path. Lists of things Tessera has none of (JS extensions,
custom-node templates, global subgraphs, embeddings) are empty because that is the truth.
Every route passes the server's guard (Host, Origin, token) like the rest of the app.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import uuid
from pathlib import Path

from aiohttp import web

from tessera.comfy.api import ComfyAPI, feature_flags
from tessera.paths import UnsafePathError, confined_path, write_confined
from tessera.queue import STORAGE_ERRORS, TERMINAL, QueueError, describe_storage_error

PREFIX = "/comfyui"
USER = "default"  # ComfyUI's single-user mode: every request is this user
SETTINGS_FILE = "comfy.settings.json"
MAX_USER_FILE = 20 << 20
KEPT_JOBS = 10_000  # as ComfyUI's history
JOB_STATUS = {  # ComfyUI's /jobs statuses for ours
    "pending": "pending",
    "running": "in_progress",
    "success": "completed",
    "error": "failed",
    "interrupted": "failed",
    "cancelled": "cancelled",
}


def static_dir() -> Path:
    """The frontend's built files, or SystemExit naming the extra to install."""
    spec = importlib.util.find_spec("comfyui_frontend_package")
    folder = Path(spec.origin).parent / "static" if spec and spec.origin else None
    if folder is None or not (folder / "index.html").is_file():
        raise SystemExit(
            "tessera serve --frontend comfyui needs ComfyUI's frontend: pip install 'tessera[comfyui]' "
            "(the comfyui-frontend-package from PyPI)"
        )
    return folder


def _refuse(message: str, status: int) -> web.Response:
    """A JSON error answer `{"error": message}`."""
    return web.json_response({"error": message}, status=status)


class ComfyFrontend:
    """The frontend's files and routes, mounted beside the server's own (see the module's docstring)."""

    def __init__(self, server, api: ComfyAPI, static: Path | None = None):
        self.server, self.api = server, api
        self.static = static or static_dir()
        self.root = server.config.user_dir / "comfyui" / USER

    def register(self, app: web.Application) -> None:
        """ComfyUI's API and the frontend's extra routes under /comfyui/api, its socket at
        /comfyui/ws, its files under /comfyui/; `/` redirects to /comfyui/."""
        r = app.router
        api = PREFIX + "/api"
        for method, path, handler in self.api.routes() + self.routes():
            r.add_route(method, api + path, handler)
        r.add_route("*", api + "/{tail:.*}", self.unsupported)
        r.add_get(PREFIX + "/ws", self.websocket)
        r.add_get(PREFIX, self.to_frontend)
        r.add_get(PREFIX + "/", self.index)
        r.add_get("/", self.to_frontend)
        r.add_static(PREFIX + "/", self.static, follow_symlinks=False)
        # a few files (favicons) are asked for at /assets/... whatever the page's path
        r.add_static("/assets/", self.static / "assets", follow_symlinks=False)
        try:
            for folder in ("workflows", "subgraphs"):  # what the frontend lists at start
                (self.root / folder).mkdir(parents=True, exist_ok=True)
        except STORAGE_ERRORS as e:
            raise SystemExit(f"tessera: cannot start: {describe_storage_error(e)}") from None

    def routes(self) -> list[tuple[str, str, object]]:
        return [
            ("GET", "/settings", self.settings),
            ("POST", "/settings", self.settings_update),
            ("GET", "/settings/{id}", self.setting),
            ("POST", "/settings/{id}", self.setting_update),
            ("GET", "/users", self.users),
            ("POST", "/users", self.users_add),
            ("GET", "/userdata", self.userdata_list),
            ("GET", "/userdata/{file}", self.userdata_get),
            ("POST", "/userdata/{file}", self.userdata_put),
            ("DELETE", "/userdata/{file}", self.userdata_delete),
            ("POST", "/userdata/{file}/move/{dest}", self.userdata_move),
            ("GET", "/features", self.features),
            ("GET", "/workflow_templates", self.workflow_templates),
            ("GET", "/global_subgraphs", self.global_subgraphs),
            ("GET", "/i18n", self.i18n),
            ("GET", "/experiment/models", self.model_folders),
            ("GET", "/experiment/models/{folder}", self.model_files),
            ("GET", "/jobs", self.jobs),
            ("GET", "/jobs/{job_id}", self.job),
            ("POST", "/jobs/{job_id}/cancel", self.job_cancel),
            ("POST", "/jobs/cancel", self.jobs_cancel),
        ]

    # -- pages ---------------------------------------------------------------------------------
    async def to_frontend(self, request):
        raise web.HTTPFound(PREFIX + "/" + (f"?{request.query_string}" if request.query_string else ""))

    async def index(self, request):
        # The page may talk to this server only (the frontend would also call comfy.org).
        headers = {"Cache-Control": "no-cache", "Content-Security-Policy": "connect-src 'self' blob: data:"}
        return web.FileResponse(self.static / "index.html", headers=headers)

    async def unsupported(self, request):
        return _refuse(f"{request.method} {request.path} is not supported by Tessera's ComfyUI API", 404)

    async def websocket(self, request):
        """ComfyUI's socket; a client without an id gets one (`sid` in the first message)."""
        return await self.api.comfy_socket(request, request.query.get("clientId") or uuid.uuid4().hex)

    # -- settings ------------------------------------------------------------------------------
    def _read_settings(self) -> dict:
        path = self.root / SETTINGS_FILE
        if not path.is_file():
            return {}
        try:
            found = json.loads(path.read_text())
        except (OSError, ValueError):
            return {}
        return found if isinstance(found, dict) else {}

    def _write_settings(self, settings: dict) -> None:
        text = json.dumps(settings, indent=1).encode()
        write_confined(self.root, SETTINGS_FILE, lambda f: f.write(text))

    async def settings(self, request):
        return web.json_response(self._read_settings())

    async def setting(self, request):
        return web.json_response(self._read_settings().get(request.match_info["id"]))

    async def settings_update(self, request):
        body = await self.server._read_json(request)
        if not isinstance(body, dict):
            return _refuse("the body must be a JSON object of setting ids and values", 400)
        return await self._save({**self._read_settings(), **body})

    async def setting_update(self, request):
        value = await self.server._read_json(request)
        return await self._save({**self._read_settings(), request.match_info["id"]: value})

    async def _save(self, settings: dict):
        try:
            await self.server._off_loop(self._write_settings, settings)
        except STORAGE_ERRORS as e:
            return _refuse(f"the settings were not saved: {describe_storage_error(e)}", 503)
        return web.Response(status=200)

    # -- users and user data -------------------------------------------------------------------
    async def users(self, request):
        """Single-user mode, as ComfyUI without --multi-user: settings live on the server."""
        return web.json_response({"storage": "server", "migrated": self.root.is_dir()})

    async def users_add(self, request):
        return _refuse(f"this server has one user ({USER}); Tessera has no multi-user mode", 400)

    def _user_path(self, name: str) -> Path:
        try:
            return confined_path(self.root, name)
        except UnsafePathError as e:
            raise web.HTTPForbidden(
                text=json.dumps({"error": str(e)}), content_type="application/json"
            ) from None

    async def userdata_list(self, request):
        folder = request.query.get("dir", "")
        if not folder:
            return _refuse("the query parameter 'dir' is required", 400)
        path = self._user_path(folder)
        if not path.is_dir():
            return _refuse(f"no user folder '{folder}'", 404)
        pattern = "**/*" if request.query.get("recurse", "").lower() == "true" else "*"
        full = request.query.get("full_info", "").lower() == "true"
        split = request.query.get("split", "").lower() == "true"
        found = []
        for file in sorted(path.glob(pattern)):
            if not file.is_file() or file.is_symlink() or file.name.endswith(".part"):
                continue
            relative = file.relative_to(path).as_posix()
            if full:
                stat = file.stat()
                found.append(
                    {
                        "path": relative,
                        "size": stat.st_size,
                        "modified": int(stat.st_mtime * 1000),
                        "created": int(stat.st_ctime * 1000),
                    }
                )
            else:
                found.append([relative, *relative.split("/")] if split else relative)
        return web.json_response(found)

    async def userdata_get(self, request):
        name = request.match_info["file"]
        path = self._user_path(name)
        if not path.is_file():
            return _refuse(f"no user file '{name}'", 404)
        # user files are the user's own content: never rendered inline in this origin (but user.css)
        css = name == "user.css"
        headers = {
            "X-Content-Type-Options": "nosniff",
            "Content-Disposition": "inline" if css else "attachment",
            "Content-Type": "text/css" if css else "application/octet-stream",
        }
        if name.endswith(".json"):
            headers["Content-Type"] = "application/json"
        return web.FileResponse(path, headers=headers)

    async def userdata_put(self, request):
        from tessera.server import read_body

        name = request.match_info["file"]
        path = self._user_path(name)
        if request.query.get("overwrite", "true") == "false" and path.exists():
            return _refuse(f"user file '{name}' exists", 409)
        data = await read_body(request, MAX_USER_FILE)
        try:
            await self.server._off_loop(write_confined, self.root, name, lambda f: f.write(data))
        except UnsafePathError as e:
            return _refuse(str(e), 403)
        except STORAGE_ERRORS as e:
            return _refuse(f"user file '{name}' was not saved: {describe_storage_error(e)}", 503)
        return web.json_response(self._info(path, request))

    def _info(self, path: Path, request) -> object:
        relative = path.relative_to(self.root.resolve()).as_posix()
        if request.query.get("full_info", "false").lower() != "true":
            return relative
        stat = path.stat()
        return {
            "path": relative,
            "size": stat.st_size,
            "modified": int(stat.st_mtime * 1000),
            "created": int(stat.st_ctime * 1000),
        }

    async def userdata_delete(self, request):
        name = request.match_info["file"]
        path = self._user_path(name)
        if not path.is_file():
            return _refuse(f"no user file '{name}'", 404)
        try:
            path.unlink()
        except STORAGE_ERRORS as e:
            return _refuse(f"user file '{name}' was not deleted: {describe_storage_error(e)}", 503)
        return web.Response(status=204)

    async def userdata_move(self, request):
        name, dest = request.match_info["file"], request.match_info["dest"]
        source, target = self._user_path(name), self._user_path(dest)
        if not source.is_file():
            return _refuse(f"no user file '{name}'", 404)
        if target.is_dir() or (request.query.get("overwrite", "true") == "false" and target.exists()):
            return _refuse(f"user file '{dest}' exists", 409)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            self._user_path(dest)  # the new folders are inside too
            shutil.move(source, target)
        except STORAGE_ERRORS as e:
            return _refuse(f"user file '{name}' was not moved: {describe_storage_error(e)}", 503)
        return web.json_response(self._info(target, request))

    # -- lists ---------------------------------------------------------------------------------
    async def features(self, request):
        return web.json_response(feature_flags())

    async def workflow_templates(self, request):
        """Templates of custom node packs by module: there are none."""
        return web.json_response({})

    async def i18n(self, request):
        """Translations shipped by node packs, by locale: there are none."""
        return web.json_response({})

    async def global_subgraphs(self, request):
        """Subgraph blueprints shipped by node packs: there are none."""
        return web.json_response({})

    async def model_folders(self, request):
        return web.json_response([{"name": f, "folders": [f]} for f in self.api._folders()])

    async def model_files(self, request):
        folder = request.match_info["folder"]
        if folder not in self.api._folders():
            return _refuse(f"no models folder '{folder}'", 404)
        files = self.server.executor.model_files(folder)
        return web.json_response([{"name": name, "pathIndex": 0} for name in files])

    # -- jobs ----------------------------------------------------------------------------------
    def _job(self, entry: dict, full: bool = False) -> dict:
        status = JOB_STATUS.get(entry["status"], entry["status"])
        job: dict = {
            "id": entry["prompt_id"],
            "status": status,
            "priority": entry["number"],
            "create_time": int(entry["created"] * 1000),
            "outputs_count": 0,
        }
        extra = (self.api.prompts.get(entry["prompt_id"]) or {}).get("extra_data", {})
        workflow_id = ((extra.get("extra_pnginfo") or {}).get("workflow") or {}).get("id")
        if workflow_id:
            job["workflow_id"] = workflow_id
        if entry["status"] in TERMINAL:
            history = self.api._history_entry(entry)
            outputs = history["outputs"]
            images = [
                {**item, "nodeId": node, "mediaType": kind}
                for node, ui in outputs.items()
                for kind, items in ui.items()
                if isinstance(items, list)
                for item in items
                if isinstance(item, dict)
            ]
            job["outputs_count"] = len(images)
            if images:
                job["preview_output"] = images[0]
            if entry.get("started"):
                job["execution_start_time"] = int(entry["started"] * 1000)
            if entry.get("finished"):
                job["execution_end_time"] = int(entry["finished"] * 1000)
            for name, data in history["status"]["messages"]:
                if name == "execution_error":  # the frontend's schema wants strings here
                    job["execution_error"] = {
                        **data,
                        "node_id": str(data.get("node_id") or ""),
                        "node_type": str(data.get("node_type") or ""),
                    }
            if full:
                job["outputs"] = outputs
                job["execution_status"] = history["status"]
                job["workflow"] = {"prompt": history["prompt"][2], "extra_data": history["prompt"][3]}
        return job

    def _jobs(self, wanted: list[str]) -> list[dict]:
        jobs = [self._job(e) for e in self.server.store.history(KEPT_JOBS)]
        return [j for j in jobs if not wanted or j["status"] in wanted]

    async def jobs(self, request):
        """The latest KEPT_JOBS prompts as ComfyUI's jobs, newest first, filtered by `status`."""
        wanted = [s for s in request.query.get("status", "").split(",") if s]
        try:
            limit = max(1, min(int(request.query.get("limit", "200")), KEPT_JOBS))
            offset = max(0, int(request.query.get("offset", "0")))
        except ValueError:
            return _refuse("limit and offset must be integers", 400)
        jobs = await self.server._off_loop(self._jobs, wanted)
        return web.json_response(
            {
                "jobs": jobs[offset : offset + limit],
                "pagination": {
                    "offset": offset,
                    "limit": limit,
                    "total": len(jobs),
                    "has_more": offset + limit < len(jobs),
                },
            }
        )

    async def job(self, request):
        entry = self.server.store.get(request.match_info["job_id"])
        if entry is None:
            return _refuse(f"no job '{request.match_info['job_id']}'", 404)
        return web.json_response(self._job(entry, full=True))

    def _cancel(self, prompt_id: str) -> None:
        """A pending job is cancelled, the running one interrupted; finished ones are left."""
        if self.server.worker.interrupt(prompt_id) is None:
            try:
                self.server.store.cancel(prompt_id)
            except QueueError:
                pass

    async def job_cancel(self, request):
        self._cancel(request.match_info["job_id"])
        self.server.emit_threadsafe("status", {"queue_remaining": self.server.store.remaining()})
        return web.Response(status=200)

    async def jobs_cancel(self, request):
        body = await self.server._read_json(request)
        ids = body.get("job_ids") if isinstance(body, dict) else None
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            return _refuse('the body must be {"job_ids": [job ids]}', 400)
        for prompt_id in ids:
            self._cancel(prompt_id)
        self.server.emit_threadsafe("status", {"queue_remaining": self.server.store.remaining()})
        return web.Response(status=200)
