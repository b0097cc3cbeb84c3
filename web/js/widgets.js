// Widgets derived from each input's schema (InputInfo in docs/API.md).
//
// Every widget that stands for a workflow input carries `widget.input = InputInfo`;
// helper widgets (upload button, seed control) have `serialize: false` and no `input`.

import { LiteGraph } from "litegraph";
import { openTextEditor } from "./text-editor.js";

const PRIMITIVES = new Set(["INT", "FLOAT", "STRING", "BOOLEAN"]);
export const SEED_CONTROLS = ["fixed", "increment", "decrement", "randomize"];
const MAX_U64 = (1n << 64n) - 1n;
const big = (v, fallback) => (v === undefined || v === null ? fallback : BigInt(v));

/**
 * A seed from what a user typed or a workflow held, as a BigInt in the input's range:
 * digits are taken exactly, anything else numeric (1e30, 12.7) is rounded and clamped.
 * Returns null for text that is no number.
 */
export function toSeed(value, info) {
  const min = big(info.min, 0n);
  const max = big(info.max, MAX_U64);
  let v;
  if (typeof value === "bigint") v = value;
  else if (typeof value === "string" && /^\s*-?\d+\s*$/.test(value)) v = BigInt(value.trim());
  else {
    const n = Number(value);
    if (Number.isNaN(n) || (typeof value === "string" && !value.trim())) return null;
    if (n === Infinity) return max;
    if (n === -Infinity) return min;
    v = BigInt(Math.round(n));
  }
  return v < min ? min : v > max ? max : v;
}

/** Whether this input gets a widget (a constant in the workflow). */
export function hasWidget(info) {
  return info.link !== "link" && PRIMITIVES.has(info.type);
}

/** Whether this input gets a socket (a link in the workflow). */
export function hasSocket(info) {
  return info.link === "link" || info.link === "either" || !PRIMITIVES.has(info.type);
}

/** The value a new node starts with. */
export function defaultValue(info) {
  if (info.default !== undefined && info.default !== null) return info.default;
  if (info.choices?.length) return info.choices[0];
  switch (info.type) {
    case "INT":
    case "FLOAT":
      return info.min != null && info.min > 0 ? info.min : 0;
    case "BOOLEAN":
      return false;
    default:
      return "";
  }
}

function decimals(step) {
  const text = String(step);
  return text.includes(".") ? text.split(".")[1].length : 0;
}

function clampNumber(info, value) {
  let v = Number(value);
  if (!Number.isFinite(v)) v = Number(defaultValue(info)) || 0;
  if (info.min != null) v = Math.max(info.min, v);
  if (info.max != null) v = Math.min(info.max, v);
  if (info.type === "INT") v = Math.round(v);
  else if (info.step) v = Number(v.toFixed(Math.max(decimals(info.step), 2)));
  return v;
}

/**
 * Adds the widget(s) for one input to `node`. `ctx.changed()` is called after each edit;
 * `ctx.api` uploads images. Returns the value widget or undefined.
 */
export function addInputWidget(node, info, ctx) {
  if (!hasWidget(info)) return undefined;
  const value = defaultValue(info);
  const onChange = () => ctx.changed?.();
  let widget;
  if (info.widget === "image_upload") {
    widget = addImageUpload(node, info, ctx);
  } else if (info.model_folder || info.choices) {
    // `values` is read on every open, so refreshed choices show up in existing nodes.
    widget = node.addWidget("combo", info.name, value, onChange, { values: () => info.choices ?? [] });
  } else if (info.type === "BOOLEAN") {
    widget = node.addWidget("toggle", info.name, Boolean(value), onChange, {});
  } else if (info.widget === "seed") {
    widget = node.addCustomWidget(seedWidget(info, value, onChange));
  } else if (info.type === "INT" || info.type === "FLOAT") {
    widget = addNumber(node, info, value, onChange);
  } else if (info.multiline) {
    widget = node.addCustomWidget(multilineWidget(info.name, value, onChange));
  } else {
    widget = node.addWidget("text", info.name, String(value), onChange, {});
  }
  widget.input = info;
  if (info.description) widget.tooltip = info.description;
  if (info.widget === "seed") addSeedControl(node, info, widget, onChange);
  return widget;
}

