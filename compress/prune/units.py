"""What pruning may legally remove: prunable units and the element counts each may lose.

A unit is the smallest thing whose elements must go together, described as PARAMETER SLICES so that one
description serves masking (sensitivity), physical removal (surgery) and counting (costs):

* ``channels``: a Torch-Pruning dependency group rooted at a conv or linear layer: a conv block's channels, a
  residual stage's coupled channels, a transformer's FFN neurons. The model's output layer never loses outputs.
  Groups that touch a parameterised layer we cannot zero-mask exactly (LayerNorm, embeddings: a BERT's hidden
  size) are not offered.
* ``heads``: attention heads of a BERT-style self-attention (q/k/v rows plus the output projection's columns),
  removed by our own surgery because Torch-Pruning's head handling fails on transformers 5 (DESIGN section 8).
* ``sparse``: one Conv/Linear weight, pruned unstructured by magnitude (the seed paper's own setting).
* ``2:4``: one Conv/Linear weight, two of every four consecutive input weights zeroed; offered only when the
  profile runs 2:4 sparsity.

Which elements go first (importance) and how many (curves + allocator) are decided elsewhere.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Literal, Sequence

import torch
from torch import nn

Mode = Literal["structured", "unstructured", "2:4"]
KINDS = ("channels", "heads", "sparse", "2:4")
MASKABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.modules.batchnorm._BatchNorm)
WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass(frozen=True)
class Slice:
    """The parameters of `module` along one axis that belong to a unit's elements.

    axis "out": weight rows, bias, and norm scale/shift; axis "in": weight columns. Element i covers `width`
    consecutive channels starting at i * width (a head covers head_size channels); `weights` marks a whole weight
    tensor whose elements are single weights (unstructured and 2:4 units).
    """

    module: str
    axis: Literal["out", "in", "weights"]
    width: int = 1


def element_channels(slice_: Slice, elements: torch.Tensor) -> torch.Tensor:
    """Channel (or flat weight) indices of `elements` along the slice's axis."""
    elements = torch.as_tensor(elements, dtype=torch.long).reshape(-1)
    if slice_.width == 1:
        return elements
    return (elements[:, None] * slice_.width + torch.arange(slice_.width)).reshape(-1)


@dataclass(frozen=True)
class PruneUnit:
    """A legal unit: `size` elements, of which any count in `options` (ascending, starting at 0) may be removed."""

    name: str
    kind: str
    root: str  # the module that roots the unit (a group's first layer, an attention module, a weighted layer)
    size: int
    slices: tuple[Slice, ...]
    options: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unit kind must be one of {KINDS}, got {self.kind!r}")
        if not self.options or self.options[0] != 0 or max(self.options) >= self.size:
            raise ValueError(f"unit {self.name!r}: options must start at 0 and keep at least one element")

    def nearest_option(self, ratio: float) -> int:
        """The legal removal count closest to `ratio` of the elements (ties go to removing fewer)."""
        want = ratio * self.size
        return min(self.options, key=lambda n: (abs(n - want), n))


@dataclass(frozen=True)
class UnitConfig:
    mode: Mode = "structured"
    channel_multiple: int = 1
    grid: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(19))  # 0.0 .. 0.9
    sparse_2_4: bool = False  # the target runs 2:4 sparsity (profile.sparse_2_4)

    def __post_init__(self) -> None:
        if self.channel_multiple < 1:
            raise ValueError(f"channel_multiple must be >= 1, got {self.channel_multiple}")
        if not self.grid or any(not 0.0 <= r < 1.0 for r in self.grid):
            raise ValueError("grid ratios must lie in [0, 1)")
        if self.mode == "2:4" and not self.sparse_2_4:
            raise ValueError("2:4 sparsity is offered only for targets that run it (profile.sparse_2_4 = true)")


def legal_removals(size: int, width: int, multiple: int, grid: Iterable[float]) -> tuple[int, ...]:
    """Removal counts for the grid: kept channels (elements x width) rounded to the multiple, never zero.

    A unit no wider than one multiple stays whole; when its width is not a multiple, keeping all is legal too.
    """
    valid_kept = [k for k in range(1, size + 1) if (k * width) % multiple == 0 or k == size]
    options = set()
    for ratio in grid:
        if ratio == 0.0:
            options.add(0)
            continue
        want = size * (1.0 - ratio)
        kept = min(valid_kept, key=lambda k: (abs(k - want), -k))
        options.add(size - kept)
    return tuple(sorted(options))


