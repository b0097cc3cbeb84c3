// Typed sockets: explains, in a toast, why litegraph refused a link the user dropped.

import { LiteGraph } from "litegraph";
import { toast } from "./toast.js";

const slotText = (slot) => `"${slot.label ?? slot.name}" (${slot.type})`;

/** Why `fromType` may not go into `input`, or null when it may. */
export function refusalReason(fromType, input) {
  if (LiteGraph.isValidConnection(fromType, input.type)) return null;
  return `Cannot connect ${fromType} to input ${slotText(input)}: the types differ.`;
}

/** Whether a link from `origin` into `target` would close a loop. */
export function wouldCreateCycle(graph, origin, target) {
  if (origin === target) return true;
  const seen = new Set();
  const stack = [origin];
  while (stack.length) {
    const node = stack.pop();
    if (node === target) return true;
    if (seen.has(node.id)) continue;
    seen.add(node.id);
    for (const slot of node.inputs ?? []) {
      const link = slot.link != null ? graph.getLink(slot.link) : null;
      const upstream = link && graph.getNodeById(link.origin_id);
      if (upstream) stack.push(upstream);
    }
  }
  return false;
}

/** onConnectInput for every node: refuses loops with a toast. */
export function allowLink(target, originNode) {
  const graph = target.graph;
  if (graph && originNode && wouldCreateCycle(graph, originNode, target)) {
    toast(`Cannot connect ${originNode.title} to ${target.title}: it would make a loop.`, "error");
    return false;
  }
  return true;
}

/** Listens to the canvas's link drops and explains refused ones. */
export function installLinkCheck(canvas) {
  const connector = canvas.linkConnector;
  connector.events.addEventListener("after-drop-links", (e) => {
    const { renderLinks, event } = e.detail;
    const first = renderLinks?.[0];
    if (!first || !event || !canvas.graph) return;
    const node = canvas.graph.getNodeOnPos(event.canvasX, event.canvasY);
    if (!node || renderLinks.every((l) => l.node === node)) return;
    const reason = connector.state.connectingTo === "output"
      ? outputReason(node, first.fromSlot, event)
      : inputReason(node, first.fromSlot, event, connector.overWidget);
    if (reason) toast(reason, "error");
  });
}

function inputReason(node, fromSlot, event, overWidget) {
  const pos = [event.canvasX, event.canvasY];
  const input = node.getInputOnPos(pos) ?? node.getSlotFromWidget(overWidget);
  if (input) return refusalReason(fromSlot.type, input);
  if (node.findInputByType(fromSlot.type)) return null;
  return `${node.title} has no input of type ${fromSlot.type}.`;
}

function outputReason(node, fromSlot, event) {
  const output = node.getOutputOnPos([event.canvasX, event.canvasY]);
  if (output) {
    if (LiteGraph.isValidConnection(output.type, fromSlot.type)) return null;
    return `Cannot connect output ${slotText(output)} to ${fromSlot.type} input "${fromSlot.name}": the types differ.`;
  }
  if (node.findOutputByType(fromSlot.type)) return null;
  return `${node.title} has no output of type ${fromSlot.type}.`;
}
