"""Automatic checks of a generated image against the attributes its caption states.

`score(image, attributes)` answers one yes/no per stated attribute (background colour,
object colour, shape, position, relation, word, texture…), so prompt adherence of a
model is measured by rendering nothing: it reads the image the way the synthetic
renderer (`lab/synthetic.py`) wrote it. Colours are matched to the nearest palette
colour; objects are segmented by projecting pixels onto the background→colour line
(which also recovers anti-aliased edges as partial coverage); shapes and words are
matched against the renderer's own templates after normalising for size and place.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import cache

import numpy as np
import torch
from PIL import Image

from tessera.engines.preprocess import gaussian_blur

from .synthetic import COLORS, IMAGE_SIZE, POSITIONS, SHAPES, WORDS, shape_alpha, word_alpha

COLOR_NAMES = tuple(COLORS)
PALETTE = np.array([COLORS[c] for c in COLOR_NAMES], dtype=np.float32)  # [K, 3]
PURE_DISTANCE = 60.0  # a pixel this close to a palette colour counts as that colour
LINE_RESIDUAL = 45.0  # a pixel this far off the background→colour line is something else
THIRD_COLOR_DISTANCE = 40.0  # this close to another palette colour, a pixel is that colour
MIN_PIXELS = 20  # fewer pixels of a colour than this is noise, not an object
_GRID = {v: k for k, v in POSITIONS.items()}
_SHAPE_GRID = 32
_WORD_GRID = (20, 56)


# ---------------------------------------------------------------- image input


def as_rgb_array(image) -> np.ndarray:
    """Any image form used in Tessera → float32 [64, 64, 3] in 0..255.

    Accepts a PIL image, a uint8 [H, W, 3] array, a float [H, W, 3] array or tensor in
    0..1 (the IMAGE socket convention, batch of one allowed) or a float [3, H, W] tensor
    in -1..1 (the training convention). Other sizes are box-resized to 64×64.
    """
    if isinstance(image, Image.Image):
        arr = np.asarray(image.convert("RGB"), dtype=np.float32)
    else:
        if isinstance(image, torch.Tensor):
            image = image.detach().float().cpu().numpy()
        arr = np.asarray(image)
        if arr.ndim == 4 and arr.shape[0] == 1:
            arr = arr[0]
        if arr.ndim != 3:
            raise ValueError(f"expected one image [H, W, 3] or [3, H, W], got shape {arr.shape}")
        if arr.dtype == np.uint8:
            arr = arr.astype(np.float32)
        elif arr.shape[0] == 3 and arr.shape[-1] != 3:
            arr = (arr.transpose(1, 2, 0).astype(np.float32) + 1.0) * 127.5
        else:
            arr = arr.astype(np.float32) * 255.0
    if arr.shape[-1] != 3:
        raise ValueError(f"expected 3 colour channels, got shape {arr.shape}")
    arr = np.clip(arr, 0, 255)
    if arr.shape[:2] != (IMAGE_SIZE, IMAGE_SIZE):
        pil = Image.fromarray((arr + 0.5).astype(np.uint8))
        arr = np.asarray(pil.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BOX), dtype=np.float32)
    return arr


# ---------------------------------------------------------------- colours


def palette_labels(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest palette index [H, W] and the distance to it [H, W]."""
    sq = (img * img).sum(-1, keepdims=True) - 2.0 * img @ PALETTE.T + (PALETTE * PALETTE).sum(-1)
    labels = sq.argmin(-1)
    nearest = np.take_along_axis(sq, labels[..., None], -1)[..., 0]
    return labels, np.sqrt(np.maximum(nearest, 0.0))


def nearest_color(rgb: np.ndarray) -> str:
    """The palette colour closest to one RGB value."""
    return COLOR_NAMES[int(np.linalg.norm(PALETTE - rgb, axis=1).argmin())]


def background_color(img: np.ndarray, labels: np.ndarray | None = None) -> str:
    """The palette colour of most of the 2-pixel frame (objects may touch the frame)."""
    if labels is None:
        labels, _ = palette_labels(img)
    frame = np.concatenate(
        [labels[:2].ravel(), labels[-2:].ravel(), labels[:, :2].ravel(), labels[:, -2:].ravel()]
    )
    return COLOR_NAMES[np.bincount(frame, minlength=len(COLOR_NAMES)).argmax()]


