"""What a model holds: layers with type, parameters and MACs, and which compression passes will touch them.

MACs are counted at the ATen level with a dispatch mode and attributed to layers through the parameter each op
reads. That works the same for an eager module, TorchScript and a `torch.export` program, so one model gives the
same table whatever file it was loaded from.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from deploy.core.model.load import LoadedModel

FUNCTIONAL = "(functional)"  # MACs of ops that read no parameter, e.g. attention score matmuls

_OP_TYPES = {
    "convolution": "Conv", "_convolution": "Conv", "conv1d": "Conv", "conv2d": "Conv", "conv3d": "Conv", "addmm": "Linear", "mm": "Linear", "bmm": "Linear",
    "matmul": "Linear", "linear": "Linear", "embedding": "Embedding", "native_layer_norm": "LayerNorm",
    "layer_norm": "LayerNorm", "_native_batch_norm_legit_no_training": "BatchNorm", "native_batch_norm": "BatchNorm",
    "batch_norm": "BatchNorm", "_batch_norm_impl_index": "BatchNorm", "native_group_norm": "GroupNorm",
    "group_norm": "GroupNorm",
}
_MATMULS = {"addmm", "mm", "bmm", "matmul", "baddbmm", "linear"}


@dataclass
class Layer:
    name: str
    type: str
    params: int
    macs: int
    weight_shape: list[int] = field(default_factory=list)
    passes: list[str] = field(default_factory=list)  # compression passes that may change this layer
    note: str = ""


@dataclass
class ModelSummary:
    format: str
    inputs: list[dict[str, Any]]
    layers: list[Layer]
    total_params: int
    total_macs: int
    functional_macs: int
    notes: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _MacCounter(TorchDispatchMode):
    """Counts MACs per parameter-owning layer, identifying a parameter by its storage."""

    def __init__(self, storage_to_layer: dict[int, str]):
        super().__init__()
        self.storage_to_layer = storage_to_layer
        self.macs: dict[str, int] = {}
        self.types: dict[str, str] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        op = func.overloadpacket.__name__
        layer = None
        weight = None
        for arg in args:
            if isinstance(arg, torch.Tensor) and arg.numel() > 0:
                name = self.storage_to_layer.get(arg.untyped_storage().data_ptr())
                if name is not None:
                    if layer is None or arg.dim() > (weight.dim() if weight is not None else -1):
                        layer, weight = name, arg
        macs = _op_macs(op, args, out, weight)
        key = layer or FUNCTIONAL
        if layer is not None and layer not in self.types and op in _OP_TYPES:
            base = _OP_TYPES[op]
            self.types[layer] = f"Conv{weight.dim() - 2}d" if base == "Conv" else base
        if macs:
            self.macs[key] = self.macs.get(key, 0) + macs
        return out


def _op_macs(op: str, args: tuple, out: Any, weight: torch.Tensor | None) -> int:
    if op in ("convolution", "_convolution", "conv1d", "conv2d", "conv3d"):
        w = args[1]
        return int(out.numel() * math.prod(w.shape[1:]))
    if op in _MATMULS and isinstance(out, torch.Tensor):
        tensors = [a for a in args if isinstance(a, torch.Tensor) and a.dim() >= 2]
        if not tensors:
            return 0
        inner = tensors[-1].shape[-2] if op != "linear" else tensors[-1].shape[-1]
        if op == "linear" and len(tensors) >= 2:
            inner = tensors[1].shape[-1]
        return int(out.numel() * inner)
    if op == "_scaled_dot_product_flash_attention_for_cpu" or op == "scaled_dot_product_attention":
        q, k, v = args[0], args[1], args[2]
        return int(q.numel() * k.shape[-2] + q.shape[:-1].numel() * k.shape[-2] * v.shape[-1])
    return 0


def _layer_of(param_name: str) -> str:
    return param_name.rsplit(".", 1)[0] if "." in param_name else param_name


def analyze(loaded: LoadedModel, sizes: dict[str, int] | None = None) -> ModelSummary:
    """Layers, parameters and MACs of a loaded torch model at the given input sizes (batch 1 by default)."""
    if loaded.module is None:
        from deploy.core.errors import ModelLoadError

        raise ModelLoadError("inspect reads PyTorch models, and this is ONNX", "use `deploy bench` for ONNX files")
    module = loaded.module
    params: dict[str, int] = {}
    storage_to_layer: dict[int, str] = {}
    weight_shapes: dict[str, list[int]] = {}
    for name, param in module.named_parameters():
        layer = _layer_of(name)
        if name.endswith("weight"):
            weight_shapes[layer] = list(param.shape)
        params[layer] = params.get(layer, 0) + param.numel()
        storage_to_layer[param.untyped_storage().data_ptr()] = layer
    gen = torch.Generator().manual_seed(0)
    args = tuple(spec.example(sizes, gen) for spec in loaded.inputs)
    counter = _MacCounter(storage_to_layer)
    with torch.no_grad(), counter:  # no_grad, not inference_mode: the latter skips decompositions unevenly
        module(*args)
    outputs = _output_layers(counter, module)
    layers = []
    for name in params:
        ltype = counter.types.get(name, "Other")
        layer = Layer(name, ltype, params[name], counter.macs.get(name, 0), weight_shapes.get(name, []))
        layer.passes, layer.note = _supported_passes(layer, loaded.structural, name in outputs)
        layers.append(layer)
    functional = counter.macs.get(FUNCTIONAL, 0)
    total_macs = sum(counter.macs.values())
    return ModelSummary(
        format=loaded.format,
        inputs=[s.to_dict() for s in loaded.inputs],
        layers=layers,
        total_params=sum(params.values()),
        total_macs=total_macs,
        functional_macs=functional,
        notes=list(loaded.notes),
    )


def _output_layers(counter: _MacCounter, module: torch.nn.Module) -> set[str]:
    """The last weighted layer produces the model output: pruning its outputs would change the output shape."""
    weighted = [n for n, t in counter.types.items() if t in ("Linear", "Conv1d", "Conv2d", "Conv3d")]
    return {weighted[-1]} if weighted else set()


def _supported_passes(layer: Layer, structural: bool, is_output: bool) -> tuple[list[str], str]:
    if layer.type in ("Conv2d", "Linear"):
        passes = ["quantize"]
        note = ""
        if structural:
            if is_output:
                passes.insert(0, "prune (inputs only)")
                note = "output layer: its outputs are kept"
            else:
                passes.insert(0, "prune")
            if layer.type == "Linear" or (len(layer.weight_shape) == 4 and max(layer.weight_shape[2:]) > 1):
                passes.append("lowrank")
        else:
            note = "graph-only model: pruning and low rank need the Python module"
        return passes, note
    if layer.type in ("BatchNorm", "LayerNorm", "GroupNorm"):
        return (["prune (follows its producer)"] if structural else []), "kept in float"
    if layer.type == "Embedding":
        return [], "left alone"
    return [], "left alone (unsupported layer type)"
