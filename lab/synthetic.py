"""Synthetic captioned scenes for training and testing the built-in models.

Every scene is described by a flat attribute dict; the caption and the 64×64 image are
both derived from it, so a scorer (`lab/scorers.py`) can check a generated image
against the same dict. Everything is a pure function of a seed, so any sample of any
batch can be regenerated, and a hash of the attribute combination decides once and for
all whether it belongs to the training or the held-out split.

Four kinds of scene:
- ``shape``: one coloured shape at a named position on a plain background;
- ``relation``: two shapes in a spatial relation (multi-clause adherence);
- ``word``: a short word written in a colour (spelling);
- ``texture``: stripes, checks or a smooth gradient between two colours.

Images are composited in numpy from cached anti-aliased alpha masks, which keeps
generation in the tens of thousands of images per second on one CPU core.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cache, lru_cache

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

IMAGE_SIZE = 64

# Chosen far apart in RGB so a nearest-palette-colour lookup stays unambiguous.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (250, 130, 20),
    "yellow": (245, 225, 40),
    "green": (40, 165, 65),
    "blue": (35, 85, 220),
    "purple": (140, 60, 190),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "star", "cross")
# Named positions form a 3×3 grid; the value is (column, row).
POSITIONS: dict[str, tuple[int, int]] = {
    "top left": (0, 0),
    "top": (1, 0),
    "top right": (2, 0),
    "left": (0, 1),
    "center": (1, 1),
    "right": (2, 1),
    "bottom left": (0, 2),
    "bottom": (1, 2),
    "bottom right": (2, 2),
}
RELATIONS = ("left of", "right of", "above", "below")
WORDS = (
    "hi", "go", "up", "ok", "no", "yes", "cat", "dog", "sun", "sky",
    "box", "fox", "owl", "bee", "art", "map", "cup", "key", "pen", "zoo",
    "tree", "fish", "bird", "moon", "love", "cake", "book", "home", "rain", "snow",
    "wind", "fire", "leaf", "frog", "hello", "world", "pixel", "tiger", "apple", "house",
    "music", "light", "dream", "smile", "zebra",
)  # fmt: skip
TEXTURES = ("stripes", "checks", "gradient")
ORIENTATIONS = ("horizontal", "vertical")
KINDS = ("shape", "relation", "word", "texture")
SPLITS = ("train", "heldout")
HELDOUT_PERCENT = 10

_POSITION_PHRASE = {
    "top left": "at the top left",
    "top": "at the top",
    "top right": "at the top right",
    "left": "on the left",
    "center": "in the center",
    "right": "on the right",
    "bottom left": "at the bottom left",
    "bottom": "at the bottom",
    "bottom right": "at the bottom right",
}
_RELATION_PHRASE = {
    "left of": "to the left of",
    "right of": "to the right of",
    "above": "above",
    "below": "below",
}
WORD_FONT_SIZE = 18


@dataclass(frozen=True)
class Sample:
    image: np.ndarray  # uint8 [64, 64, 3]
    caption: str
    attributes: dict

    def pil(self) -> Image.Image:
        return Image.fromarray(self.image)


@dataclass(frozen=True)
class Batch:
    images: torch.Tensor  # float32 [B, 3, 64, 64] in [-1, 1]
    captions: list[str]
    attributes: list[dict]


# ---------------------------------------------------------------- attributes and split


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def split_of(attributes: dict) -> str:
    """'heldout' for a fixed ~10% of attribute combinations, else 'train' (stable across runs)."""
    key = "|".join(f"{k}={attributes[k]}" for k in sorted(attributes))
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return "heldout" if int.from_bytes(digest, "little") % 100 < HELDOUT_PERCENT else "train"


def _other(rng: random.Random, options: Sequence[str], *exclude: str) -> str:
    return rng.choice([o for o in options if o not in exclude])


def random_attributes(rng: random.Random, kind: str) -> dict:
    """Draw one scene description of `kind`, whatever its split."""
    names = list(COLORS)
    if kind == "shape":
        color = rng.choice(names)
        return {
            "kind": kind,
            "shape": rng.choice(SHAPES),
            "color": color,
            "position": rng.choice(list(POSITIONS)),
            "background": _other(rng, names, color),
        }
    if kind == "relation":
        color = rng.choice(names)
        other_color = _other(rng, names, color)
        return {
            "kind": kind,
            "shape": rng.choice(SHAPES),
            "color": color,
            "relation": rng.choice(RELATIONS),
            "other_shape": rng.choice(SHAPES),
            "other_color": other_color,
            "background": _other(rng, names, color, other_color),
        }
    if kind == "word":
        color = rng.choice(names)
        return {
            "kind": kind,
            "word": rng.choice(WORDS),
            "color": color,
            "background": _other(rng, names, color),
        }
    if kind == "texture":
        texture = rng.choice(TEXTURES)
        color = rng.choice(names)
        attrs = {"kind": kind, "texture": texture, "color": color, "other_color": _other(rng, names, color)}
        if texture != "checks":
            attrs["orientation"] = rng.choice(ORIENTATIONS)
        return attrs
    raise ValueError(f"unknown scene kind {kind!r}; expected one of {KINDS}")


def sample_attributes(rng: random.Random, kind: str, split: str = "train") -> dict:
    """Draw a scene description of `kind` whose combination belongs to `split`."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    while True:
        attrs = random_attributes(rng, kind)
        if split_of(attrs) == split:
            return attrs


