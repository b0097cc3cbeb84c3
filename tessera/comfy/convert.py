"""ComfyUI workflows -> Tessera workflows, through the one table in `mapping`.

Three inputs are accepted: the API format (`{id: {"class_type", "inputs"}}`, a link is
`[node_id, output_index]`), the UI format the ComfyUI editor saves (`nodes` with
`widgets_values`, `links`), and the two text chunks ComfyUI writes into its PNGs (`prompt`:
API format, `workflow`: UI format, used for the layout). A UI document is first turned into
the API format, so one converter does the mapping. Node ids are kept (nodes the converter adds
get `id:suffix` ids). Every problem is a `WorkflowIssue` naming the node and input.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from tessera.comfy.mapping import CONTROL, RULES, UI_ONLY, Rule
from tessera.node import Node
from tessera.paths import UnsafePathError, confined_path
from tessera.registry import NodeRegistry
from tessera.workflow import CURRENT_VERSION, InvalidWorkflow, WorkflowIssue

Classify = Callable[[str], "str | None"]  # a text_encoders file name -> "clip" | "t5" | None
UI_MODES = {2: "mute", 4: "bypass"}
PASS_THROUGH = {"FluxGuidance": "conditioning", "ConditioningZeroOut": "conditioning"}
CUSTOM_SAMPLER_PARTS = {  # SamplerCustomAdvanced input -> the ComfyUI nodes it is mapped from
    "noise": ("RandomNoise",),
    "sampler": ("KSamplerSelect",),
    "sigmas": ("BasicScheduler",),
    "guider": ("BasicGuider", "CFGGuider"),  # last: its model and conditionings win
}
SAMPLERS_OF_A_MODEL = ("KSampler", "KSamplerAdvanced", "SamplerCustomAdvanced")


@dataclass(frozen=True)
class Link:
    """A ComfyUI link still to resolve: output `index` of ComfyUI node `source`."""

    source: str
    index: int


def is_api_format(doc: object) -> bool:
    return (
        isinstance(doc, dict)
        and bool(doc)
        and all(isinstance(n, dict) and "class_type" in n for n in doc.values())
    )


def is_ui_format(doc: object) -> bool:
    return isinstance(doc, dict) and isinstance(doc.get("nodes"), list) and "links" in doc


def is_comfy_document(doc: object) -> bool:
    """An API or UI workflow, or the `{"prompt", "workflow"}` pair of a ComfyUI PNG."""
    return (
        is_api_format(doc)
        or is_ui_format(doc)
        or (isinstance(doc, dict) and is_api_format(doc.get("prompt")))
    )


def supported_nodes() -> str:
    return ", ".join(sorted(RULES))


def our_widgets(cls: type[Node]) -> list[str]:
    """Widget order of one of our nodes as ComfyUI's frontend lays it out from /object_info:
    required then optional inputs that take a value, a CONTROL value after each seed."""
    names: list[str] = []
    for optional in (False, True):
        for spec in cls.inputs:
            if spec.optional == optional and spec.accepts_constant:
                names.append(spec.name)
                if spec.widget == "seed":
                    names.append(CONTROL)
    return names


# ------------------------------------------------------------------------------ UI format -> API
def ui_to_api(doc: dict, registry: NodeRegistry) -> tuple[dict, dict]:
    """(API-format graph, layout by node id) of a UI-format document."""
    links: dict = {}
    for link in doc.get("links") or []:
        if isinstance(link, list) and len(link) >= 5:
            links[link[0]] = (link[1], link[2])
        elif isinstance(link, dict) and "id" in link:
            links[link["id"]] = (link.get("origin_id"), link.get("origin_slot"))
    nodes = [n for n in doc["nodes"] if isinstance(n, dict)]
    by_id = {str(n.get("id")): n for n in nodes}

    def source(link_id):
        seen = set()
        while link_id in links and link_id not in seen:
            seen.add(link_id)
            origin, slot = links[link_id]
            node = by_id.get(str(origin))
            if node is not None and node.get("type") == "Reroute":
                link_id = ((node.get("inputs") or [{}])[0]).get("link")
                continue
            if node is not None and node.get("type") == "PrimitiveNode":
                return None  # its value is also in the target's widgets_values
            return [str(origin), slot]
        return None

    api, layout = {}, {}
    for node in nodes:
        node_id, kind = str(node.get("id")), node.get("type")
        if kind in UI_ONLY:
            continue
        rule, ours = RULES.get(kind), registry.get(kind) if isinstance(kind, str) else None
        names = list(rule.widgets) if rule else our_widgets(ours) if ours else []
        inputs: dict = {}
        values = node.get("widgets_values")
        if isinstance(values, dict):
            inputs.update(values)
        elif isinstance(values, list):
            inputs.update({n: v for n, v in zip(names, values) if n != CONTROL})
        for slot in node.get("inputs") or []:
            if isinstance(slot, dict) and slot.get("link") is not None:
                found = source(slot["link"])
                if found is not None:
                    inputs[slot.get("name")] = found
        entry = {"class_type": kind, "inputs": inputs, "_meta": {"title": node.get("title") or kind}}
        if node.get("mode") in UI_MODES:
            entry["_mode"] = UI_MODES[node["mode"]]
        api[node_id] = entry
        ui = {}
        if isinstance(node.get("pos"), list) and len(node["pos"]) == 2:
            ui["pos"] = [float(v) for v in node["pos"]]
        if isinstance(node.get("size"), list) and len(node["size"]) == 2:
            ui["size"] = [float(v) for v in node["size"]]
        layout[node_id] = ui
    return api, layout


# ----------------------------------------------------------------------------- API format -> ours
class _Converter:
    def __init__(self, api: dict, registry: NodeRegistry, classify: Classify | None, layout: dict):
        self.api, self.registry, self.classify, self.layout = api, registry, classify, layout
        self.issues: list[WorkflowIssue] = []
        self.nodes: dict[str, dict] = {}
        self.outputs: dict[str, list] = {}  # ComfyUI id -> per output: (our id, output) or ("pass", input)
        self.controlnets: dict[str, dict] = {}
        self.refused: set[str] = set()  # nodes already reported: links to them are not reported again
        self.folded: dict[str, dict] = {}  # SamplerCustomAdvanced parts: id -> their inputs, renamed
        self.shifts: dict[str, dict] = {}  # ModelSamplingFlux id -> its inputs

    def issue(self, node_id, input_name, reason) -> None:
        self.issues.append(WorkflowIssue(node_id, input_name, reason))
        self.refused.add(node_id)

    def run(self) -> dict:
        for node_id, node in self.api.items():
            node_id = str(node_id)
            kind, inputs = node.get("class_type"), node.get("inputs", {})
            if not isinstance(kind, str) or not isinstance(inputs, dict):
                self.issue(node_id, None, "a ComfyUI node needs a 'class_type' string and an 'inputs' object")
                continue
            inputs = {k: Link(str(v[0]), v[1]) if _is_link(v) else v for k, v in inputs.items()}
            if kind in RULES:
                ours = self.mapped(node_id, kind, RULES[kind], inputs)
            elif self.registry.get(kind) is not None:
                cls = self.registry.get(kind)
                ours = {"type": kind, "inputs": inputs}
                self.outputs[node_id] = [(node_id, o.name) for o in cls.outputs]
            else:
                self.issue(
                    node_id,
                    None,
                    f"ComfyUI node type '{kind}' is not supported. Supported ComfyUI nodes: "
                    f"{supported_nodes()}; and every Tessera node under its own name (tessera nodes)",
                )
                continue
            if ours is None:
                continue
            ui = dict(self.layout.get(node_id, {}))
            title = (node.get("_meta") or {}).get("title") if isinstance(node.get("_meta"), dict) else None
            if isinstance(title, str) and title and title != kind:
                ui["title"] = title[:200]
            if ui:
                ours["ui"] = ui
            if node.get("_mode") in ("mute", "bypass"):
                ours["mode"] = node["_mode"]
            self.nodes[node_id] = ours
        self.fold_custom_samplers()
        self.check_shifts()
        self.wire_controlnets()
        self.connect_empty_latents()
        for node_id, node in self.nodes.items():
            for name, value in list(node["inputs"].items()):
                if isinstance(value, Link):
                    node["inputs"][name] = self.resolve(node_id, name, value)
        if self.issues:
            raise InvalidWorkflow(self.issues)
        return {"version": CURRENT_VERSION, "nodes": self.nodes}

    # -- one mapped node -----------------------------------------------------------------------
    def mapped(self, node_id: str, kind: str, rule: Rule, inputs: dict) -> dict | None:
        ours: dict = {"type": rule.type, "inputs": dict(rule.constants)}
        for name, value in inputs.items():
            if name in rule.values:
                value = self.choice(node_id, kind, name, value, rule.values[name])
            if name in rule.accepted:
                allowed = rule.accepted[name]
                if allowed is not None and value not in allowed:
                    shown = "a link" if isinstance(value, Link) else repr(value)
                    self.issue(
                        node_id,
                        name,
                        f"{kind} {name} {shown} is not supported (supported: "
                        f"{', '.join(map(repr, allowed))})",
                    )
                continue
            target = rule.inputs.get(name)
            if target:
                ours["inputs"][target] = value
        self.outputs[node_id] = (
            [
                (node_id, out) if out else ("pass", name)
                for out, name in zip(rule.outputs, ("positive", "negative"))
            ]
            if kind == "ControlNetApplyAdvanced"
            else [(node_id, out) for out in rule.outputs]
        )
        if kind == "DualCLIPLoader":
            self.dual_clip(node_id, inputs, ours)
        elif kind == "KSampler":
            _comfy_denoise(ours["inputs"])
        elif kind == "KSamplerAdvanced":
            self.ksampler_advanced(node_id, inputs, ours)
        elif kind == "ControlNetApplyAdvanced":
            self.controlnets[node_id] = ours
            return None
        elif kind == "ModelSamplingFlux":
            self.outputs[node_id] = [("pass", "model")]
            self.shifts[node_id] = inputs
            return None
        elif rule.folded:
            self.folded[node_id] = ours
            return None
        return ours

    def choice(self, node_id, kind, name, value, table: dict):
        if isinstance(value, str) and value in table:
            return table[value]
        shown = "a link" if isinstance(value, Link) else repr(value)
        self.issue(node_id, name, f"{kind} {name} {shown} is not supported (supported: {', '.join(table)})")
        return value

    def dual_clip(self, node_id: str, inputs: dict, ours: dict) -> None:
        files = [inputs.get("clip_name1"), inputs.get("clip_name2")]
        if not all(isinstance(f, str) for f in files):
            self.issue(node_id, "clip_name1", "DualCLIPLoader needs two file names (clip_name1, clip_name2)")
            return
        kinds = [self.classify(f) if self.classify else None for f in files]
        kinds = [k or ("t5" if "t5" in f.lower() else "clip") for k, f in zip(kinds, files)]
        if kinds[0] == kinds[1]:  # ComfyUI's examples put T5 first
            kinds = ["t5", "clip"]
        ours["inputs"].update({f"{k}_file": f for k, f in zip(kinds, files)})

    def ksampler_advanced(self, node_id: str, inputs: dict, ours: dict) -> None:
        """A full pass from `start_at_step` of a `steps`-step schedule is ComfyUI's KSampler with
        steps - start steps and denoise (steps - start) / steps; partial passes are refused."""
        steps, start, end = (
            inputs.get("steps", 20),
            inputs.get("start_at_step", 0),
            inputs.get("end_at_step", 10000),
        )
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (steps, start, end)):
            self.issue(
                node_id,
                "steps",
                "KSamplerAdvanced steps, start_at_step and end_at_step must be numbers, not links",
            )
            return
        if end < steps:
            self.issue(
                node_id,
                "end_at_step",
                f"KSamplerAdvanced end_at_step {end} < steps {steps} hands on a partly "
                "denoised latent, which is not supported (set end_at_step >= steps)",
            )
        if not 0 <= start < steps:
            self.issue(
                node_id, "start_at_step", f"KSamplerAdvanced start_at_step {start} must be in 0..{steps - 1}"
            )
            return
        ours["inputs"]["steps"] = steps - start
        ours["inputs"]["denoise"] = (steps - start) / steps

    # -- graph rewrites ------------------------------------------------------------------------
    def fold_custom_samplers(self) -> None:
        """Each SamplerCustomAdvanced takes its parts' settings: one DiTSampler does all four."""
        for node_id, node in self.nodes.items():
            if self.api[node_id].get("class_type") != "SamplerCustomAdvanced":
                continue
            parts = {}
            for name, kinds in CUSTOM_SAMPLER_PARTS.items():
                value = (self.api[node_id].get("inputs") or {}).get(name)
                source = str(value[0]) if _is_link(value) else None
                kind = (self.api.get(source) or {}).get("class_type") if source else None
                if source in self.refused:
                    continue
                if kind not in kinds:
                    found = f", not {kind}" if kind else " (a link)"
                    self.issue(
                        node_id,
                        name,
                        f"SamplerCustomAdvanced {name} must come from {' or '.join(kinds)}{found}",
                    )
                    continue
                parts[name] = self.folded[source]["inputs"]
            if len(parts) < len(CUSTOM_SAMPLER_PARTS):
                continue
            if parts["sigmas"].get("model") != parts["guider"].get("model"):
                self.issue(
                    node_id,
                    "sigmas",
                    "BasicScheduler's model must be the guider's: Tessera's schedule is the sampled model's",
                )
            for name in CUSTOM_SAMPLER_PARTS:
                node["inputs"].update(parts[name])
            _comfy_denoise(node["inputs"])
            for name in ("positive", "negative"):
                if self.trace_controlnets(node["inputs"].get(name)):
                    self.issue(
                        node_id,
                        "guider",
                        "ControlNetApplyAdvanced before a SamplerCustomAdvanced guider is not supported "
                        "(use KSampler)",
                    )

    def check_shifts(self) -> None:
        """ModelSamplingFlux shifts by its width x height, ours by the latent's size: the node passes
        its model on only where the sampler's latent is an empty latent of that very size."""
        for node_id, node in self.nodes.items():
            if self.api[node_id].get("class_type") not in SAMPLERS_OF_A_MODEL:
                continue
            for shift in self._shifts_on(node["inputs"].get("model")):
                width, height = (self.shifts[shift].get(k) for k in ("width", "height"))
                size = self._empty_latent_size(node["inputs"].get("latent"))
                if size is None:
                    self.issue(
                        shift,
                        "width",
                        "ModelSamplingFlux is supported before a sampler whose latent comes from "
                        "EmptyLatentImage/EmptySD3LatentImage (Tessera takes the shift from the "
                        "latent's size, ComfyUI from width x height, and this latent's size is not "
                        "known from the graph)",
                    )
                elif size != (width, height):
                    self.issue(
                        shift,
                        "width",
                        f"ModelSamplingFlux width x height {width}x{height} differs from the latent's "
                        f"{size[0]}x{size[1]}: Tessera's schedule shifts by the latent's size (set them equal)",
                    )

    def _shifts_on(self, link) -> list[str]:
        """ModelSamplingFlux nodes a model link passes through (LoRA loaders included)."""
        found, seen = [], set()
        while isinstance(link, Link) and link.source not in seen:
            seen.add(link.source)
            node = self.api.get(link.source) or {}
            kind = node.get("class_type")
            if kind == "ModelSamplingFlux":
                found.append(link.source)
            elif kind != "LoraLoaderModelOnly":
                break
            nxt = (node.get("inputs") or {}).get("model")
            link = Link(str(nxt[0]), nxt[1]) if _is_link(nxt) else None
        return found

    def _empty_latent_size(self, link) -> tuple[int, int] | None:
        node = self.api.get(link.source) if isinstance(link, Link) else None
        if not node or node.get("class_type") not in ("EmptyLatentImage", "EmptySD3LatentImage"):
            return None
        inputs = node.get("inputs") or {}
        return inputs.get("width"), inputs.get("height")

    def trace_controlnets(self, link) -> list[str]:
        """ControlNetApplyAdvanced nodes a conditioning link passes through, nearest first."""
        found, seen = [], set()
        while isinstance(link, Link) and link.source not in seen:
            seen.add(link.source)
            node = self.api.get(link.source) or {}
            kind, inputs = node.get("class_type"), node.get("inputs") or {}
            if kind == "ControlNetApplyAdvanced":
                found.append(link.source)
                nxt = inputs.get("positive" if link.index == 0 else "negative")
            elif kind in PASS_THROUGH:
                nxt = inputs.get(PASS_THROUGH[kind])
            else:
                break
            link = Link(str(nxt[0]), nxt[1]) if _is_link(nxt) else None
        return found

    def wire_controlnets(self) -> None:
        users: dict[str, list[tuple[str, list[str]]]] = {}
        samplers = [
            i
            for i, n in self.nodes.items()
            if self.api[i].get("class_type") in ("KSampler", "KSamplerAdvanced")
        ]
        for sampler in samplers:
            inputs = self.nodes[sampler]["inputs"]
            chain = []
            for name in ("positive", "negative"):
                chain += [c for c in self.trace_controlnets(inputs.get(name)) if c not in chain]
            current = inputs.get("model")
            for cn in reversed(chain):  # the one nearest the text encoder is applied first
                users.setdefault(cn, []).append((sampler, chain))
                count = sum(1 for s in samplers if cn in self._chain_of(s))
                new_id = cn if count == 1 else f"{cn}:{sampler}"
                node = copy.deepcopy(self.controlnets[cn])
                node["inputs"]["model"] = current
                self.nodes[new_id] = node
                current = {"node": new_id, "output": "model"}
            if chain:
                inputs["model"] = current

    def _chain_of(self, sampler: str) -> list[str]:
        inputs = self.api[sampler].get("inputs") or {}
        links = [
            Link(str(v[0]), v[1]) for v in (inputs.get("positive"), inputs.get("negative")) if _is_link(v)
        ]
        return [c for link in links for c in self.trace_controlnets(link)]

    def connect_empty_latents(self) -> None:
        """ComfyUI sizes an empty latent's channels to the model; ours reads them from a VAE: the
        graph's only VAE source, when there is exactly one."""
        sources = []
        for node_id, node in self.api.items():
            rule = RULES.get(node.get("class_type"))
            types = (
                rule.output_types
                if rule
                else [o.type for o in getattr(self.registry.get(node.get("class_type")), "outputs", ())]
            )
            sources += [Link(str(node_id), i) for i, t in enumerate(types) if t == "VAE"]
        if len(sources) != 1:
            return
        for node_id, node in self.nodes.items():
            if self.api.get(node_id, {}).get("class_type") in ("EmptyLatentImage", "EmptySD3LatentImage"):
                node["inputs"].setdefault("vae", sources[0])

    def resolve(self, node_id: str, name: str, link: Link, depth: int = 0):
        outs = self.outputs.get(link.source)
        if outs is None and link.source in self.refused:
            return None
        if outs is None:
            self.issue(
                node_id, name, f"links to node '{link.source}', which is not in the workflow or not usable"
            )
            return None
        if not isinstance(link.index, int) or not 0 <= link.index < len(outs):
            self.issue(
                node_id,
                name,
                f"links to output {link.index!r} of node '{link.source}', which has {len(outs)}",
            )
            return None
        target, output = outs[link.index]
        if target == "pass":  # ControlNetApplyAdvanced hands its conditioning on
            upstream = (self.api[link.source].get("inputs") or {}).get(output)
            if not _is_link(upstream) or depth > len(self.api):
                self.issue(node_id, name, f"node '{link.source}' has no '{output}' input to pass on")
                return None
            return self.resolve(node_id, name, Link(str(upstream[0]), upstream[1]), depth + 1)
        return {"node": target, "output": output}


