"""Model surgery around quantization: fold BatchNorm into convs, find the quantizable layers, wrap and unwrap them.

BatchNorm is folded BEFORE calibration because the ONNX exporter folds it too: the simulated weights must be the
weights the runtime quantizes, or the simulation and the deployed model disagree.
"""
from __future__ import annotations

import copy

from torch import nn

from deploy.export.qdq.plan import QuantPlan
from deploy.compress.quant.sim import QuantLayer, SimFlags
from deploy.export.qdq.fold import fold_batchnorm, replace_module
from deploy.compress.quant.space import LayerShape

QUANTIZABLE = (nn.Conv2d, nn.Linear)


def layer_shapes(module: nn.Module, skip: tuple[str, ...] = ()) -> list[LayerShape]:
    """Conv2d and Linear layers (in module order), skipping names in `skip` and anything inside them, and the
    layers of an nn.MultiheadAttention: it reads its out_proj's weight itself (and its input projection is a bare
    parameter), so they stay float."""
    out = []
    wrapped = _wrapped(module)
    skip = (*skip, *(n for n, m in module.named_modules() if isinstance(m, nn.MultiheadAttention)))
    for name, mod in module.named_modules():
        if not name or any(name == s or name.startswith(s + ".") for s in skip):
            continue
        if isinstance(mod, QuantLayer):
            mod = mod.layer
        elif any(name.startswith(q + ".") for q in wrapped):
            continue
        if isinstance(mod, nn.Linear):
            out.append(LayerShape(name, "linear", mod.in_features, mod.out_features))
        elif isinstance(mod, nn.Conv2d):
            k = mod.kernel_size[0] * mod.kernel_size[1]
            out.append(LayerShape(name, "conv", mod.in_channels // mod.groups * k, mod.out_channels))
    return out


def _wrapped(module: nn.Module) -> list[str]:
    return [n for n, m in module.named_modules() if isinstance(m, QuantLayer)]


def wrap(folded: nn.Module, plan: QuantPlan, flags: dict[str, SimFlags]) -> nn.Module:
    """A copy of the folded model with every planned layer behind a QuantLayer (all options switchable)."""
    model = copy.deepcopy(folded).eval()
    for name, lp in plan.layers.items():
        replace_module(model, name, QuantLayer(model.get_submodule(name), lp, flags.get(name, SimFlags())))
    model.quant_plan = plan  # what export needs, carried with the module through a pipeline
    return model


def unwrap(module: nn.Module) -> nn.Module:
    """A float copy: QuantLayers replaced by the layers they hold (with their current, maybe recovered, weights)."""
    model = copy.deepcopy(module).eval()
    for name in _wrapped(model):
        replace_module(model, name, model.get_submodule(name).layer)
    if hasattr(model, "quant_plan"):
        del model.quant_plan
    return model


def float_module(module: nn.Module) -> tuple[nn.Module, list[str]]:
    """What export starts from: unwrapped and BatchNorm-folded (both idempotent)."""
    return fold_batchnorm(unwrap(module))


__all__ = ["QUANTIZABLE", "float_module", "fold_batchnorm", "layer_shapes", "replace_module", "unwrap", "wrap"]
