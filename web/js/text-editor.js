// A textarea laid over a canvas widget for editing multi-line text (prompts).

let current = null;

/** Canvas-space rectangle of a widget → client-space rectangle. */
function widgetRect(canvas, node, widget, height) {
  const margin = 15;
  const { offset, scale } = canvas.ds;
  const box = canvas.canvas.getBoundingClientRect();
  const x = (node.pos[0] + margin + offset[0]) * scale + box.left;
  const y = (node.pos[1] + widget.y + offset[1]) * scale + box.top;
  return { x, y, width: (node.size[0] - margin * 2) * scale, height: height * scale, scale };
}

/** Opens the editor over `widget`; `commit(text)` runs when it closes (blur, Escape, Ctrl+Enter). */
export function openTextEditor(canvas, node, widget, height, commit) {
  closeTextEditor();
  const rect = widgetRect(canvas, node, widget, height);
  const area = document.createElement("textarea");
  area.className = "text-editor";
  area.value = widget.value ?? "";
  area.spellcheck = false;
  area.setAttribute("aria-label", widget.name);
  Object.assign(area.style, {
    left: `${rect.x}px`,
    top: `${rect.y}px`,
    width: `${Math.max(rect.width, 160)}px`,
    height: `${Math.max(rect.height, 60)}px`,
    fontSize: `${Math.max(11, 13 * rect.scale)}px`,
  });
  const finish = () => {
    if (current !== area) return;
    current = null;
    area.remove();
    commit(area.value);
  };
  area.addEventListener("blur", finish);
  area.addEventListener("keydown", (e) => {
    e.stopPropagation(); // keep editor shortcuts (Delete, Ctrl+Z) inside the textarea
    if (e.key === "Escape" || (e.key === "Enter" && (e.ctrlKey || e.metaKey))) {
      e.preventDefault();
      finish();
    }
  });
  document.body.append(area);
  current = area;
  setTimeout(() => area.focus(), 0);
  return area;
}

export function closeTextEditor() {
  current?.blur();
}

export function isEditingText() {
  return current !== null;
}