def _comfy_denoise(inputs: dict) -> None:
    """ComfyUI walks the last `steps` of a schedule of int(steps / denoise) steps (KSampler and
    BasicScheduler); ours of round(steps / denoise): the denoise that gives ours that very length."""
    steps, denoise = inputs.get("steps"), inputs.get("denoise")
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (steps, denoise))
    if numbers and isinstance(steps, int) and steps >= 1 and 0 < denoise < 1:
        inputs["denoise"] = steps / max(steps, int(steps / denoise))


def _is_link(value: object) -> bool:
    return (
        isinstance(value, list)
        and len(value) == 2
        and isinstance(value[0], (str, int))
        and not isinstance(value[0], bool)
        and isinstance(value[1], int)
        and not isinstance(value[1], bool)
    )


def api_to_tessera(
    api: dict, registry: NodeRegistry, classify: Classify | None = None, layout: dict | None = None
) -> dict:
    """An API-format graph as a Tessera workflow; InvalidWorkflow naming every unsupported part."""
    return _Converter(api, registry, classify, layout or {}).run()


def to_tessera(doc: object, registry: NodeRegistry, classify: Classify | None = None) -> dict:
    """Any ComfyUI document (API, UI, or a PNG's `{"prompt", "workflow"}` pair) as a Tessera workflow."""
    if isinstance(doc, dict) and is_api_format(doc.get("prompt")):
        layout = ui_to_api(doc["workflow"], registry)[1] if is_ui_format(doc.get("workflow")) else {}
        return api_to_tessera(doc["prompt"], registry, classify, layout)
    if is_ui_format(doc):
        api, layout = ui_to_api(doc, registry)
        return api_to_tessera(api, registry, classify, layout)
    if is_api_format(doc):
        return api_to_tessera(doc, registry, classify)
    raise InvalidWorkflow(
        [
            WorkflowIssue(
                None,
                None,
                "not a ComfyUI workflow: expected the API format "
                "{id: {class_type, inputs}} or the UI format {nodes: [...], links: [...]}",
            )
        ]
    )


def read_png(path: Path) -> dict | None:
    """The `{"prompt", "workflow"}` text chunks of a PNG saved by ComfyUI; None for any other PNG."""
    try:
        with Image.open(path) as image:
            text = dict(getattr(image, "text", {}) or {})
    except (OSError, ValueError):
        return None
    found = {}
    for key in ("prompt", "workflow"):
        try:
            found[key] = json.loads(text[key]) if key in text else None
        except json.JSONDecodeError:
            found[key] = None
    if is_api_format(found["prompt"]) or is_ui_format(found["workflow"]):
        return found if found["prompt"] is not None else found["workflow"]
    return None


def file_classifier(models_dir: Path) -> Classify:
    """Tell a text_encoders file's family from its tensor names (nothing is loaded)."""
    from tessera.engines.layouts import detect_family, stored_keys

    def classify(name: str) -> str | None:
        try:
            path = confined_path(Path(models_dir) / "text_encoders", name, (".safetensors",))
            family = detect_family(stored_keys(path))
        except (UnsafePathError, OSError, ValueError, Exception):
            return None
        return {"CLIP text encoder": "clip", "T5 text encoder": "t5"}.get(family)

    return classify
