"""Drives the editor like a user: drags from the palette, connects sockets with the mouse.

Positions on the canvas are read from the page (litegraph knows where each socket is
drawn); every action is a real mouse or keyboard event.
"""

from __future__ import annotations

from playwright.sync_api import Page, expect

SLOT_JS = """([id, kind, name]) => {
  const app = window.tessera;
  const node = app.graph.getNodeById(id);
  const slots = kind === "input" ? node.inputs : node.outputs;
  const index = slots.findIndex((s) => s.name === name);
  if (index < 0) throw new Error(`no ${kind} ${name} on node ${id}`);
  const p = kind === "input" ? node.getInputPos(index) : node.getOutputPos(index);
  const [x, y] = app.canvas.ds.convertOffsetToCanvas(p);
  const box = app.canvasEl.getBoundingClientRect();
  return [box.left + x, box.top + y];
}"""


def canvas_point(page: Page, fx: float, fy: float) -> tuple[float, float]:
    """A point inside the canvas, as fractions of its width and height."""
    box = page.locator("#graph-canvas").bounding_box()
    return box["x"] + box["width"] * fx, box["y"] + box["height"] * fy


def drag_from_palette(page: Page, node_type: str, x: float, y: float) -> int:
    """Drags `node_type` from the palette to client point (x, y); returns the new node's id."""
    before = page.evaluate("() => window.tessera.graph._nodes.map((n) => n.id)")
    item = page.locator(f'.palette-item[data-type="{node_type}"]')
    item.scroll_into_view_if_needed()
    box = item.bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.mouse.down()
    page.mouse.move(x, y, steps=8)
    page.mouse.up()
    new = page.evaluate(
        "(before) => window.tessera.graph._nodes.map((n) => n.id).filter((id) => !before.includes(id))",
        before,
    )
    assert len(new) == 1, f"dragging {node_type} added {new}"
    return new[0]


def slot_point(page: Page, node_id: int, kind: str, name: str) -> tuple[float, float]:
    return tuple(page.evaluate(SLOT_JS, [node_id, kind, name]))


def connect(page: Page, from_id: int, output: str, to_id: int, input: str) -> None:
    """Drags a link from an output socket to an input socket."""
    x0, y0 = slot_point(page, from_id, "output", output)
    x1, y1 = slot_point(page, to_id, "input", input)
    page.mouse.move(x0, y0)
    page.mouse.down()
    page.mouse.move((x0 + x1) / 2, (y0 + y1) / 2, steps=5)
    page.mouse.move(x1, y1, steps=5)
    page.mouse.up()


def link_of(page: Page, node_id: int, input: str):
    """{node, output} feeding an input, or None."""
    return page.evaluate(
        """([id, name]) => {
          const wf = window.tessera.workflow();
          const v = wf.nodes[String(id)].inputs[name];
          return v && typeof v === "object" ? v : null;
        }""",
        [node_id, input],
    )


def set_widget(page: Page, node_id: int, name: str, value) -> None:
    """Sets a widget's value the way a finished edit would (used for values, not structure)."""
    page.evaluate(
        """([id, name, value]) => {
          const node = window.tessera.graph.getNodeById(id);
          const w = node.widgets.find((w) => w.name === name);
          w.value = value;
          window.tessera.changed();
        }""",
        [node_id, name, value],
    )


def run_and_wait(page: Page, timeout: float = 60_000, status: str = "success") -> None:
    """Clicks Run and waits until that prompt finished with `status`."""
    before = page.evaluate("() => window.tessera.runState.results.length")
    page.locator("#btn-run").click()
    page.wait_for_function("(n) => window.tessera.runState.results.length > n", arg=before, timeout=timeout)
    result = page.evaluate("() => window.tessera.runState.results.at(-1)")
    assert result["status"] == status, result
    if status == "success":
        expect(page.locator("#run-progress .label")).to_have_text("done")


def node_images(page: Page, node_id: int) -> list[dict]:
    return page.evaluate(
        """(id) => (window.tessera.graph.getNodeById(id).images ?? [])
            .map((img) => ({src: img.src, w: img.naturalWidth, h: img.naturalHeight, complete: img.complete}))""",
        node_id,
    )


def wait_for_node_image(page: Page, node_id: int, timeout: float = 30_000) -> list[dict]:
    page.wait_for_function(
        """(id) => { const n = window.tessera.graph.getNodeById(id);
                    return n && (n.images ?? []).some((img) => img.complete && img.naturalWidth > 0); }""",
        arg=node_id,
        timeout=timeout,
    )
    return node_images(page, node_id)


WIDGET_JS = """([id, name]) => {
  const app = window.tessera;
  const node = app.graph.getNodeById(id);
  const w = node.widgets.find((w) => w.name === name);
  if (!w) throw new Error(`no widget ${name} on node ${id}`);
  const h = (w.computedHeight ?? 24) - 4;
  const [x, y] = app.canvas.ds.convertOffsetToCanvas([node.pos[0] + node.size[0] / 2, node.pos[1] + w.y + h / 2]);
  const box = app.canvasEl.getBoundingClientRect();
  return [box.left + x, box.top + y];
}"""


def widget_point(page: Page, node_id: int, name: str) -> tuple[float, float]:
    return tuple(page.evaluate(WIDGET_JS, [node_id, name]))


def widget_value(page: Page, node_id: int, name: str):
    return page.evaluate(
        "([id, name]) => window.tessera.graph.getNodeById(id).widgets.find((w) => w.name === name).value",
        [node_id, name],
    )


def type_number(page: Page, node_id: int, name: str, value) -> None:
    """Clicks the middle of a number widget and types the value into litegraph's prompt."""
    page.mouse.click(*widget_point(page, node_id, name))
    field = page.locator(".graphdialog input.value")
    field.fill(str(value))
    field.press("Enter")
    expect(field).to_have_count(0)
    assert widget_value(page, node_id, name) == value


def choose(page: Page, node_id: int, name: str, value: str) -> None:
    """Opens a dropdown widget and picks an entry from its menu."""
    page.mouse.click(*widget_point(page, node_id, name))
    page.locator(".litecontextmenu .litemenu-entry", has_text=value).first.click()
    assert widget_value(page, node_id, name) == value


def type_text(page: Page, node_id: int, name: str, text: str) -> None:
    """Clicks a multi-line text widget and types into the editor that opens over it."""
    page.mouse.click(*widget_point(page, node_id, name))
    area = page.locator("textarea.text-editor")
    area.fill(text)
    area.press("Escape")
    expect(area).to_have_count(0)
    assert widget_value(page, node_id, name) == text


def zoom(page: Page, clicks: int, at: tuple[float, float]) -> None:
    """Mouse-wheel zoom at a point (negative clicks zoom out)."""
    page.mouse.move(*at)
    for _ in range(abs(clicks)):
        page.mouse.wheel(0, 100 if clicks < 0 else -100)
        page.wait_for_timeout(30)
