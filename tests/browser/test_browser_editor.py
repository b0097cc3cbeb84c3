"""The editor with the cheap built-in image nodes: build by mouse, run, errors, workflows, PNG drop."""

from __future__ import annotations

import base64
import json
import urllib.request

from canvas_driver import (
    canvas_point,
    connect,
    drag_from_palette,
    link_of,
    node_images,
    run_and_wait,
    wait_for_node_image,
    widget_point,
)
from playwright.sync_api import Page, expect
from playwright.sync_api import TimeoutError as PlaywrightTimeout


def build_solid_to_save(page: Page) -> tuple[int, int]:
    solid = drag_from_palette(page, "SolidColor", *canvas_point(page, 0.2, 0.25))
    save = drag_from_palette(page, "SaveImage", *canvas_point(page, 0.6, 0.3))
    connect(page, solid, "image", save, "images")
    return solid, save


def test_palette_lists_nodes_by_category_and_searches(editor: Page):
    page = editor
    expect(
        page.locator('.palette-category[data-category="image"] .palette-item[data-type="SaveImage"]')
    ).to_be_visible()
    page.locator("#palette-search").fill("imageblend")
    expect(page.locator(".palette-item")).to_have_count(1)
    expect(page.locator(".palette-item")).to_have_text("ImageBlend")
    page.locator("#palette-search").fill("")
    assert page.locator(".palette-item").count() > 5


def test_build_by_mouse_run_and_see_output(editor: Page, editor_server):
    page = editor
    solid, save = build_solid_to_save(page)
    assert link_of(page, save, "images") == {"node": str(solid), "output": "image"}
    run_and_wait(page)
    images = wait_for_node_image(page, save)
    assert "/api/view?" in images[0]["src"] and images[0]["w"] == 64
    # the history panel shows the run with its image
    item = page.locator(".history-item").first
    expect(item).to_have_attribute("data-status", "success")
    expect(item.locator("img")).to_have_count(1)
    # state badges are cleared after success; a second run is served from the cache
    run_and_wait(page)
    cached = page.evaluate(f"() => window.tessera.graph.getNodeById({solid}).runState")
    assert cached == "cached"


def test_incompatible_link_is_refused_with_a_reason(editor: Page):
    page = editor
    number = drag_from_palette(page, "Int", *canvas_point(page, 0.15, 0.3))
    save = drag_from_palette(page, "SaveImage", *canvas_point(page, 0.6, 0.3))
    connect(page, number, "value", save, "images")
    toast = page.locator(".toast.error").last
    expect(toast).to_contain_text("Cannot connect INT")
    expect(toast).to_contain_text("IMAGE")
    assert link_of(page, save, "images") is None
    assert page.evaluate("() => window.tessera.graph.links.size ?? window.tessera.graph._links.size") == 0


def test_validation_error_marks_the_offending_node_and_input(editor: Page, console_errors, screens):
    page = editor
    console_errors.allow("/api/prompt", "400")
    solid = drag_from_palette(page, "SolidColor", *canvas_point(page, 0.2, 0.25))
    save = drag_from_palette(page, "SaveImage", *canvas_point(page, 0.6, 0.3))
    page.locator("#btn-run").click()
    expect(page.locator(".toast.error").last).to_contain_text("images")
    errors = page.evaluate(f"() => window.tessera.graph.getNodeById({save}).errors")
    assert errors and errors[0]["input"] == "images", errors
    assert page.evaluate(f"() => window.tessera.graph.getNodeById({save}).has_errors")
    assert not page.evaluate(f"() => window.tessera.graph.getNodeById({solid}).has_errors")
    # fixing the graph and running clears the marks
    page.screenshot(path=str(screens / "validation-error.png"))
    connect(page, solid, "image", save, "images")
    run_and_wait(page)
    assert not page.evaluate(f"() => window.tessera.graph.getNodeById({save}).has_errors")


def test_save_new_and_open_a_workflow(editor: Page):
    page = editor
    build_solid_to_save(page)
    before = page.evaluate("() => window.tessera.workflow().nodes")
    page.keyboard.press("Control+s")
    page.locator("#name-dialog input[name=name]").fill("browser test")
    page.locator("#name-dialog button[value=ok]").click()
    expect(page.locator(".toast.ok").last).to_contain_text('Saved "browser test"')
    expect(page.locator("#workflow-name")).to_have_text("browser test")
    page.locator("#btn-new").click()
    assert page.evaluate("() => window.tessera.graph._nodes.length") == 0
    page.locator("#sel-open").select_option("saved:browser test")
    expect(page.locator(".toast.ok").last).to_contain_text('Opened "browser test"')
    after = page.evaluate("() => window.tessera.workflow().nodes")
    assert after == before


