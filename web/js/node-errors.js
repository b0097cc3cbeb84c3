// Validation and execution errors, shown on the offending node and input.

/** The graph node for a workflow node id (workflow ids are strings, graph ids numbers). */
export function findNode(graph, id) {
  if (id === null || id === undefined) return null;
  return graph.getNodeById(id) ?? (/^\d+$/.test(String(id)) ? graph.getNodeById(Number(id)) : null);
}

export function clearErrors(graph) {
  for (const node of graph._nodes) {
    node.errors = [];
    node.has_errors = false;
  }
  graph.setDirtyCanvas(true, true);
}

/**
 * Marks nodes with errors `[{node, input, reason | message}]`. Returns the errors that
 * name no node of the graph (shown elsewhere by the caller).
 */
export function showErrors(graph, errors) {
  const unplaced = [];
  for (const err of errors) {
    const node = findNode(graph, err.node);
    const message = err.reason ?? err.message ?? "error";
    if (!node) {
      unplaced.push({ ...err, message });
      continue;
    }
    node.errors = [...(node.errors ?? []), { input: err.input ?? null, message }];
    node.has_errors = true;
  }
  graph.setDirtyCanvas(true, true);
  return unplaced;
}

/** A one-line summary for a toast. */
export function describeErrors(graph, errors) {
  const first = errors[0];
  if (!first) return "";
  const node = findNode(graph, first.node);
  const where = [node ? node.title : first.node_type ?? first.node, first.input].filter(Boolean).join(".");
  const more = errors.length > 1 ? ` (+${errors.length - 1} more)` : "";
  return `${where ? `${where}: ` : ""}${first.reason ?? first.message}${more}`;
}
