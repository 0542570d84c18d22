"""BatchNorm folded into the convolution before it: the ONNX exporter folds it too, so the weights quantization
calibrates on must be the folded ones, or the simulation and the deployed model disagree."""
from __future__ import annotations

import copy
import warnings

from torch import nn


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