def title_point(page: Page, node_id: int) -> tuple[float, float]:
    return tuple(
        page.evaluate(
            """(id) => { const app = window.tessera; const n = app.graph.getNodeById(id);
            const [x, y] = app.canvas.ds.convertOffsetToCanvas([n.pos[0] + 60, n.pos[1] - 15]);
            const b = app.canvasEl.getBoundingClientRect(); return [b.left + x, b.top + y]; }""",
            node_id,
        )
    )


def test_undo_redo_delete_copy_paste(editor: Page):
    page = editor
    solid, save = build_solid_to_save(page)
    count = lambda: page.evaluate("() => window.tessera.graph._nodes.length")
    page.mouse.click(*title_point(page, save))
    page.keyboard.press("Delete")
    assert count() == 1
    page.keyboard.press("Control+z")
    assert count() == 2
    assert link_of(page, save, "images") == {"node": str(solid), "output": "image"}
    page.keyboard.press("Control+y")
    assert count() == 1
    page.keyboard.press("Control+z")
    assert count() == 2
    # copy and paste the selected node
    page.mouse.click(*title_point(page, solid))
    page.keyboard.press("Control+c")
    page.mouse.move(*canvas_point(page, 0.5, 0.8))
    page.keyboard.press("Control+v")
    assert count() == 3
    page.keyboard.press("Control+z")
    assert count() == 2


def test_templates_are_listed(editor: Page, editor_server):
    with urllib.request.urlopen(editor_server.url + "/api/templates") as r:
        templates = json.load(r)["templates"]
    names = sorted(templates)
    assert "text_to_image_diffusion" in names  # the shipped workflows/ folder is served
    options = editor.locator('#sel-open optgroup[label="Templates"] option')
    expect(options).to_have_count(len(names))
    editor.locator("#sel-open").select_option("template:text_to_image_diffusion")
    loaded = editor.evaluate("() => window.tessera.graph._nodes.length")
    assert loaded == len(templates["text_to_image_diffusion"]["nodes"])


def test_drop_a_tessera_png_restores_its_workflow(editor: Page, editor_server):
    page = editor
    solid, save = build_solid_to_save(page)
    page.evaluate(
        f"() => {{ const w = window.tessera.graph.getNodeById({solid}).widgets.find((w) => w.name === 'width'); w.value = 24; }}"
    )
    run_and_wait(page)
    src = wait_for_node_image(page, save)[0]["src"]
    with urllib.request.urlopen(src) as r:
        png = r.read()
    expected = page.evaluate("() => window.tessera.workflow().nodes")
    page.locator("#btn-new").click()
    drop_file(page, "#canvas-wrap", "from-tessera.png", "image/png", png)
    expect(page.locator(".toast.ok").last).to_contain_text("Loaded the workflow from from-tessera.png")
    restored = page.evaluate("() => window.tessera.workflow().nodes")
    assert {k: (v["type"], v["inputs"]) for k, v in restored.items()} == {
        k: (v["type"], v["inputs"]) for k, v in expected.items()
    }
    assert restored[str(solid)]["inputs"]["width"] == 24
    # a PNG without a workflow is refused with a message, the graph stays
    plain = base64.b64decode(
        "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
    )
    drop_file(page, "#canvas-wrap", "plain.png", "image/png", plain)
    expect(page.locator(".toast.error").last).to_contain_text("carries no Tessera workflow")
    assert page.evaluate("() => window.tessera.graph._nodes.length") == 2
    assert node_images(page, save) == []


def drop_file(page: Page, selector: str, name: str, mime: str, data: bytes) -> None:
    """Drops a file on an element, as the OS drag-and-drop would."""
    page.evaluate(
        """([selector, name, mime, b64]) => {
          const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
          const transfer = new DataTransfer();
          transfer.items.add(new File([bytes], name, { type: mime }));
          const target = document.querySelector(selector);
          const box = target.getBoundingClientRect();
          const at = { clientX: box.left + box.width / 2, clientY: box.top + box.height / 2 };
          for (const type of ["dragenter", "dragover", "drop"]) {
            target.dispatchEvent(new DragEvent(type, { bubbles: true, cancelable: true, dataTransfer: transfer, ...at }));
          }
        }""",
        [selector, name, mime, base64.b64encode(data).decode()],
    )


