"""Image input and output, and cheap image operations."""

from __future__ import annotations

import hashlib
import re

import torch
import torch.nn.functional as F

from tessera.images import check_pixels, image_header, open_image, pil_to_tensor, save_png, tensor_to_pil
from tessera.node import ExecutionContext, Input, Node, NodeError, Output, Result
from tessera.paths import UnsafePathError, confined_folder

MAX_SIDE = 8192


class LoadImage(Node):
    """Load a PNG, JPEG or WebP file from the input folder (uploads land there)."""

    category = "image"
    inputs = (Input("image", "STRING", widget="image_upload", link="widget"),)
    outputs = (Output("image", "IMAGE"), Output("mask", "MASK"))

    @classmethod
    def fingerprint(cls, ctx: ExecutionContext, inputs: dict) -> str | None:
        path = _input_file(ctx, inputs["image"])
        try:  # refused when the workflow is checked, from the header alone: nothing is decoded
            check_pixels(inputs["image"], *image_header(path)[1:])
        except ValueError as e:
            raise NodeError(str(e), input="image") from None
        return hashlib.sha256(path.read_bytes()).hexdigest()

    def execute(self, ctx: ExecutionContext, image: str):
        try:
            picture = open_image(_input_file(ctx, image))
        except ValueError as e:
            raise NodeError(str(e), input="image") from None
        alpha = picture.getchannel("A") if "A" in picture.getbands() else None
        tensor = pil_to_tensor(picture)
        if alpha is not None:
            mask = 1.0 - pil_to_tensor(alpha.convert("RGB"))[..., 0]
        else:
            mask = torch.zeros(tensor.shape[:3])
        return tensor, mask


def _input_file(ctx: ExecutionContext, name: str):
    try:
        path = ctx.input_path(name)
    except UnsafePathError as e:
        raise NodeError(str(e), input="image") from None
    if not path.is_file():
        raise NodeError(f"input image '{name}' does not exist", input="image")
    return path


class SaveImage(Node):
    """Save images as PNG files in the output folder, with the workflow embedded."""

    category = "image"
    is_output = True
    inputs = (
        Input("images", "IMAGE"),
        Input("filename_prefix", "STRING", default="tessera", link="widget"),
    )
    outputs = ()

    @classmethod
    def check(cls, constants: dict, linked: frozenset[str]) -> list[NodeError]:
        problem = prefix_problem(constants["filename_prefix"])
        return [NodeError(problem, input="filename_prefix")] if problem else []

    def execute(self, ctx: ExecutionContext, images: torch.Tensor, filename_prefix: str):
        return Result(ui={"images": write_images(ctx, images, filename_prefix, "")})


class PreviewImage(Node):
    """Show images in the editor without keeping them (written under output/preview)."""

    category = "image"
    is_output = True
    inputs = (Input("images", "IMAGE"),)
    outputs = ()

    def execute(self, ctx: ExecutionContext, images: torch.Tensor):
        return Result(ui={"images": write_images(ctx, images, "preview", "preview")})


PREFIX_ALLOWED = "letters, digits, '_', '-', '.', spaces and '/' between folder names"


def prefix_problem(prefix: str) -> str | None:
    """What is wrong with a filename prefix (`folder/stem`, at most 4 parts), naming the culprit."""
    bad = next((c for c in prefix if not re.fullmatch(r"[A-Za-z0-9_\-. /]", c)), None)
    if bad is not None:
        return f"filename prefix {prefix!r} contains {bad!r}, which is not allowed (use {PREFIX_ALLOWED})"
    parts = prefix.split("/")
    if any(not p.strip() for p in parts):
        return f"filename prefix {prefix!r} has an empty folder or file name (around a '/')"
    if ".." in prefix:
        return f"filename prefix {prefix!r} contains '..'"
    if len(parts) > 4 or any(len(p) > 80 for p in parts):
        return f"filename prefix {prefix!r} is too deep or too long (at most 4 parts of 80 characters)"
    return None


