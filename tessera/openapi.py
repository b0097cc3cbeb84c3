"""The OpenAPI description of the HTTP API, built from the live route table, with every status
code each route can answer (schemathesis checks the server against it in the tests)."""

from __future__ import annotations

import json

from aiohttp import web

import tessera
from tessera.workflow import workflow_schema

SUMMARIES = {
    (
        "GET",
        "/api/nodes",
    ): "Node catalogue: every node type with its typed inputs, outputs and input JSON Schema",
    ("POST", "/api/validate"): "Validate a workflow without running it",
    ("POST", "/api/prompt"): "Validate and queue a workflow; answers its prompt id",
    ("GET", "/api/queue"): "The running and pending prompts",
    ("DELETE", "/api/queue/{prompt_id}"): "Cancel a pending prompt",
    ("DELETE", "/api/queue"): "Cancel every pending prompt (only ?client_id='s, when given)",
    ("POST", "/api/interrupt"): "Interrupt the running prompt within one step",
    ("GET", "/api/history"): "Finished and queued prompts, newest first",
    ("GET", "/api/history/{prompt_id}"): "One prompt: status, timings, errors, outputs",
    ("GET", "/api/models"): "Model files (.safetensors) per models folder",
    ("GET", "/api/view"): "An output or input image",
    ("POST", "/api/upload/image"): "Upload a PNG, JPEG or WebP image into the input folder",
    ("GET", "/api/workflows"): "Names of saved workflows",
    ("GET", "/api/workflows/{name}"): "A saved workflow",
    ("PUT", "/api/workflows/{name}"): "Save a workflow",
    ("DELETE", "/api/workflows/{name}"): "Delete a saved workflow",
    ("GET", "/api/templates"): "The workflows shipped in the repository's workflows/ folder",
    (
        "POST",
        "/api/import",
    ): "A ComfyUI workflow (API or UI format, or a PNG's chunks) or an older Tessera workflow, as a current workflow",
    ("GET", "/api/system"): "Versions, device, memory and attention backend",
    ("GET", "/api/openapi.json"): "This document",
    ("GET", "/ws"): "WebSocket of execution events (JSON) and preview frames (binary)",
}

WORKFLOW_BODY = {
    "type": "object",
    "properties": {"workflow": {"$ref": "#/components/schemas/Workflow"}, "client_id": {"type": "string"}},
    "required": ["workflow"],
}
BODIES = {
    ("POST", "/api/prompt"): WORKFLOW_BODY,
    ("POST", "/api/validate"): WORKFLOW_BODY,
    ("PUT", "/api/workflows/{name}"): {"$ref": "#/components/schemas/Workflow"},
}
INTERRUPT_BODY = {"type": "object", "properties": {"prompt_id": {"type": "string"}}}
OPTIONAL_BODIES = {("POST", "/api/interrupt"): INTERRUPT_BODY}
BODIES[("POST", "/api/import")] = {"type": "object"}

STATUS_TEXT = {
    "101": "Switching to the WebSocket protocol",
    "200": "OK",
    "400": "Invalid request; the body names the problem",
    "401": "Missing or wrong access token (servers started with a token)",
    "403": "Refused: the Host is not this server, or a cross-site write",
    "404": "No such item",
    "405": "Method not allowed on this path; `Allow` lists the methods",
    "409": "Conflicts with the current state (not pending, output quota reached, too many uploads of one name)",
    "413": "Over a size budget (request body, upload, pixels)",
    "422": "A stored file is not valid JSON",
    "503": "Storage is failing (e.g. a full disk); nothing was written",
}
# What each route can answer besides 200 and the guard's 400/401/403 (docs/API.md).
RESPONSES = {
    ("POST", "/api/validate"): ("413",),
    ("POST", "/api/prompt"): ("409", "413", "503"),
    ("DELETE", "/api/queue/{prompt_id}"): ("404", "409", "503"),
    ("DELETE", "/api/queue"): ("503",),
    ("POST", "/api/interrupt"): ("413",),
    ("GET", "/api/history/{prompt_id}"): ("404",),
    ("GET", "/api/view"): ("404",),
    ("POST", "/api/upload/image"): ("409", "413", "503"),
    ("GET", "/api/workflows/{name}"): ("404", "422"),
    ("PUT", "/api/workflows/{name}"): ("413", "503"),
    ("DELETE", "/api/workflows/{name}"): ("404", "503"),
    ("POST", "/api/import"): ("413",),
    ("GET", "/ws"): ("101",),
}
ALWAYS = ("200", "400", "401", "403")

QUERIES = {
    ("GET", "/api/view"): ["filename", "type", "subfolder"],
    ("GET", "/api/history"): ["limit"],
    ("DELETE", "/api/queue"): ["client_id"],
    ("DELETE", "/api/queue/{prompt_id}"): ["client_id"],
}


def openapi_document(app: web.Application) -> dict:
    paths: dict = {}
    for route in app.router.routes():
        info = route.resource.get_info() if route.resource else {}
        path = info.get("formatter") or info.get("path")
        key = (route.method, path)
        if key not in SUMMARIES:
            continue
        codes = sorted(set(ALWAYS) | set(RESPONSES.get(key, ())))
        operation: dict = {
            "summary": SUMMARIES[key],
            "responses": {code: {"description": STATUS_TEXT[code]} for code in codes},
        }
        parameters = [
            {"name": n, "in": "path", "required": True, "schema": {"type": "string"}}
            for n in ("prompt_id", "name")
            if "{" + n + "}" in path
        ]
        parameters += [{"name": n, "in": "query", "schema": {"type": "string"}} for n in QUERIES.get(key, [])]
        if parameters:
            operation["parameters"] = parameters
        if key in BODIES:
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": BODIES[key]}},
            }
        if key in OPTIONAL_BODIES:
            operation["requestBody"] = {
                "required": False,
                "content": {"application/json": {"schema": OPTIONAL_BODIES[key]}},
            }
        if key == ("POST", "/api/upload/image"):
            operation["requestBody"] = {
                "required": True,
                "content": {
                    "multipart/form-data": {
                        "schema": {
                            "type": "object",
                            "properties": {"image": {"type": "string", "format": "binary"}},
                        }
                    }
                },
            }
        paths.setdefault(path, {})[route.method.lower()] = operation
    schema = {k: v for k, v in workflow_schema().items() if k not in ("$schema", "$id")}
    schema = json.loads(json.dumps(schema).replace('"#/$defs/', '"#/components/schemas/Workflow/$defs/'))
    return {
        "openapi": "3.1.0",
        "info": {"title": "Tessera", "version": tessera.__version__},
        "paths": paths,
        "components": {"schemas": {"Workflow": schema}},
    }
