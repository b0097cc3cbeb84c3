// Converts between the litegraph graph and the one workflow JSON format (docs/API.md).

import { LGraphGroup, LGraphNode, LiteGraph } from "litegraph";
import { nodeInfo, OUTPUT_COLOUR } from "./node-types.js";

export const WORKFLOW_VERSION = 2; // tessera/workflow.py CURRENT_VERSION
const round = (v) => Math.round(v * 10) / 10;

/** The workflow JSON of the graph; `canvas` adds the viewport to the top-level ui. */
export function graphToWorkflow(graph, canvas) {
  const nodes = {};
  const ordered = [...graph._nodes].sort((a, b) => Number(a.id) - Number(b.id));
  for (const node of ordered) {
    const info = nodeInfo(node);
    if (!info) {
      if (node.unknownNode) nodes[String(node.id)] = { ...node.unknownNode, ui: nodeUi(node) };
      continue;
    }
    const inputs = {};
    for (const input of info.inputs) {
      const slot = node.inputs?.find((s) => s.name === input.name);
      const link = slot?.link != null ? graph.getLink(slot.link) : null;
      if (link) {
        const origin = graph.getNodeById(link.origin_id);
        inputs[input.name] = { node: String(link.origin_id), output: origin.outputs[link.origin_slot].name };
        continue;
      }
      const widget = node.widgets?.find((w) => w.input && w.name === input.name);
      if (widget) inputs[input.name] = plainNumber(widget.value);
    }
    const entry = { type: info.type, inputs, ui: nodeUi(node) };
    if (MODE_NAMES[node.mode]) entry.mode = MODE_NAMES[node.mode];
    const controls = seedControls(node);
    if (controls) entry.ui.controls = controls;
    nodes[String(node.id)] = entry;
  }
  const workflow = { version: WORKFLOW_VERSION, nodes };
  const groups = (graph._groups ?? []).map((g) => ({
    title: g.title, bounding: [...g._bounding].map(round), ...(g.color ? { color: g.color } : {}),
  }));
  if (canvas || groups.length) workflow.ui = {};
  if (canvas) {
    workflow.ui.viewport = { offset: [round(canvas.ds.offset[0]), round(canvas.ds.offset[1])], scale: canvas.ds.scale };
  }
  if (groups.length) workflow.ui.groups = groups;
  return workflow;
}

/** litegraph's node modes that mean something to the runtime, by their workflow names. */
export const MODE_NAMES = { 2: "mute", 4: "bypass" };
const MODE_VALUES = { mute: 2, bypass: 4 };

/** A seed BigInt that a JS number holds exactly is written as a plain number. */
const plainNumber = (v) => (typeof v === "bigint" && v <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(v) : v);

function nodeUi(node) {
  const ui = {
    pos: [round(node.pos[0]), round(node.pos[1])],
    size: [round(node.size[0]), round(node.size[1])],
    title: node.title,
  };
  if (node.flags?.collapsed) ui.collapsed = true;
  if (node.color && node.color !== (nodeInfo(node)?.is_output ? OUTPUT_COLOUR : undefined)) ui.color = node.color;
  if (node.bgcolor) ui.bgcolor = node.bgcolor;
  return ui;
}

/** The seed widgets' "control after generate" choices (layout-only state, kept in ui). */
function seedControls(node) {
  const controls = {};
  for (const w of node.widgets ?? []) if (w.control) controls[w.name] = w.control.value;
  return Object.keys(controls).length ? controls : null;
}

const isLink = (v) => v !== null && typeof v === "object" && !Array.isArray(v)
  && typeof v.node === "string" && typeof v.output === "string" && Object.keys(v).length === 2;

/**
 * Replaces the graph's content with `workflow`. Returns a list of warnings (unknown node
 * types, inputs or outputs). Numeric node ids are kept; other ids are renumbered.
 */
