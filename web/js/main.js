// Tessera editor: wires the canvas, the palette, running, workflows and history together.

import { LGraph, LGraphCanvas, LiteGraph } from "litegraph";
import { Api } from "./api.js";
import { graphToWorkflow, workflowToGraph } from "./graph-format.js";
import { HistoryPanel } from "./history.js";
import { allowLink, installLinkCheck } from "./link-check.js";
import { clearErrors, describeErrors, showErrors } from "./node-errors.js";
import { linkColours, registerNodeTypes } from "./node-types.js";
import { createPalette, rankTypes } from "./palette.js";
import { Minimap } from "./minimap.js";
import { QueuePanel } from "./queue-panel.js";
import { RunState } from "./run-state.js";
import { installSettings } from "./settings.js";
import { parse, stringify } from "./json-big.js";
import { installShortcuts, SHORTCUTS } from "./shortcuts.js";
import { toast } from "./toast.js";
import { UndoHistory } from "./undo.js";
import { applyControlsAfterRun, uploadInto } from "./widgets.js";
import { workflowFromFile, Workflows } from "./workflows.js";

const $ = (id) => document.getElementById(id);
const SESSION_KEY = "tessera.workflow";
const GRAPH_KEY = "tessera.graphKey";
const BYPASS = 4;
const MUTE = 2; // litegraph's "Never"
const MODES = [["Always", 0], ["Never (mute)", MUTE], ["Bypass", BYPASS]];
const newGraphKey = () => Math.random().toString(36).slice(2) + Date.now().toString(36);

function configureLiteGraph() {
  LiteGraph.release_link_on_empty_shows_menu = true; // drop a link in the void: pick a node for it
  LiteGraph.search_hide_on_mouse_leave = false;
  LiteGraph.catch_exceptions = true;
  Object.assign(LGraphCanvas.link_type_colors, linkColours());
  // litegraph's "Convert to Subgraph" has no counterpart in the workflow format (it lost the
  // nodes): not offered. The Mode menu offers the modes the runtime implements.
  const withoutSubgraph = (options) => options.filter((o) => !String(o?.content ?? "").startsWith("Convert to Subgraph"));
  const nodeMenu = LGraphCanvas.prototype.getNodeMenuOptions;
  LGraphCanvas.prototype.getNodeMenuOptions = function (node) {
    return withoutSubgraph(nodeMenu.call(this, node));
  };
  const canvasMenu = LGraphCanvas.prototype.getCanvasMenuOptions;
  LGraphCanvas.prototype.getCanvasMenuOptions = function () {
    return withoutSubgraph(canvasMenu.call(this));
  };
  LGraphCanvas.onMenuNodeMode = function (value, options, event, menu, node) {
    new LiteGraph.ContextMenu(MODES.map(([label]) => label), {
      event, parentMenu: menu, node,
      callback: (label) => window.tessera.setMode(MODES.find(([l]) => l === label)[1], node),
    });
    return false;
  };
}

