"""Issue 15: the editor as a ComfyUI user expects it. Runs stay on the graph they were queued
from and survive a reload; bypass and mute; no broken subgraph item; Enter in the save
dialog; exact 64-bit seeds; fit-view and readable templates; the queue panel; Run x N."""

from __future__ import annotations

import json

from canvas_driver import canvas_point, drag_from_palette, set_widget, widget_point
from PIL import Image
from playwright.sync_api import Page, expect
from test_browser_editor import build_solid_to_save, title_point


def link(node: str, output: str) -> dict:
    return {"node": node, "output": output}


def sleep_then_save(steps: int, label: str) -> dict:
    """Sleep (node 1, runs first: lowest id) then SolidColor -> SaveImage: a run that lasts
    `steps` x 20 ms and ends with an image on node 3."""
    return {
        "version": 1,
        "nodes": {
            "1": {
                "type": "Sleep",
                "inputs": {"steps": steps, "step_seconds": 0.02, "label": label, "preview": True},
                "ui": {"pos": [40, 60]},
            },
            "2": {
                "type": "SolidColor",
                "inputs": {"width": 16, "height": 16, "red": 0.2},
                "ui": {"pos": [40, 320]},
            },
            "3": {
                "type": "SaveImage",
                "inputs": {"images": link("2", "image"), "filename_prefix": label},
                "ui": {"pos": [360, 320]},
            },
        },
    }


def load(page: Page, workflow: dict) -> None:
    assert page.evaluate("(wf) => window.tessera.loadWorkflow(wf, null)", workflow)


def results(page: Page) -> int:
    return page.evaluate("() => window.tessera.runState.results.length")


def wait_results(page: Page, n: int, timeout: float = 60_000) -> dict:
    page.wait_for_function("(n) => window.tessera.runState.results.length >= n", arg=n, timeout=timeout)
    return page.evaluate("() => window.tessera.runState.results.at(-1)")


def node_state(page: Page, node_id: int) -> dict:
    return page.evaluate(
        """(id) => { const n = window.tessera.graph.getNodeById(id);
            return {runState: n.runState ?? null, progress: n.progress ?? null, images: (n.images ?? []).length,
                    previews: n.previewCount ?? 0}; }""",
        node_id,
    )


def test_a_run_stays_on_the_graph_it_was_queued_from(editor: Page, screens):
    page = editor
    load(page, sleep_then_save(100, "graph-a"))
    before = results(page)
    page.locator("#btn-run").click()
    page.wait_for_function("() => (window.tessera.graph.getNodeById(1).previewCount ?? 0) >= 1")
    # another workflow whose node 1 is a different node, loaded while the run goes on
    page.locator("#sel-open").select_option("template:text_to_image_diffusion")
    result = wait_results(page, before + 1)
    assert result["status"] == "success"
    for node in page.evaluate("() => window.tessera.graph._nodes.map((n) => n.id)"):
        state = node_state(page, node)
        assert state == {"runState": None, "progress": None, "images": 0, "previews": 0}, (node, state)
    # the run is still in History, with its image
    expect(page.locator(".history-item").first).to_have_attribute("data-status", "success")
    expect(page.locator(".history-item").first.locator("img")).to_have_count(1)
    page.screenshot(path=str(screens / "run-stays-on-its-graph.png"))


def test_a_reload_mid_run_reattaches_and_shows_the_result(editor: Page, screens):
    page = editor
    load(page, sleep_then_save(250, "reload"))
    page.locator("#btn-run").click()
    page.wait_for_function("() => (window.tessera.graph.getNodeById(1).progress ?? 0) > 0")
    page.wait_for_function("() => (localStorage.getItem('tessera.workflow') || '').includes('Sleep')")
    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    before = results(page)
    # progress keeps coming to the same node, and the final image lands on SaveImage
    page.wait_for_function("() => (window.tessera.graph.getNodeById(1).progress ?? 0) > 0")
    expect(page.locator('.queue-item[data-status="running"]')).to_have_count(1)
    page.wait_for_function(
        "() => (window.tessera.graph.getNodeById(3).images ?? []).some((i) => i.complete && i.naturalWidth > 0)",
        timeout=60_000,
    )
    assert wait_results(page, before + 1)["status"] == "success"
    assert "reload" in page.evaluate("() => window.tessera.graph.getNodeById(3).images[0].src")
    expect(page.locator("#run-progress .label")).to_have_text("done")
    page.screenshot(path=str(screens / "reload-mid-run.png"))


