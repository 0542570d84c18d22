"""How a pruning decision is carried out, in two exactly equivalent ways.

* Masking, in place and undone afterwards: zero the unit's parameter slices. A zeroed conv row with a zeroed BN
  scale AND shift outputs exactly 0, ReLU/GELU(0) = 0, and the consumer's zeroed columns ignore it; a head whose
  q/k/v rows are zero contributes nothing through the zeroed output columns. So a masked model computes the same
  function as the physically smaller one, at a fraction of the cost: that is how distortion curves are measured.
* Physical removal, on a deep copy: Torch-Pruning for dependency groups, our own surgery for attention heads
  (q/k/v rows, output-projection columns, head count), zeros for unstructured and 2:4 weights.

Elements are given as index tensors per unit (which ones comes from the importance ranking, not from here).
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Iterator, Mapping, Sequence

import torch
from torch import nn

from deploy.compress.prune.refit import InputMoments, write_refit
from deploy.compress.prune.units import WEIGHTED, PruneUnit, Slice, dependency_graph, element_channels

Removal = Mapping[str, torch.Tensor]  # unit name -> indices of the elements removed


def slice_params(root: nn.Module, slice_: Slice) -> list[tuple[nn.Parameter, int | None]]:
    """(parameter, dimension) pairs a slice covers; dimension None means flat weight positions."""
    layer = root.get_submodule(slice_.module)
    if slice_.axis == "weights":
        return [(layer.weight, None)]
    if isinstance(layer, nn.modules.batchnorm._BatchNorm):
        return [(p, 0) for p in (layer.weight, layer.bias) if p is not None]
    if not isinstance(layer, WEIGHTED):
        raise TypeError(f"cannot mask {type(layer).__name__} {slice_.module!r}")
    if slice_.axis == "out" or getattr(layer, "groups", 1) > 1:
        return [(p, 0) for p in (layer.weight, layer.bias) if p is not None]
    return [(layer.weight, 1)]


def _zero(param: torch.Tensor, dim: int | None, index: torch.Tensor) -> None:
    if dim is None:
        param.view(-1)[index] = 0.0
    else:
        param.index_fill_(dim, index, 0.0)


class Masker:
    """Zeroes the parameter slices of removed elements in place (after refitting the linear layers that read
    them, given `refit`) and puts every value back afterwards."""

    def __init__(self, module: nn.Module, units: Sequence[PruneUnit], refit: InputMoments | None = None):
        self.module = module
        self.units = {u.name: u for u in units}
        self.refit = refit

    @contextmanager
    def applied(self, removal: Removal) -> Iterator[nn.Module]:
        saved: dict[int, tuple[nn.Parameter, torch.Tensor]] = {}
        try:
            with torch.no_grad():
                if self.refit is not None:
                    for param, original in write_refit(self.module, self.refit, self.units.values(), removal):
                        saved.setdefault(id(param), (param, original))
                for name, elements in removal.items():
                    if len(elements) == 0:
                        continue
                    for slice_ in self.units[name].slices:
                        index = element_channels(slice_, elements)
                        for param, dim in slice_params(self.module, slice_):
                            if id(param) not in saved:
                                saved[id(param)] = (param, param.detach().clone())
                            _zero(param.data, dim, index)
            yield self.module
        finally:
            with torch.no_grad():
                for param, original in saved.values():
                    param.data.copy_(original)


def remove_physically(module: nn.Module, example_inputs: tuple[torch.Tensor, ...], units: Sequence[PruneUnit],
                      removal: Removal, refit: InputMoments | None = None) -> nn.Module:
    """A deep copy of `module` with the elements gone: smaller layers, fewer heads, or zeroed weights; with
    `refit`, the linear layers reading removed channels refit first (`refit`)."""
    model = copy.deepcopy(module).eval()
    if refit is not None:
        write_refit(model, refit, units, removal)
    by_name = {u.name: u for u in units}
    todo = {n: torch.as_tensor(e, dtype=torch.long) for n, e in removal.items() if len(e)}
    channel_units = [n for n in todo if by_name[n].kind == "channels"]
    if channel_units:
        graph = dependency_graph(model, example_inputs)
        for name in channel_units:
            root = model.get_submodule(by_name[name].root)
            pruner = graph.get_pruner_of_module(root)
            group = graph.get_pruning_group(root, pruner.prune_out_channels, sorted(todo[name].tolist()))
            group.prune()
    with torch.no_grad():
        for name, elements in todo.items():
            unit = by_name[name]
            if unit.kind == "heads":
                remove_heads(model, unit, elements)
            elif unit.kind in ("sparse", "2:4"):
                model.get_submodule(unit.root).weight.view(-1)[elements] = 0.0
    return model


def remove_heads(model: nn.Module, unit: PruneUnit, heads: torch.Tensor) -> None:
    """Slice q/k/v rows and the output projection's columns; update the head count and all-head size that
    transformers' BertSelfAttention reads (its forward reshapes by attention_head_size, which stays)."""
    attn = model.get_submodule(unit.root)
    width = int(attn.attention_head_size)
    gone = set(int(h) for h in heads)
    keep_heads = [h for h in range(int(attn.num_attention_heads)) if h not in gone]
    if not keep_heads:
        raise ValueError(f"{unit.name}: cannot remove every head")
    keep = element_channels(Slice("", "out", width), torch.tensor(keep_heads))
    for slice_ in unit.slices:
        layer = model.get_submodule(slice_.module)
        _keep_linear(layer, keep, slice_.axis)
    attn.num_attention_heads = len(keep_heads)
    attn.all_head_size = len(keep_heads) * width


def _keep_linear(layer: nn.Linear, keep: torch.Tensor, axis: str) -> None:
    if axis == "out":
        layer.weight = nn.Parameter(layer.weight.data[keep].clone())
        if layer.bias is not None:
            layer.bias = nn.Parameter(layer.bias.data[keep].clone())
        layer.out_features = len(keep)
    else:
        layer.weight = nn.Parameter(layer.weight.data[:, keep].clone())
        layer.in_features = len(keep)