function addNumber(node, info, value, onChange) {
  const isInt = info.type === "INT";
  const step = info.step ?? (isInt ? 1 : 0.01);
  const useSlider = !isInt && info.min != null && info.max != null && info.max - info.min <= 10;
  const options = {
    min: info.min ?? undefined,
    max: info.max ?? undefined,
    step2: step,
    step: step * 10, // litegraph's legacy step is ten times the real one
    precision: isInt ? 0 : Math.max(decimals(step), 2),
  };
  const type = useSlider ? "slider" : "number";
  const widget = node.addWidget(type, info.name, clampNumber(info, value), (v) => {
    const fixed = clampNumber(info, v);
    if (fixed !== widget.value) widget.value = fixed;
    onChange();
  }, options);
  return widget;
}

/**
 * A seed: an unsigned 64-bit integer kept as a BigInt, so no digit is lost (a litegraph
 * number widget holds a double). Arrows step by one; a click in the middle asks for a value.
 */
function seedWidget(info, initial, onChange) {
  let current = toSeed(initial, info) ?? 0n;
  const arrow = 40;
  return {
    type: "seed",
    name: info.name,
    options: {},
    y: 0,
    get value() {
      return current;
    },
    set value(v) {
      const seed = toSeed(v, info);
      if (seed !== null) current = seed;
    },
    computeSize(width) {
      return [width ?? 200, LiteGraph.NODE_WIDGET_HEIGHT];
    },
    draw(ctx, node, width, y, height) {
      const margin = 15;
      ctx.save();
      ctx.fillStyle = LiteGraph.WIDGET_BGCOLOR;
      ctx.strokeStyle = LiteGraph.WIDGET_OUTLINE_COLOR;
      ctx.beginPath();
      ctx.roundRect(margin, y, width - margin * 2, height, height * 0.5);
      ctx.fill();
      ctx.stroke();
      ctx.fillStyle = LiteGraph.WIDGET_TEXT_COLOR;
      for (const [tip, inner] of [[margin + 6, margin + 14], [width - margin - 6, width - margin - 14]]) {
        ctx.beginPath();
        ctx.moveTo(inner, y + 5);
        ctx.lineTo(tip, y + height * 0.5);
        ctx.lineTo(inner, y + height - 5);
        ctx.fill();
      }
      ctx.font = "12px sans-serif";
      ctx.textBaseline = "middle";
      ctx.fillStyle = LiteGraph.WIDGET_SECONDARY_TEXT_COLOR;
      ctx.textAlign = "left";
      ctx.fillText(this.label ?? this.name, margin * 2 + 5, y + height * 0.5);
      ctx.fillStyle = LiteGraph.WIDGET_TEXT_COLOR;
      ctx.textAlign = "right";
      ctx.fillText(String(current), width - margin * 2 - 5, y + height * 0.5);
      ctx.restore();
    },
    mouse(event, pos, node) {
      if (event.type !== "pointerup") return true;
      const width = node.size[0];
      const delta = pos[0] < arrow ? -1n : pos[0] > width - arrow ? 1n : 0n;
      if (delta) {
        this.value = current + delta;
        node.setDirtyCanvas(true, true);
        onChange();
        return true;
      }
      const canvas = node.graph?.list_of_graphcanvas?.[0];
      canvas?.prompt("Seed", String(current), (text) => {
        const seed = toSeed(text, info);
        if (seed === null || seed === current) return;
        current = seed;
        node.setDirtyCanvas(true, true);
        onChange();
      }, event);
      return true;
    },
  };
}

/** The "control after generate" combo that follows a seed widget. */
function addSeedControl(node, info, seedWidget, onChange) {
  const control = node.addWidget("combo", "control after generate", "randomize", onChange, { values: SEED_CONTROLS });
  control.serialize = false;
  control.label = "after run"; // "control after generate" in ComfyUI; short enough not to clip
  control.controls = seedWidget;
  seedWidget.control = control;
  return control;
}

/** Applies each seed widget's "control after generate" once a prompt was queued. */
export function applyControlsAfterRun(graph) {
  for (const node of graph._nodes) {
    for (const w of node.widgets ?? []) {
      if (!w.control || node.getSlotFromWidget?.(w)?.link != null) continue;
      const min = big(w.input.min, 0n);
      const max = big(w.input.max, MAX_U64);
      switch (w.control.value) {
        case "increment":
          w.value = w.value + 1n > max ? min : w.value + 1n;
          break;
        case "decrement":
          w.value = w.value - 1n < min ? max : w.value - 1n;
          break;
        case "randomize":
          w.value = min + (crypto.getRandomValues(new BigUint64Array(1))[0] % (max - min + 1n));
          break;
        default:
          break;
      }
    }
  }
  graph.setDirtyCanvas(true, true);
}