def pixel_of_last_output(page: Page, server) -> tuple[int, int, int]:
    entry = page.evaluate("async () => (await window.tessera.api.history(1)).items[0]")
    (ref,) = [r for o in entry["outputs"].values() for r in o.get("images", [])]
    with Image.open(server.output / ref["subfolder"] / ref["filename"]) as picture:
        return picture.convert("RGB").getpixel((0, 0))


def test_ctrl_b_bypasses_and_ctrl_m_mutes_and_both_are_saved(
    editor: Page, editor_server, screens, console_errors
):
    page = editor
    console_errors.allow("/api/prompt", "400")  # the refused run below
    load(
        page,
        {
            "version": 1,
            "nodes": {
                "1": {
                    "type": "SolidColor",
                    "inputs": {"width": 8, "height": 8, "red": 1.0, "green": 0.0, "blue": 0.0},
                    "ui": {"pos": [40, 60]},
                },
                "2": {
                    "type": "ImageInvert",
                    "inputs": {"image": link("1", "image")},
                    "ui": {"pos": [340, 60]},
                },
                "3": {
                    "type": "SaveImage",
                    "inputs": {"images": link("2", "image"), "filename_prefix": "bypass"},
                    "ui": {"pos": [620, 60]},
                },
            },
        },
    )
    page.mouse.click(*title_point(page, 2))
    page.keyboard.press("Control+b")
    assert page.evaluate("() => window.tessera.workflow().nodes['2'].mode") == "bypass"
    before = results(page)
    page.locator("#btn-run").click()
    assert wait_results(page, before + 1)["status"] == "success"
    assert pixel_of_last_output(page, editor_server) == (255, 0, 0)  # not inverted: passed straight through
    page.screenshot(path=str(screens / "bypassed-node.png"))

    page.mouse.click(*title_point(page, 2))
    page.keyboard.press("Control+b")  # again: back to normal
    assert "mode" not in page.evaluate("() => window.tessera.workflow().nodes['2']")
    page.keyboard.press("Control+m")
    assert page.evaluate("() => window.tessera.workflow().nodes['2'].mode") == "mute"
    # SaveImage needs only the muted node: nothing is left to run, and the editor says so
    page.locator("#btn-run").click()
    expect(page.locator(".toast.error").last).to_contain_text("every output node is muted")
    # the mode survives a reload (saved in the workflow)
    page.wait_for_function(
        "() => (localStorage.getItem('tessera.workflow') || '').includes('\"mode\":\"mute\"')"
    )
    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    assert page.evaluate("() => window.tessera.graph.getNodeById(2).mode") == 2


def test_node_menu_offers_modes_and_no_subgraph(editor: Page):
    page = editor
    solid, _ = build_solid_to_save(page)
    page.mouse.click(*title_point(page, solid), button="right")
    menu = page.locator(".litecontextmenu").last
    expect(menu.locator(".litemenu-entry", has_text="Mode")).to_be_visible()
    expect(page.locator(".litemenu-entry", has_text="Subgraph")).to_have_count(0)
    menu.locator(".litemenu-entry", has_text="Mode").click()
    page.locator(".litecontextmenu .litemenu-entry", has_text="Bypass").click()
    assert page.evaluate(f"() => window.tessera.workflow().nodes['{solid}'].mode") == "bypass"
    # and on the canvas with several nodes selected
    page.keyboard.press("Control+a")
    page.mouse.click(*canvas_point(page, 0.5, 0.9), button="right")
    expect(page.locator(".litecontextmenu").last).to_be_visible()
    expect(page.locator(".litemenu-entry", has_text="Subgraph")).to_have_count(0)


