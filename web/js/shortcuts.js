// Keyboard shortcuts of the editor (litegraph handles Ctrl+C/V/A and Delete on the canvas).

const isTyping = (el) => el && (el.localName === "input" || el.localName === "textarea"
  || el.localName === "select" || el.isContentEditable);

/** What the shortcuts list shows, in order. */
export const SHORTCUTS = [
  ["Ctrl+Enter", "Run (queue the workflow)"],
  ["Ctrl+S", "Save"],
  ["Ctrl+Z / Ctrl+Y", "Undo / redo"],
  ["Ctrl+B", "Bypass the selected nodes (their inputs pass straight through); again to undo"],
  ["Ctrl+M", "Mute the selected nodes (they and what needs them do not run); again to undo"],
  [".", "Fit the whole graph in view"],
  ["Ctrl+C / Ctrl+V", "Copy / paste nodes"],
  ["Ctrl+A", "Select all nodes"],
  ["Delete", "Delete the selected nodes"],
  ["Double-click", "Search for a node to add"],
  ["?", "This list"],
  ["Enter / Escape", "Confirm / cancel a dialog"],
];

/** `actions` = {run, undo, redo, save, bypass, mute, fit, help, forwardToCanvas(event)}. */
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
    } else if (ctrl && key === "b") {
      e.preventDefault();
      actions.bypass();
    } else if (ctrl && key === "m") {
      e.preventDefault();
      actions.mute();
    } else if (!ctrl && !e.altKey && e.key === ".") {
      actions.fit();
    } else if (!ctrl && !e.altKey && e.key === "?") {
      actions.help();
    } else if (e.target === document.body) {
      // The canvas handles Delete, Ctrl+C/V/A itself when focused; do the same when nothing is.
      actions.forwardToCanvas(e);
    }
  });
}
