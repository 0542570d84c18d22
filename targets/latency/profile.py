"""What a runtime's per-node profiler gives us, in one shape for every runtime, and how it becomes NodeRecords.

`RuntimeProfile` holds each executed node's raw durations over the profiled runs plus its tensor shapes and its
neighbours in the runtime graph; `to_records` takes medians per node, computes the work from the shapes and maps
each node to a torch module (by name, else from its neighbours).
"""
from __future__ import annotations

import dataclasses
import statistics
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from deploy.targets.latency.names import NameResolver, Resolved, inherit_from_neighbors
from deploy.targets.latency.nodes import (NodeRecord, Shape, node_channels, node_macs, node_variant, precision_of,
                                            shape_bytes)


@dataclass(frozen=True)
class ProfiledNode:
    """One executed node: durations (microseconds, one per profiled run), shapes, and for OpenVINO the exec type
    and the original layer names it fused."""

    name: str
    op_type: str
    durations_us: tuple[float, ...]
    inputs: tuple[Shape, ...] = ()
    outputs: tuple[Shape, ...] = ()
    exec_type: str = ""
    original_names: tuple[str, ...] = ()
    output_names: tuple[str, ...] = ()  # tensor names, for nodes whose own name is generated (ORT's fusions)


@dataclass(frozen=True)
class RuntimeProfile:
    """Executed nodes in execution order; `consumers`/`producers` link node names in the runtime graph."""

    runtime: str
    nodes: tuple[ProfiledNode, ...]
    consumers: dict[str, tuple[str, ...]] = field(default_factory=dict)
    producers: dict[str, tuple[str, ...]] = field(default_factory=dict)
    runs: int = 0


def quietest(rounds: Sequence[RuntimeProfile]) -> RuntimeProfile:
    """Merge profiling rounds: per node, the durations of the round where its median was lowest. On a shared
    host a neighbour's burst slows some rounds; taking each node's quietest round drops that node by node."""
    first = rounds[0]
    by_round = [{n.name: n for n in r.nodes} for r in rounds]
    nodes = []
    for node in first.nodes:
        candidates = [r[node.name] for r in by_round if node.name in r and r[node.name].durations_us]
        nodes.append(min(candidates, key=lambda n: statistics.median(n.durations_us)) if candidates else node)
    return dataclasses.replace(first, nodes=tuple(nodes), runs=sum(r.runs for r in rounds))


def to_records(profile: RuntimeProfile, resolver: NameResolver) -> tuple[NodeRecord, ...]:
    """Median time, work, precision and module of every executed node."""
    resolved = {n.name: _resolve(n, resolver) for n in profile.nodes}
    resolved = inherit_from_neighbors(resolved, profile.consumers, profile.producers,
                                      {n.name: n.op_type for n in profile.nodes})
    records = []
    for n in profile.nodes:
        res = resolved[n.name]
        records.append(NodeRecord(
            name=n.name, op_type=n.op_type, module=res.module,
            precision=precision_of(n.op_type, n.inputs, n.exec_type),
            macs=node_macs(n.op_type, n.inputs, n.outputs), bytes=shape_bytes(n.inputs + n.outputs),
            ms=statistics.median(n.durations_us) / 1000.0 if n.durations_us else 0.0,
            exec_type=n.exec_type, mapped_by=res.how, variant=node_variant(n.op_type, n.inputs),
            channels=node_channels(n.op_type, n.inputs, n.outputs)))
    return tuple(records)


def _resolve(node: ProfiledNode, resolver: NameResolver) -> Resolved:
    """OpenVINO: the first original layer name that resolves (the anchor first); others: the node's own name,
    then the tensors it writes (ORT names a fused SkipLayerNormalization generically, its output keeps the name)."""
    candidates: Iterable[str] = node.original_names or (node.name, *node.output_names)
    ordered = sorted(candidates, key=lambda name: 0 if _is_anchor_name(name, node.op_type) else 1)
    for name in ordered:
        res = resolver.resolve(name, node.op_type)
        if res.module is not None:
            return Resolved(res.module, "original-names" if node.original_names else res.how)
    if node.original_names and node.name not in node.original_names:
        return resolver.resolve(node.name, node.op_type)
    return Resolved(None, "")


def _is_anchor_name(name: str, op_type: str) -> bool:
    """Does an original layer name look like the compute op an OpenVINO node runs (its conv, its matmul)?"""
    if op_type in ("Convolution", "GroupConvolution"):
        return "Conv" in name
    if op_type in ("FullyConnected", "MatMul"):
        return "MatMul" in name or "Gemm" in name
    return name.rstrip("/").rsplit("/", 1)[-1] == op_type
