// The minimap: every node as a small rectangle, the part of the graph in view as a frame;
// click or drag on it to move the view there.

export class Minimap {
  constructor({ canvas, graph, el }) {
    Object.assign(this, { canvas, graph, el });
    this.bounds = null; // graph rectangle the minimap shows, and its scale: {x, y, scale}
    let dragging = false;
    el.addEventListener("pointerdown", (e) => {
      dragging = true;
      el.setPointerCapture(e.pointerId);
      this.centreOn(e);
    });
    el.addEventListener("pointermove", (e) => dragging && this.centreOn(e));
    el.addEventListener("pointerup", () => {
      dragging = false;
    });
  }

  /** Moves the view so that the graph point under the pointer is in its middle. */
  centreOn(event) {
    if (!this.bounds) return;
    const box = this.el.getBoundingClientRect();
    const gx = this.bounds.x + (event.clientX - box.left) / this.bounds.scale;
    const gy = this.bounds.y + (event.clientY - box.top) / this.bounds.scale;
    const { ds } = this.canvas;
    const view = this.canvas.canvas.getBoundingClientRect();
    ds.offset[0] = view.width / 2 / ds.scale - gx;
    ds.offset[1] = view.height / 2 / ds.scale - gy;
    this.canvas.setDirty(true, true);
  }

  /** Called after every frame of the graph canvas. */
  draw() {
    const { el } = this;
    const ctx = el.getContext("2d");
    const w = el.clientWidth;
    const h = el.clientHeight;
    if (el.width !== w || el.height !== h) Object.assign(el, { width: w, height: h });
    ctx.clearRect(0, 0, w, h);
    const nodes = this.graph._nodes;
    el.hidden = !nodes.length || this.enabled === false;
    if (!nodes.length) return;
    const view = this.canvas.visible_area;
    const rects = nodes.map((n) => [n.pos[0], n.pos[1] - 30, n.size[0], n.flags?.collapsed ? 30 : n.size[1] + 30]);
    const x0 = Math.min(view[0], ...rects.map((r) => r[0]));
    const y0 = Math.min(view[1], ...rects.map((r) => r[1]));
    const x1 = Math.max(view[0] + view[2], ...rects.map((r) => r[0] + r[2]));
    const y1 = Math.max(view[1] + view[3], ...rects.map((r) => r[1] + r[3]));
    const pad = 6;
    const scale = Math.min((w - 2 * pad) / (x1 - x0), (h - 2 * pad) / (y1 - y0));
    this.bounds = { x: x0 - pad / scale, y: y0 - pad / scale, scale };
    const px = (x) => (x - this.bounds.x) * scale;
    const py = (y) => (y - this.bounds.y) * scale;
    nodes.forEach((node, i) => {
      const [x, y, rw, rh] = rects[i];
      ctx.fillStyle = node.mode === 4 ? "#8a4bb0" : node.mode === 2 ? "#444" : node.color || "#5a6170";
      ctx.fillRect(px(x), py(y), Math.max(2, rw * scale), Math.max(2, rh * scale));
    });
    ctx.strokeStyle = "#dfe3ea";
    ctx.lineWidth = 1;
    ctx.strokeRect(px(view[0]), py(view[1]), view[2] * scale, view[3] * scale);
  }
}
