"""Per-node times from ONNX Runtime's profiler: run the model with SessionOptions.enable_profiling, parse the JSON
trace (events of category "Node", named `<node>_kernel_time`, with op_name and tensor shapes), and read the
optimised graph ORT wrote out to know each node's neighbours. Same session settings as the ORT runner.
"""
from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from deploy.targets.latency.profile import ProfiledNode, RuntimeProfile
from deploy.targets.measure.lock import measurement_lock

_SUFFIX = "_kernel_time"
LEVELS = ("all", "extended", "basic")


def profile_ort(model_path: str | Path, feeds: dict[str, np.ndarray], threads: int, runs: int,
                warmup: int = 5, level: str = "all") -> RuntimeProfile:
    """Profile `runs` inferences after `warmup` unprofiled ones, holding the host measurement lock.

    `level` is the graph optimisation level: "all" is what the ORT runner uses (with CPU-specific layouts);
    "extended" keeps the portable fusions only, for pricing other devices.
    """
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="deploy-ortprof-") as tmp:
        options = _options(threads, level, Path(tmp))
        sess = ort.InferenceSession(str(model_path), sess_options=options, providers=["CPUExecutionProvider"])
        with measurement_lock():
            for _ in range(warmup + runs):
                sess.run(None, feeds)
        trace = Path(sess.end_profiling())
        events = json.loads(trace.read_text())
        optimized = _load_graph(Path(tmp) / "optimized.onnx")
    nodes = _nodes(events, skip=warmup)
    consumers, producers = _neighbors(optimized) if optimized is not None else ({}, {})
    if optimized is not None:
        nodes = _with_graph_info(nodes, optimized)
    return RuntimeProfile("onnxruntime", nodes, consumers, producers, runs)


def _options(threads: int, level: str, folder: Path) -> Any:
    import onnxruntime as ort

    levels = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC}
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = levels[level]
    options.log_severity_level = 3
    options.enable_profiling = True
    options.profile_file_prefix = str(folder / "profile")
    options.optimized_model_filepath = str(folder / "optimized.onnx")
    return options


def _nodes(events: list[dict[str, Any]], skip: int) -> tuple[ProfiledNode, ...]:
    """Node events grouped by name in first-seen order; the first `skip` occurrences (warm-up) dropped."""
    durations: dict[str, list[float]] = {}
    info: dict[str, dict[str, Any]] = {}
    for event in events:
        name = event.get("name", "")
        if event.get("cat") != "Node" or not name.endswith(_SUFFIX):
            continue
        name = name[: -len(_SUFFIX)]
        durations.setdefault(name, []).append(float(event.get("dur", 0)))
        info.setdefault(name, event.get("args", {}))
    nodes = []
    for name, durs in durations.items():
        args = info[name]
        nodes.append(ProfiledNode(name, args.get("op_name", ""), tuple(durs[skip:] or durs),
                                  _shapes(args.get("input_type_shape")), _shapes(args.get("output_type_shape"))))
    return tuple(nodes)


def _shapes(items: Any) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """[{'float': [1, 16, 32, 32]}, ...] -> (('float', (1, 16, 32, 32)), ...)."""
    out = []
    for item in items or ():
        for dtype, dims in (item or {}).items():
            out.append((str(dtype), tuple(int(d) for d in dims)))
    return tuple(out)


def _with_graph_info(nodes: tuple[ProfiledNode, ...], graph: Any) -> tuple[ProfiledNode, ...]:
    """Add each node's output tensor names, and the shapes of weights ORT pre-packed (and so left out of the
    trace, e.g. QLinearConv's), read from the optimised graph's initializers."""

    by_name = {n.name: n for n in graph.node}
    weights = {i.name: (_ONNX_DTYPES.get(i.data_type, "float"), tuple(int(d) for d in i.dims))
               for i in graph.initializer}
    out = []
    for node in nodes:
        graph_node = by_name.get(node.name)
        if graph_node is None:
            out.append(node)
            continue
        inputs = _align_inputs(list(graph_node.input), list(node.inputs), weights)
        out.append(dataclasses.replace(node, inputs=inputs, output_names=tuple(graph_node.output)))
    return tuple(out)


def _align_inputs(names: list[str], traced: list[tuple[str, tuple[int, ...]]],
                  weights: dict[str, tuple[str, tuple[int, ...]]]) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """Walk the node's declared inputs; where the trace skipped a pre-packed initializer, put its shape back."""
    if len(traced) >= len([n for n in names if n]):
        return tuple(traced)
    aligned, i = [], 0
    for name in names:
        if not name:
            continue
        if name in weights and (i >= len(traced) or traced[i][1] != weights[name][1]):
            aligned.append(weights[name])
            continue
        if i < len(traced):
            aligned.append(traced[i])
            i += 1
    return tuple(aligned + traced[i:])


_ONNX_DTYPES = {1: "float", 2: "uint8", 3: "int8", 5: "int16", 6: "int32", 7: "int64", 9: "bool", 10: "float16",
                11: "double", 16: "bfloat16"}


def _load_graph(path: Path) -> Any | None:
    import onnx

    try:
        return onnx.load(str(path), load_external_data=False).graph
    except Exception:  # the optimised model is only used for neighbours; without it, fewer nodes map
        return None


def _neighbors(graph: Any) -> tuple[dict[str, tuple[str, ...]], dict[str, tuple[str, ...]]]:
    producer = {out: n.name for n in graph.node for out in n.output}
    consumers: dict[str, list[str]] = {}
    producers: dict[str, tuple[str, ...]] = {}
    for n in graph.node:
        parents = tuple(producer[i] for i in n.input if i in producer)
        producers[n.name] = parents
        for p in parents:
            consumers.setdefault(p, []).append(n.name)
    return {k: tuple(v) for k, v in consumers.items()}, producers
