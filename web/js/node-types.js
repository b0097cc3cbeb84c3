// Registers one litegraph node class per entry of GET /api/nodes.

import { LGraphNode, LiteGraph, SlotShape } from "litegraph";
import { addInputWidget, hasSocket, hasWidget } from "./widgets.js";
import { drawNodeOverlay, runStateStroke } from "./node-overlay.js";
import { openLightbox } from "./lightbox.js";
import { addRegionTool } from "./region-tool.js";

const TYPE_COLOURS = {
  IMAGE: "#64b5f6", MASK: "#81c784", LATENT: "#ff9cf9", CONDITIONING: "#ffa931",
  DIT_MODEL: "#b39ddb", VAE: "#ff6e6e", TEXT_ENCODER: "#ffd500", CONTROL_NET: "#00d78d",
  VQ_MODEL: "#4dd0e1", AR_MODEL: "#9575cd", TOKENS: "#f06292",
  MULTISCALE_VQ: "#26a69a", VAR_MODEL: "#7e57c2", MULTISCALE_TOKENS: "#ec407a",
  INT: "#a1c181", FLOAT: "#aabb66", STRING: "#c6b38b", BOOLEAN: "#8fb3c4",
};

/** Colours of links and sockets per type, for LGraphCanvas.link_type_colors. */
export function linkColours() {
  return { ...TYPE_COLOURS };
}

/** The catalogue entry (NodeInfo) of a graph node, or undefined for unknown types. */
export function nodeInfo(node) {
  return node.constructor.nodeInfo;
}

/**
 * Registers (or refreshes) the node classes. `ctx` = {api, changed} is handed to widgets.
 * Returns the map type → NodeInfo the editor keeps.
 */
export function registerNodeTypes(catalogue, ctx) {
  for (const info of Object.values(catalogue.nodes)) {
    const existing = LiteGraph.registered_node_types[info.type];
    if (existing?.nodeInfo) {
      refreshInfo(existing.nodeInfo, info);
      continue;
    }
    const NodeClass = class extends LGraphNode {
      constructor(title) {
        super(title ?? info.type, info.type);
        buildNode(this, NodeClass.nodeInfo, ctx);
      }
    };
    NodeClass.nodeInfo = structuredClone(info);
    NodeClass.title = info.type;
    NodeClass.description = info.description ?? "";
    LiteGraph.registerNodeType(info.type, NodeClass);
    NodeClass.category = info.category ?? "misc"; // registerNodeType derives it from a "cat/type" name
  }
  return Object.fromEntries(
    Object.keys(catalogue.nodes).map((type) => [type, LiteGraph.registered_node_types[type].nodeInfo]),
  );
}

/** Copies new choices (model files, uploaded images) into the live catalogue entry. */
function refreshInfo(target, fresh) {
  for (const input of fresh.inputs) {
    const old = target.inputs.find((i) => i.name === input.name);
    if (old && input.choices) old.choices = input.choices;
  }
}

/** Output nodes' title colour; graph-format saves only colours a user chose. */
export const OUTPUT_COLOUR = "#335533";

function buildNode(node, info, ctx) {
  node.serialize_widgets = true;
  node.runState = null; // queued | running | cached | done | error
  node.errors = []; // [{input, message}]
  node.images = []; // HTMLImageElements shown in the node body
  for (const input of info.inputs) {
    const widget = addInputWidget(node, input, ctx);
    if (hasSocket(input)) {
      const extra = { label: input.name };
      if (widget && hasWidget(input)) extra.widget = { name: input.name };
      node.addInput(input.name, input.type, extra);
      if (input.optional) node.inputs.at(-1).shape = SlotShape.HollowCircle; // optional: hollow socket
    }
  }
  if (info.type === "TokenRegion" || info.type === "FixTokenRows") addRegionTool(node, ctx);
  for (const output of info.outputs) node.addOutput(output.name, output.type, { label: output.name });
  if (info.is_output) node.color = OUTPUT_COLOUR;
  node.strokeStyles.runState = runStateStroke;
  node.onDrawForeground = function (c) {
    drawNodeOverlay(this, c);
  };
  // a double click on a node's images opens them in the lightbox
  node.onDblClick = function (e, pos) {
    const images = (this.images ?? []).filter((img) => img.complete && img.naturalWidth);
    if (pos[1] > 0 && images.length) openLightbox(images.map((img, i) => ({ src: img.src, title: `${this.title} ${i + 1}` })));
  };
  const size = node.computeSize();
  node.size = [Math.max(size[0], 240, comboWidth(node)), size[1]];
}

/** Width that shows a dropdown's label and its longest choice (model file names) unclipped. */
function comboWidth(node) {
  let width = 0;
  for (const w of node.widgets ?? []) {
    if (w.type !== "combo" || !w.input) continue;
    const values = w.input.choices ?? [];
    const longest = Math.max(String(w.value ?? "").length, ...values.map((v) => String(v).length));
    width = Math.max(width, (w.name.length + longest) * 7 + 64);
  }
  return Math.min(width, 380);
}