# ---------------------------------------------------------------- captions


def caption_templates(attributes: dict) -> list[str]:
    """Every phrasing of one scene; the first is the canonical caption."""
    a = attributes
    kind = a["kind"]
    if kind == "shape":
        obj, where, bg = f"{a['color']} {a['shape']}", _POSITION_PHRASE[a["position"]], a["background"]
        return [f"{_a(obj)} {where} on {_a(bg)} background", f"{_a(obj)} {where}, {bg} background"]
    if kind == "relation":
        obj, other = f"{a['color']} {a['shape']}", f"{a['other_color']} {a['other_shape']}"
        rel, bg = _RELATION_PHRASE[a["relation"]], a["background"]
        return [
            f"{_a(obj)} {rel} {_a(other)} on {_a(bg)} background",
            f"{_a(obj)} {rel} {_a(other)}, {bg} background",
        ]
    if kind == "word":
        w, c, bg = a["word"], a["color"], a["background"]
        return [f'the word "{w}" in {c} on {_a(bg)} background', f'"{w}" written in {c} on {bg}']
    if kind == "texture":
        c1, c2 = a["color"], a["other_color"]
        if a["texture"] == "stripes":
            o = a["orientation"]
            return [f"{c1} and {c2} {o} stripes", f"{o} stripes of {c1} and {c2}"]
        if a["texture"] == "checks":
            return [f"{_a(c1)} and {c2} checkerboard", f"{c1} and {c2} checks"]
        if a["orientation"] == "horizontal":
            return [
                f"a smooth gradient from {c1} on the left to {c2} on the right",
                f"{c1} to {c2} gradient, left to right",
            ]
        return [
            f"a smooth gradient from {c1} at the top to {c2} at the bottom",
            f"{c1} to {c2} gradient, top to bottom",
        ]
    raise ValueError(f"unknown scene kind {kind!r}")


def caption(attributes: dict, variant: int = 0) -> str:
    """The caption of a scene; `variant` picks a paraphrase (0 = canonical)."""
    templates = caption_templates(attributes)
    return templates[variant % len(templates)]


# ---------------------------------------------------------------- rendering


