"""What really runs in low precision: read the runtime's optimised graph back and say, per layer, which kernel ran.

A Q/DQ file only states an intent; ONNX Runtime fuses DQ->Conv->Q into QLinearConv only under its rules, and
OpenVINO's low-precision transformations may keep a layer in f32. So the plan is checked against:
- ONNX Runtime: the model it writes to SessionOptions.optimized_model_filepath (QLinearConv, QLinearMatMul,
  MatMulInteger(ToFloat), QGemm, MatMulNBits vs Conv/MatMul/Gemm), mapped to layers by the weights they read
  (export names them `<layer>.weight_q`, `<layer>.weight_Q4`) or else by node scope;
- OpenVINO: the compiled model's runtime graph, each op's rt_info layerType / runtimePrecision, mapped to layers
  through originalLayersNames.
"""
from __future__ import annotations

import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from deploy.export.qdq.plan import QuantPlan
from deploy.targets.target import runtime_hint

ORT_INT8 = ("QLinearConv", "QLinearMatMul", "MatMulInteger", "MatMulIntegerToFloat", "QGemm", "ConvInteger",
            "DynamicQuantizeMatMul")
ORT_INT4 = ("MatMulNBits",)
ORT_FLOAT = ("Conv", "FusedConv", "MatMul", "FusedMatMul", "Gemm")
OV_COMPUTE = ("Convolution", "GroupConvolution", "FullyConnected", "MatMul", "Deconvolution")
_OV_PRECISION = {"u8": "int8", "i8": "int8", "f32": "fp32", "bf16": "bf16", "f16": "fp16", "u4": "int4",
                 "i4": "int4"}


@dataclass(frozen=True)
class LayerRuntime:
    layer: str
    op_type: str
    precision: str  # int8 | int4 | fp32 | bf16 | fp16 | missing
    node: str = ""


def ort_optimized(model_path: str | Path, threads: int = 1) -> Any:
    """The graph ONNX Runtime actually runs (all optimisations, as the ORT runner sets them)."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="deploy-ortopt-") as tmp:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        options.log_severity_level = 3
        ort.InferenceSession(str(model_path), sess_options=options, providers=["CPUExecutionProvider"])
        return onnx.load(str(Path(tmp) / "optimized.onnx"))


def op_counts(model: Any) -> dict[str, int]:
    return dict(Counter(n.op_type for n in model.graph.node))


def _layer_by_inputs(node: Any, layers: list[str]) -> str | None:
    """The layer whose weight or bias the node reads (`layer1.conv1.weight_q`, `fc.weight_Q4`, `fc.bias_q`)."""
    best = None
    for name in node.input:
        for layer in layers:
            if name.startswith((layer + ".weight", layer + ".bias")) and (best is None or len(layer) > len(best)):
                best = layer
    return best


def ort_layer_precisions(model_path: str | Path, layers: Iterable[str], threads: int = 1) -> dict[str, LayerRuntime]:
    """Per layer: the op ONNX Runtime runs for it and that op's precision ('missing' if none was found)."""
    import onnx

    from deploy.targets.latency.names import NameResolver

    names = sorted(layers)
    resolver = NameResolver(onnx.load(str(model_path), load_external_data=False).graph, set(names))
    found: dict[str, LayerRuntime] = {}
    for node in ort_optimized(model_path, threads).graph.node:
        if node.op_type in ORT_INT8:
            precision = "int8"
        elif node.op_type in ORT_INT4:
            precision = "int4"
        elif node.op_type in ORT_FLOAT:
            precision = "fp32"
        else:
            continue
        layer = _layer_by_inputs(node, names)
        if layer is None:
            resolved = resolver.resolve(node.name, "Conv" if "Conv" in node.op_type else "MatMul").module
            layer = resolved if resolved in names else None
        if layer is not None and layer not in found:
            found[layer] = LayerRuntime(layer, node.op_type, precision, node.name)
    return {n: found.get(n, LayerRuntime(n, "", "missing")) for n in names}


def openvino_layer_precisions(model_path: str | Path, layers: Iterable[str], threads: int = 1,
                              hint: str = "f32") -> dict[str, LayerRuntime]:
    """Per layer: OpenVINO's runtime layerType and runtimePrecision (u8/i8 -> int8) after compilation."""
    import onnx
    import openvino as ov

    from deploy.targets.latency.names import NameResolver

    names = set(layers)
    resolver = NameResolver(onnx.load(str(model_path), load_external_data=False).graph, names)
    core = ov.Core()
    compiled = core.compile_model(str(model_path), "CPU", {"INFERENCE_PRECISION_HINT": hint,
                                                           "INFERENCE_NUM_THREADS": threads})
    found: dict[str, LayerRuntime] = {}
    for op in compiled.get_runtime_model().get_ordered_ops():
        rt = op.get_rt_info()
        layer_type = _rt(rt, "layerType")
        if layer_type not in OV_COMPUTE:
            continue
        precision = _OV_PRECISION.get(_rt(rt, "runtimePrecision"), _rt(rt, "runtimePrecision"))
        for original in _rt(rt, "originalLayersNames").split(","):
            family = "Conv" if "Conv" in layer_type else "MatMul"
            layer = resolver.resolve(original, family).module if original else None
            if layer in names and layer not in found:  # a node name, or a tensor it writes ("output")
                found[layer] = LayerRuntime(layer, layer_type, precision, op.get_friendly_name())
                break
    return {n: found.get(n, LayerRuntime(n, "", "missing")) for n in sorted(names)}


def _rt(rt: Any, key: str) -> str:
    try:
        return str(rt[key].astype(str)) if key in rt else ""
    except Exception:  # noqa: BLE001 - an rt_info entry of another type: treat as absent
        return ""


def layer_precisions(model_path: str | Path, plan: QuantPlan, runtime: str = "onnxruntime", threads: int = 1
                     ) -> dict[str, LayerRuntime]:
    """The per-layer actual precision on `runtime` (onnxruntime or openvino)."""
    if runtime == "openvino":
        hint = runtime_hint(plan.float_precision, "openvino")
        return openvino_layer_precisions(model_path, plan.layers, threads, hint)
    return ort_layer_precisions(model_path, plan.layers, threads)


def mismatches(plan: QuantPlan, actual: dict[str, LayerRuntime]) -> list[str]:
    """Layers whose runtime precision contradicts the plan (an int8 layer running float, or the reverse)."""
    out = []
    for name, lp in plan.layers.items():
        got = actual.get(name)
        want = lp.option.precision
        if got is None or got.precision == "missing":
            out.append(f"{name}: planned {lp.option.label}, no kernel found in the optimised graph")
        elif want in ("int8", "int4") and got.precision != want:
            out.append(f"{name}: planned {lp.option.label}, runs {got.op_type} in {got.precision}")
        elif want not in ("int8", "int4") and got.precision in ("int8", "int4"):
            out.append(f"{name}: planned {lp.option.label} (float), runs {got.op_type} in {got.precision}")
    return out
