"""LoRA: low-rank and dense weight updates read from the formats in use, applied without touching the base.

Formats (any mix in one file):
- kohya / sd-scripts: `lora_unet_<module path with _>.lora_down.weight / .lora_up.weight / .alpha`
  (e.g. `lora_unet_double_blocks_0_img_attn_qkv`, or `lora_transformer_<diffusers path>`);
- diffusers / PEFT: `<module>.lora_A.weight / .lora_B.weight` (optionally `.lora_A.<adapter>.weight`,
  `.lora.down/up`), with or without a `transformer.` / `base_model.model.` / `diffusion_model.` prefix;
- dense deltas: `<module>.diff` (weight) and `<module>.diff_b` (bias), ComfyUI's format.

Module names may follow the model's own layout (BFL for the DiT, LlamaGen for the GPT) or, for the
DiT, the diffusers `FluxTransformer2DModel` layout: a diffusers module lands on the rows of the fused
BFL weight that `flux.convert_diffusers_dit` puts it in (`attn.to_k` → the middle third of
`img_attn.qkv`), a map derived by running that converter on row-tagged tensors, not written twice.

Applying: `with_loras(model, [(lora, strength), ...])` returns a new model object of the same class
that shares every base tensor. Low-rank updates run in the forward (`LoraLinear` adds
strength·scale·up(down(x)) to the touched output rows); dense deltas are merged into fresh tensors
owned by the copy. The base module is never written, so a cached base stays valid for every other
user, and several strengths of one base can live side by side.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checkpoint import CheckpointError, read_safetensors
from .fp8 import is_fp8

# ---------------------------------------------------------------- what a LoRA file holds


@dataclass(frozen=True)
class Update:
    """One update to one parameter of the model: low-rank (down, up) or dense (diff)."""

    target: str  # parameter name in the model's state dict, e.g. "double_blocks.0.img_attn.qkv.weight"
    rows: Tensor | None  # output rows of the target the update covers, in the update's row order; None = all
    scale: float  # alpha / rank for low-rank updates, 1 for dense ones
    down: Tensor | None = None  # [rank, in]
    up: Tensor | None = None  # [rows, rank]
    diff: Tensor | None = None  # dense delta shaped like target[rows]
    source: str = ""  # the file's key stem it came from

    @property
    def low_rank(self) -> bool:
        return self.down is not None

    def delta(self) -> Tensor:
        """The dense update (fp32) for target[rows], strength 1."""
        if self.low_rank:
            return (self.up.float() @ self.down.float()) * self.scale
        return self.diff.float() * self.scale


@dataclass
class Lora:
    """The updates a file applies to one model, and the file keys it could not use (key -> why)."""

    name: str
    updates: list[Update]
    matched: int  # file keys used
    unmatched: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        text = f"{self.name}: {self.matched} keys matched, {len(self.updates)} weights updated"
        if self.unmatched:
            shown = ", ".join(f"{k} ({why})" for k, why in list(self.unmatched.items())[:8])
            more = f" and {len(self.unmatched) - 8} more" if len(self.unmatched) > 8 else ""
            text += f"; {len(self.unmatched)} keys not applied: {shown}{more}"
        return text


# ---------------------------------------------------------------- key names

# suffix -> role; PEFT may put an adapter name between lora_A and weight
_SUFFIX = re.compile(
    r"^(?P<stem>.+?)\.(?:"
    r"(?P<down>lora_down\.weight|lora_A(?:\.[^.]+)?\.weight|lora\.down\.weight|lora_linear_layer\.down\.weight)"
    r"|(?P<up>lora_up\.weight|lora_B(?:\.[^.]+)?\.weight|lora\.up\.weight|lora_linear_layer\.up\.weight)"
    r"|(?P<alpha>alpha)|(?P<diff_b>diff_b)|(?P<diff>diff))$"
)
_UNSUPPORTED = re.compile(r"\.(dora_scale|lora_mid\.weight|hada_\w+|lokr_\w+|lora_magnitude_vector.*)$")
_KOHYA_PREFIXES = ("lora_unet_", "lora_transformer_", "lycoris_")
_DOTTED_PREFIXES = (
    "base_model.model.",
    "model.diffusion_model.",
    "diffusion_model.",
    "transformer.",
    "unet.",
    "model.",
)


def _split_key(key: str) -> tuple[str, str] | None:
    """(stem, role) with role in down/up/alpha/diff/diff_b, or None for a key of no known format."""
    m = _SUFFIX.match(key)
    if not m:
        return None
    role = next(r for r in ("down", "up", "alpha", "diff_b", "diff") if m.group(r))
    return m.group("stem"), role


# ---------------------------------------------------------------- diffusers Flux names → BFL rows

_ROW_TAGS = 2  # tag rows per source tensor: enough to see a source split in halves and reordered


def _run_converter_on_tags(
    depth: int, depth_single: int, guidance: bool
) -> tuple[dict[str, Tensor], list[str]]:
    """Run `convert_diffusers_dit` on tagged stand-ins for every diffusers tensor it asks for.

    Each stand-in is a [2, 1] float64 column holding (2·i, 2·i+1) for the i-th source name, so the
    converted tensors say which source rows they are made of. The converter names the tensor it
    misses (add it) or the one it did not use (drop it: a block-count seed or a wrong bias guess).
    """
    from .flux import convert_diffusers_dit

    names: list[str] = []
    sd: dict[str, Tensor] = {}

    def add(name: str) -> None:
        sd[name] = torch.tensor([[2.0 * len(names)], [2.0 * len(names) + 1]], dtype=torch.float64)
        names.append(name)

    # seeds make the converter count the blocks; once it has asked for real keys they are dropped
    for i in range(depth):
        add(f"transformer_blocks.{i}.seed")
    for i in range(depth_single):
        add(f"single_transformer_blocks.{i}.seed")
    if guidance:
        add("time_text_embed.guidance_embedder.linear_1.weight")
        add("time_text_embed.guidance_embedder.linear_1.bias")
    for _ in range(100_000):
        try:
            return convert_diffusers_dit(sd), names
        except CheckpointError as e:
            if e.key is None:
                raise
            if e.key in sd:
                del sd[e.key]
            else:
                add(e.key)
                if e.key.endswith(".weight"):  # the converter takes a bias only when one is there
                    add(e.key[: -len(".weight")] + ".bias")
    raise RuntimeError("deriving the diffusers → BFL key map did not converge")


_BLOCK = re.compile(r"^(transformer_blocks|single_transformer_blocks|double_blocks|single_blocks)\.0\.")


@lru_cache(maxsize=16)
def _diffusers_layout(
    depth: int, depth_single: int, guidance: bool
) -> dict[str, tuple[str, tuple[tuple[str, int], ...]]]:
    """diffusers parameter -> (BFL parameter, the (source, half) blocks of that BFL tensor in row order).

    Derived on one block of each kind, then repeated for every block index (blocks are alike).
    """
    converted, names = _run_converter_on_tags(min(depth, 1), min(depth_single, 1), guidance)
    one = {}
    for bfl, t in converted.items():
        blocks = tuple((names[int(v) // 2], int(v) % 2) for v in t.flatten().tolist())
        for src, _ in blocks:
            one[src] = (bfl, blocks)
    out = {}
    for src, (bfl, blocks) in one.items():
        m = _BLOCK.match(src)
        if m is None:
            out[src] = (bfl, blocks)
            continue
        for i in range(depth if m.group(1) == "transformer_blocks" else depth_single):

            def at(name: str, i: int = i) -> str:
                return _BLOCK.sub(lambda g: f"{g.group(1)}.{i}.", name)

            out[at(src)] = (at(bfl), tuple((at(s), h) for s, h in blocks))
    return out


def _source_rows(blocks: tuple[tuple[str, int], ...], source: str, rows: int, in_features: int) -> Tensor:
    """Rows of a BFL tensor that one diffusers source fills, in the source's own row order.

    Fused sources (q, k, v, mlp stacked along the output dim) are contiguous and in order; all but
    the last are square (in_features rows: q, k, v) and the last takes the rest (the single blocks'
    MLP), which holds for every fused Flux linear. A lone source may come split in halves and
    reordered (the final modulation: diffusers (scale, shift), BFL (shift, scale)).
    """
    order = list(dict.fromkeys(src for src, _ in blocks))
    if len(order) > 1:
        sizes = [in_features] * (len(order) - 1) + [rows - in_features * (len(order) - 1)]
        i = order.index(source)
        first = sum(sizes[:i])
        return torch.arange(first, first + sizes[i])
    if rows % _ROW_TAGS:
        return torch.arange(rows)
    part = rows // _ROW_TAGS
    where = {half: j for j, (_, half) in enumerate(blocks)}  # half of the source -> its block position
    return torch.cat([torch.arange(where[h] * part, (where[h] + 1) * part) for h in range(_ROW_TAGS)])


# ---------------------------------------------------------------- matching a file to a model


class _Targets:
    """How file names map onto one model's parameters: its own names, and (DiT) diffusers names."""

    def __init__(self, model: nn.Module):
        self.shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        self.diffusers: dict[str, tuple[str, tuple]] = {}
        from .flux import Flux

        if isinstance(model, Flux):
            c = model.config
            self.diffusers = _diffusers_layout(c.depth, c.depth_single, c.guidance_embed)
        modules = {k.rsplit(".", 1)[0] for k in list(self.shapes) + list(self.diffusers) if "." in k}
        under: dict[str, str | None] = {}
        for m in modules:
            u = m.replace(".", "_")
            under[u] = None if u in under and under[u] != m else m  # ambiguous underscores match nothing
        self.underscored = {u: m for u, m in under.items() if m is not None}

    def module_stem(self, stem: str) -> str | None:
        """A dotted module path in either layout for a file's stem (prefixes and kohya underscores undone)."""
        for prefix in _KOHYA_PREFIXES:
            if stem.startswith(prefix):
                return self.underscored.get(stem[len(prefix) :])
        candidates = [stem] + [stem[len(p) :] for p in _DOTTED_PREFIXES if stem.startswith(p)]
        for c in candidates:
            if self._known(c + ".weight") or self._known(c + ".bias") or self._known(c):
                return c
        return None

    def _known(self, name: str) -> bool:
        return name in self.shapes or name in self.diffusers

    def param(self, name: str) -> tuple[str, Tensor | None] | None:
        """(our parameter, rows or None) for a parameter name in either layout."""
        if name in self.shapes:
            return name, None
        if name not in self.diffusers:
            return None
        bfl, blocks = self.diffusers[name]
        shape = self.shapes[bfl]
        weight = self.shapes.get(bfl.rsplit(".", 1)[0] + ".weight", shape)
        in_features = weight[1] if len(weight) > 1 else weight[0]
        rows = _source_rows(blocks, name, shape[0], in_features)
        if len(rows) == shape[0] and torch.equal(rows, torch.arange(shape[0])):
            rows = None
        return bfl, rows


