// The settings panel: a few editor preferences, kept in localStorage and applied at once.

import { LiteGraph } from "litegraph";

const KEY = "tessera.settings";
const LINKS = { spline: 2, straight: 0, linear: 1 }; // litegraph's LinkRenderType values

export const DEFAULTS = { minimap: true, links: "spline", snap: false, fitOnLoad: false };

export function loadSettings() {
  try {
    return { ...DEFAULTS, ...JSON.parse(localStorage.getItem(KEY) ?? "{}") };
  } catch {
    return { ...DEFAULTS };
  }
}

/** Applies `settings` to the app's canvas and minimap. */
export function applySettings(app, settings) {
  app.settings = settings;
  app.canvas.links_render_mode = LINKS[settings.links] ?? LINKS.spline;
  LiteGraph.alwaysSnapToGrid = Boolean(settings.snap);
  app.minimap.enabled = Boolean(settings.minimap);
  app.canvas.setDirty(true, true);
}

/** Wires the <dialog>: its fields show the current settings; each change applies and is saved. */
export function installSettings(app, dialog, button) {
  applySettings(app, loadSettings());
  const fields = dialog.querySelectorAll("[name]");
  button.addEventListener("click", () => {
    for (const field of fields) {
      if (field.type === "checkbox") field.checked = Boolean(app.settings[field.name]);
      else field.value = app.settings[field.name];
    }
    dialog.showModal();
  });
  for (const field of fields) {
    field.addEventListener("change", () => {
      const settings = { ...app.settings, [field.name]: field.type === "checkbox" ? field.checked : field.value };
      applySettings(app, settings);
      try {
        localStorage.setItem(KEY, JSON.stringify(settings));
      } catch {
        // storage disabled: the setting lasts for this page only
      }
    });
  }
}