def _shape_polygon(shape: str, n: float) -> list[tuple[float, float]] | None:
    """Outline of `shape` filling an n×n box (None for the circle, drawn as an ellipse)."""
    if shape == "square":
        return [(0, 0), (n, 0), (n, n), (0, n)]
    if shape == "triangle":
        return [(n / 2, 0), (n, n), (0, n)]
    if shape == "cross":
        lo, hi = n * 0.32, n * 0.68
        return [(lo, 0), (hi, 0), (hi, lo), (n, lo), (n, hi), (hi, hi), (hi, n), (lo, n),
                (lo, hi), (0, hi), (0, lo), (lo, lo)]  # fmt: skip
    if shape == "star":
        pts = []
        for k in range(10):
            r = 1.0 if k % 2 == 0 else 0.48
            ang = -np.pi / 2 + k * np.pi / 5
            pts.append((r * np.cos(ang), r * np.sin(ang)))
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        x0, y0, w, h = min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)
        return [((x - x0) / w * n, (y - y0) / h * n) for x, y in pts]
    return None


@cache
def shape_alpha(shape: str, size: int) -> np.ndarray:
    """Anti-aliased coverage [size, size] in 0..1 of `shape` filling its box (4× supersampled)."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    n = size * 4
    img = Image.new("L", (n, n), 0)
    draw = ImageDraw.Draw(img)
    poly = _shape_polygon(shape, n)
    if poly is None:
        draw.ellipse((0, 0, n - 1, n - 1), fill=255)
    else:
        draw.polygon(poly, fill=255)
    small = img.resize((size, size), Image.BOX)
    alpha = np.asarray(small, dtype=np.float32) / 255.0
    alpha.setflags(write=False)
    return alpha


@lru_cache(maxsize=1)
def word_font() -> ImageFont.FreeTypeFont:
    """Pillow's bundled scalable font, so renders match on every machine without system fonts."""
    return ImageFont.load_default(size=WORD_FONT_SIZE)


@cache
def word_alpha(word: str) -> np.ndarray:
    """Coverage of `word` in the word font (stroked once for weight), cropped to its ink."""
    font = word_font()
    box = ImageDraw.Draw(Image.new("L", (1, 1))).textbbox((0, 0), word, font=font, stroke_width=1)
    w, h = box[2] - box[0] + 2, box[3] - box[1] + 2
    img = Image.new("L", (w, h), 0)
    ImageDraw.Draw(img).text(
        (1 - box[0], 1 - box[1]), word, fill=255, font=font, stroke_width=1, stroke_fill=255
    )
    alpha = np.asarray(img, dtype=np.float32) / 255.0
    ys, xs = np.nonzero(alpha > 0)
    alpha = np.ascontiguousarray(alpha[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1])
    alpha.setflags(write=False)
    return alpha


def _rgb(name: str) -> np.ndarray:
    return np.asarray(COLORS[name], dtype=np.float32)


def _paste(canvas: np.ndarray, alpha: np.ndarray, color: np.ndarray, x0: int, y0: int) -> None:
    """Blend `color` into `canvas` with coverage `alpha` whose top-left corner is (x0, y0)."""
    h, w = alpha.shape
    H, W = canvas.shape[:2]
    cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x0 + w, W), min(y0 + h, H)
    if cx0 >= cx1 or cy0 >= cy1:
        return
    a = alpha[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0, None]
    region = canvas[cy0:cy1, cx0:cx1]
    region += a * (color - region)


def _cell_center(index: int) -> float:
    return (index + 0.5) * IMAGE_SIZE / 3


def _shape_canvas(shape: str, color: str, background: str, size: int, cx: float, cy: float) -> np.ndarray:
    """One `size` px shape centred near (cx, cy) on a plain background (float canvas)."""
    canvas = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), np.float32)
    canvas[:] = _rgb(background)
    # Keep a one-pixel margin: a shape cut by the frame would no longer be that shape.
    x0 = min(max(round(cx - size / 2), 1), IMAGE_SIZE - 1 - size)
    y0 = min(max(round(cy - size / 2), 1), IMAGE_SIZE - 1 - size)
    _paste(canvas, shape_alpha(shape, size), _rgb(color), x0, y0)
    return canvas


