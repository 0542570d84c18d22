"""Model surgery around quantization: fold BatchNorm into convs, find the quantizable layers, wrap and unwrap them.

BatchNorm is folded BEFORE calibration because the ONNX exporter folds it too: the simulated weights must be the
weights the runtime quantizes, or the simulation and the deployed model disagree.
"""
from __future__ import annotations

import copy
import warnings

from torch import nn

from deploy.compress.quant_plan import QuantPlan
from deploy.compress.quant_sim import QuantLayer, SimFlags
from deploy.compress.quant_space import LayerShape

QUANTIZABLE = (nn.Conv2d, nn.Linear)


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def fold_batchnorm(module: nn.Module) -> tuple[nn.Module, list[str]]:
    """A copy with every Conv2d -> BatchNorm2d pair fused (BN becomes Identity); and notes on what was left."""
    folded = copy.deepcopy(module).eval()
    if not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules()):
        return folded, []
    try:
        import torch.fx

        graph = torch.fx.symbolic_trace(folded).graph
    except Exception as exc:  # noqa: BLE001 - any tracing failure means: cannot see the pairs
        return folded, [f"BatchNorm not folded (torch.fx cannot trace the model: {type(exc).__name__}); "
                        "simulated int8 weights may differ slightly from the exported ones"]
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    notes = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(folded.get_submodule(node.target), nn.BatchNorm2d):
            continue
        src = node.args[0] if node.args else None
        if getattr(src, "op", None) != "call_module" or len(src.users) != 1:
            notes.append(f"BatchNorm {node.target} does not follow a conv directly: left unfolded")
            continue
        conv = folded.get_submodule(src.target)
        if not isinstance(conv, nn.Conv2d):
            notes.append(f"BatchNorm {node.target} does not follow a Conv2d: left unfolded")
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            replace_module(folded, src.target, fuse_conv_bn_eval(conv, folded.get_submodule(node.target)))
        replace_module(folded, node.target, nn.Identity())
    return folded, notes


def layer_shapes(module: nn.Module, skip: tuple[str, ...] = ()) -> list[LayerShape]:
    """Conv2d and Linear layers (in module order), skipping names in `skip` and anything inside them."""
    out = []
    wrapped = _wrapped(module)
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
