"""ComfyUI's own frontend (comfyui-frontend-package), served by `tessera serve --frontend comfyui`,
builds and runs an autoregressive graph of our nodes and a diffusion workflow on the shipped models.

Nodes are added the ComfyUI way (double-click the canvas, type in the node search box, pick the
result) and linked by dragging from socket to socket; the Run button queues the prompt through
/comfyui/api/prompt and the image arrives over /comfyui/ws and /comfyui/api/view.
"""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image
from playwright.sync_api import Page
from tessera_harness import TERMINAL, Server, wait_until
from test_browser_editor import drop_file
from test_comfy_api import DIFFUSION

from tessera.paths import SOURCE_ROOT

MODELS = SOURCE_ROOT / "models"
VIEWPORT = {"width": 1280, "height": 800}
EMPTY_SPOT = (0.45, 0.92)  # where the node search box is opened (the nodes are put down elsewhere)
# What this server truthfully answers 404 for while the frontend starts: no user stylesheet,
# no saved user templates, and no core template library (comfyui-workflow-templates is not served).
EXPECTED_404 = ("user.css", "comfy.templates.json", "/templates/index", "index_logo.json")

SLOT_JS = """([id, kind, name]) => {
  const node = window.app.graph.getNodeById(id);
  const slots = kind === "input" ? node.inputs : node.outputs;
  const index = slots.findIndex((s) => s.name === name);
  if (index < 0) throw new Error(`no ${kind} ${name} on node ${id}`);
  const p = node.getConnectionPos(kind === "input", index);
  const [x, y] = window.app.canvas.ds.convertOffsetToCanvas(p);
  const box = window.app.canvas.canvas.getBoundingClientRect();
  return [box.left + x, box.top + y];
}"""


@pytest.fixture(scope="module")
def comfy_server(server) -> Server:
    """`tessera serve --frontend comfyui` on the shipped models; the first-run tour is marked
    done through the settings API, so the page opens on the graph, not on the template browser."""
    srv = server("comfy-frontend", extra_args=("--models-dir", str(MODELS), "--frontend", "comfyui"))
    settings = {"Comfy.TutorialCompleted": True, "Comfy.InstalledVersion": "1.0.0"}
    assert srv.request("POST", "/comfyui/api/settings", json_body=settings).status == 200
    return srv


@pytest.fixture
def comfy_page(chromium_browser, comfy_server):
    """ComfyUI's frontend opened at / (redirected to /comfyui/); fails on unexpected console
    errors and on any request that leaves this server."""
    context = chromium_browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    errors: list[str] = []
    outside: list[str] = []

    def on_console(message):
        where = (message.location or {}).get("url", "")
        expected = any(part in where for part in EXPECTED_404)
        if message.type == "error" and not expected and "loading core workflow templates" not in message.text:
            errors.append(f"{message.text[:300]} ({where})")

    def on_request(request):
        if not request.url.startswith((comfy_server.url, "blob:", "data:")):
            outside.append(request.url)

    page.on("console", on_console)
    page.on("pageerror", lambda e: errors.append(f"uncaught: {e}"))
    page.on("request", on_request)
    page.set_default_timeout(30_000)
    page.goto(comfy_server.url + "/")
    assert page.url == comfy_server.url + "/comfyui/"
    # the frontend is a large bundle: on a loaded machine it takes a while to start; ready when
    # the canvas is there and our node types (from /comfyui/api/object_info) are registered
    page.wait_for_function(
        "() => window.app && window.app.graph && window.app.canvas"
        " && window.LiteGraph.registered_node_types['ARGenerateTokens']",
        timeout=120_000,
    )
    yield page
    context.close()
    assert not errors, "console errors:\n" + "\n".join(errors)
    assert not outside, f"the page reached outside this server: {outside}"