class App {
  async start() {
    configureLiteGraph();
    this.api = new Api();
    this.graph = new LGraph();
    this.canvasEl = $("graph-canvas");
    this.canvas = new LGraphCanvas(this.canvasEl, this.graph);
    this.canvas.default_connection_color_byType = linkColours();
    this.canvas.show_info = false;
    this.canvas.low_quality_zoom_threshold = 0.35; // titles and widget text stay drawn down to 35% zoom
    this.canvas.onSearchBox = (helper, text) => this.searchNodes(helper, text);
    this.minimap = new Minimap({ canvas: this.canvas, graph: this.graph, el: $("minimap") });
    this.canvas.onDrawOverlay = () => this.minimap.draw();
    this.canvas.render_canvas_border = false; // a frame of the screen's size at the graph origin: meaningless here
    installSettings(this, $("settings-dialog"), $("btn-settings"));
    this.fitCanvas();
    new ResizeObserver(() => this.fitCanvas()).observe($("canvas-wrap"));
    installLinkCheck(this.canvas);

    this.graphKey = sessionStorage.getItem(GRAPH_KEY) || this.newGraph(); // per tab, as its runs
    this.runState = new RunState({
      api: this.api, graph: this.graph, progressEl: $("run-progress"), graphKey: () => this.graphKey,
    });
    this.queuePanel = new QueuePanel({
      api: this.api,
      list: $("queue-list"),
      clearButton: $("btn-queue-clear"),
      ours: (id) => this.runState.prompts.has(id),
      onCancelled: (id) => this.runState.cancelled(id),
    });
    this.history = new HistoryPanel({
      api: this.api,
      list: $("history-list"),
      refreshButton: $("btn-history-refresh"),
      onRestore: (workflow) => this.loadWorkflow(workflow, null),
    });
    this.workflows = new Workflows({
      api: this.api,
      current: () => this.workflow(),
      load: (workflow, name, options) => this.loadWorkflow(workflow, name, options),
      select: $("sel-open"),
      nameLabel: $("workflow-name"),
      dialog: $("name-dialog"),
      fileInput: $("file-import"),
    });
    this.workflows.setName(null);
    this.palette = createPalette({
      list: $("palette-list"),
      search: $("palette-search"),
      dropTarget: this.canvasEl,
      onDrop: (type, x, y) => this.addNode(type, x, y),
    });

    await this.loadCatalogue();
    this.undo = new UndoHistory(() => stringify(graphToWorkflow(this.graph)), (s) => this.restore(s));
    this.restoreSession();
    this.bindUi();
    this.api.addEventListener("connection", (e) => {
      $("conn-status").textContent = e.detail.online ? "connected" : "offline";
      $("conn-status").classList.toggle("online", e.detail.online);
    });
    // The server sends `status` after it recorded a prompt's state: the moment to refresh.
    this.api.addEventListener("status", () => {
      this.history.refreshSoon();
      this.queuePanel.refreshSoon();
    });
    this.runState.addEventListener("finished", () => this.history.refreshSoon());
    this.api.connect();
    await Promise.all([this.workflows.refresh(), this.history.refresh(), this.runState.reattach().catch(() => {})]);
    await this.queuePanel.refresh();
    document.body.dataset.ready = "true";
  }

  /** GET /api/nodes → node classes and palette; called again to refresh model choices. */
  async loadCatalogue() {
    const catalogue = await this.api.nodes();
    this.nodeInfos = registerNodeTypes(catalogue, { api: this.api, changed: () => this.changed() });
    for (const Type of Object.values(LiteGraph.registered_node_types)) {
      Type.prototype.onConnectInput = function (index, type, output, origin) {
        return allowLink(this, origin);
      };
    }
    this.palette.setCatalogue(this.nodeInfos);
    this.graph.setDirtyCanvas(true, true);
  }

  fitCanvas() {
    const wrap = $("canvas-wrap");
    const dpr = Math.max(window.devicePixelRatio || 1, 1);
    const { width, height } = wrap.getBoundingClientRect();
    this.canvasEl.width = Math.round(width * dpr);
    this.canvasEl.height = Math.round(height * dpr);
    this.canvasEl.style.width = `${width}px`;
    this.canvasEl.style.height = `${height}px`;
    this.canvasEl.getContext("2d").setTransform(dpr, 0, 0, dpr, 0, 0);
    this.canvas.setDirty(true, true);
  }

  /** Client coordinates → graph coordinates (litegraph names this direction "canvas to offset"). */
  toGraph(clientX, clientY) {
    const box = this.canvasEl.getBoundingClientRect();
    return this.canvas.ds.convertCanvasToOffset([clientX - box.left, clientY - box.top]);
  }

