"""Control-image preprocessors, in numpy: Canny edges and a scribble (threshold) map.

Both produce what edge/scribble ControlNets were trained on: white lines on black. They work on
IMAGE values ([B, H, W, 3] in 0..1) one image at a time and return the same shape.
"""

from __future__ import annotations

from functools import cache

import numpy as np
import torch


def luma(rgb: np.ndarray) -> np.ndarray:
    """[H, W, 3] 0..1 → [H, W] brightness (Rec. 601 weights)."""
    return (rgb[..., :3] @ np.array([0.299, 0.587, 0.114], dtype=np.float32)).astype(np.float32)


def gaussian_blur(a: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of a 2-D array; edges reflect, so borders do not darken."""
    if sigma <= 0:
        return a.astype(np.float32)
    r = max(1, int(np.ceil(3 * sigma)))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k = (k / k.sum()).astype(np.float32)
    h, w = a.shape
    p = np.pad(a.astype(np.float32), ((r, r), (0, 0)), mode="reflect" if h > r else "edge")
    a = sum(k[i] * p[i : i + h] for i in range(2 * r + 1))
    p = np.pad(a, ((0, 0), (r, r)), mode="reflect" if w > r else "edge")
    return sum(k[i] * p[:, i : i + w] for i in range(2 * r + 1)).astype(np.float32)


def sobel(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(d/dx, d/dy) by 3×3 Sobel, scaled by 1/4 so a 0→1 step between pixels reads about 1."""
    p = np.pad(a, 1, mode="edge")
    h, w = a.shape

    def at(dy: int, dx: int) -> np.ndarray:
        return p[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]

    gx = (at(-1, 1) + 2 * at(0, 1) + at(1, 1) - at(-1, -1) - 2 * at(0, -1) - at(1, -1)) / 4
    gy = (at(1, -1) + 2 * at(1, 0) + at(1, 1) - at(-1, -1) - 2 * at(-1, 0) - at(-1, 1)) / 4
    return gx, gy


def non_max_suppression(mag: np.ndarray, gx: np.ndarray, gy: np.ndarray) -> np.ndarray:
    """Keep a pixel only where its gradient magnitude peaks across the edge (4 directions)."""
    angle = (np.degrees(np.arctan2(gy, gx)) + 180.0) % 180.0
    p = np.pad(mag, 1)
    h, w = mag.shape

    def at(dy: int, dx: int) -> np.ndarray:
        return p[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]

    # (neighbour offsets across the edge) for gradients near 0°, 45°, 90°, 135° (y points down)
    sectors = [((0, 1), (0, -1)), ((1, 1), (-1, -1)), ((1, 0), (-1, 0)), ((1, -1), (-1, 1))]
    sector = (((angle + 22.5) // 45).astype(np.int64)) % 4
    keep = np.zeros_like(mag, dtype=bool)
    for s, (a, b) in enumerate(sectors):
        peak = (mag > at(*a)) & (mag >= at(*b))  # strict on one side: a two-pixel plateau keeps one
        keep |= (sector == s) & peak
    return np.where(keep, mag, 0.0)


def component_labels(mask: np.ndarray) -> np.ndarray:
    """One label per 8-connected component of `mask` [H, W] (its smallest flat index); H·W outside."""
    h, w = mask.shape
    big = h * w
    lab = np.where(mask, np.arange(big).reshape(h, w), big)
    while True:  # every pixel takes the smallest index in its component (pointer jumping)
        p = np.pad(lab, 1, constant_values=big)
        nb = np.minimum.reduce([p[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)])
        nb = np.where(mask, nb, big)
        nb = np.append(nb.ravel(), big)[nb]
        if np.array_equal(nb, lab):
            return lab
        lab = nb


def hysteresis(weak: np.ndarray, strong: np.ndarray) -> np.ndarray:
    """Weak pixels 8-connected (through weak pixels) to a strong one; strong ⊆ weak."""
    lab = component_labels(weak)
    return weak & np.isin(lab, np.unique(lab[strong & weak]))


@cache
def _step_response(sigma: float) -> float:
    """Gradient magnitude that a sharp 0→1 step reads after the blur (the thresholds' unit)."""
    step = np.zeros((3, 8 * max(1, int(np.ceil(3 * sigma)))), np.float32)
    step[:, step.shape[1] // 2 :] = 1.0
    return float(sobel(gaussian_blur(step, sigma))[0].max())


def canny(image: np.ndarray, low: float = 0.1, high: float = 0.2, sigma: float = 1.4) -> np.ndarray:
    """Canny edges of a [H, W] or [H, W, C] 0..1 image: Gaussian blur, Sobel, non-max suppression, hysteresis.

    `low` and `high` are shares of a sharp black-to-white step, whatever the blur: pixels above
    `high` start edges, pixels above `low` continue them. A colour image takes, pixel by pixel,
    the channel whose gradient is strongest (as OpenCV's Canny does), so a red/blue border of
    nearly equal brightness is still an edge.
    """
    planes = image[..., None] if image.ndim == 2 else image
    grads = [sobel(gaussian_blur(planes[..., c], sigma)) for c in range(planes.shape[-1])]
    gx, gy = (np.stack(g) for g in zip(*grads))
    mags = np.hypot(gx, gy)
    best = mags.argmax(0)[None]
    mag, gx, gy = (np.take_along_axis(a, best, 0)[0] for a in (mags, gx, gy))
    thin = non_max_suppression(mag / _step_response(sigma), gx, gy)
    return hysteresis(thin >= low, thin >= max(high, low))


def scribble(gray: np.ndarray, threshold: float = 0.5, invert: bool = True, thickness: int = 0) -> np.ndarray:
    """Binary line map: pixels darker than `threshold` (lighter if not invert), grown by `thickness` px."""
    lines = gray < threshold if invert else gray >= threshold
    for _ in range(max(0, thickness)):
        p = np.pad(lines, 1)
        h, w = lines.shape
        lines = np.logical_or.reduce([p[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)])
    return lines


def _per_image(image: torch.Tensor, fn) -> torch.Tensor:
    """Apply `fn(rgb [H, W, 3]) -> bool [H, W]` to each image of an IMAGE, as white-on-black RGB."""
    out = []
    for rgb in image.detach().float().cpu().numpy():
        out.append(np.repeat(fn(rgb[..., :3])[..., None], 3, axis=-1).astype(np.float32))
    return torch.from_numpy(np.stack(out))


def canny_image(image: torch.Tensor, low: float = 0.1, high: float = 0.2, sigma: float = 1.4) -> torch.Tensor:
    """Canny edges of every image of an IMAGE [B, H, W, 3] (colour-aware), white on black."""
    return _per_image(image, lambda rgb: canny(rgb, low, high, sigma))


def scribble_image(
    image: torch.Tensor, threshold: float = 0.5, invert: bool = True, thickness: int = 0
) -> torch.Tensor:
    """The scribble map of every image of an IMAGE [B, H, W, 3], white lines on black."""
    return _per_image(image, lambda rgb: scribble(luma(rgb), threshold, invert, thickness))