def test_enter_saves_and_escape_cancels_the_name_dialog(editor: Page):
    page = editor
    build_solid_to_save(page)
    page.locator("#btn-save").click()
    page.locator("#name-dialog input[name=name]").fill("by enter")
    page.keyboard.press("Enter")
    expect(page.locator(".toast.ok").last).to_contain_text('Saved "by enter"')
    page.locator("#btn-new").click()
    build_solid_to_save(page)
    page.locator("#btn-save").click()
    page.locator("#name-dialog input[name=name]").fill("by escape")
    page.keyboard.press("Escape")
    expect(page.locator("#name-dialog")).not_to_be_visible()
    assert "by escape" not in page.evaluate("async () => (await window.tessera.api.workflows()).workflows")
    # the shortcuts list opens with ? and closes with Escape
    page.mouse.click(*canvas_point(page, 0.5, 0.9))
    page.keyboard.press("?")
    expect(page.locator("#shortcuts-dialog")).to_contain_text("Ctrl+B")
    page.keyboard.press("Escape")
    expect(page.locator("#shortcuts-dialog")).not_to_be_visible()


def type_seed(page: Page, node_id: int, text: str) -> None:
    page.mouse.click(*widget_point(page, node_id, "seed"))
    field = page.locator(".graphdialog input.value")
    field.fill(text)
    field.press("Enter")
    expect(field).to_have_count(0)


def test_seeds_cover_the_full_64_bit_range_exactly(editor: Page):
    page = editor
    build_solid_to_save(page)
    seed = drag_from_palette(page, "Seed", *canvas_point(page, 0.3, 0.7))
    for typed, expected in [
        ("1e30", 2**64 - 1),
        ("18446744073709551614", 2**64 - 2),
        ("9007199254740993", 2**53 + 1),
    ]:
        type_seed(page, seed, typed)
        sent = page.evaluate(
            """async () => { const { stringify } = await import('/js/json-big.js');
                return stringify(window.tessera.workflow()); }"""
        )
        assert json.loads(sent)["nodes"][str(seed)]["inputs"]["seed"] == expected
        # the server takes it as it is
        valid = page.evaluate(
            "async () => (await window.tessera.api.validate(window.tessera.workflow())).valid"
        )
        assert valid is True


TEMPLATE_BOXES = """() => {
  const app = window.tessera, title = 30;  // LiteGraph.NODE_TITLE_HEIGHT
  const c = app.canvasEl.getBoundingClientRect();
  return {
    scale: app.canvas.ds.scale, lowQuality: app.canvas.low_quality, canvas: [c.width, c.height],
    boxes: app.graph._nodes.map((n) => {
      const [x, y] = app.canvas.ds.convertOffsetToCanvas([n.pos[0], n.pos[1] - title]);
      const s = app.canvas.ds.scale;
      return {id: n.id, x, y, w: n.size[0] * s, h: (n.size[1] + title) * s};
    }),
  };
}"""


def test_every_template_fits_the_screen_without_overlap(editor: Page, screens):
    page = editor
    names = page.evaluate("async () => Object.keys((await window.tessera.api.templates()).templates)")
    assert len(names) >= 6
    page.evaluate("() => { window.tessera.canvas.ds.scale = 2.5; }")  # zoom must not carry over
    for name in sorted(names):
        page.locator("#sel-open").select_option(f"template:{name}")
        page.evaluate("() => window.tessera.drawNow()")
        view = page.evaluate(TEMPLATE_BOXES)
        width, height = view["canvas"]
        assert view["scale"] >= 0.4 and not view["lowQuality"], (name, view["scale"])  # text still drawn
        minimap = page.evaluate(
            "() => { const m = document.getElementById('minimap').getBoundingClientRect(),"
            " c = window.tessera.canvasEl.getBoundingClientRect(); return m.top - c.top; }"
        )
        for b in view["boxes"]:
            assert b["x"] >= 0 and b["y"] >= 0 and b["x"] + b["w"] <= width and b["y"] + b["h"] <= height, (
                name,
                b,
            )
            assert b["y"] + b["h"] <= minimap, (name, b)  # nothing hides under the minimap
        boxes = view["boxes"]
        for i, a in enumerate(boxes):
            for b in boxes[i + 1 :]:
                apart = (
                    a["x"] + a["w"] <= b["x"]
                    or b["x"] + b["w"] <= a["x"]
                    or a["y"] + a["h"] <= b["y"]
                    or b["y"] + b["h"] <= a["y"]
                )
                assert apart, (name, a, b)
        page.screenshot(path=str(screens / f"template-{name}.png"))
    # the Fit button brings a graph zoomed far away back into view; text is drawn at 40%
    page.evaluate("() => { window.tessera.canvas.ds.scale = 0.4; window.tessera.drawNow(); }")
    assert page.evaluate("() => window.tessera.canvas.low_quality") is False
    page.screenshot(path=str(screens / "zoom-40-percent.png"))
    page.evaluate("() => { const ds = window.tessera.canvas.ds; ds.scale = 0.2; ds.offset[0] = 9000; }")
    page.locator("#btn-fit").click()
    view = page.evaluate(TEMPLATE_BOXES)
    assert all(b["x"] >= 0 and b["x"] + b["w"] <= view["canvas"][0] for b in view["boxes"])


