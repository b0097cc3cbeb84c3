"""The node registry: built-in nodes, node packs from entry points and `custom_nodes/`.

A pack that fails to import is recorded by name with its error and skipped, so one
broken pack never stops the server.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import pkgutil
import sys
import traceback
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType

from tessera.node import Node

ENTRY_POINT_GROUP = "tessera.nodes"


class NodeRegistry:
    def __init__(self) -> None:
        self.nodes: dict[str, type[Node]] = {}
        self.failed_packs: dict[str, str] = {}

    def register(self, node_class: type[Node]) -> None:
        name = node_class.type_name
        existing = self.nodes.get(name)
        if existing is not None and existing is not node_class:
            raise ValueError(
                f"node type '{name}' is registered twice ({existing.__module__}, {node_class.__module__})"
            )
        self.nodes[name] = node_class

    def register_module(self, module: ModuleType) -> int:
        """Register every Node subclass defined in `module` (or listed in its NODES)."""
        classes = getattr(module, "NODES", None)
        if classes is None:
            classes = [
                obj
                for obj in vars(module).values()
                if inspect.isclass(obj)
                and issubclass(obj, Node)
                and obj is not Node
                and (obj.__module__ == module.__name__ or obj.__module__.startswith(module.__name__ + "."))
                and not inspect.isabstract(obj)
                and "execute" in _defined_methods(obj)
            ]
        for cls in classes:
            self.register(cls)
        return len(classes)

    def load_pack(self, name: str, load) -> None:
        """Import one pack through `load()`; record and skip it on any error."""
        try:
            module = load()
            if isinstance(module, ModuleType):
                self.register_module(module)
            elif callable(module):  # an entry point may name a register(registry) function
                module(self)
        except (Exception, SystemExit):  # a pack calling sys.exit() must not stop the server either
            self.failed_packs[name] = traceback.format_exc(limit=3)

    def load_builtins(self) -> None:
        import tessera.nodes as package

        for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
            name = f"tessera.nodes.{info.name}"
            self.load_pack(name, lambda n=name: importlib.import_module(n))

    def load_entry_points(self) -> None:
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            self.load_pack(f"entry point {ep.name}", ep.load)

    def load_custom_nodes(self, folder: Path) -> None:
        """Import each `*.py` file or package in `folder` as a node pack."""
        if not folder.is_dir():
            return
        for path in sorted(folder.iterdir()):
            if path.name.startswith((".", "_")):
                continue
            if path.is_dir() and (path / "__init__.py").exists():
                init = path / "__init__.py"
            elif path.suffix == ".py":
                init = path
            else:
                continue
            self.load_pack(f"custom_nodes/{path.name}", lambda p=path, i=init: _import_file(p, i))

    def get(self, type_name: str) -> type[Node] | None:
        return self.nodes.get(type_name)


def _defined_methods(cls: type) -> set[str]:
    names: set[str] = set()
    for klass in cls.__mro__:
        if klass is Node:
            break
        names.update(vars(klass))
    return names


def _import_file(path: Path, init: Path) -> ModuleType:
    module_name = f"tessera_custom_nodes.{path.stem}"
    spec = importlib.util.spec_from_file_location(
        module_name, init, submodule_search_locations=[str(path)] if init.name == "__init__.py" else None
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(module_name, None)
        raise
    return module


def default_registry(custom_nodes_dir: Path | None = None) -> NodeRegistry:
    """Built-ins, then installed packs, then the `custom_nodes/` folder."""
    registry = NodeRegistry()
    registry.load_builtins()
    registry.load_entry_points()
    if custom_nodes_dir is not None:
        registry.load_custom_nodes(custom_nodes_dir)
    return registry
