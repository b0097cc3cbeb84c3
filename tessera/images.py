"""Image conversion and PNG files that carry their workflow.

IMAGE values are float tensors [B, H, W, 3] in 0..1. A saved PNG holds the workflow
JSON in a tEXt chunk named `workflow`, so `tessera run image.png` and a drop on the
canvas can restore exactly what made it. A workflow larger than `LIMITS.embedded_workflow_bytes`
is not copied into every image (a batch would multiply it): the PNG names its prompt
instead, whose history entry keeps the workflow once.

Images are read only after their header shows they fit `LIMITS.max_pixels`, so a small
file that would decode to gigabytes (a decompression bomb) is refused before decoding.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, PngImagePlugin

from tessera.paths import write_confined

WORKFLOW_CHUNK = "workflow"
PROMPT_CHUNK = "tessera_prompt"
READABLE_FORMATS = {"PNG", "JPEG", "WEBP"}


@dataclass
class ImageLimits:
    """Process-wide image budgets; `tessera serve` sets them from its flags."""

    max_pixels: int = 8192 * 8192
    embedded_workflow_bytes: int = 256 << 10


LIMITS = ImageLimits()


def configure_image_limits(max_pixels: int, embedded_workflow_bytes: int) -> None:
    LIMITS.max_pixels, LIMITS.embedded_workflow_bytes = max_pixels, embedded_workflow_bytes
    # Pillow's own guard stays a backstop behind ours (it raises at twice this many pixels).
    Image.MAX_IMAGE_PIXELS = max_pixels


def tensor_to_pil(image: torch.Tensor) -> list[Image.Image]:
    """[B,H,W,C] (or [H,W,C]) floats in 0..1 → one PIL image per batch item."""
    if image.ndim == 3:
        image = image[None]
    array = (image.detach().float().clamp(0, 1).cpu().numpy() * 255.0 + 0.5).astype(np.uint8)
    return [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in array]


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """A PIL image → [1,H,W,3] float in 0..1 (alpha dropped)."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array.copy())[None]


def save_png(
    image: Image.Image,
    root: Path,
    name: str,
    workflow: dict | None = None,
    prompt_id: str = "",
    exclusive: bool = False,
) -> Path:
    """Write `name` inside `root` as a PNG that carries its workflow (or, when that is larger
    than the embedding limit, its prompt id); see `paths.write_confined` for how it is written."""
    info = PngImagePlugin.PngInfo()
    if workflow is not None:
        text = json.dumps(workflow, separators=(",", ":"))
        if len(text) <= LIMITS.embedded_workflow_bytes:
            info.add_text(WORKFLOW_CHUNK, text)
        elif prompt_id:
            info.add_text(PROMPT_CHUNK, prompt_id)
    return write_confined(
        root, name, lambda f: image.save(f, format="PNG", pnginfo=info), exclusive=exclusive
    )


def read_workflow_from_png(path: Path) -> dict:
    """The workflow embedded by `save_png`; ValueError naming the file if there is none."""
    try:
        with Image.open(path) as image:
            text = image.text.get(WORKFLOW_CHUNK) if hasattr(image, "text") else None
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable image ({e})") from None
    if text is None:
        prompt_id = image.text.get(PROMPT_CHUNK) if hasattr(image, "text") else None
        if prompt_id:
            raise ValueError(
                f"{path}: its workflow was too large to embed; it is in the history of prompt {prompt_id}"
            )
        raise ValueError(f"{path}: this PNG carries no Tessera workflow")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: the embedded workflow is not valid JSON ({e})") from None


def check_pixels(name: str, width: int, height: int) -> None:
    """ValueError naming the image if it has more pixels than the budget allows."""
    if width * height > LIMITS.max_pixels:
        raise ValueError(
            f"{name}: {width}×{height} is {width * height:,} pixels, over the limit of {LIMITS.max_pixels:,} "
            "(tessera serve --max-image-pixels)"
        )


def too_many_pixels(name: str, error: Image.DecompressionBombError) -> ValueError:
    """Pillow's own guard fired (at twice our limit) while reading the header."""
    return ValueError(
        f"{name}: over the limit of {LIMITS.max_pixels:,} pixels per image "
        f"(tessera serve --max-image-pixels): {error}"
    )


def image_header(path: Path) -> tuple[str, int, int]:
    """(format, width, height) from the file's header, without decoding; ValueError if unreadable."""
    try:
        with Image.open(path) as image:
            return image.format, *image.size
    except Image.DecompressionBombError as e:
        raise too_many_pixels(path.name, e) from None
    except OSError as e:
        raise ValueError(f"{path.name}: not a readable image ({e})") from None


def open_image(path: Path) -> Image.Image:
    """Open a PNG/JPEG/WebP file fully, refusing other formats and over-budget sizes by name before decoding."""
    try:
        with Image.open(path) as image:
            if image.format not in READABLE_FORMATS:
                raise ValueError(f"{path.name}: {image.format} images are not supported (PNG, JPEG or WebP)")
            check_pixels(path.name, *image.size)
            image.load()
            return image.copy()
    except Image.DecompressionBombError as e:
        raise too_many_pixels(path.name, e) from None
    except OSError as e:
        raise ValueError(f"{path.name}: not a readable image ({e})") from None