def dominant_color(
    img: np.ndarray,
    exclude: Sequence[str] = (),
    background: str | None = None,
    labels: np.ndarray | None = None,
    dist: np.ndarray | None = None,
) -> str | None:
    """The palette colour (outside `exclude`) that most pixels are solidly painted in.

    With a `background`, a pixel counts for a colour when it lies on the background→colour
    line at ≥ 75% coverage, so the blended edges of thin strokes (blue on red looks purple)
    do not outvote the colour itself. None if no colour has enough pixels.
    """
    best, best_count = None, MIN_PIXELS - 1
    if labels is None or dist is None:
        labels, dist = palette_labels(img)
    if background is None:
        counts = np.bincount(labels[dist < PURE_DISTANCE], minlength=len(COLOR_NAMES))
    else:
        counts = [
            int((color_coverage(img, c, background, labels, dist) > 0.75).sum()) if c != background else 0
            for c in COLOR_NAMES
        ]
    for name, count in zip(COLOR_NAMES, counts):
        if name not in exclude and count > best_count:
            best, best_count = name, count
    return best


def color_coverage(
    img: np.ndarray,
    color: str,
    background: str,
    labels: np.ndarray | None = None,
    dist: np.ndarray | None = None,
) -> np.ndarray:
    """Estimated coverage [H, W] in 0..1 of `color` painted over `background`.

    A pixel that blends the two lies on the line between them; its position along the
    line is the coverage. Pixels far off the line, or clearly a third palette colour
    (orange sits halfway between red and yellow), belong to something else.
    """
    if labels is None or dist is None:
        labels, dist = palette_labels(img)
    bg = np.asarray(COLORS[background], np.float32)
    v = np.asarray(COLORS[color], np.float32) - bg
    d = img - bg
    t = (d @ v) / float(v @ v)
    off = d - t[..., None] * v
    residual = np.sqrt((off * off).sum(-1))
    third = (dist < THIRD_COLOR_DISTANCE) & (labels != COLOR_NAMES.index(color))
    ok = (residual < LINE_RESIDUAL) & (t < 1.5) & ~third
    return np.where(ok, np.clip(t, 0.0, 1.0), 0.0).astype(np.float32)


# ---------------------------------------------------------------- regions


def components(mask: np.ndarray) -> np.ndarray:
    """4-connected component labels of a boolean mask (-1 outside; label = a member's flat index)."""
    h, w = mask.shape
    big = h * w
    lab = np.where(mask, np.arange(big).reshape(h, w), big)
    while True:
        padded = np.pad(lab, 1, constant_values=big)
        nb = np.minimum.reduce(
            [lab, padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]]
        )
        nb = np.where(mask, nb, big)
        flat = np.append(nb.ravel(), big)
        nb = flat[nb]  # pointer jumping: adopt the label of one's label
        if np.array_equal(nb, lab):
            return np.where(mask, lab, -1)
        lab = nb


def largest_component(mask: np.ndarray) -> np.ndarray:
    lab = components(mask)
    if not mask.any():
        return mask
    ids, counts = np.unique(lab[lab >= 0], return_counts=True)
    return lab == ids[counts.argmax()]


def _drop_specks(mask: np.ndarray, min_size: int = 3) -> np.ndarray:
    lab = components(mask)
    ids, counts = np.unique(lab[lab >= 0], return_counts=True)
    return np.isin(lab, ids[counts >= min_size])


