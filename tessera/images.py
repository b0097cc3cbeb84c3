"""Image conversion and PNG files that carry their workflow.

IMAGE values are float tensors [B, H, W, 3] in 0..1. A saved PNG holds the workflow
JSON in a tEXt chunk named `workflow`, so `tessera run image.png` and a drop on the
canvas can restore exactly what made it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, PngImagePlugin

WORKFLOW_CHUNK = "workflow"
READABLE_FORMATS = {"PNG", "JPEG", "WEBP"}


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


def save_png(image: Image.Image, path: Path, workflow: dict | None = None) -> None:
    """Write a PNG, embedding the workflow; written to a temp name first so no half file is left."""
    info = PngImagePlugin.PngInfo()
    if workflow is not None:
        info.add_text(WORKFLOW_CHUNK, json.dumps(workflow, separators=(",", ":")))
    tmp = path.with_name(path.name + ".part")
    image.save(tmp, format="PNG", pnginfo=info)
    tmp.replace(path)


def read_workflow_from_png(path: Path) -> dict:
    """The workflow embedded by `save_png`; ValueError naming the file if there is none."""
    try:
        with Image.open(path) as image:
            text = image.text.get(WORKFLOW_CHUNK) if hasattr(image, "text") else None
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable image ({e})") from None
    if text is None:
        raise ValueError(f"{path}: this PNG carries no Tessera workflow")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: the embedded workflow is not valid JSON ({e})") from None


def open_image(path: Path) -> Image.Image:
    """Open a PNG/JPEG/WebP file fully, refusing other formats by name."""
    try:
        with Image.open(path) as image:
            if image.format not in READABLE_FORMATS:
                raise ValueError(f"{path.name}: {image.format} images are not supported (PNG, JPEG or WebP)")
            image.load()
            return image.copy()
    except (OSError, Image.DecompressionBombError) as e:
        raise ValueError(f"{path.name}: not a readable image ({e})") from None
