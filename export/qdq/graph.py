"""Where each quantizable layer sits in the exported ONNX graph: its node, its input tensor, its output tensor
(after a ReLU that follows it), and who else reads those tensors.

Calibration, pricing and export all need the same tensor-level view: two layers reading one tensor must share
one Q/DQ pair (one set of parameters), a conv's output Q may be the next layer's input Q, and an int8 layer next
to a float op pays a Q or DQ at the boundary. The view is read from the exporter's own graph so that it is the
graph the runtime will see.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

COMPUTE_OPS = ("Conv", "MatMul", "Gemm")
PASS_THROUGH = ("Reshape", "Transpose", "Squeeze", "Unsqueeze")  # ops that move values without changing them
GLOBAL_POOLS = ("GlobalAveragePool",)


@dataclass(frozen=True)
class LayerNode:
    layer: str
    node: str  # ONNX node name
    op_type: str  # Conv | MatMul | Gemm
    input: str  # activation tensor
    weight: str  # initializer name
    bias: str  # initializer name or ""
    output: str
    post: str  # the output, or the output of a ReLU that is its only consumer
    relu_after: bool
    bias_add: str = ""  # a MatMul's bias lives in the Add that follows it (Linear on 3-D input): that Add's name


@dataclass
class LayerGraph:
    nodes: dict[str, LayerNode]
    consumers: dict[str, list[str]] = field(default_factory=dict)  # tensor -> consuming node names
    graph_outputs: set[str] = field(default_factory=set)
    node_ops: dict[str, str] = field(default_factory=dict)  # node name -> op type
    node_io: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = field(default_factory=dict)  # inputs, outputs

    def input_groups(self) -> dict[str, list[str]]:
        """Activation tensor -> the layers that read it (q/k/v share one; so do a block's conv1 and downsample)."""
        groups: dict[str, list[str]] = {}
        for ln in self.nodes.values():
            groups.setdefault(ln.input, []).append(ln.layer)
        return groups

    def producer(self, tensor: str) -> str | None:
        """The layer whose (post-ReLU) output is `tensor`."""
        return next((ln.layer for ln in self.nodes.values() if ln.post == tensor), None)

    def readers(self, tensor: str) -> list[str]:
        """Node names reading `tensor` ("<output>" stands for a graph output)."""
        out = list(self.consumers.get(tensor, []))
        return out + (["<output>"] if tensor in self.graph_outputs else [])

    def add_output(self, add: str) -> str:
        """An Add's output, or the output of a ReLU that is its only reader (where a Q would sit)."""
        out = self.node_io[add][1][0]
        readers = self.consumers.get(out, [])
        if len(readers) == 1 and self.node_ops.get(readers[0]) == "Relu" and out not in self.graph_outputs:
            return self.node_io[readers[0]][1][0]
        return out

    def layer_of_node(self) -> dict[str, str]:
        return {ln.node: ln.layer for ln in self.nodes.values()}

    def attention_feeders(self) -> dict[str, str]:
        """Layers whose (post) output reaches an activation x activation MatMul (attention's Q.K^T and P.V)
        through value-preserving ops only (Reshape, Transpose, Squeeze, Unsqueeze): layer -> that MatMul's name.
        Quantizing such an output is the same as quantizing the MatMul's input, so the simulation can do it."""
        layer_nodes = self.layer_of_node()
        out: dict[str, str] = {}
        for ln in self.nodes.values():
            frontier, seen = [ln.post], set()
            while frontier:
                tensor = frontier.pop()
                for reader in self.consumers.get(tensor, []):
                    op = self.node_ops.get(reader)
                    if op in PASS_THROUGH and reader not in seen:
                        seen.add(reader)
                        frontier.append(self.node_io[reader][1][0])
                    elif op == "MatMul" and reader not in layer_nodes:
                        out.setdefault(ln.layer, reader)
        return out

    def residual_convs(self) -> dict[str, str]:
        """Conv layers whose output (no ReLU between) is one input of a two-input Add whose other input is computed
        too, a residual block's sum: layer -> that Add's name."""
        produced = {o for _, outs in self.node_io.values() for o in outs}
        out: dict[str, str] = {}
        for ln in self.nodes.values():
            if ln.op_type != "Conv" or ln.relu_after:
                continue
            for reader in self.consumers.get(ln.output, []):
                inputs = self.node_io[reader][0]
                if self.node_ops.get(reader) == "Add" and len(inputs) == 2 and all(i in produced for i in inputs):
                    out.setdefault(ln.layer, reader)
        return out

    def pooled_layers(self) -> dict[str, tuple[str, str]]:
        """Global pools whose output is a layer's input, directly or through Flatten and the value-preserving ops
        (a CNN's head): pool node -> (the pool's input tensor, that layer)."""
        by_input = {ln.input: ln.layer for ln in self.nodes.values()}
        out: dict[str, tuple[str, str]] = {}
        for node, op in self.node_ops.items():
            if op not in GLOBAL_POOLS:
                continue
            tensor = self.node_io[node][1][0]
            while tensor not in by_input:
                readers = self.consumers.get(tensor, [])
                if len(readers) != 1 or self.node_ops.get(readers[0]) not in (*PASS_THROUGH, "Flatten"):
                    break
                tensor = self.node_io[readers[0]][1][0]
            if tensor in by_input:
                out[node] = (self.node_io[node][0][0], by_input[tensor])
        return out


def scope_of(node_name: str, layers: set[str]) -> str | None:
    """The layer a TorchScript-exported node belongs to, read off its scope name (`/layer1/conv1/Conv`)."""
    from deploy.targets.latency.names import scope_module

    module = scope_module(node_name, layers)
    return module if module in layers else None


def layer_graph(model: Any, layers: Iterable[str]) -> LayerGraph:
    """Map layers to nodes in an onnx.ModelProto exported by deploy.core.model.onnx_export (TorchScript exporter)."""
    graph = model.graph
    layer_set = set(layers)
    inits = {i.name: i for i in graph.initializer}
    consumers: dict[str, list[str]] = {}
    for n in graph.node:
        for name in n.input:
            consumers.setdefault(name, []).append(n.name)
    by_name = {n.name: n for n in graph.node}
    outputs = {o.name for o in graph.output}
    nodes: dict[str, LayerNode] = {}
    for n in graph.node:
        if n.op_type not in COMPUTE_OPS or len(n.input) < 2 or n.input[1] not in inits:
            continue
        layer = scope_of(n.name, layer_set)
        if layer is None or layer in nodes:
            continue
        out = n.output[0]
        bias = n.input[2] if len(n.input) > 2 and n.input[2] in inits else ""
        bias_add, after = "", out
        readers = consumers.get(out, [])
        if n.op_type == "MatMul" and len(readers) == 1 and out not in outputs and by_name[readers[0]].op_type == "Add":
            add = by_name[readers[0]]
            other = [i for i in add.input if i != out]
            if len(other) == 1 and other[0] in inits and _dims(inits[other[0]]) == _dims(inits[n.input[1]])[-1:]:
                bias, bias_add, after = other[0], add.name, add.output[0]
        readers = consumers.get(after, [])
        relu = len(readers) == 1 and after not in outputs and by_name[readers[0]].op_type == "Relu"
        post = by_name[readers[0]].output[0] if relu else after
        nodes[layer] = LayerNode(layer, n.name, n.op_type, n.input[0], n.input[1], bias, out, post, relu, bias_add)
    return LayerGraph(nodes, consumers, outputs, {n.name: n.op_type for n in graph.node},
                      {n.name: (tuple(n.input), tuple(n.output)) for n in graph.node})


def _dims(init: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in init.dims)
