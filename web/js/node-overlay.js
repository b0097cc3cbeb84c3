// What the editor draws on top of a node: run state, images, errors.

import { LiteGraph } from "litegraph";

const STATE_COLOURS = { queued: "#8d929b", running: "#3fb56b", cached: "#4f8cff", done: "#3a7a52" };
const IMAGE_AREA_MIN = 200;

/** strokeStyles entry: an outline in the colour of the node's run state. */
export function runStateStroke() {
  const color = STATE_COLOURS[this.runState];
  if (!color || this.has_errors) return undefined;
  return { color, lineWidth: this.runState === "running" ? 3 : 2, padding: 4 };
}

/** Y (node space) where free body space starts: below slots and widgets. */
function contentBottom(node) {
  let bottom = 4;
  const rows = Math.max(
    (node.inputs ?? []).filter((s) => !s.widget).length,
    (node.outputs ?? []).length,
  );
  bottom = Math.max(bottom, rows * LiteGraph.NODE_SLOT_HEIGHT + 6);
  for (const w of node.widgets ?? []) {
    if (w.hidden) continue;
    bottom = Math.max(bottom, (w.y ?? 0) + (w.computedHeight ?? LiteGraph.NODE_WIDGET_HEIGHT + 4));
  }
  return bottom + 4;
}

/**
 * Grows `node` to `height`; the nodes below it whose columns it overlaps move down by as
 * much, so a node that grows for its images never covers its neighbours.
 */
export function growNode(node, height) {
  const delta = height - node.size[1];
  if (delta <= 0) return;
  const bottom = node.pos[1] + node.size[1];
  const left = node.pos[0];
  const right = node.pos[0] + node.size[0];
  for (const other of node.graph?._nodes ?? []) {
    if (other === node) continue;
    const overlapsColumn = other.pos[0] < right && other.pos[0] + other.size[0] > left;
    if (overlapsColumn && other.pos[1] - LiteGraph.NODE_TITLE_HEIGHT >= bottom - 1) other.pos[1] += delta;
  }
  node.setSize([node.size[0], height]);
}

/** Shows images (HTMLImageElements) in the node body, growing the node when needed. */
export function setNodeImages(node, images) {
  node.images = images;
  const need = contentBottom(node) + IMAGE_AREA_MIN;
  if (images.length && node.size[1] < need) growNode(node, need);
  for (const img of images) {
    if (!img.complete) img.addEventListener("load", () => node.setDirtyCanvas(true, true), { once: true });
  }
  node.setDirtyCanvas(true, true);
}

/** onDrawForeground: images, state badge, progress, error marks. Node-local coordinates. */
export function drawNodeOverlay(node, ctx) {
  if (node.mode === 2 || node.mode === 4) drawMode(node, ctx);
  if (node.flags.collapsed) return;
  drawImages(node, ctx);
  drawBadge(node, ctx);
  if (node.errors?.length) drawErrors(node, ctx);
}

function drawImages(node, ctx) {
  const images = (node.images ?? []).filter((img) => img.complete && img.naturalWidth);
  if (!images.length) return;
  const top = contentBottom(node);
  const area = { x: 6, y: top, w: node.size[0] - 12, h: node.size[1] - top - 6 };
  if (area.h < 20) return;
  const cols = Math.ceil(Math.sqrt(images.length));
  const rows = Math.ceil(images.length / cols);
  const cw = area.w / cols;
  const ch = area.h / rows;
  images.forEach((img, i) => {
    const scale = Math.min(cw / img.naturalWidth, ch / img.naturalHeight);
    const w = img.naturalWidth * scale;
    const h = img.naturalHeight * scale;
    const x = area.x + (i % cols) * cw + (cw - w) / 2;
    const y = area.y + Math.floor(i / cols) * ch + (ch - h) / 2;
    ctx.imageSmoothingEnabled = scale < 1; // keep tiny outputs crisp when enlarged
    ctx.drawImage(img, x, y, w, h);
  });
  ctx.imageSmoothingEnabled = true;
}