  addNode(type, clientX, clientY) {
    const node = LiteGraph.createNode(type);
    if (!node) return null;
    let pos;
    if (clientX === undefined) {
      const box = this.canvasEl.getBoundingClientRect();
      pos = this.toGraph(box.left + box.width / 2 - node.size[0] / 2, box.top + box.height / 3);
    } else {
      pos = this.toGraph(clientX, clientY);
      pos = [pos[0] - 20, pos[1] + LiteGraph.NODE_TITLE_HEIGHT / 2];
    }
    node.pos = [Math.round(pos[0]), Math.round(pos[1])];
    this.graph.add(node);
    this.canvas.selectNode(node);
    this.changed();
    this.drawNow();
    return node;
  }

  /** The editor's graph as workflow JSON (docs/API.md). */
  workflow() {
    return graphToWorkflow(this.graph, this.canvas);
  }

  /**
   * Replaces the graph with `workflow` (undoable): a new graph, so runs queued from the old
   * one no longer draw on it. The view fits the graph when asked (templates) or when the
   * workflow brings no viewport of its own.
   */
  loadWorkflow(workflow, name, { fit = false } = {}) {
    let warnings;
    try {
      warnings = workflowToGraph(workflow, this.graph, this.canvas);
    } catch (err) {
      toast(`Could not load the workflow: ${err.message}`, "error");
      return false;
    }
    this.newGraph();
    for (const warning of warnings.slice(0, 3)) toast(warning, "warn");
    this.workflows.setName(name);
    if (fit || !workflow.ui?.viewport || this.settings.fitOnLoad) this.fitView();
    this.changed();
    this.drawNow();
    return true;
  }

  /** A new identity for the graph on the canvas (see RunState). */
  newGraph() {
    this.graphKey = newGraphKey();
    try {
      sessionStorage.setItem(GRAPH_KEY, this.graphKey);
    } catch {
      // storage disabled: runs still stay on their graph until a reload
    }
    return this.graphKey;
  }

  /**
   * The double-click search: ranked by rankTypes, each node shown once with its category
   * (litegraph would show the name twice, as title and as type).
   */
  searchNodes(helper, text) {
    const types = rankTypes(Object.values(this.nodeInfos ?? {}), text).slice(0, 30);
    queueMicrotask(() => {
      for (const el of helper.querySelectorAll(".lite-search-item")) {
        const type = decodeURIComponent(el.dataset.type);
        const category = Object.assign(document.createElement("span"), {
          className: "litegraph lite-search-item-type", textContent: this.nodeInfos[type]?.category ?? "",
        });
        el.replaceChildren(type, category);
      }
    });
    return types;
  }

  /** Zooms and pans so every node and group is in view, at most at 100%. */
  fitView() {
    const title = LiteGraph.NODE_TITLE_HEIGHT;
    const items = [
      ...this.graph._nodes.map((n) => [n.pos[0], n.pos[1] - title, n.size[0], n.flags?.collapsed ? title : n.size[1] + title]),
      ...(this.graph._groups ?? []).map((g) => g._bounding),
    ];
    const { width, height } = this.canvasEl.getBoundingClientRect();
    if (!items.length || !width || !height) return;
    const x0 = Math.min(...items.map((r) => r[0]));
    const y0 = Math.min(...items.map((r) => r[1]));
    const x1 = Math.max(...items.map((r) => r[0] + r[2]));
    const y1 = Math.max(...items.map((r) => r[1] + r[3]));
    const margin = 24;
    const below = this.settings?.minimap === false ? 0 : 130; // the minimap's corner stays clear
    const room = height - below;
    const scale = Math.max(0.1, Math.min(1, (width - 2 * margin) / (x1 - x0), (room - 2 * margin) / (y1 - y0)));
    this.canvas.ds.scale = scale;
    this.canvas.ds.offset[0] = width / 2 / scale - (x0 + x1) / 2;
    this.canvas.ds.offset[1] = room / 2 / scale - (y0 + y1) / 2;
    this.canvas.setDirty(true, true);
    this.saveSession();
  }

