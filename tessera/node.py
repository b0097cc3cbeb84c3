"""The node API: a node declares its typed inputs and outputs once, as a class.

Everything else is derived from that one declaration: the JSON Schema of its inputs,
the catalogue entry the editor builds widgets from, and workflow validation.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

PRIMITIVE_TYPES = {"INT": "integer", "FLOAT": "number", "STRING": "string", "BOOLEAN": "boolean"}
# Seeds are unsigned 64-bit, the range torch.Generator.manual_seed takes; the editor carries
# them as BigInt so none loses precision on the way (JS numbers are exact only below 2**53).
MAX_SEED = 2**64 - 1


class Interrupted(Exception):
    """Raised inside a running node when the user interrupts the prompt."""


class NodeError(Exception):
    """A node could not run with the inputs it was given; names the input when one is at fault."""

    def __init__(self, message: str, input: str | None = None):
        super().__init__(message)
        self.input = input


@dataclass(frozen=True)
class Input:
    """One typed input. Primitive types are widgets (constants) that a link may also feed."""

    name: str
    type: str
    default: Any = None
    min: float | None = None
    max: float | None = None
    step: float | None = None
    choices: tuple | None = None
    optional: bool = False
    link: str = "auto"  # "auto" | "widget" | "link" | "either"
    multiline: bool = False
    model_folder: str | None = None
    model_family: str | None = None  # what the loader reads (engines.layouts.detect_family): listed first
    widget: str | None = None

    def __post_init__(self) -> None:
        if self.choices is not None:
            object.__setattr__(self, "choices", tuple(self.choices))

    @property
    def is_primitive(self) -> bool:
        return self.type in PRIMITIVE_TYPES

    @property
    def link_mode(self) -> str:
        """'widget' (constant only), 'link' (socket only) or 'either'."""
        if self.link != "auto":
            return self.link
        return "either" if self.is_primitive else "link"

    @property
    def accepts_constant(self) -> bool:
        return self.link_mode in ("widget", "either")

    @property
    def accepts_link(self) -> bool:
        return self.link_mode in ("link", "either")

    @property
    def required(self) -> bool:
        """Required when the workflow must supply it: not optional and without a default."""
        return not self.optional and self.default is None

    def model_choices(self, model_files: Callable[..., list[str]]) -> list[str]:
        """The folder's files for a dropdown; the loader's own family first, so that a new node's
        default (the first choice) is a file it can load even where families share a folder."""
        if self.model_family:
            return model_files(self.model_folder, family=self.model_family)
        return model_files(self.model_folder)

    def value_schema(self, model_choices: list[str] | None = None) -> dict:
        """The JSON Schema of a constant value for this input."""
        if not self.is_primitive:
            return {}
        schema: dict = {"type": PRIMITIVE_TYPES[self.type]}
        if self.min is not None:
            schema["minimum"] = self.min
        if self.max is not None:
            schema["maximum"] = self.max
        choices = model_choices if self.model_folder else self.choices
        if choices is not None:
            schema["enum"] = list(choices)
        if self.default is not None:
            schema["default"] = self.default
        return schema


@dataclass
class Result:
    """What `execute` returns when it has something to show besides its outputs (images saved)."""

    outputs: tuple = ()
    ui: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Output:
    name: str
    type: str


LINK_SCHEMA = {
    "type": "object",
    "properties": {"node": {"type": "string"}, "output": {"type": "string"}},
    "required": ["node", "output"],
    "additionalProperties": False,
}


@dataclass
class ExecutionContext:
    """What a running node may use from the runtime, and nothing more."""

    device: torch.device
    dtype: torch.dtype
    models_dir: Path
    input_dir: Path
    output_dir: Path
    node_id: str = ""
    prompt_id: str = ""
    workflow: dict = field(default_factory=dict)
    on_progress: Callable[[str, int, int, Any], None] | None = None
    is_interrupted: Callable[[], bool] = lambda: False

    def check_interrupted(self) -> None:
        if self.is_interrupted():
            raise Interrupted()

    def progress(self, value: int, total: int, preview: Any = None) -> None:
        """Report step `value` of `total` (and an optional PIL preview); raises if interrupted."""
        self.check_interrupted()
        if self.on_progress is not None:
            self.on_progress(self.node_id, value, total, preview)

    def model_path(self, folder: str, name: str) -> Path:
        from tessera.paths import confined_path

        return confined_path(self.models_dir / folder, name, suffixes=(".safetensors",))

    def model_file(self, folder: str, name: str, input: str = "file") -> Path:
        """The model file an input names, or a NodeError on that input if it is unsafe or missing."""
        from tessera.paths import UnsafePathError

        try:
            path = self.model_path(folder, name)
        except UnsafePathError as e:
            raise NodeError(str(e), input=input) from None
        if not path.is_file():
            raise NodeError(f"model file '{name}' is not in models/{folder}", input=input)
        return path

    def model_file_identity(self, folder: str, name: str) -> str | None:
        """Size and mtime of a model file: part of every loader's cache key, so a replaced
        file re-runs its loader, without hashing gigabytes on each run."""
        from tessera.paths import UnsafePathError

        try:
            stat = self.model_path(folder, name).stat()
        except (OSError, UnsafePathError):
            return None
        return f"{stat.st_size}:{stat.st_mtime_ns}"

    def input_path(self, name: str) -> Path:
        from tessera.paths import find_input

        return find_input(self.input_dir, name)


class Node:
    """Base class of every graph node. Subclasses set the class attributes and `execute`."""

    type_name: ClassVar[str] = ""
    category: ClassVar[str] = "misc"
    version: ClassVar[int] = 1
    is_output: ClassVar[bool] = False
    inputs: ClassVar[tuple[Input, ...]] = ()
    outputs: ClassVar[tuple[Output, ...]] = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if not cls.__dict__.get("type_name"):
            cls.type_name = cls.__name__

    @classmethod
    def description(cls) -> str:
        doc = inspect.getdoc(cls) or ""
        return doc.split("\n\n")[0].replace("\n", " ")

    @classmethod
    def input(cls, name: str) -> Input | None:
        return next((i for i in cls.inputs if i.name == name), None)

    @classmethod
    def output_type(cls, name: str) -> str | None:
        return next((o.type for o in cls.outputs if o.name == name), None)

    @classmethod
    def fingerprint(cls, ctx: ExecutionContext, inputs: dict) -> str | None:
        """Extra cache-key material for inputs whose meaning lives outside the graph."""
        return None

    @classmethod
    def check(cls, constants: dict, linked: frozenset[str]) -> list[NodeError]:
        """Problems the node can tell from its constant inputs alone (a file name's characters,
        inputs that depend on each other); `linked` names the inputs fed by links. Run when the
        workflow is validated, so a bad value is refused before anything executes."""
        return []

    @classmethod
    def describe(cls, ctx: ExecutionContext, constants: dict, upstream: dict[str, dict]) -> dict[str, dict]:
        """What is known of this node's outputs before anything runs: output name -> facts (a
        DiT's text widths read from its file headers, a conditioning's widths). `upstream` gives
        the facts of each linked input ({} when nothing is known). Raise NodeError, naming the
        input, when the inputs cannot work together: it is run when the workflow is compiled, so
        a mismatch is refused before any node executes. By default each output hands on the
        facts of the node's first input of the same type (a LoRA, FluxGuidance) or none."""
        out = {}
        for o in cls.outputs:
            source = next((i.name for i in cls.inputs if i.type == o.type), None)
            out[o.name] = upstream.get(source, {}) if source else {}
        return out

    def execute(self, ctx: ExecutionContext, **inputs) -> tuple | Result:
        raise NotImplementedError(f"{self.type_name} does not implement execute()")

    @classmethod
    def input_schema(cls, model_files: Callable[[str], list[str]] | None = None) -> dict:
        """JSON Schema of this node's `inputs` object in a workflow."""
        properties = {}
        for spec in cls.inputs:
            choices = model_files(spec.model_folder) if (spec.model_folder and model_files) else None
            options = []
            if spec.accepts_constant:
                options.append(spec.value_schema(choices))
            if spec.accepts_link:
                options.append(LINK_SCHEMA)
            properties[spec.name] = options[0] if len(options) == 1 else {"anyOf": options}
        return {
            "type": "object",
            "properties": properties,
            "required": [i.name for i in cls.inputs if i.required],
            "additionalProperties": False,
        }

    @classmethod
    def info(
        cls,
        model_files: Callable[[str], list[str]] | None = None,
        input_images: Callable[[], list[str]] | None = None,
    ) -> dict:
        """The catalogue entry served to the editor (`input_images` lists an image_upload input's choices)."""
        inputs = []
        for spec in cls.inputs:
            entry: dict = {
                "name": spec.name,
                "type": spec.type,
                "optional": spec.optional,
                "link": spec.link_mode,
            }
            for key in ("default", "min", "max", "step", "widget", "model_folder"):
                if getattr(spec, key) is not None:
                    entry[key] = getattr(spec, key)
            if spec.multiline:
                entry["multiline"] = True
            if spec.model_folder and model_files:
                entry["choices"] = spec.model_choices(model_files)
            elif spec.widget == "image_upload" and input_images:
                entry["choices"] = input_images()
            elif spec.choices is not None:
                entry["choices"] = list(spec.choices)
            inputs.append(entry)
        return {
            "type": cls.type_name,
            "category": cls.category,
            "description": cls.description(),
            "version": cls.version,
            "is_output": cls.is_output,
            "inputs": inputs,
            "outputs": [{"name": o.name, "type": o.type} for o in cls.outputs],
            "input_schema": cls.input_schema(model_files),
        }
