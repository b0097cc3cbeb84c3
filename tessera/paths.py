"""Confining user-supplied file names to their folders, and writing files without following links.

Every route and node that takes a file name from a request or a workflow goes through
`confined_path`, so `..`, absolute paths, NUL bytes and symlinks that point outside
cannot reach another file. Every file the server writes goes through `write_confined`:
its folders are created only once their resolved path is inside the root, the data goes
to a temporary file created exclusively (O_EXCL never follows a planted link), and a
rename puts it in place (a rename replaces a link itself, never the file it points at).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

MAX_NAME_CHARS = 1024


class UnsafePathError(ValueError):
    """A file name that would leave its folder or is not allowed there."""


def confined_path(folder: Path, name: str, suffixes: tuple[str, ...] | None = None) -> Path:
    """Resolve `name` inside `folder`; raise UnsafePathError if it escapes or has a wrong suffix."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise UnsafePathError(f"invalid file name {name!r}")
    if len(name) > MAX_NAME_CHARS or any(
        len(p.encode("utf-8", "surrogateescape")) > 255 for p in name.split("/")
    ):
        raise UnsafePathError(f"file name {name[:40]!r}… is too long")  # the OS would fail with ENAMETOOLONG
    if "\\" in name or name.startswith(("/", "~")) or (len(name) > 1 and name[1] == ":"):
        raise UnsafePathError(f"file name {name!r} must be relative to its folder")
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise UnsafePathError(f"file name {name!r} must not contain '.', '..' or empty parts")
    root = folder.resolve()
    path = (root / name).resolve()
    if path != root and root not in path.parents:
        raise UnsafePathError(f"file name {name!r} leaves its folder")
    if suffixes is not None and path.suffix.lower() not in suffixes:
        raise UnsafePathError(f"file name {name!r} must end in one of {', '.join(suffixes)}")
    return path


def confined_folder(root: Path, subfolder: str) -> Path:
    """Create `subfolder` ("" or "a/b") inside `root` one level at a time, each level checked
    to resolve inside the root before the next is made; returns its resolved path."""
    root.mkdir(
        parents=True, exist_ok=True
    )  # the root itself is ours to create (e.g. `tessera run --out DIR`)
    base = root.resolve()
    if not subfolder:
        return base
    confined_path(base, subfolder)
    folder = base
    for part in subfolder.split("/"):
        folder = folder / part
        if not folder.is_dir():
            try:
                os.mkdir(folder)  # never follows a link: a planted (even dangling) one makes this fail
            except FileExistsError:
                if not folder.is_dir():
                    raise UnsafePathError(
                        f"folder {subfolder!r}: {part!r} exists and is not a folder"
                    ) from None
        folder = folder.resolve()
        if folder != base and base not in folder.parents:
            raise UnsafePathError(f"folder {subfolder!r} leaves its root")
    return folder


def write_confined(root: Path, name: str, write: Callable[[BinaryIO], None], exclusive: bool = False) -> Path:
    """Write the file `name` (relative, may contain folders) inside `root` and return its path.

    `write(f)` fills a temporary file created with O_EXCL in the target folder; a rename then
    puts it in place, so a crash or a full disk leaves no half file and no link is followed.
    With `exclusive`, an existing file of that name is never replaced (FileExistsError).
    """
    folder_part, _, stem = name.rpartition("/")
    confined_path(root, name)
    folder = confined_folder(root, folder_part)
    target = folder / stem
    fd, tmp = tempfile.mkstemp(prefix=f".{stem[:60]}.", suffix=".part", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if exclusive:
            os.link(tmp, target, follow_symlinks=False)  # fails if the name exists (file or link)
            os.unlink(tmp)
        else:
            os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return target


# Folders of .safetensors files that loaders read (`/api/models` lists each); tokenizers/ holds
# tokenizer files beside these, looked up by the text-encoder loaders, and is not listed.
MODEL_FOLDERS = (
    "diffusion_models",
    "checkpoints",
    "vae",
    "text_encoders",
    "loras",
    "controlnet",
    "vq_models",
    "ar_models",
)
SOURCE_ROOT = Path(__file__).resolve().parent.parent


def default_models_dir() -> Path:
    """The shipped `models/` folder beside the package (a source checkout)."""
    return SOURCE_ROOT / "models"


def templates_dir() -> Path:
    return SOURCE_ROOT / "workflows"


def example_inputs_dir() -> Path:
    """Images the shipped workflows use; read-only, searched after the user's input folder."""
    return templates_dir() / "inputs"


def find_input(input_dir: Path, name: str) -> Path:
    """An input file by name: the user's input folder first, then the shipped examples."""
    path = confined_path(input_dir, name)
    if not path.exists():
        example = confined_path(example_inputs_dir(), name)
        if example.is_file():
            return example
    return path
