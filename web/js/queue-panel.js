// The queue panel: the running and pending prompts (GET /api/queue), each cancellable
// (a pending one through DELETE /api/queue/{id}, the running one by interrupting it), and
// "clear" for everything this editor still has pending.

import { toast } from "./toast.js";

export class QueuePanel {
  /** `ours(promptId)` says whether this editor queued a prompt; `onCancelled(id)` forgets it. */
  constructor({ api, list, clearButton, ours, onCancelled }) {
    Object.assign(this, { api, list, ours, onCancelled });
    clearButton.addEventListener("click", () => this.clearPending());
  }

  refreshSoon() {
    clearTimeout(this.timer);
    this.timer = setTimeout(() => this.refresh(), 100);
  }

  async refresh() {
    let queue;
    try {
      queue = await this.api.queue();
    } catch {
      return; // offline: the connection badge says so
    }
    const items = [...queue.running, ...queue.pending];
    this.list.replaceChildren(...items.map((item) => this.item(item)));
    if (!items.length) {
      const empty = document.createElement("div");
      empty.className = "palette-empty";
      empty.textContent = "Queue is empty.";
      this.list.append(empty);
    }
  }

  item(item) {
    const el = document.createElement("div");
    el.className = "queue-item";
    el.dataset.promptId = item.prompt_id;
    el.dataset.status = item.status;
    const label = document.createElement("span");
    label.textContent = `#${item.number} ${item.status}${this.ours(item.prompt_id) ? "" : " (other tab)"}`;
    const cancel = document.createElement("button");
    cancel.className = "small cancel";
    cancel.textContent = "×";
    cancel.title = item.status === "running" ? "Interrupt this prompt" : "Cancel this prompt";
    cancel.addEventListener("click", () => this.cancel(item));
    el.append(label, cancel);
    return el;
  }

  async cancel(item) {
    try {
      if (item.status === "running") await this.api.interrupt(item.prompt_id);
      else {
        await this.api.cancel(item.prompt_id);
        this.onCancelled(item.prompt_id);
      }
    } catch (err) {
      toast(`Could not cancel #${item.number}: ${err.message}`, "error");
    }
    this.refresh();
  }

  async clearPending() {
    try {
      const { cancelled } = await this.api.clearPending();
      for (const id of cancelled) this.onCancelled(id);
      toast(cancelled.length ? `Cancelled ${cancelled.length} pending prompt(s).` : "Nothing pending.", "ok");
    } catch (err) {
      toast(`Could not clear the queue: ${err.message}`, "error");
    }
    this.refresh();
  }
}
