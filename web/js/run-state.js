// Per-node run state (queued, running, cached, done, error), progress, previews and outputs,
// driven by the server's WebSocket events for the prompts this editor queued.
//
// Every prompt remembers the graph it was queued from (`graphKey()` at that moment): its
// events touch nodes only while that graph is the one on the canvas, so loading another
// workflow mid-run never puts a run's previews on a node that happens to share an id.
// Unfinished prompts are kept in sessionStorage (this tab's, like its client id, which the
// server scopes events by), so a reload re-attaches to them (`reattach`).

import { clearErrors, describeErrors, findNode, showErrors } from "./node-errors.js";
import { setNodeImages } from "./node-overlay.js";
import { toast } from "./toast.js";

const RUNS_KEY = "tessera.runs";

export class RunState extends EventTarget {
  constructor({ api, graph, progressEl, graphKey }) {
    super();
    this.api = api;
    this.graph = graph;
    this.graphKey = graphKey;
    this.bar = progressEl.querySelector(".bar");
    this.label = progressEl.querySelector(".label");
    this.prompts = new Map(); // prompt_id → {nodes: [node ids], graphKey}, for prompts queued here
    this.running = null; // prompt_id being executed
    this.runningNode = null;
    this.queueRemaining = 0;
    this.previewUrls = new Map(); // node id → object URL of the last preview
    this.results = []; // [{prompt_id, status}] of finished prompts, oldest first
    // Events can beat the answer of POST /api/prompt; while a request is out, events of
    // unknown prompts wait here and are replayed once the prompt id is known.
    this.requestsOut = 0;
    this.early = [];
    const on = (type, fn) => api.addEventListener(type, (e) => {
      const data = e.detail;
      if (data.prompt_id && !this.prompts.has(data.prompt_id) && this.requestsOut > 0) {
        this.early.push([fn, data]);
      } else {
        fn.call(this, data);
      }
    });
    on("status", this.onStatus);
    on("execution_start", this.onStart);
    on("execution_cached", this.onCached);
    on("executing", this.onExecuting);
    on("progress", this.onProgress);
    on("preview", this.onPreview);
    on("executed", this.onExecuted);
    on("execution_error", this.onError);
    on("execution_interrupted", this.onInterrupted);
    on("execution_success", this.onSuccess);
  }

  /** Call before POST /api/prompt; then `queued` or `requestFailed`. */
  requestSent() {
    this.requestsOut += 1;
  }

  requestFailed(err) {
    this.results.push({ prompt_id: null, status: "refused", error: err?.message, errors: err?.errors ?? [] });
    this.requestsOut = Math.max(0, this.requestsOut - 1);
    if (!this.requestsOut) this.early = [];
  }

  /** Call when POST /api/prompt accepted `workflow`. */
  queued(promptId, workflow) {
    this.requestsOut = Math.max(0, this.requestsOut - 1);
    this.prompts.set(promptId, { nodes: Object.keys(workflow.nodes), graphKey: this.graphKey() });
    this.saveRuns();
    clearErrors(this.graph);
    for (const node of this.graph._nodes) node.runState = workflow.nodes[String(node.id)] ? "queued" : null;
    this.setLabel(this.running ? `queued (${this.queueRemaining})` : "queued", 0);
    this.graph.setDirtyCanvas(true, true);
    const early = this.early;
    this.early = [];
    for (const [fn, data] of early) {
      if (data.prompt_id === promptId) fn.call(this, data);
      else if (this.requestsOut) this.early.push([fn, data]);
    }
  }

  isOurs(data) {
    return this.prompts.has(data.prompt_id);
  }

  /** Whether the prompt's own graph is the one on the canvas now. */
  isHere(data) {
    return this.prompts.get(data.prompt_id)?.graphKey === this.graphKey();
  }

  saveRuns() {
    try {
      sessionStorage.setItem(RUNS_KEY, JSON.stringify(Object.fromEntries(this.prompts)));
    } catch {
      // storage disabled: a reload then shows the result in History only
    }
  }

  /**
   * After a reload: takes back the prompts this tab queued that are not finished in
   * `GET /api/queue`; finished ones get their outputs and errors from History.
   */
  async reattach() {
    let saved;
    try {
      saved = JSON.parse(sessionStorage.getItem(RUNS_KEY) ?? "{}");
    } catch {
      saved = {};
    }
    for (const [id, run] of Object.entries(saved)) this.prompts.set(id, { ...run, reattached: true });
    if (!this.prompts.size) return;
    const { running, pending } = await this.api.queue();
    const live = new Set([...running, ...pending].map((item) => item.prompt_id));
    for (const item of running) {
      if (!this.prompts.has(item.prompt_id) || this.running) continue;
      this.running = item.prompt_id;
      if (this.isHere(item)) this.markQueued(this.prompts.get(item.prompt_id));
      this.setLabel("running", 0);
    }
    for (const id of [...this.prompts.keys()]) {
      if (!live.has(id)) await this.finishFromHistory(id);
    }
    this.graph.setDirtyCanvas(true, true);
  }

  /** Ends a re-attached prompt from its History entry: outputs and errors on its graph. */
  async finishFromHistory(promptId) {
    let entry;
    try {
      entry = await this.api.historyEntry(promptId);
    } catch {
      this.prompts.delete(promptId);
      this.saveRuns();
      return;
    }
    if (!this.prompts.has(promptId) || entry.status === "pending" || entry.status === "running") return;
    if (this.isHere({ prompt_id: promptId })) {
      for (const [id, ui] of Object.entries(entry.outputs ?? {})) this.showOutput(this.node(id), ui);
      if (entry.errors?.length) showErrors(this.graph, entry.errors);
    }
    this.end(promptId, entry.status);
  }

