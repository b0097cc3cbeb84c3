// The node palette: node types grouped by category, with search; drag one onto the canvas.

const DRAG_THRESHOLD_PX = 4;

/**
 * The node types that match `query`, best first: the exact name, then names that start with
 * it, then names that contain it, then types whose category or description mention it.
 */
export function rankTypes(infos, query) {
  const q = query.trim().toLowerCase();
  const ranked = [];
  for (const info of infos) {
    const name = info.type.toLowerCase();
    let rank;
    if (!q) rank = 3;
    else if (name === q) rank = 0;
    else if (name.startsWith(q)) rank = 1;
    else if (name.includes(q)) rank = 2;
    else if (`${info.category ?? ""} ${info.description ?? ""}`.toLowerCase().includes(q)) rank = 3;
    else continue;
    ranked.push([rank, info.type]);
  }
  return ranked.sort((a, b) => a[0] - b[0] || a[1].localeCompare(b[1])).map(([, type]) => type);
}

/**
 * Fills `list` with the catalogue (type → NodeInfo) and wires `search`.
 * `onDrop(type, clientX, clientY)` adds a node where it was dropped on `dropTarget`;
 * a plain click calls `onDrop(type)` without a position (centre of the view).
 */
export function createPalette({ list, search, dropTarget, onDrop }) {
  let catalogue = {};

  function render() {
    const query = search.value.trim().toLowerCase();
    const groups = new Map();
    for (const info of Object.values(catalogue)) {
      const text = `${info.type} ${info.category} ${info.description ?? ""}`.toLowerCase();
      if (query && !query.split(/\s+/).every((word) => text.includes(word))) continue;
      const category = info.category || "misc";
      if (!groups.has(category)) groups.set(category, []);
      groups.get(category).push(info);
    }
    list.replaceChildren();
    if (!groups.size) {
      const empty = document.createElement("div");
      empty.className = "palette-empty";
      empty.textContent = query ? "No node matches." : "No nodes.";
      list.append(empty);
      return;
    }
    for (const category of [...groups.keys()].sort()) {
      const details = document.createElement("details");
      details.className = "palette-category";
      details.open = true;
      details.dataset.category = category;
      const summary = document.createElement("summary");
      summary.textContent = category;
      details.append(summary);
      for (const info of groups.get(category).sort((a, b) => a.type.localeCompare(b.type))) {
        details.append(item(info));
      }
      list.append(details);
    }
  }

  function item(info) {
    const el = document.createElement("div");
    el.className = "palette-item";
    el.textContent = info.type;
    el.title = info.description || info.type;
    el.dataset.type = info.type;
    el.addEventListener("pointerdown", (e) => startDrag(e, info.type));
    return el;
  }

  function startDrag(down, type) {
    if (down.button !== 0) return;
    down.preventDefault();
    let ghost = null;
    const move = (e) => {
      if (!ghost && Math.hypot(e.clientX - down.clientX, e.clientY - down.clientY) < DRAG_THRESHOLD_PX) return;
      if (!ghost) {
        ghost = document.createElement("div");
        ghost.className = "drag-ghost";
        ghost.textContent = type;
        document.body.append(ghost);
      }
      ghost.style.left = `${e.clientX}px`;
      ghost.style.top = `${e.clientY}px`;
    };
    const up = (e) => {
      window.removeEventListener("pointermove", move, true);
      window.removeEventListener("pointerup", up, true);
      if (!ghost) {
        onDrop(type);
        return;
      }
      ghost.remove();
      const box = dropTarget.getBoundingClientRect();
      const inside = e.clientX >= box.left && e.clientX <= box.right && e.clientY >= box.top && e.clientY <= box.bottom;
      if (inside) onDrop(type, e.clientX, e.clientY);
    };
    // Capture phase: the canvas stops the propagation of the pointer events it handles.
    window.addEventListener("pointermove", move, true);
    window.addEventListener("pointerup", up, true);
  }

  search.addEventListener("input", render);
  search.addEventListener("keydown", (e) => {
    if (e.key === "Enter") {
      const first = list.querySelector(".palette-item");
      if (first) onDrop(first.dataset.type);
    } else if (e.key === "Escape") {
      search.value = "";
      render();
    }
  });

  return {
    setCatalogue(next) {
      catalogue = next;
      render();
    },
  };
}