def write_images(ctx: ExecutionContext, images: torch.Tensor, prefix: str, subfolder: str) -> list[dict]:
    problem = prefix_problem(prefix)
    if problem:
        raise NodeError(problem, input="filename_prefix")
    folder_part, _, stem = prefix.rpartition("/")
    subfolder = "/".join(p for p in (subfolder, folder_part) if p)
    refs = []
    try:  # folders are made only once checked to stay inside output/; no link is written through
        folder = confined_folder(ctx.output_dir, subfolder)
        for picture in tensor_to_pil(images):
            while True:
                name = f"{stem}_{_next_counter(folder, stem):05d}.png"
                try:
                    save_png(
                        picture,
                        ctx.output_dir,
                        f"{subfolder}/{name}" if subfolder else name,
                        ctx.workflow,
                        ctx.prompt_id,
                        exclusive=True,
                    )
                    break
                except FileExistsError:
                    continue  # a file of that name appeared meanwhile: take the next number
            refs.append({"filename": name, "subfolder": subfolder, "type": "output"})
    except UnsafePathError as e:
        raise NodeError(str(e), input="filename_prefix") from None
    except OSError as e:  # e.g. a full disk: the node fails by name, the server keeps going
        raise NodeError(
            f"could not write {subfolder + '/' if subfolder else ''}{stem}_*.png in the output folder: "
            f"{e.strerror or e}",
            input="images",
        ) from e
    return refs


def _next_counter(folder, stem: str) -> int:
    pattern = re.compile(re.escape(stem) + r"_(\d{5})\.png$")
    numbers = [int(m.group(1)) for p in folder.iterdir() if (m := pattern.match(p.name))]
    return max(numbers, default=0) + 1


class SolidColor(Node):
    """An image of one colour: a canvas to draw on or a background to blend with."""

    category = "image"
    version = 2  # 2: `batch` is `batch_size`, as in every node
    inputs = (
        Input("width", "INT", default=64, min=1, max=MAX_SIDE),
        Input("height", "INT", default=64, min=1, max=MAX_SIDE),
        Input("red", "FLOAT", default=0.5, min=0.0, max=1.0, step=0.01),
        Input("green", "FLOAT", default=0.5, min=0.0, max=1.0, step=0.01),
        Input("blue", "FLOAT", default=0.5, min=0.0, max=1.0, step=0.01),
        Input("batch_size", "INT", default=1, min=1, max=64),
    )
    outputs = (Output("image", "IMAGE"),)

    def execute(self, ctx, width, height, red, green, blue, batch_size):
        return (
            torch.tensor([red, green, blue], dtype=torch.float32)
            .expand(batch_size, height, width, 3)
            .clone(),
        )


class ImageScale(Node):
    """Resize images to a width and height."""

    category = "image"
    inputs = (
        Input("image", "IMAGE"),
        Input("width", "INT", default=512, min=1, max=MAX_SIDE),
        Input("height", "INT", default=512, min=1, max=MAX_SIDE),
        Input(
            "method",
            "STRING",
            default="bilinear",
            choices=("nearest", "bilinear", "bicubic", "area"),
            link="widget",
        ),
    )
    outputs = (Output("image", "IMAGE"),)

    def execute(self, ctx, image, width, height, method):
        x = image.movedim(-1, 1)
        kwargs = {"align_corners": False} if method in ("bilinear", "bicubic") else {}
        x = F.interpolate(x, size=(height, width), mode=method, **kwargs)
        return (x.movedim(1, -1).clamp(0, 1),)


class ImageBlend(Node):
    """Blend two images: (1 - factor)·a + factor·b (b is resized to a)."""

    category = "image"
    inputs = (
        Input("image_a", "IMAGE"),
        Input("image_b", "IMAGE"),
        Input("factor", "FLOAT", default=0.5, min=0.0, max=1.0, step=0.01),
    )
    outputs = (Output("image", "IMAGE"),)

    def execute(self, ctx, image_a, image_b, factor):
        if image_b.shape[1:3] != image_a.shape[1:3]:
            image_b = F.interpolate(image_b.movedim(-1, 1), size=image_a.shape[1:3], mode="bilinear").movedim(
                1, -1
            )
        if image_b.shape[0] not in (1, image_a.shape[0]):
            raise NodeError(
                f"batch sizes differ ({image_a.shape[0]} and {image_b.shape[0]})", input="image_b"
            )
        return ((1 - factor) * image_a + factor * image_b,)


class ImageInvert(Node):
    """Invert colours (1 - x)."""

    category = "image"
    inputs = (Input("image", "IMAGE"),)
    outputs = (Output("image", "IMAGE"),)

    def execute(self, ctx, image):
        return (1.0 - image,)
