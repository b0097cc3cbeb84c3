"""Build the next-scale (VAR) text-to-image graph with the mouse, run it with tiny random-weight
models, and watch it arrive coarse to fine: one progress step and one preview per scale."""

from __future__ import annotations

import pytest
import torch
from canvas_driver import (
    canvas_point,
    choose,
    connect,
    link_of,
    run_and_wait,
    type_number,
    type_text,
    wait_for_node_image,
)
from playwright.sync_api import Page, expect
from test_browser_models import need_nodes, place
from tiny_models import TEXT_ENCODER

from tessera.engines.multiscale_vq import MultiScaleVQ, MultiScaleVQConfig, save_multiscale_vq
from tessera.engines.text_encoder import load_text_encoder
from tessera.engines.var import VAR, VARConfig, save_var

NODES = ["LoadTextEncoder", "TextEncode", "LoadVARModel", "LoadMultiScaleVQ", "VARGenerate", "MultiScaleDecode",
         "SaveImage"]  # fmt: skip
PATCH_NUMS = [1, 2, 3, 4]  # four scales; 4 x downsample 4 = 16 px images
VAR_FILE, MSVQ_FILE = "tiny-var.safetensors", "tiny-msvq.safetensors"

# Every preview and progress event of the page, with each preview's decoded size and a pixel sum.
RECORD_JS = """() => {
  window.__events = [];
  const api = window.tessera.api;
  api.addEventListener("progress", (e) => window.__events.push({type: "progress", node: e.detail.node,
                                                                value: e.detail.value, max: e.detail.max}));
  api.addEventListener("preview", async (e) => {
    const entry = {type: "preview", node: e.detail.node};
    window.__events.push(entry);
    const bitmap = await createImageBitmap(e.detail.blob);
    const canvas = new OffscreenCanvas(bitmap.width, bitmap.height);
    const g = canvas.getContext("2d");
    g.drawImage(bitmap, 0, 0);
    const data = g.getImageData(0, 0, bitmap.width, bitmap.height).data;
    let sum = 0;
    for (let i = 0; i < data.length; i++) sum += data[i];
    Object.assign(entry, {w: bitmap.width, h: bitmap.height, sum});
  });
}"""


@pytest.fixture
def next_scale_models(editor_server):
    """A tiny caption VAR (for the browser tests' tiny text encoder) and its multi-scale VQ, in the
    server's models folder for the length of one test."""
    te = load_text_encoder(editor_server.models / "text_encoders" / TEXT_ENCODER)
    torch.manual_seed(0)
    msvq = MultiScaleVQ(MultiScaleVQConfig(channels=8, ch_mult=[1, 2, 2], num_res_blocks=1, attn_deepest=False,
                                           mid_attn=False, z_channels=8, vocab_size=32, patch_nums=PATCH_NUMS,
                                           norm_groups=4))  # fmt: skip
    var = VAR(VARConfig(depth=1, width=32, heads=2, ffn_hidden=64, vocab_size=32, cvae=8, patch_nums=PATCH_NUMS,
                        num_classes=0, pooled_dim=te.config.pooled_dim)).init_weights(0)  # fmt: skip
    paths = [editor_server.models / "vq_models" / MSVQ_FILE, editor_server.models / "ar_models" / VAR_FILE]
    save_multiscale_vq(msvq, paths[0])
    save_var(var, paths[1])
    yield
    for path in paths:
        path.unlink()


def test_next_scale_graph_by_mouse_shows_every_scale(next_scale_models, editor: Page, editor_server, screens):
    page = editor
    need_nodes(editor_server, NODES)
    n = place(
        page,
        {
            "LoadTextEncoder": (0.03, 0.04),
            "TextEncode": (0.03, 0.20),
            "LoadVARModel": (0.03, 0.50),
            "LoadMultiScaleVQ": (0.03, 0.68),
            "VARGenerate": (0.37, 0.03),
            "MultiScaleDecode": (0.70, 0.04),
            "SaveImage": (0.70, 0.26),
        },
    )
    connect(page, n["LoadTextEncoder"], "text_encoder", n["TextEncode"], "text_encoder")
    connect(page, n["TextEncode"], "conditioning", n["VARGenerate"], "positive")
    connect(page, n["LoadVARModel"], "model", n["VARGenerate"], "model")
    connect(page, n["LoadMultiScaleVQ"], "vq", n["VARGenerate"], "vq")
    connect(page, n["LoadMultiScaleVQ"], "vq", n["MultiScaleDecode"], "vq")
    connect(page, n["VARGenerate"], "tokens", n["MultiScaleDecode"], "tokens")
    connect(page, n["MultiScaleDecode"], "image", n["SaveImage"], "images")
    assert link_of(page, n["MultiScaleDecode"], "tokens") == {
        "node": str(n["VARGenerate"]),
        "output": "tokens",
    }
    choose(page, n["LoadVARModel"], "file", VAR_FILE)
    choose(page, n["LoadMultiScaleVQ"], "file", MSVQ_FILE)
    type_text(page, n["TextEncode"], "text", "a red star at the top left on a blue background")
    gen = n["VARGenerate"]
    type_number(page, gen, "cfg", 3)
    choose(page, gen, "control after generate", "fixed")
    type_number(page, gen, "seed", 7)
    page.evaluate(RECORD_JS)
    run_and_wait(page, timeout=120_000)
    out = wait_for_node_image(page, n["SaveImage"])
    assert (out[0]["w"], out[0]["h"]) == (16, 16) and "/api/view?" in out[0]["src"]
    # coarse to fine: one progress step and one preview per scale, on the generator node
    page.wait_for_function(
        f"() => window.__events.filter((e) => e.type === 'preview' && e.node === '{gen}' && e.sum !== undefined)"
        f".length >= {len(PATCH_NUMS)}"
    )
    events = page.evaluate("() => window.__events")
    steps = [(e["value"], e["max"]) for e in events if e["type"] == "progress" and e["node"] == str(gen)]
    assert steps == [(k, len(PATCH_NUMS)) for k in range(1, len(PATCH_NUMS) + 1)], steps
    previews = [e for e in events if e["type"] == "preview" and e["node"] == str(gen)]
    assert len(previews) == len(PATCH_NUMS) > 1
    # each preview is the image decoded from the scales so far (full size), and each scale changes it
    assert all((p["w"], p["h"]) == (16, 16) for p in previews), previews
    assert len({p["sum"] for p in previews}) == len(previews), previews
    assert page.evaluate(f"() => window.tessera.graph.getNodeById({gen}).previewCount") == len(PATCH_NUMS)
    expect(page.locator(".history-item").first).to_have_attribute("data-status", "success")
    page.mouse.move(*canvas_point(page, 0.98, 0.98))
    page.screenshot(path=str(screens / "next-scale-run.png"))
