"""A PNG saved by ComfyUI (its `prompt` and `workflow` text chunks) and a ComfyUI UI-format
workflow, dropped on our editor, restore as Tessera graphs (converted by the server)."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, PngImagePlugin
from playwright.sync_api import Page, expect
from test_browser_editor import drop_file

COMFY = Path(__file__).resolve().parent.parent / "comfy_workflows"


def comfyui_png() -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_text("prompt", (COMFY / "flux_dev_api.json").read_text())
    info.add_text("workflow", (COMFY / "flux_dev_ui.json").read_text())
    buffer = io.BytesIO()
    Image.new("RGB", (32, 48), (9, 9, 9)).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def test_drop_a_comfyui_png_restores_its_graph(editor: Page):
    page = editor
    drop_file(page, "#canvas-wrap", "ComfyUI_00001_.png", "image/png", comfyui_png())
    expect(page.locator(".toast.ok").last).to_contain_text("Loaded the workflow from ComfyUI_00001_.png")
    nodes = page.evaluate("() => window.tessera.workflow().nodes")
    assert {k: v["type"] for k, v in nodes.items()} == {
        "6": "TextEncode",
        "8": "VAEDecode",
        "9": "SaveImage",
        "10": "LoadVAE",
        "11": "DualCLIPLoader",
        "12": "LoadDiffusionModel",
        "26": "FluxGuidance",
        "27": "EmptyLatent",
        "31": "DiTSampler",
        "33": "TextEncode",
        "35": "ConditioningZeroOut",
    }
    assert nodes["31"]["inputs"]["positive"] == {"node": "26", "output": "conditioning"}
    assert nodes["31"]["inputs"]["schedule"] == "flux"
    assert nodes["12"]["ui"]["pos"] == [20, 260]  # placed where the ComfyUI editor had it


def test_drop_a_comfyui_ui_workflow_and_an_unsupported_one(editor: Page, console_errors):
    page = editor
    text = (COMFY / "flux_dev_ui.json").read_text()
    drop_file(page, "#canvas-wrap", "flux_dev_ui.json", "application/json", text.encode())
    expect(page.locator(".toast.ok").last).to_contain_text("Loaded the workflow from flux_dev_ui.json")
    assert page.evaluate("() => window.tessera.workflow().nodes['31'].inputs.denoise") == 0.5
    console_errors.allow("/api/import", "400")
    unsupported = text.replace('"type": "KSamplerAdvanced"', '"type": "SamplerCustom"')
    drop_file(page, "#canvas-wrap", "custom.json", "application/json", unsupported.encode())
    expect(page.locator(".toast.error").last).to_contain_text(
        "node 31: ComfyUI node type 'SamplerCustom' is not supported"
    )
    assert page.evaluate("() => Object.keys(window.tessera.workflow().nodes).length") == 11  # the graph stays
