// Workflows: save to / open from the server, templates, import and export of files.

import { parse, stringify } from "./json-big.js";
import { WORKFLOW_VERSION } from "./graph-format.js";
import { toast } from "./toast.js";
import { workflowFromPng } from "./png-workflow.js";
import { comfyPngText, importComfy, isComfyDocument, looseParse } from "./comfy-import.js";

const SAVED = "saved:";
const TEMPLATE = "template:";

/**
 * Asks for a name in the <dialog>; resolves to the name or null. Enter saves (the form's
 * only submit button is Save), Escape and Cancel close it without saving.
 */
function askName(dialog, initial) {
  const input = dialog.querySelector("input[name=name]");
  input.value = initial ?? "";
  dialog.querySelector("[data-cancel]").onclick = () => dialog.close("cancel");
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => {
      resolve(dialog.returnValue === "ok" && input.value.trim() ? input.value.trim() : null);
    }, { once: true });
    dialog.returnValue = "";
    dialog.showModal();
    input.select();
  });
}

/** Reads a dropped or picked file: workflow JSON, or a PNG that carries one. */
export async function workflowFromFile(file) {
  if (file.type === "image/png" || /\.png$/i.test(file.name)) {
    const comfy = await comfyPngText(file); // a PNG ComfyUI saved: converted by the server
    if (comfy) return importComfy(comfy);
    const workflow = await workflowFromPng(file);
    if (!workflow) throw new Error(`${file.name} carries no Tessera workflow`);
    return current(workflow);
  }
  const text = await file.text();
  if (isComfyDocument(looseParse(text))) return importComfy(text); // ComfyUI's API or UI format
  const parsed = parse(text);
  return current(parsed?.nodes ? parsed : parsed?.workflow ?? parsed);
}

/** A workflow of an older version, upgraded by the server's migrations (renamed inputs kept). */
async function current(workflow) {
  const old = typeof workflow?.version === "number" && workflow.version < WORKFLOW_VERSION;
  return old ? importComfy(stringify(workflow)) : workflow;
}

export class Workflows {
  /**
   * `current()` gives the workflow JSON of the editor; `load(workflow, name)` replaces it.
   * Elements: the open <select>, the name label, the name dialog and the import file input.
   */
  constructor({ api, current, load, select, nameLabel, dialog, fileInput }) {
    Object.assign(this, { api, current, load, select, nameLabel, dialog, fileInput });
    this.name = null;
    this.templates = {};
    select.addEventListener("change", () => this.openSelected());
    fileInput.addEventListener("change", () => {
      const file = fileInput.files?.[0];
      fileInput.value = "";
      if (file) this.importFile(file);
    });
  }

  setName(name) {
    this.name = name;
    this.nameLabel.textContent = name ?? "unsaved workflow";
  }

  /** Rebuilds the open menu from the saved workflows and the templates. */
  async refresh() {
    const [saved, templates] = await Promise.all([
      this.api.workflows().catch(() => ({ workflows: [] })),
      this.api.templates().catch(() => ({ templates: {} })),
    ]);
    this.templates = templates.templates ?? {};
    const options = [new Option("Open…", "")];
    const group = (label, prefix, names) => {
      const g = document.createElement("optgroup");
      g.label = label;
      for (const name of names) g.append(new Option(name, prefix + name));
      if (!names.length) g.append(Object.assign(new Option("(none)", ""), { disabled: true }));
      return g;
    };
    this.select.replaceChildren(
      ...options,
      group("Saved workflows", SAVED, [...(saved.workflows ?? [])].sort()),
      group("Templates", TEMPLATE, Object.keys(this.templates).sort()),
    );
  }

  async openSelected() {
    const value = this.select.value;
    this.select.value = "";
    if (value.startsWith(SAVED)) await this.open(value.slice(SAVED.length));
    else if (value.startsWith(TEMPLATE)) {
      const name = value.slice(TEMPLATE.length);
      const template = this.templates[name];
      if (template) {
        this.load(structuredClone(template), null, { fit: true });
        toast(`Template "${name}" loaded.`, "ok");
      }
    }
  }

  /** Opens the saved workflow `name` from the server. */
  async open(name) {
    try {
      const workflow = await this.api.workflow(name);
      this.load(workflow, name);
      toast(`Opened "${name}".`, "ok");
    } catch (err) {
      toast(`Could not open "${name}": ${err.message}`, "error");
    }
  }

  /** Saves under the current name, asking for one first when there is none (or `askAlways`). */
  async save(askAlways = false) {
    let name = this.name;
    if (!name || askAlways) name = await askName(this.dialog, name);
    if (!name) return false;
    try {
      await this.api.saveWorkflow(name, this.current());
    } catch (err) {
      toast(`Could not save "${name}": ${err.message}`, "error");
      return false;
    }
    this.setName(name);
    toast(`Saved "${name}".`, "ok");
    await this.refresh();
    return true;
  }

  async importFile(file) {
    try {
      this.load(await workflowFromFile(file), null);
      toast(`Imported ${file.name}.`, "ok");
    } catch (err) {
      toast(`Could not import ${file.name}: ${err.message}`, "error");
    }
  }

  export() {
    const blob = new Blob([stringify(this.current(), null, 2)], { type: "application/json" });
    const a = document.createElement("a");
    a.href = URL.createObjectURL(blob);
    a.download = `${this.name ?? "workflow"}.json`;
    a.click();
    setTimeout(() => URL.revokeObjectURL(a.href), 1000);
  }
}