def _as_matrix(t: Tensor) -> Tensor:
    """LoRA factors saved as 1x1 convolutions ([out, in, 1, 1]) are matrices."""
    return t.flatten(1) if t.dim() == 4 and t.shape[2:] == (1, 1) else t


def lora_from_state_dict(sd: dict[str, Tensor], model: nn.Module, name: str = "<state dict>") -> Lora:
    """Match a LoRA state dict against `model`; raises CheckpointError when nothing matches."""
    targets = _Targets(model)
    groups: dict[str, dict[str, tuple[str, Tensor]]] = {}
    unmatched: dict[str, str] = {}
    for key, t in sd.items():
        if _UNSUPPORTED.search(key):
            unmatched[key] = "unsupported LoRA variant"
            continue
        split = _split_key(key)
        if split is None:
            unmatched[key] = "not a LoRA key"
            continue
        stem, role = split
        groups.setdefault(stem, {})[role] = (key, t)

    updates: list[Update] = []
    matched = 0

    def reject(parts: dict[str, tuple[str, Tensor]], why: str) -> None:
        for key, _ in parts.values():
            unmatched[key] = why

    for stem, parts in groups.items():
        module = targets.module_stem(stem)
        if module is None:
            reject(parts, "no such module in this model")
            continue
        used: list[str] = []
        if "down" in parts or "up" in parts:
            if not ("down" in parts and "up" in parts):
                reject(
                    {r: parts[r] for r in ("down", "up", "alpha") if r in parts},
                    "lora_down/up pair incomplete",
                )
            else:
                placed = targets.param(module + ".weight")
                down, up = _as_matrix(parts["down"][1]), _as_matrix(parts["up"][1])
                why = _check_low_rank(placed, targets, down, up)
                if why:
                    reject({r: parts[r] for r in ("down", "up", "alpha") if r in parts}, why)
                else:
                    rank = down.shape[0]
                    alpha = float(parts["alpha"][1]) if "alpha" in parts else float(rank)
                    updates.append(Update(placed[0], placed[1], alpha / rank, down=down, up=up, source=stem))
                    used += [parts[r][0] for r in ("down", "up", "alpha") if r in parts]
        elif "alpha" in parts:
            reject({"alpha": parts["alpha"]}, "alpha without lora_down/up")
        for role, suffix in (("diff", ".weight"), ("diff_b", ".bias")):
            if role not in parts:
                continue
            placed = targets.param(module + suffix) or (targets.param(module) if role == "diff" else None)
            diff = parts[role][1]
            why = _check_dense(placed, targets, diff)
            if why:
                reject({role: parts[role]}, why)
            else:
                updates.append(Update(placed[0], placed[1], 1.0, diff=diff, source=stem))
                used.append(parts[role][0])
        matched += len(used)

    if not updates:
        examples = ", ".join(list(sd)[:3])
        raise CheckpointError(
            name, f"no LoRA tensor matches this model ({len(sd)} keys, none applicable; e.g. {examples})"
        )
    return Lora(Path(str(name)).name, updates, matched, unmatched)


