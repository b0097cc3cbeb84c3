"""Confining user-supplied file names to their folders.

Every route and node that takes a file name from a request or a workflow goes through
`confined_path`, so `..`, absolute paths, NUL bytes and symlinks that point outside
cannot reach another file.
"""

from __future__ import annotations

from pathlib import Path

MAX_NAME_CHARS = 1024


class UnsafePathError(ValueError):
    """A file name that would leave its folder or is not allowed there."""


def confined_path(folder: Path, name: str, suffixes: tuple[str, ...] | None = None) -> Path:
    """Resolve `name` inside `folder`; raise UnsafePathError if it escapes or has a wrong suffix."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise UnsafePathError(f"invalid file name {name!r}")
    if len(name) > MAX_NAME_CHARS or any(len(p.encode("utf-8", "surrogateescape")) > 255 for p in name.split("/")):
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


MODEL_FOLDERS = ("diffusion_models", "vae", "text_encoders", "loras", "controlnet", "vq_models", "ar_models")
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
