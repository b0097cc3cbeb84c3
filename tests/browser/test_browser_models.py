"""Build the diffusion and the autoregressive text-to-image graphs with the mouse, run them
with tiny random-weight models, watch the previews and the output, and keep a screenshot."""

from __future__ import annotations

import json
import urllib.request

from canvas_driver import (
    canvas_point,
    choose,
    connect,
    drag_from_palette,
    link_of,
    run_and_wait,
    type_number,
    type_text,
    wait_for_node_image,
)
from playwright.sync_api import Page, expect
from test_browser_editor import drop_file

DIFFUSION_NODES = [
    "LoadDiffusionModel",
    "LoadVAE",
    "LoadTextEncoder",
    "TextEncode",
    "EmptyLatent",
    "DiTSampler",
    "VAEDecode",
    "SaveImage",
]
AR_NODES = ["LoadARModel", "LoadVQModel", "ARGenerateTokens", "VQDecode", "SaveImage"]


def need_nodes(server, names: list[str]) -> dict:
    with urllib.request.urlopen(server.url + "/api/nodes") as r:
        catalogue = json.load(r)["nodes"]
    missing = [n for n in names if n not in catalogue]
    assert not missing, f"node types missing from the catalogue: {', '.join(missing)}"
    return catalogue


def place(page: Page, spec: dict[str, tuple[float, float]]) -> dict[str, int]:
    """Drags each node type from the palette to its (fx, fy) spot on the canvas."""
    return {
        name: drag_from_palette(page, name.split("#")[0], *canvas_point(page, fx, fy))
        for name, (fx, fy) in spec.items()
    }


def test_autoregressive_graph_by_mouse(editor: Page, editor_server, screens):
    page = editor
    need_nodes(editor_server, AR_NODES)
    n = place(
        page,
        {
            "LoadARModel": (0.04, 0.06),
            "LoadVQModel": (0.04, 0.30),
            "ARGenerateTokens": (0.36, 0.04),
            "VQDecode": (0.68, 0.06),
            "SaveImage": (0.68, 0.28),
        },
    )
    connect(page, n["LoadARModel"], "model", n["ARGenerateTokens"], "model")
    connect(page, n["LoadVQModel"], "vq", n["ARGenerateTokens"], "vq")
    connect(page, n["LoadVQModel"], "vq", n["VQDecode"], "vq")
    connect(page, n["ARGenerateTokens"], "tokens", n["VQDecode"], "tokens")
    connect(page, n["VQDecode"], "image", n["SaveImage"], "images")
    assert link_of(page, n["VQDecode"], "tokens") == {"node": str(n["ARGenerateTokens"]), "output": "tokens"}
    gen = n["ARGenerateTokens"]
    type_number(page, gen, "class_id", 3)
    type_number(page, gen, "preview_every", 16)
    choose(page, gen, "control after generate", "fixed")
    type_number(page, gen, "seed", 1234)
    run_and_wait(page, timeout=120_000)
    out = wait_for_node_image(page, n["SaveImage"])
    assert out[0]["w"] > 0 and "/api/view?" in out[0]["src"]
    # the token grid filled in raster order: previews arrived on the generator node
    previews = page.evaluate(f"() => window.tessera.graph.getNodeById({gen}).previewCount ?? 0")
    assert previews >= 2, previews
    assert page.evaluate(f"() => window.tessera.graph.getNodeById({gen}).images[0].src").startswith("blob:")
    # seed control "fixed": the seed stays for the next run
    assert page.evaluate(f"() => window.tessera.workflow().nodes['{gen}'].inputs.seed") == 1234
    expect(page.locator(".history-item").first).to_have_attribute("data-status", "success")
    page.mouse.move(*canvas_point(page, 0.98, 0.98))
    page.screenshot(path=str(screens / "autoregressive-run.png"))


def test_diffusion_graph_by_mouse(editor: Page, editor_server, screens):
    page = editor
    need_nodes(editor_server, DIFFUSION_NODES)
    n = place(
        page,
        {
            "LoadTextEncoder": (0.04, 0.03),
            "TextEncode": (0.04, 0.16),
            "LoadDiffusionModel": (0.04, 0.40),
            "LoadVAE": (0.04, 0.57),
            "EmptyLatent": (0.04, 0.74),
            "DiTSampler": (0.39, 0.03),
            "VAEDecode": (0.71, 0.03),
            "SaveImage": (0.71, 0.24),
        },
    )
    connect(page, n["LoadTextEncoder"], "text_encoder", n["TextEncode"], "text_encoder")
    connect(page, n["LoadDiffusionModel"], "model", n["DiTSampler"], "model")
    connect(page, n["TextEncode"], "conditioning", n["DiTSampler"], "positive")
    connect(page, n["LoadVAE"], "vae", n["EmptyLatent"], "vae")
    connect(page, n["EmptyLatent"], "latent", n["DiTSampler"], "latent")
    connect(page, n["DiTSampler"], "latent", n["VAEDecode"], "latent")
    connect(page, n["LoadVAE"], "vae", n["VAEDecode"], "vae")
    connect(page, n["VAEDecode"], "image", n["SaveImage"], "images")
    type_text(page, n["TextEncode"], "text", "a red circle above a blue square")
    latent = n["EmptyLatent"]
    type_number(page, latent, "width", 32)
    type_number(page, latent, "height", 32)
    sampler = n["DiTSampler"]
    type_number(page, sampler, "steps", 4)
    run_and_wait(page, timeout=120_000)
    out = wait_for_node_image(page, n["SaveImage"])
    assert out[0]["w"] == 32
    previews = page.evaluate(f"() => window.tessera.graph.getNodeById({sampler}).previewCount ?? 0")
    assert previews >= 1, previews
    expect(page.locator(".history-item").first).to_have_attribute("data-status", "success")
    page.mouse.move(*canvas_point(page, 0.98, 0.98))
    page.screenshot(path=str(screens / "diffusion-run.png"))


