// Reads the workflow that Tessera's SaveImage stores in a PNG text chunk (keyword "workflow").

import { parse } from "./json-big.js";

const SIGNATURE = [0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a];
const latin1 = (bytes) => Array.from(bytes, (b) => String.fromCharCode(b)).join("");
const utf8 = (bytes) => new TextDecoder("utf-8").decode(bytes);

async function inflate(bytes) {
  // PNG's compressed text is a zlib stream, which DecompressionStream calls "deflate".
  const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("deflate"));
  return new Uint8Array(await new Response(stream).arrayBuffer());
}

/** All text chunks (tEXt, zTXt, iTXt) of a PNG as {keyword: text}; null when not a PNG. */
export async function readPngText(buffer) {
  const bytes = new Uint8Array(buffer);
  if (bytes.length < 8 || SIGNATURE.some((b, i) => bytes[i] !== b)) return null;
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const texts = {};
  let pos = 8;
  while (pos + 12 <= bytes.length) {
    const length = view.getUint32(pos);
    const type = latin1(bytes.subarray(pos + 4, pos + 8));
    const data = bytes.subarray(pos + 8, pos + 8 + length);
    if (data.length < length) break; // truncated file
    pos += 12 + length;
    const nul = data.indexOf(0);
    if (nul < 0) {
      if (type === "IEND") break;
      continue;
    }
    const keyword = latin1(data.subarray(0, nul));
    if (type === "tEXt") {
      texts[keyword] = latin1(data.subarray(nul + 1));
    } else if (type === "zTXt") {
      texts[keyword] = latin1(await inflate(data.subarray(nul + 2)));
    } else if (type === "iTXt") {
      const compressed = data[nul + 1] === 1;
      let rest = nul + 3;
      rest = data.indexOf(0, rest) + 1; // language tag
      rest = data.indexOf(0, rest) + 1; // translated keyword
      if (rest <= 0) continue;
      const body = data.subarray(rest);
      texts[keyword] = utf8(compressed ? await inflate(body) : body);
    } else if (type === "IEND") {
      break;
    }
  }
  return texts;
}

/** The workflow stored in a PNG file (Blob/File), or null when it has none. */
export async function workflowFromPng(file) {
  const texts = await readPngText(await file.arrayBuffer());
  const text = texts?.workflow;
  if (!text) return null;
  const parsed = parse(text);
  // Accept both the bare workflow and {"workflow": W}.
  return parsed && parsed.nodes ? parsed : parsed?.workflow ?? null;
}
