"""Give a graph model (torch.export `.pt2`, TorchScript) real `nn.Conv2d` / `nn.Linear` / `nn.BatchNorm2d` layers.

A graph model calls `aten.conv2d(x, weight, ...)` on tensors it holds as attributes, so the passes that work
layer by layer (quantization: calibration, sensitivity, fake quantization, Q/DQ export; analysis) find no layer.
Lifting rewrites each such call whose weights sit alone in one holder module (`stem.0.weight`, `stem.0.bias`)
into a call of a real layer at that holder's path, with the same tensors: the layer names are the original
model's, and the module computes exactly what the graph did. TorchScript is first converted to a torch.export
program. The result is checked against the original before it is used.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from deploy.core.errors import ModelLoadError
from deploy.core.spec import InputSpec

_CONV = {"aten.conv2d.default", "aten.convolution.default", "aten.conv1d.default"}
_LINEAR = {"aten.linear.default"}
_BATCH_NORM = {"aten.batch_norm.default"}
_HOLDER_TENSORS = {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}


def torchscript_to_program(module: torch.jit.ScriptModule, specs: Sequence[InputSpec]) -> Any:
    """A torch.export program of a TorchScript module, traced on the input spec's example."""
    from torch._export.converter import TS2EPConverter

    args = tuple(spec.example() for spec in specs)
    try:
        return TS2EPConverter(module, args).convert()
    except Exception as exc:
        from deploy.core.user_code import short

        raise ModelLoadError(f"the TorchScript graph could not be converted for quantization ({short(exc)})",
                             "export the model with torch.export.save (.pt2), or save a state_dict and pass "
                             "--arch") from None


def lift_layers(graph_module: torch.fx.GraphModule, order: Sequence[str] = ()) -> torch.fx.GraphModule:
    """A copy of `graph_module` with conv / linear / batch-norm calls made real layers (see the module doc);
    `order` (the original model's module names) fixes the order layers are listed in."""
    gm = torch.fx.GraphModule(graph_module, graph_module.graph)  # a plain GraphModule: eval(), train() work
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":  # shape checks; deploy checks inputs itself
            graph.erase_node(node)
            delattr(gm, "_guards_fn")
            continue
        if node.op != "call_function":
            continue
        target = str(node.target)
        kind = "conv" if target in _CONV else "linear" if target in _LINEAR else "bn" if target in _BATCH_NORM else None
        if kind is None:
            continue
        layer_and_holder = _layer_for(gm, node, kind)
        if layer_and_holder is None:
            continue
        layer, holder, used = layer_and_holder
        _install(gm, holder, layer)
        with graph.inserting_before(node):
            call = graph.call_module(holder, (node.args[0],))
        call.meta = dict(node.meta)
        node.replace_all_uses_with(call)
        graph.erase_node(node)
        for attr in used:
            if not attr.users:
                graph.erase_node(attr)
    _call_through_parents(gm)
    if order:
        _reorder(gm, list(order))
    graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()
    return gm.eval()


def _reorder(gm: nn.Module, order: list[str]) -> None:
    """Children in the original model's order (a converted graph lists its tensors in first-use order)."""
    rank = {name: i for i, name in enumerate(order)}
    for prefix, module in gm.named_modules():
        children = module._modules
        keyed = sorted(children, key=lambda k: rank.get(f"{prefix}.{k}" if prefix else k, len(rank)))
        module._modules = type(children)((k, children[k]) for k in keyed)


class Scope(nn.Module):
    """A container that calls one of its descendants by path. The graph calls `layer1("conv1", x)` instead of
    `layer1.conv1(x)`, so a traced export names the node /layer1/conv1/Conv, as for the original model."""

    def forward(self, path: str, *args: Any) -> Any:
        head, _, rest = path.partition(".")
        child = getattr(self, head)
        return child(rest, *args) if rest else child(*args)


def _call_through_parents(gm: torch.fx.GraphModule) -> None:
    for node in gm.graph.nodes:
        if node.op != "call_module" or "." not in node.target:
            continue
        parts = node.target.split(".")
        for depth in range(1, len(parts)):
            _as_scope(gm, ".".join(parts[:depth]))
        node.target, node.args = parts[0], (".".join(parts[1:]), *node.args)


def _as_scope(gm: torch.fx.GraphModule, path: str) -> None:
    module = gm.get_submodule(path)
    if isinstance(module, Scope):
        return
    if type(module) is not nn.Module:  # a real layer with children: leave the call as it is
        raise ModelLoadError(f"cannot give the graph's layer {path} a scope", "save a state_dict and pass --arch")
    scope = Scope()
    scope._modules, scope._parameters, scope._buffers = module._modules, module._parameters, module._buffers
    _install(gm, path, scope)