def test_queue_panel_cancels_and_clears_and_run_times_n(editor: Page, screens):
    page = editor
    load(
        page,
        {
            "version": 1,
            "nodes": {"1": {"type": "Sleep", "inputs": {"steps": 2000, "step_seconds": 0.02, "label": "q"}}},
        },
    )
    page.locator("#run-count").fill("4")
    page.locator("#btn-run").click()
    expect(page.locator(".queue-item")).to_have_count(4)
    expect(page.locator('.queue-item[data-status="running"]')).to_have_count(1)
    page.screenshot(path=str(screens / "queue-panel.png"))
    page.locator('.queue-item[data-status="pending"] .cancel').first.click()
    expect(page.locator(".queue-item")).to_have_count(3)
    page.locator("#btn-queue-clear").click()
    expect(page.locator(".queue-item")).to_have_count(1)
    page.locator('.queue-item[data-status="running"] .cancel').click()
    expect(page.locator(".queue-item")).to_have_count(0)
    expect(page.locator(".queue-list-empty, #queue-list")).to_contain_text("Queue is empty")
    statuses = page.evaluate("() => window.tessera.runState.results.slice(-4).map((r) => r.status).sort()")
    assert statuses == ["cancelled", "cancelled", "cancelled", "interrupted"]


def open_search(page: Page):
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    box = page.locator(".litesearchbox input")
    for _ in range(3):  # litegraph times the two clicks itself
        page.mouse.dblclick(*canvas_point(page, 0.5, 0.5))
        try:
            box.wait_for(state="visible", timeout=3_000)
            return box
        except PlaywrightTimeout:
            continue
    raise AssertionError("the search box did not open")


def test_search_ranks_exact_then_prefix_and_shows_each_node_once(editor: Page):
    page = editor
    box = open_search(page)
    box.press_sequentially("TextEncode")
    items = page.locator(".litesearchbox .lite-search-item")
    expect(items.first).to_have_attribute("data-type", "TextEncode")
    types = items.evaluate_all("(els) => els.map((e) => decodeURIComponent(e.dataset.type))")
    assert types.index("TextEncode") < types.index("LoadTextEncoder")
    first = items.first.evaluate(
        "(e) => [e.childNodes[0].textContent, e.querySelector('.lite-search-item-type').textContent]"
    )
    assert first == ["TextEncode", "conditioning"]
    box.press("Enter")
    assert page.evaluate("() => window.tessera.graph._nodes.map((n) => n.type)") == ["TextEncode"]


def test_load_image_lists_the_example_inputs_with_a_preview(editor: Page):
    page = editor
    node = drag_from_palette(page, "LoadImage", *canvas_point(page, 0.4, 0.3))
    choices = page.evaluate(f"() => window.tessera.graph.getNodeById({node}).uploadTarget.info.choices")
    assert "example.png" in choices
    page.mouse.click(*widget_point(page, node, "image"))
    page.locator(".litecontextmenu .litemenu-entry", has_text="example.png").first.click()
    page.wait_for_function(
        f"() => (window.tessera.graph.getNodeById({node}).images ?? []).some((i) => i.complete && i.naturalWidth > 0)"
    )


