// ComfyUI files dropped or opened in the editor: a workflow in ComfyUI's API or UI format, or a
// PNG ComfyUI saved (text chunks `prompt` and `workflow`). The server converts them (POST
// /api/import) through the same mapping table as its ComfyUI /prompt route. Texts are sent as
// they are, so 64-bit seeds keep every digit.

import { parse } from "./json-big.js";
import { readPngText } from "./png-workflow.js";

/** JSON.parse, or null for text that is not JSON (only used to recognise ComfyUI documents). */
export function looseParse(text) {
  try {
    return JSON.parse(text);
  } catch {
    return null;
  }
}

/** True for ComfyUI's UI format ({nodes: [...], links}) or API format ({id: {class_type, inputs}}). */
export function isComfyDocument(doc) {
  if (!doc || typeof doc !== "object" || Array.isArray(doc)) return false;
  if (Array.isArray(doc.nodes) && "links" in doc) return true;
  const nodes = Object.values(doc);
  return nodes.length > 0 && nodes.every((n) => n && typeof n === "object" && "class_type" in n);
}

/** The JSON text to import from a ComfyUI PNG, or null when the PNG is not ComfyUI's. */
export async function comfyPngText(file) {
  const texts = await readPngText(await file.arrayBuffer());
  if (!texts) return null;
  if (texts.prompt && isComfyDocument(looseParse(texts.prompt))) {
    const layout = texts.workflow && isComfyDocument(looseParse(texts.workflow)) ? texts.workflow : "null";
    return `{"prompt": ${texts.prompt}, "workflow": ${layout}}`;
  }
  return texts.workflow && isComfyDocument(looseParse(texts.workflow)) ? texts.workflow : null;
}

/**
 * A ComfyUI document's JSON text, or an older Tessera workflow's, as a Tessera workflow of the
 * current version (the server migrates it); throws with every problem the server names.
 */
export async function importComfy(text) {
  const response = await fetch("/api/import", { method: "POST", headers: { "Content-Type": "application/json" }, body: text });
  const body = parse(await response.text());
  if (!response.ok) {
    const problems = (body.errors ?? []).map((e) => (e.node ? `node ${e.node}: ${e.reason}` : e.reason));
    throw new Error(problems.join("; ") || body.error);
  }
  return body.workflow;
}
