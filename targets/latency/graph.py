"""The nodes a runtime will execute for a model, with their shapes and modules but no times: what the latency model
prices. Read from ONNX Runtime's optimised graph after one profiled inference (its time is thrown away); "all"
optimisation gives this CPU's exact kernels, "extended" the portable fusions used to price other devices.
"""
from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch

from deploy.core.spec import InputSpec
from deploy.targets.latency.nodes import NodeRecord

INT8 = "int8"


def graph_nodes(model: torch.nn.Module | str | Path, inputs: Sequence[InputSpec] | None = None,
                level: str = "all", int8_modules: Iterable[str] | None = None) -> tuple[NodeRecord, ...]:
    """Structure of `model` as the runtime runs it. `int8_modules` (module names, or ["*"] for all) are quantized
    first with static QDQ, so int8 is priced as the int8 kernels and the Q/DQ nodes it really adds."""
    from deploy.targets.latency.export import as_onnx

    with tempfile.TemporaryDirectory(prefix="deploy-graph-") as tmp:
        path, specs, module_names = as_onnx(model, inputs, Path(tmp))
        wanted = set(int8_modules or ())
        if wanted:
            path = _quantized(path, specs, wanted, module_names, Path(tmp))
        return nodes_of_file(path, specs, level, module_names)


def nodes_of_file(path: Path, specs: Sequence[InputSpec], level: str = "all",
                  module_names: set[str] | None = None) -> tuple[NodeRecord, ...]:
    import onnx

    from deploy.targets.latency.export import feeds_for
    from deploy.targets.latency.names import NameResolver
    from deploy.targets.latency.ort_profile import profile_ort
    from deploy.targets.latency.profile import to_records

    profile = profile_ort(path, feeds_for(specs), threads=1, runs=1, warmup=0, level=level)
    resolver = NameResolver(onnx.load(str(path), load_external_data=False).graph, module_names)
    return tuple(dataclasses.replace(n, ms=0.0) for n in to_records(profile, resolver))


def precision_for(module: str | None, precision_map: str | Mapping[str, str] | None, default: str = "fp32") -> str:
    """A node's requested precision: one precision for all, or a per-module map ('*' the default), matching the
    module or its nearest listed parent."""
    if precision_map is None:
        return default
    if isinstance(precision_map, str):
        return precision_map
    name = module or ""
    while True:
        if name in precision_map:
            return precision_map[name]
        if not name:
            return precision_map.get("*", default)
        name = name.rsplit(".", 1)[0] if "." in name else ""


def _quantized(path: Path, specs: Sequence[InputSpec], wanted: set[str], module_names: set[str] | None,
               folder: Path) -> Path:
    import onnx

    from deploy.targets.latency.export import quantize_qdq
    from deploy.targets.latency.names import scope_module

    graph = onnx.load(str(path), load_external_data=False).graph
    if any(n.op_type == "QuantizeLinear" for n in graph.node):
        return path  # already quantized: price it as it is
    nodes = None
    if "*" not in wanted:
        nodes = [n.name for n in graph.node if _inside(scope_module(n.name, module_names), wanted)]
        if not nodes:
            return path
    return quantize_qdq(path, specs, folder / "model_int8.onnx", nodes)


def _inside(module: str | None, wanted: set[str]) -> bool:
    if module is None:
        return False
    return any(module == w or module.startswith(w + ".") for w in wanted)
