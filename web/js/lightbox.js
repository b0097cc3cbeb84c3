// The lightbox: an output image large on a dark backdrop. Small images (64 px model outputs,
// token grids) are scaled up with square pixels; arrow keys step through the gallery it was
// opened from; Escape or a click outside the image closes it.

let box = null;

function build() {
  const el = document.createElement("div");
  el.id = "lightbox";
  el.hidden = true;
  el.innerHTML = `<button class="nav prev" title="Previous (←)">‹</button>
    <figure><img alt=""><figcaption></figcaption></figure>
    <button class="nav next" title="Next (→)">›</button>`;
  document.body.append(el);
  const state = { el, img: el.querySelector("img"), caption: el.querySelector("figcaption"), urls: [], index: 0 };
  el.addEventListener("click", (e) => {
    if (e.target === el) close();
  });
  el.querySelector(".prev").addEventListener("click", () => show(state.index - 1));
  el.querySelector(".next").addEventListener("click", () => show(state.index + 1));
  document.addEventListener("keydown", (e) => {
    if (el.hidden) return;
    if (e.key === "Escape") close();
    else if (e.key === "ArrowLeft") show(state.index - 1);
    else if (e.key === "ArrowRight") show(state.index + 1);
    else return;
    e.preventDefault();
    e.stopPropagation();
  }, true);
  state.img.addEventListener("load", () => fit(state));
  window.addEventListener("resize", () => !el.hidden && fit(state));
  return state;
}

/** Largest size that fits the window; a small image grows by a whole factor, pixelated. */
function fit({ img }) {
  const w = img.naturalWidth;
  const h = img.naturalHeight;
  if (!w || !h) return;
  const room = Math.min((window.innerWidth - 140) / w, (window.innerHeight - 100) / h);
  const scale = room >= 1 ? Math.floor(room) : room;
  img.style.width = `${Math.round(w * scale)}px`;
  img.style.height = `${Math.round(h * scale)}px`;
  img.classList.toggle("pixelated", scale >= 2);
}

function show(index) {
  const n = box.urls.length;
  box.index = ((index % n) + n) % n;
  const { src, title } = box.urls[box.index];
  box.img.src = src;
  box.caption.textContent = `${title} — ${box.index + 1} / ${n}`;
}

function close() {
  box.el.hidden = true;
}

/** Opens the lightbox on `items[index]`; `items` = [{src, title}]. */
export function openLightbox(items, index = 0) {
  box ??= build();
  box.urls = items;
  box.el.hidden = false;
  show(index);
}