def test_bad_constants_are_refused_at_submit_naming_the_problem(editor: Page, console_errors):
    page = editor
    console_errors.allow("/api/prompt", "400")
    load(
        page,
        {
            "version": 1,
            "nodes": {
                "1": {"type": "SolidColor", "inputs": {"width": 8, "height": 8}, "ui": {"pos": [40, 60]}},
                "2": {
                    "type": "SaveImage",
                    "inputs": {"images": link("1", "image"), "filename_prefix": "day:1"},
                    "ui": {"pos": [340, 60]},
                },
            },
        },
    )
    before = page.evaluate("async () => (await window.tessera.api.history(1)).items.length")
    page.locator("#btn-run").click()
    expect(page.locator(".toast.error").last).to_contain_text("contains ':'")
    assert page.evaluate("() => window.tessera.graph.getNodeById(2).errors[0].input") == "filename_prefix"
    after = page.evaluate("async () => (await window.tessera.api.history(1)).items.length")
    assert after == before  # nothing was queued, nothing ran


def test_history_thumbnail_opens_a_pixelated_lightbox_with_arrow_keys(editor: Page, screens):
    page = editor
    solid, _ = build_solid_to_save(page)
    for red in (0.9, 0.1):  # two different outputs (the same inputs would be served from the cache)
        set_widget(page, solid, "red", red)
        before = results(page)
        page.locator("#btn-run").click()
        wait_results(page, before + 1)
    page.locator("#btn-history-refresh").click()
    thumbs = page.locator(".history-item .thumbs img")
    expect(thumbs.nth(1)).to_be_visible()
    thumbs.first.click()
    box = page.locator("#lightbox")
    expect(box).to_be_visible()
    img = box.locator("img")
    page.wait_for_function("() => document.querySelector('#lightbox img').naturalWidth > 0")
    assert "pixelated" in img.get_attribute("class")
    assert img.bounding_box()["width"] >= 64 * 4  # a 64 px output shown at least 4x
    first = img.get_attribute("src")
    page.keyboard.press("ArrowRight")
    expect(img).not_to_have_attribute("src", first)
    expect(box.locator("figcaption")).to_contain_text("2 /")
    page.screenshot(path=str(screens / "lightbox.png"))
    page.keyboard.press("Escape")
    expect(box).to_be_hidden()


def test_groups_collapse_colours_and_sizes_survive_a_reload_and_the_minimap_moves_the_view(
    editor: Page, screens
):
    page = editor
    solid, save = build_solid_to_save(page)
    page.evaluate(
        """([solid, save]) => { const app = window.tessera;
            const s = app.graph.getNodeById(solid);
            s.collapse(true);
            app.graph.getNodeById(save).color = "#223366";
            app.graph.getNodeById(save).size = [300, 200];
            app.changed(); }""",
        [solid, save],
    )
    # a group made from the canvas menu
    page.mouse.click(*canvas_point(page, 0.5, 0.85), button="right")
    page.locator(".litecontextmenu .litemenu-entry", has_text="Add Group").first.click()
    page.evaluate("() => window.tessera.changed()")
    page.wait_for_function("() => (localStorage.getItem('tessera.workflow') || '').includes('\"groups\"')")
    saved = page.evaluate("() => window.tessera.workflow()")
    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    restored = page.evaluate("() => window.tessera.workflow()")
    assert restored["nodes"][str(solid)]["ui"].get("collapsed") is True
    assert restored["nodes"][str(save)]["ui"]["color"] == "#223366"
    assert restored["nodes"][str(save)]["ui"]["size"] == [300, 200]
    assert restored["ui"]["groups"] == saved["ui"]["groups"] and len(saved["ui"]["groups"]) == 1
    # the minimap: a click on its far corner moves the view
    minimap = page.locator("#minimap")
    expect(minimap).to_be_visible()
    offset = page.evaluate("() => [...window.tessera.canvas.ds.offset]")
    box = minimap.bounding_box()
    page.mouse.click(box["x"] + box["width"] - 3, box["y"] + box["height"] - 3)
    assert page.evaluate("() => [...window.tessera.canvas.ds.offset]") != offset
    page.screenshot(path=str(screens / "minimap-groups.png"))


