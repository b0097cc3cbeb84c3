// The rectangle tool of TokenRegion and FixTokenRows: draw the token rectangle (or the rows
// to keep) with the mouse on the source image, instead of typing x, y, width and height.
//
// The source image is found upstream: tokens ← (TokenRegion | FixTokenRows)* ← VQTokenize ←
// LoadImage. VQTokenize centre-crops to a multiple of the tokenizer's stride, so the grid is
// drawn over that crop; the stride is 8 for Tessera's VQ and 16 for LlamaGen's (chosen from
// the VQ file's name, and changeable in the dialog).

import { toast } from "./toast.js";

const TOKEN_NODES = new Set(["TokenRegion", "FixTokenRows"]);
const VIEW = 384; // the longer side of the image in the dialog, in CSS pixels

function upstream(node, inputName) {
  const slot = node.inputs?.find((s) => s.name === inputName);
  const link = slot?.link != null ? node.graph.getLink(slot.link) : null;
  return link ? node.graph.getNodeById(link.origin_id) : null;
}

const widgetValue = (node, name) => node?.widgets?.find((w) => w.name === name)?.value;

/** {url, stride} of the image the tokens come from, or an explanation of what is missing. */
export function tokenSource(node, api) {
  let from = upstream(node, "tokens");
  while (from && TOKEN_NODES.has(from.type)) from = upstream(from, "tokens");
  if (from?.type !== "VQTokenize") return { problem: "connect its tokens to a VQTokenize first" };
  const image = upstream(from, "image");
  if (image?.type !== "LoadImage" || !widgetValue(image, "image")) {
    return { problem: "its VQTokenize needs an image from a LoadImage" };
  }
  const vqFile = String(widgetValue(upstream(from, "vq"), "file") ?? "");
  return {
    url: api.viewUrl({ filename: widgetValue(image, "image"), type: "input", subfolder: "" }),
    stride: /16|llamagen/i.test(vqFile) ? 16 : 8,
  };
}

/** Adds the "draw on image…" button to a TokenRegion or FixTokenRows node. */
export function addRegionTool(node, ctx) {
  const button = node.addWidget("button", "draw on image…", null, () => openRegionTool(node, ctx), {});
  button.serialize = false;
  button.label = "draw on image…";
}

function dialogElement() {
  let dialog = document.getElementById("region-dialog");
  if (dialog) return dialog;
  dialog = document.createElement("dialog");
  dialog.id = "region-dialog";
  dialog.innerHTML = `<form method="dialog">
      <h3>Draw the tokens to keep</h3>
      <canvas width="${VIEW}" height="${VIEW}"></canvas>
      <label>Token size <select name="stride"><option value="8">8 px (Tessera VQ)</option>
        <option value="16">16 px (LlamaGen VQ)</option></select></label>
      <div class="hint"></div>
      <menu><button type="button" value="cancel" data-cancel>Cancel</button><button value="ok" class="primary">Apply</button></menu>
    </form>`;
  document.body.append(dialog);
  return dialog;
}

