"""Per-node times from OpenVINO's performance counters (PERF_COUNT=YES): `request.profiling_info` gives each
executed node's real time and exec type (e.g. `brgconv_avx512_I8`, which shows the precision it really ran in);
the compiled runtime model gives its shapes and, in rt_info `originalLayersNames`, the ONNX nodes it fused.
Same compile settings as the OpenVINO runner.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from deploy.core.errors import MeasurementError
from deploy.targets.latency.profile import ProfiledNode, RuntimeProfile
from deploy.targets.measure.lock import measurement_lock


def profile_openvino(model_path: str | Path, feeds: dict[str, np.ndarray], threads: int, runs: int,
                     warmup: int = 5, precision: str = "f32") -> RuntimeProfile:
    """Profile `runs` inferences after `warmup`, holding the host measurement lock."""
    compiled = _compile(model_path, feeds, threads, precision)
    request = compiled.create_infer_request()
    for port in compiled.inputs:
        name = next(n for n in port.get_names() if n in feeds)
        request.set_tensor(port, _tensor(feeds[name]))
    durations: dict[str, list[float]] = {}
    info: dict[str, tuple[str, str]] = {}
    with measurement_lock():
        for i in range(warmup + runs):
            request.infer()
            if i < warmup:
                continue
            for item in request.profiling_info:
                if item.status.name != "EXECUTED":
                    continue
                durations.setdefault(item.node_name, []).append(item.real_time.total_seconds() * 1e6)
                info.setdefault(item.node_name, (item.node_type, item.exec_type))
    graph = _runtime_graph(compiled)
    nodes = []
    for name, durs in durations.items():
        node_type, exec_type = info[name]
        meta = graph.get(name, {})
        nodes.append(ProfiledNode(name, node_type, tuple(durs), meta.get("inputs", ()), meta.get("outputs", ()),
                                  exec_type, meta.get("original", ())))
    producers = {name: meta["parents"] for name, meta in graph.items()}
    consumers: dict[str, list[str]] = {}
    for name, parents in producers.items():
        for p in parents:
            consumers.setdefault(p, []).append(name)
    return RuntimeProfile("openvino", tuple(nodes), {k: tuple(v) for k, v in consumers.items()}, producers, runs)


def _compile(model_path: str | Path, feeds: dict[str, np.ndarray], threads: int, precision: str) -> Any:
    import openvino as ov
    import openvino.properties as props
    import openvino.properties.hint as hints

    core = ov.Core()
    model = core.read_model(str(model_path))
    shapes = {}
    for port in model.inputs:
        name = next((n for n in port.get_names() if n in feeds), None)
        if name is None:
            raise MeasurementError(f"openvino sees an input '{port.get_any_name()}' that has no feed")
        shapes[port] = ov.PartialShape(list(feeds[name].shape))
    model.reshape(shapes)
    properties = {
        hints.performance_mode: hints.PerformanceMode.LATENCY,
        props.num_streams: 1,
        props.inference_num_threads: threads,
        hints.inference_precision: ov.Type.bf16 if precision == "bf16" else ov.Type.f32,
        "PERF_COUNT": True,
    }
    return core.compile_model(model, "CPU", properties)


def _tensor(array: np.ndarray) -> Any:
    import openvino as ov

    return ov.Tensor(np.ascontiguousarray(array))


def _runtime_graph(compiled: Any) -> dict[str, dict[str, Any]]:
    """Per runtime node: input/output shapes, the original layer names it fused, its producers' names."""
    graph: dict[str, dict[str, Any]] = {}
    for op in compiled.get_runtime_model().get_ordered_ops():
        rt = op.get_rt_info()
        original = _rt_str(rt, "originalLayersNames")
        graph[op.get_friendly_name()] = {
            "inputs": tuple(_port_shape(p) for p in op.inputs()),
            "outputs": tuple(_port_shape(p) for p in op.outputs()),
            "original": tuple(n for n in original.split(",") if n),
            "parents": tuple(op.input_value(i).get_node().get_friendly_name() for i in range(op.get_input_size())),
        }
    return graph


def _rt_str(rt: Any, key: str) -> str:
    try:
        return str(rt[key].astype(str)) if key in rt else ""
    except Exception:
        return ""


def _port_shape(port: Any) -> tuple[str, tuple[int, ...]]:
    shape = port.get_partial_shape()
    dims = tuple(int(d.get_length()) if d.is_static else 1 for d in shape) if shape.rank.is_static else ()
    return port.get_element_type().get_type_name(), dims
