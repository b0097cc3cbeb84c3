// Keyboard shortcuts of the editor (litegraph handles Ctrl+C/V/A and Delete on the canvas).

const isTyping = (el) => el && (el.localName === "input" || el.localName === "textarea"
  || el.localName === "select" || el.isContentEditable);

/** `actions` = {run, undo, redo, save, forwardToCanvas(event)}. */
export function installShortcuts(actions) {
  document.addEventListener("keydown", (e) => {
    const ctrl = e.ctrlKey || e.metaKey;
    const key = e.key.toLowerCase();
    if (ctrl && key === "enter") {
      e.preventDefault();
      actions.run();
      return;
    }
    if (ctrl && key === "s") {
      e.preventDefault();
      actions.save();
      return;
    }
    if (isTyping(e.target) || document.querySelector("dialog[open]")) return;
    if (ctrl && key === "z" && !e.shiftKey) {
      e.preventDefault();
      actions.undo();
    } else if (ctrl && (key === "y" || (key === "z" && e.shiftKey))) {
      e.preventDefault();
      actions.redo();
    } else if (e.target === document.body) {
      // The canvas handles Delete, Ctrl+C/V/A itself when focused; do the same when nothing is.
      actions.forwardToCanvas(e);
    }
  });
}