def add_node(page: Page, name: str, fx: float, fy: float) -> int:
    """Double-click an empty spot of the canvas, search for `name`, pick it, and click at (fx, fy)
    of the canvas (fractions) to put it down there: it follows the pointer until then, its title
    centred on it. Returns the new node's id."""
    before = page.evaluate("() => window.app.graph._nodes.map((n) => n.id)")
    page.mouse.dblclick(*canvas_point(page, *EMPTY_SPOT))
    search = page.get_by_role("combobox", name="Add a node...")
    search.fill(name)
    page.locator('[data-testid="result-item"]').filter(has=page.get_by_text(name, exact=True)).first.click()
    search.wait_for(state="hidden")
    x, y = canvas_point(page, fx, fy)
    page.mouse.move(x, y, steps=4)
    page.mouse.click(x, y)
    new = page.evaluate(
        "(before) => window.app.graph._nodes.filter((n) => !before.includes(n.id)).map((n) => [n.id, n.type])",
        before,
    )
    assert [t for _, t in new] == [name], f"searching {name} added {new}"
    return new[0][0]


def connect(page: Page, from_id: int, output: str, to_id: int, input: str) -> None:
    """Drags a link from an output socket to an input socket."""
    x0, y0 = page.evaluate(SLOT_JS, [from_id, "output", output])
    x1, y1 = page.evaluate(SLOT_JS, [to_id, "input", input])
    page.mouse.move(x0, y0)
    page.mouse.down()
    page.mouse.move((x0 + x1) / 2, (y0 + y1) / 2, steps=5)
    page.mouse.move(x1, y1, steps=5)
    page.mouse.up()
    linked = page.evaluate(
        """([id, name]) => {
          const node = window.app.graph.getNodeById(id);
          const link = node.inputs.find((i) => i.name === name).link;
          return link == null ? null : window.app.graph.links[link].origin_id;
        }""",
        [to_id, input],
    )
    assert linked == from_id, f"dragging {output} -> {input} did not link node {from_id} to {to_id}"


def set_widgets(page: Page, node_id: int, values: dict) -> None:
    page.evaluate(
        """([id, values]) => {
          const node = window.app.graph.getNodeById(id);
          for (const [name, value] of Object.entries(values)) {
            const widget = node.widgets.find((w) => w.name === name);
            if (!widget) throw new Error(`no widget ${name} on ${node.type}`);
            widget.value = value;
          }
        }""",
        [node_id, values],
    )


def run_and_get_image(page: Page, srv: Server, save_id: int) -> Image.Image:
    """Press Run; the prompt the page queued must succeed; then the SaveImage node shows its
    image, which is fetched as the page did."""
    with page.expect_response(
        lambda r: r.url.endswith("/comfyui/api/prompt") and r.request.method == "POST"
    ) as sent:
        page.get_by_role("button", name="Run", exact=True).click()
    assert sent.value.status == 200, sent.value.text()
    prompt_id = sent.value.json()["prompt_id"]
    entry = wait_until(
        lambda: (e := srv.get_json(f"/api/history/{prompt_id}"))["status"] in TERMINAL and e,
        180,
        interval=0.2,
        message=f"prompt {prompt_id} to finish",
    )
    assert entry["status"] == "success", entry["errors"]
    page.wait_for_function("(id) => (window.app.graph.getNodeById(id).imgs || []).length > 0", arg=save_id)
    src = page.evaluate("(id) => window.app.graph.getNodeById(id).imgs[0].src", save_id)
    assert src.startswith(srv.url + "/comfyui/api/view?"), src
    response = srv.get(src.removeprefix(srv.url))
    assert response.status == 200
    return Image.open(io.BytesIO(response.body))


def canvas_point(page: Page, fx: float, fy: float) -> tuple[float, float]:
    box = page.locator("#graph-canvas").bounding_box()
    return box["x"] + box["width"] * fx, box["y"] + box["height"] * fy


def clear_graph(page: Page) -> None:
    page.locator("#graph-canvas").click(position={"x": 600, "y": 300})
    page.keyboard.press("Control+a")
    page.keyboard.press("Delete")
    assert page.evaluate("() => window.app.graph._nodes.length") == 0