def _check_low_rank(placed, targets: _Targets, down: Tensor, up: Tensor) -> str | None:
    if placed is None:
        return "module has no weight"
    shape = targets.shapes[placed[0]]
    if len(shape) != 2:
        return f"target {placed[0]} is not a matrix"
    rows = shape[0] if placed[1] is None else len(placed[1])
    if down.dim() != 2 or up.dim() != 2 or up.shape[1] != down.shape[0]:
        return f"lora_down {tuple(down.shape)} and lora_up {tuple(up.shape)} do not form a product"
    if (up.shape[0], down.shape[1]) != (rows, shape[1]):
        return f"update {(up.shape[0], down.shape[1])} does not fit {placed[0]} rows {(rows, shape[1])}"
    return None


def _check_dense(placed, targets: _Targets, diff: Tensor) -> str | None:
    if placed is None:
        return "no such parameter in this model"
    shape = targets.shapes[placed[0]]
    want = shape if placed[1] is None else (len(placed[1]),) + shape[1:]
    if tuple(diff.shape) != tuple(want):
        return f"diff {tuple(diff.shape)} does not fit {placed[0]} {tuple(want)}"
    return None


def load_lora(path: str | Path, model: nn.Module) -> Lora:
    """Read a LoRA `.safetensors` file and match it to `model` (errors name the file)."""
    sd, _ = read_safetensors(path)
    return lora_from_state_dict(sd, model, path)