  /** Sets the mode of `node` and the other selected nodes (0 always, 2 mute, 4 bypass). */
  setMode(mode, node) {
    const nodes = new Set(Object.values(this.canvas.selected_nodes ?? {}));
    if (node) nodes.add(node);
    for (const n of nodes) n.mode = mode; // (litegraph's changeMode refuses BYPASS)
    this.changed();
    this.drawNow();
  }

  /** Ctrl+B / Ctrl+M: toggles the mode on the selection (back to "always" when all have it). */
  toggleMode(mode) {
    const nodes = Object.values(this.canvas.selected_nodes ?? {});
    if (!nodes.length) {
      toast("Select the nodes to bypass or mute first.", "warn");
      return;
    }
    this.setMode(nodes.every((n) => n.mode === mode) ? 0 : mode);
  }

  showShortcuts() {
    const table = $("shortcuts-table");
    table.replaceChildren(...SHORTCUTS.map(([keys, what]) => {
      const row = table.insertRow();
      row.insertCell().innerHTML = keys.split(" / ").map((k) => `<kbd>${k}</kbd>`).join(" / ");
      row.insertCell().textContent = what;
      return row;
    }));
    $("shortcuts-dialog").showModal();
  }

  /** Puts back an undo snapshot, keeping the images shown on nodes. */
  restore(state) {
    const images = new Map(this.graph._nodes.map((n) => [n.id, n.images]));
    workflowToGraph(parse(state), this.graph, null);
    for (const node of this.graph._nodes) if (images.get(node.id)?.length) node.images = images.get(node.id);
    this.saveSession();
    this.drawNow();
  }

  /** Renders a frame now: litegraph finds nodes under the pointer by the areas of the last frame. */
  drawNow() {
    this.canvas.draw(true, true);
  }

  /** Call after any edit: records an undo step and the session copy. */
  changed() {
    this.undo?.check();
    this.saveSession();
    this.updateEmptyHint();
  }

  saveSession() {
    clearTimeout(this.sessionTimer);
    this.sessionTimer = setTimeout(() => {
      try {
        localStorage.setItem(SESSION_KEY, stringify(this.workflow()));
      } catch {
        // storage full or disabled: the session copy is a convenience only
      }
    }, 300);
  }

  restoreSession() {
    const text = localStorage.getItem(SESSION_KEY);
    if (text) {
      try {
        workflowToGraph(parse(text), this.graph, this.canvas);
      } catch {
        localStorage.removeItem(SESSION_KEY);
        this.graph.clear();
      }
    }
    this.undo.reset();
    this.updateEmptyHint();
  }

  updateEmptyHint() {
    $("empty-hint").hidden = this.graph._nodes.length > 0;
  }

  /** Run × N: queues the workflow N times, the seed controls applied after each. */
  async run() {
    const count = Math.max(1, Math.min(100, Math.round(Number($("run-count").value)) || 1));
    for (let i = 0; i < count; i++) if (!(await this.runOnce())) break;
  }

  async runOnce() {
    if (!this.graph._nodes.length) {
      toast("Nothing to run: add nodes from the palette first.", "warn");
      return false;
    }
    const workflow = this.workflow();
    clearErrors(this.graph);
    this.runState.requestSent();
    try {
      const { prompt_id: promptId, number } = await this.api.queuePrompt(workflow);
      this.runState.queued(promptId, workflow);
      applyControlsAfterRun(this.graph);
      this.changed();
      toast(`Queued #${number}.`);
      this.queuePanel.refreshSoon();
      return true;
    } catch (err) {
      this.runState.requestFailed(err);
      if (err.errors?.length) {
        const unplaced = showErrors(this.graph, err.errors);
        toast(`Cannot run: ${describeErrors(this.graph, err.errors)}`, "error");
        if (unplaced.length && unplaced.length !== err.errors.length) toast(describeErrors(this.graph, unplaced), "error");
      } else {
        toast(`Cannot run: ${err.message}`, "error");
      }
      return false;
    }
  }