def render_shape(shape: str, color: str, background: str, size: int, cx: float, cy: float) -> np.ndarray:
    """One shape of any size as uint8 [64, 64, 3] (the adapters' new concepts draw with it)."""
    return np.clip(_shape_canvas(shape, color, background, size, cx, cy) + 0.5, 0, 255).astype(np.uint8)


def _render_shape(a: dict, rng: random.Random) -> np.ndarray:
    size = rng.randint(17, 22)
    col, row = POSITIONS[a["position"]]
    cx, cy = _cell_center(col) + rng.uniform(-3, 3), _cell_center(row) + rng.uniform(-3, 3)
    return _shape_canvas(a["shape"], a["color"], a["background"], size, cx, cy)


def _render_relation(a: dict, rng: random.Random) -> np.ndarray:
    canvas = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), np.float32)
    canvas[:] = _rgb(a["background"])
    s1, s2 = rng.randint(15, 19), rng.randint(15, 19)
    # Along the relation's axis the two centres are 24–36 px apart (within 12..52), across
    # it at most 16, so the relation is unambiguous and the shapes never overlap.
    gap = rng.uniform(24, 36)
    along = rng.uniform(32 - (40 - gap) / 2, 32 + (40 - gap) / 2)
    first, second = along - gap / 2, along + gap / 2
    across1, across2 = 32 + rng.uniform(-8, 8), 32 + rng.uniform(-8, 8)
    rel = a["relation"]
    if rel in ("right of", "below"):
        first, second = second, first
    if rel in ("left of", "right of"):
        (x1, y1), (x2, y2) = (first, across1), (second, across2)
    else:
        (x1, y1), (x2, y2) = (across1, first), (across2, second)
    _paste(canvas, shape_alpha(a["shape"], s1), _rgb(a["color"]), round(x1 - s1 / 2), round(y1 - s1 / 2))
    _paste(
        canvas,
        shape_alpha(a["other_shape"], s2),
        _rgb(a["other_color"]),
        round(x2 - s2 / 2),
        round(y2 - s2 / 2),
    )
    return canvas