def test_a_widget_input_takes_a_link(editor: Page):
    page = editor
    number = drag_from_palette(page, "Int", *canvas_point(page, 0.05, 0.5))
    solid = drag_from_palette(page, "SolidColor", *canvas_point(page, 0.45, 0.2))
    connect(page, number, "value", solid, "width")
    assert link_of(page, solid, "width") == {"node": str(number), "output": "value"}
    # the linked widget is drawn disabled (litegraph computes that when it draws the node)
    page.wait_for_function(
        f"""() => {{ const n = window.tessera.graph.getNodeById({solid});
            return n.widgets.find((w) => w.name === 'width').computedDisabled; }}"""
    )


def test_double_click_search_adds_a_node(editor: Page):
    page = editor
    box = page.locator(".litesearchbox input")
    for _ in range(3):  # litegraph times the two clicks itself; a busy CI machine can stretch them apart
        page.mouse.dblclick(*canvas_point(page, 0.5, 0.5))
        try:
            box.wait_for(state="visible", timeout=3_000)
            break
        except PlaywrightTimeout:
            continue
    box.press_sequentially("ImageInv")
    page.locator(".litesearchbox .lite-search-item", has_text="ImageInvert").first.click()
    types = page.evaluate("() => window.tessera.graph._nodes.map((n) => n.type)")
    assert types == ["ImageInvert"]


def test_upload_an_image_and_run_it(editor: Page):
    page = editor
    load = drag_from_palette(page, "LoadImage", *canvas_point(page, 0.05, 0.1))
    invert = drag_from_palette(page, "ImageInvert", *canvas_point(page, 0.4, 0.1))
    save = drag_from_palette(page, "SaveImage", *canvas_point(page, 0.7, 0.1))
    connect(page, load, "image", invert, "image")
    connect(page, invert, "image", save, "images")
    png = base64.b64decode(  # 2x2 PNG: red, green, blue, white
        "iVBORw0KGgoAAAANSUhEUgAAAAIAAAACCAIAAAD91JpzAAAAEklEQVR4nGP4z8DAAMIM/4EAAB/uBfsL2WiLAAAAAElFTkSuQmCC"
    )
    with page.expect_file_chooser() as chooser:
        page.mouse.click(*widget_point(page, load, "upload image…"))
    chooser.value.set_files(files=[{"name": "dots.png", "mimeType": "image/png", "buffer": png}])
    page.wait_for_function(f"() => window.tessera.workflow().nodes['{load}'].inputs.image === 'dots.png'")
    wait_for_node_image(page, load)
    run_and_wait(page)
    assert wait_for_node_image(page, save)[0]["w"] == 2


def test_export_and_restore_from_history(editor: Page):
    page = editor
    solid, save = build_solid_to_save(page)
    with page.expect_download() as download:
        page.locator("#btn-export").click()
    exported = json.loads(download.value.path().read_text())
    assert exported["version"] == 2  # tessera.workflow.CURRENT_VERSION
    assert exported["nodes"][str(save)]["inputs"]["images"] == {"node": str(solid), "output": "image"}
    assert exported["nodes"][str(solid)]["ui"]["title"] == "SolidColor"
    assert "viewport" in exported["ui"]
    run_and_wait(page)
    prompt_id = page.evaluate("() => window.tessera.runState.results.at(-1).prompt_id")
    page.locator("#btn-new").click()
    page.locator(f'.history-item[data-prompt-id="{prompt_id}"]').get_by_role(
        "button", name="Load workflow"
    ).click()
    nodes = page.evaluate("() => window.tessera.workflow().nodes")
    assert {v["type"] for v in nodes.values()} == {"SolidColor", "SaveImage"}


def test_refresh_lists_new_model_files(editor: Page, editor_server):
    page = editor
    vae = drag_from_palette(page, "LoadVAE", *canvas_point(page, 0.3, 0.3))
    folder = editor_server.models / "vae"
    extra = folder / "another-vae.safetensors"
    extra.write_bytes(next(folder.glob("*.safetensors")).read_bytes())
    try:
        page.locator("#btn-refresh-nodes").click()
        expect(page.locator(".toast.ok").last).to_contain_text("refreshed")
        page.mouse.click(*widget_point(page, vae, "file"))
        expect(
            page.locator(".litecontextmenu .litemenu-entry", has_text="another-vae.safetensors")
        ).to_be_visible()
        page.keyboard.press("Escape")
    finally:
        extra.unlink()


def test_the_session_survives_a_reload(editor: Page):
    page = editor
    solid, save = build_solid_to_save(page)
    # the session copy is written 300 ms after the last edit: wait for the one with the link
    page.wait_for_function(
        "() => (localStorage.getItem('tessera.workflow') || '').includes('\"images\":{\"node\"')"
    )
    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    assert link_of(page, save, "images") == {"node": str(solid), "output": "image"}
    expect(page.locator("#empty-hint")).to_be_hidden()