# ---------------------------------------------------------------- applying in the forward


@dataclass
class Adapter:
    """A low-rank path added to some output rows of a linear layer: scale · up(down(x))."""

    down: Tensor  # [rank, in]
    up: Tensor  # [rows, rank]
    scale: float
    rows: Tensor | slice | None  # None: all outputs; slice: contiguous rows; Tensor: an index


def _rows_arg(rows: Tensor | None) -> Tensor | slice | None:
    if rows is None:
        return None
    start = int(rows[0])
    if torch.equal(rows, torch.arange(start, start + len(rows))):
        return slice(start, start + len(rows))
    return rows


class LoraLinear(nn.Linear):
    """An `nn.Linear` sharing another's weight and bias, plus low-rank adapters applied in the forward.

    It keeps the base layer's parameter names, so the model's state dict is unchanged; the
    adapters are plain attributes (trainers hand them to the optimizer themselves).
    """

    adapters: list[Adapter]

    @classmethod
    def sharing(cls, base: nn.Linear) -> LoraLinear:
        layer = _copy_module(base)
        layer.__class__ = cls
        layer.adapters = list(getattr(base, "adapters", []))
        return layer

    def forward(self, x: Tensor) -> Tensor:
        weight, bias = self.weight, self.bias
        if is_fp8(weight.dtype):  # an fp8-stored layer (engines/fp8.py): upcast per call, as Fp8Linear does
            if is_fp8(x.dtype):
                x = x.to(_compute_dtype(self))
            weight, bias = weight.to(x.dtype), None if bias is None else bias.to(x.dtype)
        out = F.linear(x, weight, bias)
        for a in self.adapters:
            y = F.linear(F.linear(x, a.down), a.up) * a.scale
            if a.rows is None:
                out = out + y
            elif isinstance(a.rows, slice):
                out[..., a.rows] += y
            else:
                out = out.index_add(-1, a.rows, y)
        return out