def test_comfyui_frontend_builds_and_runs_an_autoregressive_graph(comfy_page: Page, comfy_server):
    page = comfy_page
    clear_graph(page)
    n = {
        name: add_node(page, name, fx, fy)
        for name, (fx, fy) in {
            "LoadTextEncoder": (0.20, 0.16),
            "TextEncode": (0.20, 0.32),
            "LoadARModel": (0.20, 0.64),
            "LoadVQModel": (0.20, 0.78),
            "ARGenerateTokens": (0.52, 0.16),
            "VQDecode": (0.76, 0.16),
            "SaveImage": (0.76, 0.36),
        }.items()
    }
    page.mouse.click(*canvas_point(page, *EMPTY_SPOT))  # nothing selected: no toolbar over the sockets
    connect(page, n["LoadTextEncoder"], "text_encoder", n["TextEncode"], "text_encoder")
    connect(page, n["TextEncode"], "conditioning", n["ARGenerateTokens"], "positive")
    connect(page, n["LoadARModel"], "model", n["ARGenerateTokens"], "model")
    connect(page, n["LoadVQModel"], "vq", n["ARGenerateTokens"], "vq")
    connect(page, n["LoadVQModel"], "vq", n["VQDecode"], "vq")
    connect(page, n["ARGenerateTokens"], "tokens", n["VQDecode"], "tokens")
    connect(page, n["VQDecode"], "image", n["SaveImage"], "images")
    # the shipped files by name (a folder may hold others, e.g. the multi-scale VQ of VAR)
    set_widgets(page, n["LoadTextEncoder"], {"file": "tessera-text-encoder.safetensors"})
    set_widgets(page, n["LoadARModel"], {"file": "tessera-ar-tiny.safetensors"})
    set_widgets(page, n["LoadVQModel"], {"file": "tessera-vq-f8.safetensors"})
    set_widgets(page, n["TextEncode"], {"text": "a red star at the top left on a blue background"})
    set_widgets(
        page, n["ARGenerateTokens"], {"width": 4, "height": 4, "cfg": 1.0, "preview_every": 0, "seed": 3}
    )
    image = run_and_get_image(page, comfy_server, n["SaveImage"])
    assert image.size == (32, 32)  # a 4x4 token grid through the f8 VQ decoder
    jobs = comfy_server.get_json("/comfyui/api/jobs?status=completed")["jobs"]
    assert jobs and jobs[0]["preview_output"]["nodeId"] == str(n["SaveImage"])


def test_comfyui_frontend_opens_and_runs_a_diffusion_workflow_file(comfy_page: Page, comfy_server):
    """A ComfyUI API-format file (ComfyUI node types: UNETLoader, KSampler, ...) dropped on the page
    becomes a graph in the frontend, runs, and shows its image."""
    page = comfy_page
    clear_graph(page)
    drop_file(page, "#graph-canvas", "diffusion_api.json", "application/json", json.dumps(DIFFUSION).encode())
    page.wait_for_function("() => window.app.graph._nodes.length === 9")
    page.locator("#graph-canvas").click(position={"x": 60 + 8, "y": 790 - 8})  # an empty corner
    page.keyboard.press(".")  # fit the view to the graph: the SaveImage node is drawn with its image
    nodes = dict(page.evaluate("() => window.app.graph._nodes.map((n) => [n.type, n.id])"))
    assert {"UNETLoader", "VAELoader", "KSampler", "EmptyLatentImage", "SaveImage"} <= set(nodes)
    image = run_and_get_image(page, comfy_server, nodes["SaveImage"])
    assert image.size == (64, 64)
    prompt = comfy_server.get_json("/comfyui/api/history?max_items=1")
    (entry,) = prompt.values()
    assert entry["status"]["completed"] is True
    assert {n["class_type"] for n in entry["prompt"][2].values()} >= {"UNETLoader", "KSampler"}
