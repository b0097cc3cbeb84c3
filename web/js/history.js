// The history panel: the latest prompts (GET /api/history) with their output images.

import { openLightbox } from "./lightbox.js";
import { toast } from "./toast.js";

function when(value) {
  if (value === null || value === undefined) return "";
  const date = typeof value === "number" ? new Date(value < 1e12 ? value * 1000 : value) : new Date(value);
  return Number.isNaN(date.getTime()) ? "" : date.toLocaleTimeString();
}

export class HistoryPanel {
  /** `onRestore(workflow)` loads an entry's workflow into the editor. */
  constructor({ api, list, refreshButton, onRestore }) {
    this.api = api;
    this.list = list;
    this.onRestore = onRestore;
    refreshButton.addEventListener("click", () => this.refresh());
  }

  /** Refreshes once after a burst of calls. */
  refreshSoon() {
    clearTimeout(this.timer);
    this.timer = setTimeout(() => this.refresh(), 150);
  }

  async refresh() {
    let items;
    try {
      ({ items } = await this.api.history(20));
    } catch (err) {
      toast(`History: ${err.message}`, "error");
      return;
    }
    this.list.replaceChildren(...items.map((entry) => this.item(entry)));
    if (!items.length) {
      const empty = document.createElement("div");
      empty.className = "palette-empty";
      empty.textContent = "Nothing run yet.";
      this.list.append(empty);
    }
  }

  /** The lightbox over every image in the panel, newest first, starting at `src`. */
  openGallery(src) {
    const items = [...this.list.querySelectorAll(".thumbs img")].map((img) => ({ src: img.src, title: img.title }));
    openLightbox(items, Math.max(0, items.findIndex((item) => item.src === src)));
  }

  item(entry) {
    const el = document.createElement("div");
    el.className = "history-item";
    el.dataset.promptId = entry.prompt_id;
    el.dataset.status = entry.status;
    const meta = document.createElement("div");
    meta.className = "meta";
    const number = document.createElement("span");
    number.textContent = `#${entry.number ?? "?"} ${when(entry.finished ?? entry.created)}`;
    const status = document.createElement("span");
    status.className = `status-${entry.status}`;
    status.textContent = entry.status;
    meta.append(number, status);
    el.append(meta);

    const refs = Object.values(entry.outputs ?? {}).flatMap((o) => o.images ?? []);
    if (refs.length) {
      const thumbs = document.createElement("div");
      thumbs.className = "thumbs";
      for (const ref of refs.slice(0, 8)) {
        const img = document.createElement("img");
        img.src = this.api.viewUrl(ref);
        img.alt = ref.filename;
        img.title = ref.filename;
        img.loading = "lazy";
        // small generated images (tiny models, token grids) stay crisp when enlarged
        img.addEventListener("load", () => img.classList.toggle("pixelated", img.naturalWidth < 160), { once: true });
        img.addEventListener("click", () => this.openGallery(img.src));
        thumbs.append(img);
      }
      el.append(thumbs);
    }
    for (const err of (entry.errors ?? []).slice(0, 2)) {
      const line = document.createElement("div");
      line.className = "err";
      line.textContent = `${err.node_type ?? err.node ?? ""}${err.input ? `.${err.input}` : ""}: ${err.message}`;
      el.append(line);
    }
    if (entry.workflow) {
      const restore = document.createElement("button");
      restore.className = "restore";
      restore.textContent = "Load workflow";
      restore.addEventListener("click", () => this.onRestore(entry.workflow));
      el.append(restore);
    }
    return el;
  }
}