def test_a_node_that_grows_for_its_image_pushes_the_node_below(editor: Page):
    page = editor
    load(
        page,
        {
            "version": 1,
            "nodes": {
                "1": {"type": "SolidColor", "inputs": {"width": 8, "height": 8}, "ui": {"pos": [40, 60]}},
                "2": {
                    "type": "SaveImage",
                    "inputs": {"images": link("1", "image"), "filename_prefix": "grow"},
                    "ui": {"pos": [340, 60], "size": [240, 60]},
                },
                "3": {"type": "SolidColor", "inputs": {}, "ui": {"pos": [340, 160]}},
            },
        },
    )
    before = results(page)
    page.locator("#btn-run").click()
    wait_results(page, before + 1)
    page.wait_for_function("() => (window.tessera.graph.getNodeById(2).images ?? []).length > 0")
    save_bottom, below_top = page.evaluate(
        """() => { const g = window.tessera.graph, s = g.getNodeById(2), b = g.getNodeById(3);
            return [s.pos[1] + s.size[1], b.pos[1] - 30]; }"""
    )
    assert save_bottom <= below_top


def test_settings_panel_hides_the_minimap_and_keeps_it_after_a_reload(editor: Page):
    page = editor
    build_solid_to_save(page)
    expect(page.locator("#minimap")).to_be_visible()
    page.locator("#btn-settings").click()
    page.locator("#settings-dialog input[name=minimap]").uncheck()
    page.locator("#settings-dialog select[name=links]").select_option("straight")
    page.keyboard.press("Escape")
    expect(page.locator("#settings-dialog")).not_to_be_visible()
    expect(page.locator("#minimap")).to_be_hidden()
    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    expect(page.locator("#minimap")).to_be_hidden()
    assert page.evaluate("() => window.tessera.canvas.links_render_mode") == 0  # straight


def test_token_region_is_drawn_with_the_mouse_on_the_source_image(editor: Page, screens):
    page = editor
    load(
        page,
        {
            "version": 2,
            "nodes": {
                "1": {"type": "LoadImage", "inputs": {"image": "example.png"}, "ui": {"pos": [40, 60]}},
                "2": {
                    "type": "LoadVQModel",
                    "inputs": {"file": "tiny-vq.safetensors"},
                    "ui": {"pos": [40, 420]},
                },
                "3": {
                    "type": "VQTokenize",
                    "inputs": {"vq": link("2", "vq"), "image": link("1", "image")},
                    "ui": {"pos": [340, 60]},
                },
                "4": {
                    "type": "TokenRegion",
                    "inputs": {"tokens": link("3", "tokens")},
                    "ui": {"pos": [620, 60]},
                },
            },
        },
    )
    page.mouse.click(*widget_point(page, 4, "draw on image…"))
    canvas = page.locator("#region-dialog canvas")
    expect(canvas).to_be_visible()
    expect(page.locator("#region-dialog .hint")).to_contain_text("of a 8 × 8 grid")  # 64 px / 8 px tokens
    box = canvas.bounding_box()
    cell = box["width"] / 8
    page.mouse.move(box["x"] + 1.5 * cell, box["y"] + 1.5 * cell)
    page.mouse.down()
    page.mouse.move(box["x"] + 3.5 * cell, box["y"] + 2.5 * cell, steps=4)
    page.mouse.up()
    expect(page.locator("#region-dialog .hint")).to_contain_text("x 1, y 1, 3 × 2 tokens")
    page.screenshot(path=str(screens / "token-region-tool.png"))
    page.keyboard.press("Enter")
    expect(page.locator("#region-dialog")).not_to_be_visible()
    inputs = page.evaluate("() => window.tessera.workflow().nodes['4'].inputs")
    assert (inputs["x"], inputs["y"], inputs["width"], inputs["height"]) == (1, 1, 3, 2)