def find_units(module: nn.Module, example_inputs: tuple[torch.Tensor, ...], config: UnitConfig) -> list[PruneUnit]:
    """Every unit of `module` that may lose something in this mode, in a deterministic order."""
    return [u for u in all_units(module, example_inputs, config) if len(u.options) > 1]


def all_units(module: nn.Module, example_inputs: tuple[torch.Tensor, ...], config: UnitConfig) -> list[PruneUnit]:
    """Every unit's structure, including those that the multiple leaves nothing to remove from."""
    if config.mode != "structured":
        return weight_units(module, config)
    heads = head_units(module, config)
    skip = {s.module for u in heads for s in u.slices}
    return channel_units(module, example_inputs, config, skip) + heads


# --- channels: Torch-Pruning dependency groups --------------------------------------------------------------------

def output_layer(module: nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> str | None:
    """The last weighted layer the forward pass runs: its outputs are the model's outputs."""
    names = {m: n for n, m in module.named_modules()}
    order: list[str] = []
    hooks = [m.register_forward_hook(lambda m, i, o: order.append(names[m]))
             for m in module.modules() if isinstance(m, WEIGHTED)]
    try:
        with torch.no_grad():
            module(*example_inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return order[-1] if order else None


def output_sum(output: Any) -> torch.Tensor:
    """Reduce any model output (tensor, tuple, dict, ModelOutput) to a scalar for Torch-Pruning's tracing."""
    if isinstance(output, torch.Tensor):
        return output.float().sum()
    values = output.values() if isinstance(output, dict) else output
    tensors = [v for v in values if isinstance(v, torch.Tensor) and v.is_floating_point()]
    return sum(t.sum() for t in tensors)


def dependency_graph(module: nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> Any:
    import torch_pruning as tp

    return tp.DependencyGraph().build_dependency(module, example_inputs=example_inputs, output_transform=output_sum)


def channel_units(module: nn.Module, example_inputs: tuple[torch.Tensor, ...], config: UnitConfig,
                  skip: set[str] = frozenset()) -> list[PruneUnit]:
    """Coupled-channel groups from Torch-Pruning, kept only where zero-masking equals removal."""
    graph = dependency_graph(module, example_inputs)
    names = {m: n for n, m in module.named_modules()}
    last = output_layer(module, example_inputs)
    skip = set(skip) | attention_projections(module)
    ignored = [module.get_submodule(n) for n in ({last} if last else set()) | skip]
    units = []
    for group in graph.get_all_groups(ignored_layers=ignored, root_module_types=list(WEIGHTED)):
        unit = _group_unit(graph, group, names, config, skip)
        if unit is not None:
            units.append(unit)
    return units


HEAD_COUNT_ATTRIBUTES = ("num_attention_heads", "num_heads", "n_heads", "n_head", "heads")


def attention_projections(module: nn.Module) -> set[str]:
    """Linear layers directly inside an attention-like module (one that counts heads in an int attribute). Their
    channels are head dimensions that a reshape by head size couples (a fused qkv projection even interleaves
    three of them); only whole-head surgery may remove them."""
    found = set()
    for name, sub in module.named_modules():
        if any(isinstance(getattr(sub, a, None), int) and not isinstance(getattr(sub, a), bool)
               for a in HEAD_COUNT_ATTRIBUTES):
            found |= {f"{name}.{child}" if name else child for child, layer in sub.named_children()
                      if isinstance(layer, nn.Linear)}
    return found


def _group_unit(graph: Any, group: Any, names: dict[nn.Module, str], config: UnitConfig,
                skip: set[str]) -> PruneUnit | None:
    slices: list[Slice] = []
    size = None
    for dep, idxs in group:
        target = dep.target.module
        if not isinstance(target, nn.Module) or not any(True for _ in target.parameters(recurse=False)):
            continue  # tracing-only nodes (adds, reshapes): nothing to mask
        name = names.get(target)
        if name is None or name in skip or not isinstance(target, MASKABLE):
            return None  # LayerNorm, embeddings, attention projections: not exactly maskable here
        count = len(idxs)
        if size is None:
            size = count
        if count != size or [int(i) for i in idxs] != list(range(size)):
            return None  # index remapping (concat, flatten into a wide layer): not offered
        one_axis = isinstance(target, nn.modules.batchnorm._BatchNorm) or getattr(target, "groups", 1) > 1
        axis = "out" if one_axis or graph.is_out_channel_pruning_fn(dep.handler) else "in"  # depthwise: rows only
        if axis_length(target, axis) != size:
            return None  # the tracer coupled axes of different lengths (a fused qkv reshaped into heads)
        slice_ = Slice(name, axis)
        if slice_ not in slices:
            slices.append(slice_)
    if size is None or not slices:
        return None
    root = slices[0].module
    options = legal_removals(size, 1, config.channel_multiple, config.grid)
    return PruneUnit(f"channels:{root}", "channels", root, size, tuple(slices), options)


def axis_length(layer: nn.Module, axis: str) -> int:
    """Channels of a maskable layer along a slice axis ("out": rows, norm features; "in": weight columns)."""
    if isinstance(layer, nn.modules.batchnorm._BatchNorm):
        return int(layer.num_features)
    return int(layer.weight.shape[0] if axis == "out" or getattr(layer, "groups", 1) > 1 else layer.weight.shape[1])


# --- heads: BERT-style self-attention -----------------------------------------------------------------------------

def attention_modules(module: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(name, self-attention module, name of its output projection) for every BERT-style attention."""
    found = []
    for name, sub in module.named_modules():
        if not all(isinstance(getattr(sub, a, None), nn.Linear) for a in ("query", "key", "value")):
            continue
        if not hasattr(sub, "num_attention_heads") or not hasattr(sub, "attention_head_size"):
            continue
        parent = name.rsplit(".", 1)[0] if "." in name else ""
        try:
            proj = module.get_submodule(f"{parent}.output.dense" if parent else "output.dense")
        except AttributeError:
            continue
        if isinstance(proj, nn.Linear) and proj.in_features == sub.query.out_features:
            found.append((name, sub, f"{parent}.output.dense" if parent else "output.dense"))
    return found


def head_units(module: nn.Module, config: UnitConfig) -> list[PruneUnit]:
    units = []
    for name, attn, proj in attention_modules(module):
        heads, width = int(attn.num_attention_heads), int(attn.attention_head_size)
        slices = tuple(Slice(f"{name}.{p}", "out", width) for p in ("query", "key", "value")) + (
            Slice(proj, "in", width),)
        options = legal_removals(heads, width, config.channel_multiple, config.grid)
        units.append(PruneUnit(f"heads:{name}", "heads", name, heads, slices, options))
    return units


# --- single weights: unstructured and 2:4 -------------------------------------------------------------------------

def weight_units(module: nn.Module, config: UnitConfig) -> list[PruneUnit]:
    units = []
    for name, layer in module.named_modules():
        if not isinstance(layer, WEIGHTED):
            continue
        size = layer.weight.numel()
        if config.mode == "unstructured":
            options = tuple(sorted({int(round(r * size)) for r in config.grid}))
            units.append(PruneUnit(f"sparse:{name}", "sparse", name, size, (Slice(name, "weights"),), options))
        elif input_width(layer) % 4 == 0:
            units.append(PruneUnit(f"2:4:{name}", "2:4", name, size, (Slice(name, "weights"),), (0, size // 2)))
    return units


def input_width(layer: nn.Module) -> int:
    """Length of the reduction dimension that 2:4 groups run along (input channels / features)."""
    return int(layer.weight.shape[1])


def kept_counts(units: Sequence[PruneUnit], removed: dict[str, int]) -> dict[str, int]:
    """Elements each unit keeps under a plan (unit name -> removed count)."""
    return {u.name: u.size - int(removed.get(u.name, 0)) for u in units}


def ratio_of(unit: PruneUnit, removed: int) -> float:
    return round(removed / unit.size, 4) if unit.size else 0.0


def check_plan(units: Sequence[PruneUnit], removed: dict[str, int]) -> None:
    """Every count must be one of its unit's legal options (never all, multiples respected)."""
    by_name = {u.name: u for u in units}
    for name, count in removed.items():
        if name not in by_name:
            raise ValueError(f"plan names unknown unit {name!r}")
        if int(count) not in by_name[name].options:
            raise ValueError(f"unit {name!r}: removing {count} is not a legal option {by_name[name].options}")