  async interrupt() {
    try {
      await this.api.interrupt(this.runState.running);
    } catch (err) {
      toast(`Interrupt failed: ${err.message}`, "error");
    }
  }

  newWorkflow() {
    this.graph.clear();
    this.newGraph();
    this.workflows.setName(null);
    this.changed();
  }

  bindUi() {
    $("btn-run").addEventListener("click", () => this.run());
    $("btn-interrupt").addEventListener("click", () => this.interrupt());
    $("btn-new").addEventListener("click", () => this.newWorkflow());
    $("btn-save").addEventListener("click", () => this.workflows.save());
    $("btn-import").addEventListener("click", () => $("file-import").click());
    $("btn-export").addEventListener("click", () => this.workflows.export());
    $("btn-undo").addEventListener("click", () => this.undo.undo());
    $("btn-redo").addEventListener("click", () => this.undo.redo());
    $("btn-refresh-nodes").addEventListener("click", () => this.refreshCatalogue());
    $("btn-fit").addEventListener("click", () => this.fitView());
    $("btn-shortcuts").addEventListener("click", () => this.showShortcuts());
    installShortcuts({
      run: () => this.run(),
      undo: () => this.undo.undo(),
      redo: () => this.undo.redo(),
      save: () => this.workflows.save(),
      bypass: () => this.toggleMode(BYPASS),
      mute: () => this.toggleMode(MUTE),
      fit: () => this.fitView(),
      help: () => this.showShortcuts(),
      forwardToCanvas: (e) => this.canvas.processKey(e),
    });
    // Undo snapshots: litegraph changes the graph in place, so the state is compared after
    // each gesture (a timer, as litegraph acts after this listener) and, because timers can
    // lag behind fast input, again synchronously when the next gesture starts.
    // (capture phase: the canvas stops the propagation of the events it handles)
    for (const type of ["pointerup", "keyup"]) window.addEventListener(type, () => setTimeout(() => this.changed(), 0), true);
    for (const type of ["pointerdown", "keydown"]) window.addEventListener(type, () => this.undo.check(), true);
    this.canvasEl.addEventListener("wheel", () => this.saveSession(), { passive: true });
    this.bindFileDrop();
  }

  async refreshCatalogue() {
    try {
      await this.loadCatalogue();
      toast("Node list and model files refreshed.", "ok");
    } catch (err) {
      toast(`Refresh failed: ${err.message}`, "error");
    }
  }

  /** Drop a workflow .json or a Tessera PNG to load it; any image on a LoadImage node uploads it. */
  bindFileDrop() {
    const wrap = $("canvas-wrap");
    const hint = $("drop-hint");
    const hasFiles = (e) => [...(e.dataTransfer?.types ?? [])].includes("Files");
    wrap.addEventListener("dragover", (e) => {
      if (!hasFiles(e)) return;
      e.preventDefault();
      hint.hidden = false;
    });
    wrap.addEventListener("dragleave", () => {
      hint.hidden = true;
    });
    wrap.addEventListener("drop", async (e) => {
      hint.hidden = true;
      const file = e.dataTransfer?.files?.[0];
      if (!file) return;
      e.preventDefault();
      const [x, y] = this.toGraph(e.clientX, e.clientY);
      const target = this.graph.getNodeOnPos(x, y);
      if (target?.uploadTarget && file.type.startsWith("image/")) {
        try {
          await uploadInto(target, file, { api: this.api, changed: () => this.changed() });
        } catch (err) {
          toast(`Upload failed: ${err.message}`, "error");
        }
        return;
      }
      try {
        const workflow = await workflowFromFile(file);
        if (this.loadWorkflow(workflow, null)) toast(`Loaded the workflow from ${file.name}.`, "ok");
      } catch (err) {
        toast(`Could not load ${file.name}: ${err.message}`, "error");
      }
    });
  }
}

const app = new App();
window.tessera = app; // for the console and the browser tests
app.start().catch((err) => {
  toast(`Editor failed to start: ${err.message}`, "error");
  throw err;
});