/** A multi-line text widget: draws the wrapped text; a click opens a text editor over it. */
function multilineWidget(name, value, onChange) {
  const height = 84;
  return {
    type: "multiline",
    name,
    value: String(value),
    options: {},
    y: 0,
    computeSize(width) {
      return [width ?? 200, height];
    },
    draw(ctx, node, width, y) {
      const margin = 15;
      const w = width - margin * 2;
      const h = height - 4;
      ctx.save();
      ctx.fillStyle = LiteGraph.WIDGET_BGCOLOR;
      ctx.strokeStyle = LiteGraph.WIDGET_OUTLINE_COLOR;
      ctx.beginPath();
      ctx.roundRect(margin, y, w, h, 6);
      ctx.fill();
      ctx.stroke();
      ctx.beginPath();
      ctx.rect(margin, y, w, h);
      ctx.clip();
      ctx.font = "12px sans-serif";
      ctx.fillStyle = LiteGraph.WIDGET_SECONDARY_TEXT_COLOR;
      ctx.fillText(this.label ?? this.name, margin + 6, y + 13);
      ctx.fillStyle = this.value ? LiteGraph.WIDGET_TEXT_COLOR : "#777";
      const lines = wrapText(ctx, this.value || "(empty — click to edit)", w - 12);
      lines.slice(0, 4).forEach((line, i) => ctx.fillText(line, margin + 6, y + 30 + i * 15));
      ctx.restore();
    },
    mouse(event, pos, node) {
      if (event.type !== "pointerup" || this.computedDisabled) return false;
      const canvas = node.graph?.list_of_graphcanvas?.[0];
      if (!canvas) return false;
      openTextEditor(canvas, node, this, height - 4, (text) => {
        if (text === this.value) return;
        this.value = text;
        node.setDirtyCanvas(true, true);
        onChange();
      });
      return true;
    },
  };
}

function wrapText(ctx, text, width) {
  const lines = [];
  for (const paragraph of String(text).split("\n")) {
    let line = "";
    for (const word of paragraph.split(" ")) {
      const candidate = line ? `${line} ${word}` : word;
      if (ctx.measureText(candidate).width > width && line) {
        lines.push(line);
        line = word;
      } else {
        line = candidate;
      }
    }
    lines.push(line);
  }
  return lines;
}

/** LoadImage's file input: a dropdown of uploaded files, an upload button and a preview. */
function addImageUpload(node, info, ctx) {
  const combo = node.addWidget("combo", info.name, defaultValue(info), () => {
    showInputImage(node, combo.value, ctx.api);
    ctx.changed?.();
  }, { values: () => info.choices ?? [] });
  const button = node.addWidget("button", "upload image…", null, () => pickAndUpload(node, info, combo, ctx), {});
  button.serialize = false;
  button.label = "upload image…";
  node.uploadTarget = { info, combo };
  node.onWorkflowLoaded = () => showInputImage(node, combo.value, ctx.api);
  queueMicrotask(() => showInputImage(node, combo.value, ctx.api));
  return combo;
}

function pickAndUpload(node, info, combo, ctx) {
  const picker = document.createElement("input");
  picker.type = "file";
  picker.accept = "image/png,image/jpeg,image/webp";
  picker.addEventListener("change", () => {
    if (picker.files?.[0]) uploadInto(node, picker.files[0], ctx);
  });
  picker.click();
}

/** Uploads `file` and selects it on a LoadImage-like node. */
export async function uploadInto(node, file, ctx) {
  const { info, combo } = node.uploadTarget;
  const answer = await ctx.api.uploadImage(file);
  const name = answer.subfolder ? `${answer.subfolder}/${answer.name}` : answer.name;
  info.choices = [...new Set([...(info.choices ?? []), name])].sort();
  combo.value = name;
  showInputImage(node, name, ctx.api);
  ctx.changed?.();
  return name;
}

function showInputImage(node, name, api) {
  // Only files the server listed exist; anything else would be a 404.
  if (!name || !api || !node.uploadTarget?.info.choices?.includes(name)) return;
  const img = new Image();
  img.onload = () => node.setDirtyCanvas(true, true);
  img.src = api.viewUrl({ filename: name, type: "input", subfolder: "" });
  node.images = [img];
}
