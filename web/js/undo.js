// Undo/redo by snapshots: after each user gesture the workflow JSON is compared with the
// last snapshot and pushed when it differs.

const LIMIT = 100;

export class UndoHistory {
  /** `take()` returns the current state as a string; `restore(state)` puts one back. */
  constructor(take, restore) {
    this.take = take;
    this.restore = restore;
    this.undoStack = [];
    this.redoStack = [];
    this.current = take();
    this.restoring = false;
  }

  /** Records the state if it changed since the last call. */
  check() {
    if (this.restoring) return;
    const state = this.take();
    if (state === this.current) return;
    this.undoStack.push(this.current);
    if (this.undoStack.length > LIMIT) this.undoStack.shift();
    this.redoStack = [];
    this.current = state;
  }

  /** Forgets the history (after loading a workflow, the load itself stays undoable). */
  reset() {
    this.current = this.take();
  }

  undo() {
    this.check();
    if (!this.undoStack.length) return false;
    this.redoStack.push(this.current);
    this.apply(this.undoStack.pop());
    return true;
  }

  redo() {
    if (!this.redoStack.length) return false;
    this.undoStack.push(this.current);
    this.apply(this.redoStack.pop());
    return true;
  }

  apply(state) {
    this.restoring = true;
    try {
      this.restore(state);
    } finally {
      this.restoring = false;
    }
    this.current = this.take();
  }

  get canUndo() {
    return this.undoStack.length > 0 || this.take() !== this.current;
  }

  get canRedo() {
    return this.redoStack.length > 0;
  }
}