def _attr(gm: torch.fx.GraphModule, node: Any) -> tuple[str, torch.Tensor] | None:
    if not isinstance(node, torch.fx.Node) or node.op != "get_attr":
        return None
    try:
        return node.target, _fetch(gm, node.target)
    except AttributeError:
        return None


def _fetch(gm: torch.fx.GraphModule, path: str) -> torch.Tensor:
    owner, _, name = path.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, name)


def _holder(paths: Sequence[str]) -> str | None:
    """The one module all of an op's tensors live in, if that is all it holds."""
    owners = {p.rpartition(".")[0] for p in paths}
    if len(owners) != 1:
        return None
    return owners.pop() or None


def _layer_for(gm: torch.fx.GraphModule, node: Any, kind: str) -> tuple[nn.Module, str, list[Any]] | None:
    args = list(node.args) + [None] * 12
    kwargs = node.kwargs
    if kind == "bn":
        tensors = [args[1], args[2], args[3], args[4]]  # weight, bias, running_mean, running_var
    else:
        tensors = [args[1], args[2]]  # weight, bias
    fetched = [_attr(gm, t) if t is not None else None for t in tensors]
    if fetched[0] is None or any(t is not None and f is None for t, f in zip(tensors, fetched)):
        return None
    paths = [f[0] for f in fetched if f is not None]
    holder = _holder(paths)
    if holder is None or not _holds_only(gm, holder):
        return None
    values = [f[1] if f is not None else None for f in fetched]
    weight = values[0]
    if kind == "linear":
        layer: nn.Module = nn.Linear(weight.shape[1], weight.shape[0], bias=values[1] is not None)
    elif kind == "conv":
        layer = _conv(node, args, kwargs, weight, values[1] is not None)
        if layer is None:
            return None
    else:
        if args[5]:  # training-mode batch norm: not a frozen layer
            return None
        dims = node.args[0].meta.get("val").dim() if "val" in node.args[0].meta else 4
        cls = nn.BatchNorm2d if dims == 4 else nn.BatchNorm1d
        layer = cls(weight.shape[0], eps=float(args[7] if args[7] is not None else 1e-5),
                    momentum=float(args[6]) if args[6] is not None else 0.1)
    names = ["weight", "bias", "running_mean", "running_var"]
    with torch.no_grad():
        for name, value in zip(names, values):
            if value is None or not hasattr(layer, name):
                continue
            if isinstance(getattr(layer, name), nn.Parameter):
                setattr(layer, name, nn.Parameter(value.detach().clone(), requires_grad=False))
            else:
                getattr(layer, name).copy_(value.detach())
    return layer, holder, [t for t in tensors if t is not None]


def _conv(node: Any, args: list[Any], kwargs: dict[str, Any], weight: torch.Tensor, bias: bool) -> nn.Module | None:
    target = str(node.target)
    spatial = weight.dim() - 2
    if target == "aten.convolution.default":
        stride, padding, dilation, transposed, _, groups = args[3], args[4], args[5], args[6], args[7], args[8]
        if transposed:
            return None
    else:
        stride, padding, dilation, groups = (args[3] or 1, args[4] or 0, args[5] or 1, args[6] or 1)
    cls = {1: nn.Conv1d, 2: nn.Conv2d}.get(spatial)
    if cls is None or isinstance(padding, str) and padding not in ("same", "valid"):
        return None
    return cls(weight.shape[1] * int(groups), weight.shape[0], tuple(weight.shape[2:]), stride=stride,
               padding=padding, dilation=dilation, groups=int(groups), bias=bias)


def _holds_only(gm: torch.fx.GraphModule, holder: str) -> bool:
    module = gm.get_submodule(holder)
    tensors = set(dict(module.named_parameters(recurse=False))) | set(dict(module.named_buffers(recurse=False)))
    plain = {k for k, v in vars(module).items() if isinstance(v, torch.Tensor)}
    return not list(module.children()) and (tensors | plain) <= _HOLDER_TENSORS


def _install(gm: torch.fx.GraphModule, path: str, layer: nn.Module) -> None:
    owner, _, name = path.rpartition(".")
    setattr(gm.get_submodule(owner) if owner else gm, name, layer)


def check_same(lifted: nn.Module, original: Any, specs: Sequence[InputSpec], sizes: dict[str, int] | None = None
               ) -> None:
    """The lifted module must compute what the original did (float tolerance)."""
    from deploy.core.metrics import first_tensor

    gen = torch.Generator().manual_seed(0)
    args = tuple(spec.example(sizes, gen) for spec in specs)
    with torch.inference_mode():
        want, got = first_tensor(original(*args)), first_tensor(lifted(*args))
    if want.shape != got.shape or not torch.allclose(want.float(), got.float(), rtol=1e-3, atol=1e-4):
        raise ModelLoadError("the model's graph could not be given layers faithfully (outputs differ after lifting)",
                             "save a state_dict and pass --arch module:factory")