def _compute_dtype(layer: nn.Linear) -> torch.dtype:
    """The dtype a layer computes in: its weight's, or for an fp8-stored one the dtype it upcasts to."""
    if is_fp8(layer.weight.dtype):
        return getattr(layer, "compute_dtype", torch.bfloat16)
    return layer.weight.dtype


def _copy_module(m: nn.Module) -> nn.Module:
    """A new module object with its own parameter/buffer/child tables pointing at the same tensors."""
    c = copy.copy(m)
    c._parameters = dict(m._parameters)
    c._buffers = dict(m._buffers)
    c._modules = dict(m._modules)
    return c


def copy_structure(model: nn.Module) -> nn.Module:
    """Copy every module object of `model` while sharing all of its tensors.

    Changing what a copied module holds (a layer swapped, a parameter replaced, a cache set) leaves
    the original untouched; the weights themselves are not duplicated.
    """
    c = _copy_module(model)
    if isinstance(c, LoraLinear):
        c.adapters = list(c.adapters)
    for name, child in model._modules.items():
        c._modules[name] = None if child is None else copy_structure(child)
    return c


def with_loras(model: nn.Module, loras: Sequence[tuple[Lora, float]]) -> nn.Module:
    """A new model of the same class sharing every base tensor, with each LoRA applied at its strength.

    Low-rank updates on linear weights run in the forward; dense ones (and low-rank ones on other
    parameters) are merged into new tensors that only the copy holds. `model` is never written.
    """
    new = copy_structure(model)
    if hasattr(new, "clear_caches"):  # decoding state belongs to a run, not to the weights
        new.clear_caches()
    for lora, strength in loras:
        if strength == 0:
            continue
        for u in lora.updates:
            path, pname = u.target.rsplit(".", 1)
            parent_path, _, child = path.rpartition(".")
            module = new.get_submodule(path)
            if u.low_rank and pname == "weight" and isinstance(module, nn.Linear):
                if not isinstance(module, LoraLinear):
                    module = LoraLinear.sharing(module)
                    new.get_submodule(parent_path)._modules[child] = module
                w, dtype = module.weight, _compute_dtype(module)  # adapters never in fp8
                module.adapters.append(
                    Adapter(
                        u.down.to(w.device, dtype),
                        u.up.to(w.device, dtype),
                        strength * u.scale,
                        _rows_arg(u.rows),
                    )
                )
            else:
                old = module._parameters[pname] if pname in module._parameters else module._buffers[pname]
                merged = _add_rows(old.detach(), u.rows, strength * u.delta())
                if pname in module._parameters:
                    module._parameters[pname] = nn.Parameter(merged, requires_grad=False)
                else:
                    module._buffers[pname] = merged
    return new


def _add_rows(base: Tensor, rows: Tensor | None, delta: Tensor) -> Tensor:
    """base + delta on `rows` (all when None), computed in fp32, returned as a new tensor in base's dtype."""
    out = base.float().clone()
    delta = delta.to(out.device)
    if rows is None:
        out += delta
    else:
        out.index_add_(0, rows.to(out.device), delta)
    return out.to(base.dtype)
