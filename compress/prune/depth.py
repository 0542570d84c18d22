"""Depth pruning: whole residual blocks dropped (a transformer's layers, a ResNet stage's identity blocks).

Width pruning thins every layer; dropping a block removes all of its work at once, and with distillation a deep
model often loses less from a dropped block than from the same latency cut spread over every layer (ShortGPT,
"keep every other layer" baselines). A block is droppable where skipping it leaves a model that still runs:

* it is a composite module (has children, and is not a Sequential or ModuleList: those group blocks) holding a
  Conv or Linear layer, of a class that occurs at least twice (the repeated unit of an architecture: BertLayer,
  BasicBlock), not inside another droppable block;
* it is called once per forward pass, and returns one tensor shaped like its first positional input (so the
  identity, `Skip`, can stand in for it: a residual block's output minus its branch);
* the model with it skipped runs and gives outputs of the original shapes.

A dropped block is replaced in place by `Skip`, so every other module keeps its name: width plans, precision
labels and distillation's block matching name the same layers whether or not blocks were dropped.
"""
from __future__ import annotations

import copy
from collections import Counter
from typing import Any, Sequence

import torch
from torch import nn

from deploy.core.errors import ConfigError
from deploy.core.metrics import first_tensor

WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)  # groupings, not blocks: their elements are the blocks


class Skip(nn.Module):
    """A dropped block: returns its first input unchanged."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return x


def droppable_blocks(module: nn.Module, example: tuple[torch.Tensor, ...]) -> list[str]:
    """The blocks of `module` that may be dropped (see the module docstring), in module order."""
    classes = Counter(type(m) for m in module.modules())
    named = [(n, m) for n, m in module.named_modules() if n and not isinstance(m, (Skip, *CONTAINERS))
             and classes[type(m)] >= 2 and any(True for _ in m.children())
             and any(isinstance(x, WEIGHTED) for x in m.modules())]
    calls: dict[str, list[bool]] = {n: [] for n, _ in named}

    def hook(name: str):
        def record(mod: nn.Module, args: tuple, output: Any) -> None:
            first = args[0] if args else None
            calls[name].append(isinstance(output, torch.Tensor) and isinstance(first, torch.Tensor)
                               and output.shape == first.shape and output.dtype == first.dtype)
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in named]
    try:
        with torch.no_grad():
            reference = module(*example)
    finally:
        for handle in handles:
            handle.remove()
    shapes = _shapes(reference)
    chosen: list[str] = []
    for name, _ in named:
        if calls[name] != [True] or any(name.startswith(f"{outer}.") for outer in chosen):
            continue
        try:
            with torch.no_grad():
                runs = _shapes(dropped(module, [name])(*example)) == shapes
        except Exception:  # noqa: BLE001 - a forward that needs the block's output format: not droppable
            runs = False
        if runs:
            chosen.append(name)
    return chosen


def _shapes(output: Any) -> list[tuple[int, ...]]:
    if isinstance(output, torch.Tensor):
        return [tuple(output.shape)]
    if isinstance(output, dict):
        return [s for v in output.values() for s in _shapes(v)]
    if isinstance(output, (list, tuple)):
        return [s for v in output for s in _shapes(v)]
    return []


def dropped(module: nn.Module, blocks: Sequence[str]) -> nn.Module:
    """A copy of `module` with each named block replaced by `Skip` (names unknown to the model: ConfigError)."""
    out = copy.deepcopy(module)
    for name in blocks:
        parent_name, _, child = name.rpartition(".")
        try:
            parent = out.get_submodule(parent_name) if parent_name else out
            parent.get_submodule(child)
        except AttributeError:
            raise ConfigError(f"the plan drops block {name!r}, which this model does not have",
                              "replay a plan with the model it was made for") from None
        setattr(parent, child, Skip())
    return out.eval()


def distortion(module: nn.Module, batches: Sequence[tuple[torch.Tensor, ...]], reference: Sequence[torch.Tensor]
               ) -> float:
    """Mean squared output change relative to the reference outputs' mean square (0: unchanged)."""
    num = den = 0.0
    with torch.no_grad():
        for batch, ref in zip(batches, reference):
            out = first_tensor(module(*batch)).float()
            num += float(((out - ref) ** 2).sum())
            den += float((ref ** 2).sum())
    return num / max(den, 1e-30)


def drop_order(module: nn.Module, blocks: Sequence[str], batches: Sequence[tuple[torch.Tensor, ...]],
               count: int) -> list[tuple[str, float]]:
    """Greedy: `count` blocks, each the one whose drop (with those chosen before) changes the output least; with
    the measured distortion after each drop. Greedy rather than one block at a time: a block's loss depends on
    which others are gone (neighbours can stand in for each other)."""
    with torch.no_grad():
        reference = [first_tensor(module(*b)).float() for b in batches]
    order: list[tuple[str, float]] = []
    left = list(blocks)
    for _ in range(min(count, len(left))):
        chosen = [name for name, _ in order]
        scored = [(distortion(dropped(module, chosen + [b]), batches, reference), b) for b in left]
        value, best = min(scored)
        order.append((best, value))
        left.remove(best)
    return order