export async function openRegionTool(node, ctx) {
  const source = tokenSource(node, ctx.api);
  if (source.problem) {
    toast(`${node.title}: ${source.problem}.`, "warn");
    return;
  }
  const img = new Image();
  img.src = source.url;
  try {
    await img.decode();
  } catch {
    toast(`${node.title}: the source image could not be loaded.`, "error");
    return;
  }
  const dialog = dialogElement();
  const canvas = dialog.querySelector("canvas");
  const stride = dialog.querySelector("select[name=stride]");
  const hint = dialog.querySelector(".hint");
  stride.value = String(source.stride);
  const rows = node.type === "FixTokenRows";
  let cell = null; // {x, y} grid cell where the drag started
  let rect = rows
    ? { x: 0, y: 0, w: Infinity, h: Number(widgetValue(node, "rows")) }
    : ["x", "y", "width", "height"].map((n) => Number(widgetValue(node, n)));
  if (!rows) rect = { x: rect[0], y: rect[1], w: rect[2], h: rect[3] };

  const grid = () => {
    const f = Number(stride.value);
    const gw = Math.floor(img.naturalWidth / f);
    const gh = Math.floor(img.naturalHeight / f);
    const scale = VIEW / Math.max(gw, gh) / f;
    const crop = { left: (img.naturalWidth - gw * f) / 2, top: (img.naturalHeight - gh * f) / 2 };
    return { f, gw, gh, scale, crop, cw: f * scale };
  };
  const draw = () => {
    const g = grid();
    canvas.width = g.gw * g.cw;
    canvas.height = g.gh * g.cw;
    const c = canvas.getContext("2d");
    c.imageSmoothingEnabled = false;
    c.drawImage(img, g.crop.left, g.crop.top, g.gw * g.f, g.gh * g.f, 0, 0, canvas.width, canvas.height);
    c.strokeStyle = "rgba(255,255,255,.25)";
    for (let i = 1; i < g.gw; i++) c.strokeRect(i * g.cw, 0, 0, canvas.height);
    for (let j = 1; j < g.gh; j++) c.strokeRect(0, j * g.cw, canvas.width, 0);
    const w = Math.min(rect.w, g.gw - rect.x);
    c.fillStyle = "rgba(255, 220, 0, .25)";
    c.strokeStyle = "#ffdc00";
    c.lineWidth = 2;
    c.fillRect(rect.x * g.cw, rect.y * g.cw, w * g.cw, rect.h * g.cw);
    c.strokeRect(rect.x * g.cw, rect.y * g.cw, w * g.cw, rect.h * g.cw);
    hint.textContent = rows
      ? `keep the top ${rect.h} of ${g.gh} rows`
      : `x ${rect.x}, y ${rect.y}, ${rect.w} × ${rect.h} tokens of a ${g.gw} × ${g.gh} grid`;
  };
  const cellAt = (e) => {
    const g = grid();
    const box = canvas.getBoundingClientRect();
    const x = Math.min(g.gw - 1, Math.max(0, Math.floor((e.clientX - box.left) / g.cw)));
    const y = Math.min(g.gh - 1, Math.max(0, Math.floor((e.clientY - box.top) / g.cw)));
    return { x, y };
  };
  const spanTo = (to) => {
    if (rows) rect = { x: 0, y: 0, w: Infinity, h: to.y + 1 };
    else {
      rect = {
        x: Math.min(cell.x, to.x), y: Math.min(cell.y, to.y),
        w: Math.abs(to.x - cell.x) + 1, h: Math.abs(to.y - cell.y) + 1,
      };
    }
    draw();
  };
  canvas.onpointerdown = (e) => {
    canvas.setPointerCapture(e.pointerId);
    cell = cellAt(e);
    spanTo(cell);
  };
  canvas.onpointermove = (e) => cell && spanTo(cellAt(e));
  canvas.onpointerup = () => {
    cell = null;
  };
  stride.onchange = draw;
  dialog.querySelector("[data-cancel]").onclick = () => dialog.close("cancel");
  dialog.onkeydown = (e) => {
    if (e.key !== "Enter") return;
    e.preventDefault();
    dialog.close("ok"); // Enter applies wherever the focus is (Escape cancels: the dialog's own)
  };
  dialog.returnValue = "";
  draw();
  dialog.showModal();
  dialog.addEventListener("close", () => {
    if (dialog.returnValue !== "ok") return;
    const set = (name, value) => {
      const widget = node.widgets.find((w) => w.name === name);
      if (widget) widget.value = value;
    };
    if (rows) set("rows", rect.h);
    else for (const [name, value] of [["x", rect.x], ["y", rect.y], ["width", rect.w], ["height", rect.h]]) set(name, value);
    node.setDirtyCanvas(true, true);
    ctx.changed?.();
  }, { once: true });
}
