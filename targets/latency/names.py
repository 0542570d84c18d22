"""Map a runtime's node names back to torch modules.

torch.onnx.export (dynamo=False) names nodes after the module scope, e.g. `/layer1/layer1.0/conv1/Conv` for
module `layer1.0.conv1`. Runtimes then rename what they fuse: ONNX Runtime calls a Conv+ReLU `<relu output>_nchwc`,
a MatMul+Add `<matmul>/MatMulAddFusion`, a quantized conv `<conv>_token_7`, and leaves some nodes unnamed
(`SkipLayerNormalization`); OpenVINO keeps the original names in `originalLayersNames`. We resolve a runtime name to
an original node (by name, by the tensor it names, or by the initializer it names), re-anchor fused compute to the
Conv/MatMul it absorbed, and read the module path off that node's scope. What is left inherits from its graph
neighbours (`inherit_from_neighbors`).
"""
from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from deploy.targets.latency.nodes import op_class

_ANCHORS = ("Conv", "MatMul")
_SPLIT = re.compile(r"[_/]")
_MAX_ANCHOR_DEPTH = 6


@dataclass(frozen=True)
class Resolved:
    module: str | None
    how: str  # name | tensor | initializer | anchor | "" (unresolved)


class NameResolver:
    """Resolves runtime node names against the ONNX graph the runtime was given."""

    def __init__(self, graph: Any, module_names: Iterable[str] | None = None):
        self.nodes = {n.name: n for n in graph.node if n.name}
        self.producer = {out: n for n in graph.node for out in n.output}
        self.consumers: dict[str, list[Any]] = {}
        for n in graph.node:
            for name in n.input:
                self.consumers.setdefault(name, []).append(n)
        self.initializers = {i.name for i in graph.initializer}
        self.module_names = set(module_names) if module_names is not None else None

    def resolve(self, runtime_name: str, op_type: str = "") -> Resolved:
        """The module a runtime node belongs to, and how we know."""
        node, how = self._original(runtime_name)
        if node is None:
            return Resolved(None, "")
        family = op_class(op_type) if op_type else ""
        if family in _ANCHORS and op_class(node.op_type) != family:
            anchor = self._upstream_anchor(node, family)
            if anchor is not None:
                node, how = anchor, "anchor"
        module = scope_module(node.name, self.module_names)
        return Resolved(module, how if module is not None else "")

    def _original(self, runtime_name: str) -> tuple[Any | None, str]:
        for candidate in _prefixes(runtime_name):
            if candidate in self.nodes:
                return self.nodes[candidate], "name"
            if candidate in self.producer:
                return self.producer[candidate], "tensor"
            if candidate in self.initializers and self.consumers.get(candidate):
                return self.consumers[candidate][0], "initializer"
        return None, ""

    def _upstream_anchor(self, start: Any, family: str) -> Any | None:
        """The nearest Conv/MatMul feeding `start` (a fused node named after its epilogue, e.g. the ReLU)."""
        queue = deque([(start, 0)])
        seen = {id(start)}
        while queue:
            node, depth = queue.popleft()
            if op_class(node.op_type) == family:
                return node
            if depth >= _MAX_ANCHOR_DEPTH:
                continue
            for name in node.input:
                parent = self.producer.get(name)
                if parent is not None and id(parent) not in seen:
                    seen.add(id(parent))
                    queue.append((parent, depth + 1))
        return None


def _prefixes(name: str) -> list[str]:
    """The name itself, then shorter prefixes cut at '_' or '/' (longest first): `/a/Conv_token_7` -> `/a/Conv`."""
    cuts = [m.start() for m in _SPLIT.finditer(name)]
    return [name] + [name[:i] for i in reversed(cuts) if i > 0]


def scope_module(node_name: str, module_names: set[str] | None = None) -> str | None:
    """`/layer1/layer1.0/conv1/Conv` -> `layer1.0.conv1`; `/Add` -> "" (the root); unscoped names -> None.

    A scope token is a module's qualified name from its last non-numeric atom (`stem.0` for `stem.0`, `layer.0`
    for `model.encoder.layer.0`), so a token whose first atom is already in the path continues it.
    """
    if not node_name.startswith("/"):
        return None
    tokens = [t for t in node_name.split("/")[1:-1] if t]
    path: list[str] = []
    for token in tokens:
        atoms = token.split(".")
        head, tail = atoms[0], atoms[1:]
        if tail and head in path and all(a.isdigit() for a in path[len(path) - path[::-1].index(head):]):
            path = path[:len(path) - path[::-1].index(head)] + tail
        else:
            path = path + atoms
    module = ".".join(path)
    if module_names is None or module in module_names or module == "":
        return module
    while path:  # the deepest prefix that is a real module (a token the rule above read wrongly)
        path = path[:-1]
        if ".".join(path) in module_names:
            return ".".join(path)
    return ""


# ops that prepare an operand (layout, type, quantization): they belong to the op they feed
_FEEDERS = ("Reshape", "Transpose", "Convert", "Reorder", "QuantizeLinear", "DequantizeLinear",
            "DynamicQuantizeLinear", "Cast", "Unsqueeze", "Squeeze", "Flatten", "Parameter", "Constant")


def inherit_from_neighbors(resolved: Mapping[str, Resolved], consumers: Mapping[str, Sequence[str]],
                           producers: Mapping[str, Sequence[str]],
                           op_types: Mapping[str, str] | None = None) -> dict[str, Resolved]:
    """Give each unresolved node a neighbour's module, repeating until nothing changes: operand-preparing ops
    (reshape, transpose, quantize, layout reorder) take their consumer's, everything else (a renamed LayerNorm,
    an activation) its producer's. `consumers`/`producers` map a node name to its neighbours' names."""
    out = dict(resolved)
    op_types = op_types or {}
    changed = True
    while changed:
        changed = False
        for name, res in out.items():
            if res.module is not None:
                continue
            down, up = list(consumers.get(name, ())), list(producers.get(name, ()))
            feeder = any(f in op_types.get(name, "") for f in _FEEDERS)
            for neighbour in (down + up if feeder else up + down):
                other = out.get(neighbour)
                if other is not None and other.module is not None:
                    out[name] = Resolved(other.module, "neighbor")
                    changed = True
                    break
    return out