def test_import_a_workflow_file_then_interrupt_the_run(editor: Page, editor_server):
    page = editor
    need_nodes(editor_server, AR_NODES)
    workflow = {
        "version": 1,
        "nodes": {
            "1": {
                "type": "LoadARModel",
                "inputs": {"model_name": "tiny-gpt.safetensors"},
                "ui": {"pos": [20, 40]},
            },
            "2": {
                "type": "ARGenerateTokens",
                "ui": {"pos": [320, 40]},
                "inputs": {
                    "model": {"node": "1", "output": "model"},
                    "width": 64,
                    "height": 64,
                    "preview_every": 0,
                    "class_id": 1,
                },
            },
            "3": {
                "type": "LoadVQModel",
                "inputs": {"model_name": "tiny-vq.safetensors"},
                "ui": {"pos": [20, 220]},
            },
            "4": {
                "type": "VQDecode",
                "inputs": {"vq": {"node": "3", "output": "vq"}, "tokens": {"node": "2", "output": "tokens"}},
                "ui": {"pos": [620, 40]},
            },
            "5": {
                "type": "PreviewImage",
                "inputs": {"images": {"node": "4", "output": "image"}},
                "ui": {"pos": [620, 200]},
            },
        },
    }
    with page.expect_file_chooser() as chooser:
        page.locator("#btn-import").click()
    chooser.value.set_files(
        files=[
            {"name": "long-ar.json", "mimeType": "application/json", "buffer": json.dumps(workflow).encode()}
        ]
    )
    expect(page.locator(".toast.ok").last).to_contain_text("Imported long-ar.json")
    assert page.evaluate("() => window.tessera.workflow().nodes['2'].inputs.width") == 64
    before = page.evaluate("() => window.tessera.runState.results.length")
    page.locator("#btn-run").click()
    page.wait_for_function("() => (window.tessera.graph.getNodeById(2).progress ?? 0) > 0", timeout=60_000)
    assert page.evaluate("() => window.tessera.graph.getNodeById(2).runState") == "running"
    page.locator("#btn-interrupt").click()
    page.wait_for_function("(n) => window.tessera.runState.results.length > n", arg=before, timeout=30_000)
    assert page.evaluate("() => window.tessera.runState.results.at(-1).status") == "interrupted"
    expect(page.locator(".toast.warn").last).to_contain_text("Interrupted")
    expect(page.locator(".history-item").first).to_have_attribute("data-status", "interrupted")


def test_execution_error_marks_node_and_input(editor: Page, editor_server, screens):
    page = editor
    need_nodes(editor_server, AR_NODES)
    workflow = {
        "version": 1,
        "nodes": {
            "1": {
                "type": "LoadARModel",
                "inputs": {"model_name": "tiny-gpt.safetensors"},
                "ui": {"pos": [30, 60]},
            },
            "2": {
                "type": "ARGenerateTokens",
                "ui": {"pos": [340, 40]},
                "inputs": {
                    "model": {"node": "1", "output": "model"},
                    "width": 8,
                    "height": 8,
                    "class_id": 50,
                },
            },
            "3": {
                "type": "LoadVQModel",
                "inputs": {"model_name": "tiny-vq.safetensors"},
                "ui": {"pos": [30, 260]},
            },
            "4": {
                "type": "VQDecode",
                "inputs": {"vq": {"node": "3", "output": "vq"}, "tokens": {"node": "2", "output": "tokens"}},
                "ui": {"pos": [640, 60]},
            },
            "5": {
                "type": "PreviewImage",
                "inputs": {"images": {"node": "4", "output": "image"}},
                "ui": {"pos": [640, 220]},
            },
        },
    }
    drop_file(page, "#canvas-wrap", "bad-class.json", "application/json", json.dumps(workflow).encode())
    expect(page.locator(".toast.ok").last).to_contain_text("bad-class.json")
    before = page.evaluate("() => window.tessera.runState.results.length")
    page.locator("#graph-canvas").focus()
    page.keyboard.press("Control+Enter")
    page.wait_for_function("(n) => window.tessera.runState.results.length > n", arg=before, timeout=60_000)
    assert page.evaluate("() => window.tessera.runState.results.at(-1).status") == "error"
    errors = page.evaluate("() => window.tessera.graph.getNodeById(2).errors")
    assert errors[0]["input"] == "class_id" and "class_id" in errors[0]["message"], errors
    assert page.evaluate("() => window.tessera.graph.getNodeById(2).runState") == "error"
    expect(page.locator(".toast.error").last).to_contain_text("class_id")
    expect(page.locator(".history-item").first).to_have_attribute("data-status", "error")
    page.screenshot(path=str(screens / "execution-error.png"))