def test_defaults_that_cannot_trap_a_newcomer(editor: Page, console_errors):
    page = editor
    console_errors.allow("/api/prompt", "400")
    # a new EmptyLatent starts at 0 x 0: "the connected VAE's native size"
    latent = drag_from_palette(page, "EmptyLatent", *canvas_point(page, 0.3, 0.3))
    inputs = page.evaluate(f"() => window.tessera.workflow().nodes['{latent}'].inputs")
    assert (inputs["width"], inputs["height"]) == (0, 0)
    # far above the VAE's native size: it runs, and the editor warns
    load(
        page,
        {
            "version": 2,
            "nodes": {
                "1": {"type": "LoadVAE", "inputs": {"file": "tiny-vae.safetensors"}, "ui": {"pos": [40, 60]}},
                "2": {
                    "type": "EmptyLatent",
                    "inputs": {"width": 96, "height": 96, "vae": link("1", "vae")},
                    "ui": {"pos": [340, 60]},
                },
                "3": {
                    "type": "VAEDecode",
                    "inputs": {"vae": link("1", "vae"), "latent": link("2", "latent")},
                    "ui": {"pos": [640, 60]},
                },
                "4": {
                    "type": "PreviewImage",
                    "inputs": {"images": link("3", "image")},
                    "ui": {"pos": [640, 260]},
                },
            },
        },
    )
    before = results(page)
    page.locator("#btn-run").click()
    assert wait_results(page, before + 1)["status"] == "success"
    expect(page.locator(".toast.warn").last).to_contain_text("far above the VAE's native 32x32")
    # cfg above 1 without a negative is refused when Run is pressed, on the sampler's negative input
    load(
        page,
        {
            "version": 2,
            "nodes": {
                "1": {
                    "type": "LoadDiffusionModel",
                    "inputs": {"file": "tiny-dit.safetensors"},
                    "ui": {"pos": [40, 60]},
                },
                "2": {
                    "type": "LoadTextEncoder",
                    "inputs": {"file": "tiny-text-encoder.safetensors"},
                    "ui": {"pos": [40, 260]},
                },
                "3": {
                    "type": "TextEncode",
                    "inputs": {"text_encoder": link("2", "text_encoder"), "text": "a cat"},
                    "ui": {"pos": [340, 260]},
                },
                "4": {
                    "type": "EmptyLatent",
                    "inputs": {"width": 32, "height": 32, "channels": 4},
                    "ui": {"pos": [340, 460]},
                },
                "5": {
                    "type": "DiTSampler",
                    "inputs": {
                        "model": link("1", "model"),
                        "positive": link("3", "conditioning"),
                        "latent": link("4", "latent"),
                        "cfg": 4.0,
                        "steps": 2,
                    },
                    "ui": {"pos": [640, 60]},
                },
                "6": {
                    "type": "SaveImage",
                    "inputs": {"images": link("7", "image")},
                    "ui": {"pos": [1200, 60]},
                },
                "7": {
                    "type": "VAEDecode",
                    "inputs": {"vae": link("8", "vae"), "latent": link("5", "latent")},
                    "ui": {"pos": [940, 60]},
                },
                "8": {
                    "type": "LoadVAE",
                    "inputs": {"file": "tiny-vae.safetensors"},
                    "ui": {"pos": [640, 460]},
                },
            },
        },
    )
    page.locator("#btn-run").click()
    expect(page.locator(".toast.error").last).to_contain_text("needs a negative conditioning")
    assert page.evaluate("() => window.tessera.graph.getNodeById(5).errors.map((e) => e.input)") == [
        "negative"
    ]


def test_double_click_on_an_output_opens_it_in_the_lightbox(editor: Page):
    page = editor
    _, save = build_solid_to_save(page)
    before = results(page)
    page.locator("#btn-run").click()
    wait_results(page, before + 1)
    page.wait_for_function(
        f"() => (window.tessera.graph.getNodeById({save}).images ?? []).some((i) => i.naturalWidth > 0)"
    )
    page.evaluate("() => window.tessera.drawNow()")
    point = page.evaluate(
        """(id) => { const app = window.tessera, n = app.graph.getNodeById(id);
            const [x, y] = app.canvas.ds.convertOffsetToCanvas([n.pos[0] + n.size[0] / 2, n.pos[1] + n.size[1] - 60]);
            const b = app.canvasEl.getBoundingClientRect(); return [b.left + x, b.top + y]; }""",
        save,
    )
    box = page.locator("#lightbox")
    for _ in range(3):  # litegraph times the two clicks itself
        page.mouse.dblclick(*point)
        if box.is_visible():
            break
        page.wait_for_timeout(300)
    expect(box).to_be_visible()
    expect(box.locator("figcaption")).to_contain_text("SaveImage 1 — 1 / 1")
    page.keyboard.press("Escape")
    expect(box).to_be_hidden()
