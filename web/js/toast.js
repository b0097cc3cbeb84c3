// Short messages in the lower right corner.

const DURATION_MS = { info: 3500, ok: 3000, warn: 6000, error: 8000 };

/** Shows `message`; kind is "info", "ok", "warn" or "error". Returns the element. */
export function toast(message, kind = "info") {
  const box = document.getElementById("toasts");
  const el = document.createElement("div");
  el.className = `toast ${kind}`;
  el.setAttribute("role", kind === "error" ? "alert" : "status");
  el.textContent = message;
  box.append(el);
  while (box.children.length > 5) box.firstElementChild.remove();
  setTimeout(() => el.remove(), DURATION_MS[kind] ?? 4000);
  return el;
}
