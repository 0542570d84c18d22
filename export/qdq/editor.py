"""The one editor every Q/DQ edit goes through: initializers by name, new nodes, and which tensors already carry
a Q/DQ pair (so a layer's input Q and a neighbour's Q on the same tensor with the same parameters are one pair).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from deploy.export.qdq.graph import LayerGraph
from deploy.export.qdq.plan import ActParams


@dataclass
class Editor:
    """A mutable view of one graph: initializers by name, new nodes, and which tensors already carry a Q/DQ."""

    model: Any
    inits: dict[str, Any] = field(default_factory=dict)
    dq_params: dict[str, ActParams] = field(default_factory=dict)  # DQ output tensor -> its parameters
    shared: dict[tuple[str, ActParams], str] = field(default_factory=dict)  # (tensor, params) -> DQ output
    smoothed: dict[tuple[str, tuple[float, ...]], str] = field(default_factory=dict)  # (tensor, s) -> Mul output
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.inits = {i.name: i for i in self.model.graph.initializer}

    def array(self, name: str) -> np.ndarray:
        from onnx import numpy_helper

        return numpy_helper.to_array(self.inits[name])

    def add_init(self, name: str, value: np.ndarray, dtype: int | None = None) -> str:
        from onnx import helper, numpy_helper

        if dtype is None:
            value = np.asarray(value)  # (not ascontiguousarray: it turns a scalar into shape [1], and ORT's
            tensor = numpy_helper.from_array(value.copy(order="C"), name)  # QLinearAdd fusion wants scalars)
        else:
            tensor = helper.make_tensor(name, dtype, list(np.shape(value)), np.asarray(value).reshape(-1).tolist())
        if name in self.inits:
            self.model.graph.initializer.remove(self.inits[name])
        self.model.graph.initializer.append(tensor)
        self.inits[name] = tensor
        return name

    def node(self, op: str, inputs: list[str], outputs: list[str], name: str, **attrs: Any) -> None:
        from onnx import helper

        self.model.graph.node.append(helper.make_node(op, inputs, outputs, name=name, **attrs))

    def nodes_by_name(self) -> dict[str, Any]:
        return {n.name: n for n in self.model.graph.node}

    def readers(self) -> dict[str, list[Any]]:
        """Tensor -> the nodes reading it, as the graph is now."""
        out: dict[str, list[Any]] = {}
        for node in self.model.graph.node:
            for name in node.input:
                out.setdefault(name, []).append(node)
        return out


def zero_point_type(params: ActParams) -> int:
    from onnx import TensorProto

    if params.method == "fp8":
        return TensorProto.FLOAT8E4M3FN
    return TensorProto.INT8 if params.signed else TensorProto.UINT8


def qdq_pair(ed: Editor, tensor: str, params: ActParams, tag: str) -> str:
    """Q then DQ of `tensor` (a new tensor name is returned; nothing is rewired here)."""
    key = (tensor, params)
    if key in ed.shared:
        return ed.shared[key]
    scale = ed.add_init(f"{tag}.scale", np.array(params.scale, dtype=np.float32))
    zp = ed.add_init(f"{tag}.zero_point", np.array(params.zero_point), zero_point_type(params))
    ed.node("QuantizeLinear", [tensor, scale, zp], [f"{tag}.q"], f"{tag}/QuantizeLinear")
    ed.node("DequantizeLinear", [f"{tag}.q", scale, zp], [f"{tag}.dq"], f"{tag}/DequantizeLinear")
    ed.shared[key] = f"{tag}.dq"
    ed.dq_params[f"{tag}.dq"] = params
    return f"{tag}.dq"


def tensor_tag(graph: LayerGraph, tensor: str) -> str:
    """A readable, unique prefix for tensors we add next to `tensor`."""
    return "qdq" + tensor.replace("/", ".").replace(":", ".") if tensor.startswith("/") else f"qdq.{tensor}"


def topological_sort(model: Any) -> None:
    """Reorder nodes so every input is produced before it is read (we appended new nodes at the end)."""
    graph = model.graph
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending = list(graph.node)
    ordered = []
    while pending:
        ready = [n for n in pending if all(i in available for i in n.input)]
        if not ready:
            raise ValueError("the edited graph has a cycle or a missing input: " +
                             ", ".join(sorted({i for n in pending for i in n.input if i not in available})[:5]))
        ids = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in ids]
        for n in ready:
            ordered.append(n)
            available.update(n.output)
    del graph.node[:]
    graph.node.extend(ordered)