export function workflowToGraph(workflow, graph, canvas) {
  if (!workflow || typeof workflow !== "object" || typeof workflow.nodes !== "object") {
    throw new Error("not a Tessera workflow (no \"nodes\" object)");
  }
  const warnings = [];
  graph.clear();
  const byId = new Map();
  const entries = Object.entries(workflow.nodes);
  const taken = new Set(entries.map(([id]) => id).filter((id) => /^\d+$/.test(id)).map(Number));
  let next = Math.max(0, ...taken) + 1;
  let autoX = 40;
  for (const [id, data] of entries) {
    let node = LiteGraph.createNode(data.type);
    if (!node) {
      warnings.push(`unknown node type "${data.type}" (node ${id})`);
      node = unknownNode(data);
    }
    node.id = /^\d+$/.test(id) ? Number(id) : next++;
    const ui = data.ui ?? {};
    if (Array.isArray(ui.pos)) node.pos = [ui.pos[0], ui.pos[1]];
    else {
      node.pos = [autoX, 80];
      autoX += node.size[0] + 40;
    }
    if (Array.isArray(ui.size)) node.size = [Math.max(ui.size[0], 80), Math.max(ui.size[1], 30)];
    if (ui.title) node.title = ui.title;
    if (typeof ui.color === "string") node.color = ui.color;
    if (typeof ui.bgcolor === "string") node.bgcolor = ui.bgcolor;
    node.mode = MODE_VALUES[data.mode] ?? 0;
    graph.add(node);
    if (ui.collapsed) node.collapse(true);
    byId.set(id, node);
  }
  for (const [id, data] of entries) {
    const node = byId.get(id);
    const info = nodeInfo(node);
    if (!info) continue;
    for (const [name, value] of Object.entries(data.inputs ?? {})) {
      if (!info.inputs.some((i) => i.name === name)) {
        warnings.push(`${data.type} (node ${id}) has no input "${name}"`);
        continue;
      }
      if (isLink(value)) {
        const origin = byId.get(value.node);
        const outIndex = origin?.outputs?.findIndex((o) => o.name === value.output) ?? -1;
        const inIndex = node.inputs?.findIndex((s) => s.name === name) ?? -1;
        if (!origin || outIndex < 0 || inIndex < 0) {
          warnings.push(`link to ${data.type}.${name} from node ${value.node}.${value.output} could not be made`);
          continue;
        }
        origin.connect(outIndex, node, inIndex);
        continue;
      }
      const widget = node.widgets?.find((w) => w.input && w.name === name);
      if (widget) widget.value = value;
      else warnings.push(`${data.type}.${name} takes only a link`);
    }
    for (const [name, control] of Object.entries(data.ui?.controls ?? {})) {
      const widget = node.widgets?.find((w) => w.name === name && w.control);
      if (widget) widget.control.value = control;
    }
    node.onWorkflowLoaded?.();
  }
  for (const g of Array.isArray(workflow.ui?.groups) ? workflow.ui.groups : []) {
    const group = new LGraphGroup(String(g.title ?? "Group"));
    if (Array.isArray(g.bounding) && g.bounding.length === 4) group._bounding.set(g.bounding.map(Number));
    if (typeof g.color === "string") group.color = g.color;
    graph.add(group);
  }
  const viewport = workflow.ui?.viewport;
  if (canvas && viewport && Array.isArray(viewport.offset)) {
    canvas.ds.offset[0] = viewport.offset[0];
    canvas.ds.offset[1] = viewport.offset[1];
    canvas.ds.scale = Number(viewport.scale) || 1;
  }
  graph.setDirtyCanvas(true, true);
  return warnings;
}

/** A stand-in for a node type the server does not know; keeps its data for export. */
function unknownNode(data) {
  const node = new LGraphNode(`${data.type} (unknown)`);
  node.type = data.type;
  node.unknownNode = { type: data.type, inputs: data.inputs ?? {} };
  node.color = "#662222";
  node.bgcolor = "#442222";
  node.size = [240, 60];
  return node;
}
