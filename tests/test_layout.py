"""The package layout's one rule: `engines/` (the product's model code) imports neither the
runtime (`tessera.*`) nor the lab (`tessera.lab`), so it can be read, tested and reused alone."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ENGINES = Path(__file__).resolve().parents[1] / "engines"


def forbidden_imports(source: str) -> list[str]:
    """Every import in `source` that leaves `tessera.engines` for another tessera package."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level > 1:  # `from .. import x` climbs out of engines/
                found.append("." * node.level + (node.module or ""))
                continue
            names = [] if node.level else [node.module or ""]
        else:
            continue
        for name in names:
            if (name == "tessera" or name.startswith("tessera.")) and not (
                name == "tessera.engines" or name.startswith("tessera.engines.")
            ):
                found.append(name)
    return found


@pytest.mark.parametrize("path", sorted(ENGINES.glob("*.py")), ids=lambda p: p.name)
def test_engines_import_no_runtime_and_no_lab(path: Path):
    assert forbidden_imports(path.read_text()) == [], f"{path.name} imports outside tessera.engines"


def test_the_check_sees_each_kind_of_forbidden_import():
    source = (
        "import tessera.queue\n"
        "from tessera.lab import training\n"
        "def f():\n    from tessera.paths import x\n"
        "from .. import cli\n"
        "from tessera.engines.vae import load_vae\n"
        "from .flux import Flux\n"
        "import torch\n"
    )
    assert sorted(forbidden_imports(source)) == sorted(
        ["tessera.queue", "tessera.lab", "tessera.paths", ".."]
    )