  /** A pending prompt of ours was cancelled: it will send no more events. */
  cancelled(promptId) {
    if (this.prompts.has(promptId)) this.end(promptId, "cancelled");
  }

  markQueued(run) {
    const ids = new Set(run.nodes);
    for (const node of this.graph._nodes) {
      node.runState = ids.has(String(node.id)) ? "queued" : null;
      node.progress = undefined;
    }
  }

  showOutput(node, output) {
    const images = output?.images ?? [];
    if (!node || !images.length) return;
    setNodeImages(node, images.map((ref) => {
      const img = new Image();
      img.src = this.api.viewUrl(ref);
      return img;
    }));
  }

  node(id) {
    return findNode(this.graph, id);
  }

  setLabel(text, fraction) {
    this.label.textContent = text;
    this.bar.style.width = `${Math.round((fraction ?? 0) * 100)}%`;
  }

  onStatus({ queue_remaining: remaining }) {
    this.queueRemaining = remaining ?? 0;
    // While idle the label keeps the last result (done, error, interrupted) unless work is waiting.
    if (!this.running && remaining) this.setLabel(`queue: ${remaining}`, 0);
  }

  onStart(data) {
    if (!this.isOurs(data)) return;
    this.running = data.prompt_id;
    if (this.isHere(data)) this.markQueued(this.prompts.get(data.prompt_id));
    this.setLabel("started", 0);
    this.graph.setDirtyCanvas(true, true);
  }

  onCached(data) {
    if (!this.isHere(data)) return;
    for (const id of data.nodes ?? []) {
      const node = this.node(id);
      if (node) node.runState = "cached";
    }
    this.graph.setDirtyCanvas(true, true);
  }

  finishRunningNode() {
    const node = this.runningNode;
    if (node && node.runState === "running") node.runState = "done";
    if (node) {
      node.progress = undefined;
      node.progressText = undefined;
    }
    this.runningNode = null;
  }

  onExecuting(data) {
    if (!this.isOurs(data)) return;
    this.finishRunningNode();
    if (!this.isHere(data)) {
      this.setLabel(`node ${data.node} (other graph)`, 0);
      return;
    }
    const node = this.node(data.node);
    if (node) {
      node.runState = "running";
      this.runningNode = node;
      this.setLabel(node.title, 0);
    }
    this.graph.setDirtyCanvas(true, true);
  }

  onProgress(data) {
    if (!this.isOurs(data)) return;
    const node = this.isHere(data) ? this.node(data.node) : null;
    const fraction = data.max ? data.value / data.max : 0;
    if (node) {
      node.progress = fraction;
      node.progressText = `${data.value}/${data.max}`;
    }
    this.setLabel(`${node?.title ?? data.node} ${data.value}/${data.max}`, fraction);
    this.graph.setDirtyCanvas(true, false);
  }

  onPreview(data) {
    if (!this.isHere(data)) return;
    const node = this.node(data.node);
    if (!node) return;
    node.previewCount = (node.previewCount ?? 0) + 1;
    const url = URL.createObjectURL(data.blob);
    const img = new Image();
    img.onload = () => {
      const old = this.previewUrls.get(node.id);
      if (old) URL.revokeObjectURL(old);
      this.previewUrls.set(node.id, url);
      setNodeImages(node, [img]);
    };
    img.src = url;
  }

  onExecuted(data) {
    if (!this.isOurs(data)) return;
    if (this.isHere(data)) this.showOutput(this.node(data.node), data.output);
    for (const warning of data.output?.warnings ?? []) toast(`${this.node(data.node)?.title ?? data.node}: ${warning}`, "warn");
    this.dispatchEvent(new CustomEvent("output", { detail: data }));
  }

  onError(data) {
    if (!this.isOurs(data)) return;
    this.finishRunningNode();
    if (this.isHere(data)) {
      const node = this.node(data.node);
      if (node) node.runState = "error";
      showErrors(this.graph, [{ node: data.node, input: data.input ?? null, message: data.message }]);
      toast(`Error in ${describeErrors(this.graph, [data])}`, "error");
    } else {
      toast(`A run queued from another graph failed: ${data.message}`, "error");
    }
    this.end(data.prompt_id, "error");
  }

  onInterrupted(data) {
    if (!this.isOurs(data)) return;
    this.finishRunningNode();
    toast("Interrupted.", "warn");
    this.end(data.prompt_id, "interrupted");
  }

  onSuccess(data) {
    if (!this.isOurs(data)) return;
    this.finishRunningNode();
    // A prompt taken back after a reload missed the outputs of the nodes that ran before it.
    if (this.prompts.get(data.prompt_id).reattached) this.finishFromHistory(data.prompt_id);
    else this.end(data.prompt_id, "success");
  }

  end(promptId, status) {
    const here = this.isHere({ prompt_id: promptId });
    this.prompts.delete(promptId);
    this.saveRuns();
    if (this.running === promptId) this.running = null;
    for (const node of here ? this.graph._nodes : []) {
      if (node.runState === "queued" || node.runState === "running" || node.runState === "done") node.runState = null;
    }
    this.results.push({ prompt_id: promptId, status });
    this.setLabel(status === "success" ? "done" : status, status === "success" ? 1 : 0);
    this.graph.setDirtyCanvas(true, true);
    this.dispatchEvent(new CustomEvent("finished", { detail: { prompt_id: promptId, status } }));
  }
}