def _render_word(a: dict, rng: random.Random) -> np.ndarray:
    canvas = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), np.float32)
    canvas[:] = _rgb(a["background"])
    alpha = word_alpha(a["word"])
    h, w = alpha.shape
    slack_x = max(0, min(4, (IMAGE_SIZE - 4 - w) // 2))
    x0 = (IMAGE_SIZE - w) // 2 + rng.randint(-slack_x, slack_x)
    y0 = (IMAGE_SIZE - h) // 2 + rng.randint(-6, 6)
    _paste(canvas, alpha, _rgb(a["color"]), x0, y0)
    return canvas


def _render_texture(a: dict, rng: random.Random) -> np.ndarray:
    c1, c2 = _rgb(a["color"]), _rgb(a["other_color"])
    idx = np.arange(IMAGE_SIZE)
    if a["texture"] == "gradient":
        t = np.linspace(0.0, 1.0, IMAGE_SIZE, dtype=np.float32)
        line = c1 + t[:, None] * (c2 - c1)  # [64, 3]
        if a["orientation"] == "horizontal":
            return np.broadcast_to(line[None, :, :], (IMAGE_SIZE, IMAGE_SIZE, 3)).copy()
        return np.broadcast_to(line[:, None, :], (IMAGE_SIZE, IMAGE_SIZE, 3)).copy()
    if a["texture"] == "stripes":
        width = rng.choice((4, 6, 8))
        band = ((idx + rng.randrange(2 * width)) // width) % 2
        pick = band[:, None] if a["orientation"] == "horizontal" else band[None, :]
        pick = np.broadcast_to(pick, (IMAGE_SIZE, IMAGE_SIZE))
    else:
        cell = rng.choice((8, 16))
        rows = (idx + rng.randrange(cell)) // cell
        cols = (idx + rng.randrange(cell)) // cell
        pick = (rows[:, None] + cols[None, :]) % 2
    return np.where(pick[:, :, None] == 0, c1, c2).astype(np.float32)


_RENDERERS = {
    "shape": _render_shape,
    "relation": _render_relation,
    "word": _render_word,
    "texture": _render_texture,
}


def render(attributes: dict, seed: int | random.Random = 0) -> np.ndarray:
    """Draw the scene as uint8 [64, 64, 3]; `seed` only moves things within what the caption says."""
    rng = seed if isinstance(seed, random.Random) else random.Random(seed)
    canvas = _RENDERERS[attributes["kind"]](attributes, rng)
    return np.clip(canvas + 0.5, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- samples and batches


def _rng(seed: int, index: int) -> random.Random:
    return random.Random(seed * 1_000_003 + index)


def make_sample(
    seed: int, index: int = 0, split: str = "train", kinds: Sequence[str] = KINDS, paraphrase: bool = True
) -> Sample:
    """Sample `index` of the stream named by `seed`: the same arguments always give the same sample."""
    rng = _rng(seed, index)
    attrs = sample_attributes(rng, rng.choice(tuple(kinds)), split)
    text = caption(attrs, rng.randrange(len(caption_templates(attrs))) if paraphrase else 0)
    return Sample(render(attrs, rng), text, attrs)


def to_training_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [B, H, W, 3] → float32 [B, 3, H, W] in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


def make_batch(
    batch_size: int,
    seed: int,
    step: int = 0,
    split: str = "train",
    kinds: Sequence[str] = KINDS,
    paraphrase: bool = True,
) -> Batch:
    """Batch `step` of the stream named by `seed` (samples step*B … step*B+B-1)."""
    samples = [make_sample(seed, step * batch_size + i, split, kinds, paraphrase) for i in range(batch_size)]
    images = np.stack([s.image for s in samples])
    return Batch(to_training_tensor(images), [s.caption for s in samples], [s.attributes for s in samples])


def batches(
    batch_size: int,
    seed: int = 0,
    split: str = "train",
    kinds: Sequence[str] = KINDS,
    paraphrase: bool = True,
    start_step: int = 0,
) -> Iterator[Batch]:
    """Endless training batches; resuming at `start_step` continues the same stream."""
    step = start_step
    while True:
        yield make_batch(batch_size, seed, step, split, kinds, paraphrase)
        step += 1


# ---------------------------------------------------------------- labels for text-encoder pretraining

ATTRIBUTE_CLASSES: dict[str, tuple[str, ...]] = {
    "kind": KINDS,
    "shape": SHAPES,
    "color": tuple(COLORS),
    "position": tuple(POSITIONS),
    "background": tuple(COLORS),
    "relation": RELATIONS,
    "other_shape": SHAPES,
    "other_color": tuple(COLORS),
    "word": WORDS,
    "texture": TEXTURES,
    "orientation": ORIENTATIONS,
}
IGNORE_LABEL = -100  # the label of a field a scene does not have (torch's cross-entropy ignore_index)


def attribute_labels(attributes: Sequence[dict]) -> dict[str, torch.Tensor]:
    """Class indices [B] per attribute field, IGNORE_LABEL where a scene lacks the field."""
    out = {}
    for field, classes in ATTRIBUTE_CLASSES.items():
        index = {c: i for i, c in enumerate(classes)}
        out[field] = torch.tensor([index[a[field]] if field in a else IGNORE_LABEL for a in attributes])
    return out


def caption_batches(
    batch_size: int, seed: int = 0, split: str = "train", kinds: Sequence[str] = KINDS
) -> Iterator[tuple[list[str], dict[str, torch.Tensor]]]:
    """Endless (captions, attribute labels) batches without rendering, for text-only pretraining."""
    index = 0
    while True:
        captions, attrs = [], []
        for _ in range(batch_size):
            rng = _rng(seed, index)
            index += 1
            a = sample_attributes(rng, rng.choice(tuple(kinds)), split)
            captions.append(caption(a, rng.randrange(len(caption_templates(a)))))
            attrs.append(a)
        yield captions, attribute_labels(attrs)