/** Muted nodes are dimmed, bypassed ones tinted purple (as in ComfyUI), with a label. */
function drawMode(node, ctx) {
  const title = LiteGraph.NODE_TITLE_HEIGHT;
  const h = node.flags.collapsed ? title : node.size[1] + title;
  const w = node.flags.collapsed ? (node._collapsed_width ?? LiteGraph.NODE_COLLAPSED_WIDTH) : node.size[0];
  ctx.save();
  ctx.fillStyle = node.mode === 4 ? "rgba(170, 60, 220, 0.35)" : "rgba(10, 10, 12, 0.55)";
  ctx.fillRect(0, -title, w, h);
  if (!node.flags.collapsed) {
    ctx.font = "bold 12px sans-serif";
    ctx.fillStyle = "#fff";
    ctx.textAlign = "right";
    ctx.fillText(node.mode === 4 ? "bypassed" : "muted", w - 10, -title / 2 + 4); // in the title bar
  }
  ctx.restore();
}

function drawBadge(node, ctx) {
  let text = null;
  let colour = STATE_COLOURS[node.runState];
  if (node.runState === "running") {
    text = node.progressText ? `running ${node.progressText}` : "running";
  } else if (node.runState === "queued" || node.runState === "cached") {
    text = node.runState;
  } else if (node.has_errors) {
    text = "error";
    colour = LiteGraph.NODE_ERROR_COLOUR;
  }
  if (!text) return;
  ctx.save();
  ctx.font = "bold 11px sans-serif";
  // inside the title bar, right-aligned, so it never leaves the node's area
  const w = ctx.measureText(text).width + 12;
  const x = node.size[0] - w - 8;
  const y = -LiteGraph.NODE_TITLE_HEIGHT + (LiteGraph.NODE_TITLE_HEIGHT - 16) / 2;
  ctx.fillStyle = colour;
  ctx.beginPath();
  ctx.roundRect(x, y, w, 16, 4);
  ctx.fill();
  ctx.fillStyle = "#fff";
  ctx.textAlign = "left";
  ctx.fillText(text, x + 6, y + 12);
  ctx.restore();
}

function drawErrors(node, ctx) {
  ctx.save();
  ctx.strokeStyle = LiteGraph.NODE_ERROR_COLOUR;
  ctx.lineWidth = 2;
  for (const err of node.errors) {
    if (!err.input) continue;
    const widget = node.widgets?.find((w) => w.name === err.input && w.input);
    const index = node.inputs?.findIndex((s) => s.name === err.input) ?? -1;
    if (widget && !widget.hidden && node.getSlotFromWidget(widget)?.link == null) {
      const h = widget.computedHeight ? widget.computedHeight - 4 : LiteGraph.NODE_WIDGET_HEIGHT;
      ctx.beginPath();
      ctx.roundRect(11, widget.y - 3, node.size[0] - 22, h + 6, 6);
      ctx.stroke();
    } else if (index >= 0) {
      const [ax, ay] = node.getInputPos(index);
      const x = ax - node.pos[0];
      const y = ay - node.pos[1];
      ctx.beginPath();
      ctx.arc(x, y, 7, 0, Math.PI * 2);
      ctx.stroke();
      const slot = node.inputs[index];
      const label = slot.label ?? slot.name;
      ctx.font = "12px sans-serif";
      const w = ctx.measureText(label).width;
      ctx.beginPath();
      ctx.roundRect(x + 8, y - 9, w + 10, 18, 4);
      ctx.stroke();
    }
  }
  // The messages, wrapped inside the node's body at its bottom (the node grows to hold them).
  ctx.font = "12px sans-serif";
  const lines = node.errors.slice(0, 4).flatMap((err) => wrap(ctx, err.input ? `${err.input}: ${err.message}` : err.message, node.size[0] - 20));
  const boxHeight = lines.length * 15 + 8;
  const need = contentBottom(node) + boxHeight + 4;
  if (node.size[1] < need) growNode(node, need);
  let y = node.size[1] - boxHeight - 2;
  ctx.fillStyle = "rgba(60, 10, 12, 0.85)";
  ctx.fillRect(4, y, node.size[0] - 8, boxHeight);
  ctx.fillStyle = "#ff8a8d";
  ctx.textAlign = "left";
  y += 15;
  for (const line of lines) {
    ctx.fillText(line, 10, y);
    y += 15;
  }
  ctx.restore();
}

function wrap(ctx, text, width) {
  const lines = [];
  let line = "";
  for (const word of String(text).split(/\s+/)) {
    const candidate = line ? `${line} ${word}` : word;
    if (line && ctx.measureText(candidate).width > width) {
      lines.push(line);
      line = word;
    } else {
      line = candidate;
    }
  }
  if (line) lines.push(line);
  return lines.slice(0, 6);
}
