// HTTP and WebSocket client for the Tessera server (docs/API.md).

import { parse, stringify } from "./json-big.js";

/** An HTTP error answer: `status`, `message` and the server's `errors` list, if any. */
export class ApiError extends Error {
  constructor(status, body) {
    super(body?.error || `HTTP ${status}`);
    this.status = status;
    this.errors = Array.isArray(body?.errors) ? body.errors : [];
  }
}

function newClientId() {
  if (globalThis.crypto?.randomUUID) return crypto.randomUUID();
  return Math.random().toString(36).slice(2) + Date.now().toString(36);
}

/**
 * Talks to the server. WebSocket messages are re-dispatched as DOM events:
 * `status`, `execution_start`, `executing`, `progress`, `executed`, `execution_cached`,
 * `execution_error`, `execution_interrupted`, `execution_success` (detail = data),
 * `preview` (detail = {prompt_id, node, blob}) and `connection` (detail = {online}).
 */
export class Api extends EventTarget {
  constructor(base = "") {
    super();
    this.base = base;
    // Kept for the tab's life (sessionStorage survives a reload), so a reloaded editor is
    // still the client its queued prompts belong to.
    this.clientId = sessionStorage.getItem("tessera.clientId") || newClientId();
    sessionStorage.setItem("tessera.clientId", this.clientId);
    // A server on a non-loopback address wants a token; the editor takes it from ?token=.
    this.token = new URLSearchParams(location.search).get("token");
    this.socket = null;
    this.reconnectDelay = 500;
  }

  url(path) {
    return this.base + path;
  }

  async request(method, path, body) {
    const headers = {};
    if (this.token) headers.Authorization = `Bearer ${this.token}`;
    let payload;
    if (body instanceof FormData) payload = body;
    else if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      payload = stringify(body);
    }
    const res = await fetch(this.url(path), { method, headers, body: payload });
    const text = await res.text();
    let data = null;
    try {
      data = text ? parse(text) : null;
    } catch {
      data = { error: text };
    }
    if (!res.ok) throw new ApiError(res.status, data);
    return data;
  }

  get(path) { return this.request("GET", path); }

  nodes() { return this.get("/api/nodes"); }
  models() { return this.get("/api/models"); }
  templates() { return this.get("/api/templates"); }
  history(limit = 20) { return this.get(`/api/history?limit=${limit}`); }
  historyEntry(id) { return this.get(`/api/history/${encodeURIComponent(id)}`); }
  workflows() { return this.get("/api/workflows"); }
  workflow(name) { return this.get(`/api/workflows/${encodeURIComponent(name)}`); }
  saveWorkflow(name, workflow) { return this.request("PUT", `/api/workflows/${encodeURIComponent(name)}`, workflow); }
  deleteWorkflow(name) { return this.request("DELETE", `/api/workflows/${encodeURIComponent(name)}`); }
  validate(workflow) { return this.request("POST", "/api/validate", { workflow }); }
  queuePrompt(workflow) { return this.request("POST", "/api/prompt", { workflow, client_id: this.clientId }); }
  queue() { return this.get("/api/queue"); }
  cancel(promptId) {
    return this.request("DELETE", `/api/queue/${encodeURIComponent(promptId)}?client_id=${encodeURIComponent(this.clientId)}`);
  }
  clearPending() { return this.request("DELETE", `/api/queue?client_id=${encodeURIComponent(this.clientId)}`); }
  interrupt(promptId) { return this.request("POST", "/api/interrupt", promptId ? { prompt_id: promptId } : {}); }

  uploadImage(file) {
    const form = new FormData();
    form.append("image", file, file.name || "image.png");
    return this.request("POST", "/api/upload/image", form);
  }

  /** URL of an image (ImageRef = {filename, subfolder, type}). */
  viewUrl(ref) {
    const q = new URLSearchParams({ filename: ref.filename, type: ref.type || "output", subfolder: ref.subfolder || "" });
    if (this.token) q.set("token", this.token);
    return this.url(`/api/view?${q}`);
  }

  /** Opens the WebSocket and keeps it open (reconnects with back-off). */
  connect() {
    const proto = location.protocol === "https:" ? "wss:" : "ws:";
    const q = new URLSearchParams({ client_id: this.clientId });
    if (this.token) q.set("token", this.token);
    const base = this.base || `${proto}//${location.host}`;
    const socket = new WebSocket(`${base.replace(/^http/, "ws")}/ws?${q}`);
    socket.binaryType = "arraybuffer";
    this.socket = socket;
    socket.addEventListener("open", () => {
      this.reconnectDelay = 500;
      this.emit("connection", { online: true });
    });
    socket.addEventListener("close", () => {
      this.emit("connection", { online: false });
      setTimeout(() => this.connect(), this.reconnectDelay);
      this.reconnectDelay = Math.min(this.reconnectDelay * 2, 8000);
    });
    socket.addEventListener("message", (event) => this.onMessage(event.data));
  }

  onMessage(data) {
    if (typeof data === "string") {
      let msg;
      try {
        msg = parse(data);
      } catch {
        return;
      }
      if (msg && typeof msg.type === "string") this.emit(msg.type, msg.data ?? {});
      return;
    }
    const preview = parsePreviewFrame(data);
    if (preview) this.emit("preview", preview);
  }

  emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }
}

/** Binary frame: 4-byte big-endian header length N, N bytes of JSON header, then the image bytes. */
export function parsePreviewFrame(buffer) {
  if (!(buffer instanceof ArrayBuffer) || buffer.byteLength < 4) return null;
  const n = new DataView(buffer).getUint32(0, false);
  if (4 + n > buffer.byteLength) return null;
  let header;
  try {
    header = JSON.parse(new TextDecoder().decode(new Uint8Array(buffer, 4, n)));
  } catch {
    return null;
  }
  const type = `image/${header.format || "png"}`;
  return { ...header, blob: new Blob([new Uint8Array(buffer, 4 + n)], { type }) };
}