def _normalised_crop(alpha: np.ndarray, mask: np.ndarray, size: tuple[int, int]) -> np.ndarray | None:
    """The coverage inside the mask's bounding box, resized to `size` (rows, cols)."""
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return None
    crop = np.where(mask, alpha, 0.0)[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    pil = Image.fromarray(crop.astype(np.float32), mode="F")
    return np.asarray(pil.resize((size[1], size[0]), Image.BILINEAR), dtype=np.float32)


def _soft_iou(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.minimum(a, b).sum() / max(np.maximum(a, b).sum(), 1e-6))


# Generated images are rarely as crisp as the renderer, and blur rounds a square's
# corners towards a circle; matching against blurred templates too keeps them apart.
TEMPLATE_BLURS = (0.0, 0.7, 1.2)


@cache
def _shape_template(shape: str, size: int, blur: float) -> np.ndarray:
    # zero margins twice the kernel radius: room for the blur to spread outward, and the blur's
    # reflecting border then sees only zeros
    margin = 2 * int(np.ceil(3 * blur))
    alpha = gaussian_blur(np.pad(shape_alpha(shape, size), margin), blur)
    return _normalised_crop(alpha, alpha > 0.5, (_SHAPE_GRID, _SHAPE_GRID))


def object_mask(
    img: np.ndarray,
    color: str,
    background: str,
    labels: np.ndarray | None = None,
    dist: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(coverage, mask of the largest blob) of `color` on `background`."""
    alpha = color_coverage(img, color, background, labels, dist)
    return alpha, largest_component(alpha > 0.5)


def classify_shape(alpha: np.ndarray, mask: np.ndarray) -> tuple[str | None, dict[str, float]]:
    """The shape whose template best overlaps the blob once both fill the same box."""
    if mask.sum() < MIN_PIXELS:
        return None, {}
    ys, xs = np.nonzero(mask)
    size = int(min(max(ys.max() - ys.min() + 1, xs.max() - xs.min() + 1), IMAGE_SIZE))
    crop = _normalised_crop(alpha, mask, (_SHAPE_GRID, _SHAPE_GRID))
    scores = {
        s: max(_soft_iou(crop, _shape_template(s, max(size, 4), b)) for b in TEMPLATE_BLURS) for s in SHAPES
    }
    return max(scores, key=scores.get), scores


def centroid(alpha: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """Coverage-weighted (x, y) centre of the blob, in pixels."""
    w = np.where(mask, alpha, 0.0)
    total = w.sum()
    ys, xs = np.mgrid[: w.shape[0], : w.shape[1]]
    return float((w * xs).sum() / total) + 0.5, float((w * ys).sum() / total) + 0.5


def position_of(x: float, y: float) -> str:
    """Named cell of the 3×3 grid that holds the point (x, y)."""
    third = IMAGE_SIZE / 3
    return _GRID[(min(int(x // third), 2), min(int(y // third), 2))]


def relation_of(first: tuple[float, float], second: tuple[float, float]) -> str:
    """Where the first point is relative to the second, along the dominant axis."""
    dx, dy = first[0] - second[0], first[1] - second[1]
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


# ---------------------------------------------------------------- words


@cache
def _word_template(word: str) -> tuple[np.ndarray, float]:
    alpha = word_alpha(word)
    mask = alpha > 0.5
    ys, xs = np.nonzero(mask)
    aspect = (xs.max() - xs.min() + 1) / (ys.max() - ys.min() + 1)
    return _normalised_crop(alpha, mask, _WORD_GRID), float(aspect)


def read_word(
    img: np.ndarray,
    color: str,
    background: str,
    vocabulary: Sequence[str] = WORDS,
    labels: np.ndarray | None = None,
    dist: np.ndarray | None = None,
) -> tuple[str | None, float]:
    """OCR by template matching: the vocabulary word whose rendering best fits the ink of `color`."""
    alpha = color_coverage(img, color, background, labels, dist)
    mask = alpha > 0.5
    if mask.sum() < MIN_PIXELS:
        return None, 0.0
    mask = _drop_specks(mask)
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return None, 0.0
    aspect = (xs.max() - xs.min() + 1) / (ys.max() - ys.min() + 1)
    crop = _normalised_crop(alpha, mask, _WORD_GRID)
    best, best_score = None, -np.inf
    for word in vocabulary:
        template, t_aspect = _word_template(word)
        s = _soft_iou(crop, template) - 0.5 * abs(np.log(aspect / t_aspect))
        if s > best_score:
            best, best_score = word, s
    return best, float(best_score)


# ---------------------------------------------------------------- textures


def classify_texture(img: np.ndarray) -> dict:
    """{'texture', 'orientation', 'colors'} read from the image.

    Averaging each row (or column) keeps horizontal (vertical) stripes and gradients
    but cancels checks, whose rows hold both colours equally. Along the axis that
    varies, a gradient is explained by a straight line and stripes are not. For
    stripes and checks `colors` is the set of the two colours; for a gradient it is
    (start, end) in reading order.
    """
    total = img.var(axis=(0, 1)).sum()
    if total < 100.0:  # one flat colour (a 10-level spread is noise)
        return {"texture": "plain", "orientation": None, "colors": set()}
    across_rows = img.mean(axis=1)  # [64 rows, 3]: varies for horizontal bands
    across_cols = img.mean(axis=0)  # [64 cols, 3]: varies for vertical bands
    var_rows, var_cols = across_rows.var(0).sum(), across_cols.var(0).sum()
    labels, dist = palette_labels(img)
    counts = np.bincount(labels[dist < PURE_DISTANCE], minlength=len(COLOR_NAMES))
    pair = {COLOR_NAMES[i] for i in counts.argsort()[::-1][:2]}
    if max(var_rows, var_cols) < 0.2 * total:
        return {"texture": "checks", "orientation": None, "colors": pair}
    bands = "horizontal" if var_rows >= var_cols else "vertical"
    profile = across_rows if bands == "horizontal" else across_cols
    t = np.linspace(-1.0, 1.0, len(profile), dtype=np.float32)[:, None]
    centred = profile - profile.mean(0)
    slope = (t * centred).sum(0) / (t * t).sum()
    unexplained = ((centred - t * slope) ** 2).sum() / max((centred**2).sum(), 1e-6)
    if unexplained > 0.3:
        return {"texture": "stripes", "orientation": bands, "colors": pair}
    # colour changing down the rows is a top-to-bottom ("vertical") gradient, and vice versa
    orientation = "vertical" if bands == "horizontal" else "horizontal"
    return {
        "texture": "gradient",
        "orientation": orientation,
        "colors": (nearest_color(profile[:3].mean(0)), nearest_color(profile[-3:].mean(0))),
    }


# ---------------------------------------------------------------- scoring


def _score_objects(
    img: np.ndarray, a: dict, bg: str, labels: np.ndarray, dist: np.ndarray
) -> dict[str, bool]:
    out: dict[str, bool] = {}
    if a["kind"] == "shape":
        found = dominant_color(img, (bg,), bg, labels, dist)
        out["color"] = found == a["color"]
        # shape and place are judged on the object actually drawn, whatever its colour
        alpha, mask = object_mask(img, found or a["color"], bg, labels, dist)
        shape, _ = classify_shape(alpha, mask)
        out["shape"] = shape == a["shape"]
        out["position"] = (
            bool(mask.sum() >= MIN_PIXELS) and position_of(*centroid(alpha, mask)) == a["position"]
        )
        return out
    alpha1, mask1 = object_mask(img, a["color"], bg, labels, dist)
    alpha2, mask2 = object_mask(img, a["other_color"], bg, labels, dist)
    present1, present2 = bool(mask1.sum() >= MIN_PIXELS), bool(mask2.sum() >= MIN_PIXELS)
    out["color"], out["other_color"] = present1, present2
    out["shape"] = classify_shape(alpha1, mask1)[0] == a["shape"]
    out["other_shape"] = classify_shape(alpha2, mask2)[0] == a["other_shape"]
    out["relation"] = (
        present1
        and present2
        and relation_of(centroid(alpha1, mask1), centroid(alpha2, mask2)) == a["relation"]
    )
    return out


def score(image, attributes: dict) -> dict[str, bool]:
    """One yes/no per attribute the caption states; keys depend on the scene kind.

    Checks are independent where they can be: a correct circle in the wrong colour fails
    only `color` (shape, position and word are read from the colour actually drawn). In
    a relation scene the colours name the two objects, so a missing colour fails them all.

    shape: background, color, shape, position · relation: background, color, other_color,
    shape, other_shape, relation · word: background, color, word · texture: texture,
    colors, and orientation when the caption names one.
    """
    img = as_rgb_array(image)
    a = attributes
    kind = a["kind"]
    if kind == "texture":
        found = classify_texture(img)
        out = {"texture": found["texture"] == a["texture"]}
        if "orientation" in a:
            out["orientation"] = found["orientation"] == a["orientation"]
        if a["texture"] == "gradient":
            out["colors"] = found["colors"] == (a["color"], a["other_color"])
        else:
            out["colors"] = found["colors"] == {a["color"], a["other_color"]}
        return out
    labels, dist = palette_labels(img)
    bg = background_color(img, labels)
    out = {"background": bg == a["background"]}
    if bg == a.get("color") or bg == a.get("other_color"):
        bg = a["background"]  # judge the objects against the background the caption asked for
    if kind in ("shape", "relation"):
        out.update(_score_objects(img, a, bg, labels, dist))
    elif kind == "word":
        found = dominant_color(img, (bg,), bg, labels, dist)
        out["color"] = found == a["color"]
        out["word"] = read_word(img, found or a["color"], bg, labels=labels, dist=dist)[0] == a["word"]
    else:
        raise ValueError(f"unknown scene kind {kind!r}")
    return out


def score_batch(images, attributes: Sequence[dict]) -> list[dict[str, bool]]:
    """`score` over a batch: an IMAGE tensor [B, H, W, 3] in 0..1, or a sequence of images."""
    if len(images) != len(attributes):
        raise ValueError(f"{len(images)} images but {len(attributes)} attribute dicts")
    return [score(img, a) for img, a in zip(images, attributes)]


def aggregate(results: Iterable[dict[str, bool]]) -> dict[str, float]:
    """Per-attribute pass rate, plus 'all' (images passing every check) and 'n'."""
    totals: dict[str, list[int]] = {}
    n = passed_all = 0
    for r in results:
        n += 1
        passed_all += all(r.values())
        for k, v in r.items():
            t = totals.setdefault(k, [0, 0])
            t[0] += bool(v)
            t[1] += 1
    out = {k: hits / count for k, (hits, count) in sorted(totals.items())}
    out["all"] = passed_all / n if n else 0.0
    out["n"] = float(n)
    return out
