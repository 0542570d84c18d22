"""The export of a quantization plan as a Q/DQ ONNX file (plus OpenVINO IR): the float model (BatchNorm folded, the
plan's bias corrections applied) is exported, then Q/DQ pairs, integer weights and int32 biases are inserted where
the target runtime's policy (export.qdq.policy) says its kernels fuse them."""
from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from torch import nn

from deploy.export.qdq.plan import QuantPlan
from deploy.core.errors import ConfigError
from deploy.export.qdq.policy import QdqPolicy, policy_for
from deploy.core.spec import InputSpec


@dataclass
class QuantizedExport:
    onnx: Path
    openvino_xml: Path | None = None
    policy: str = ""
    float_layers_precision: dict[str, str] = field(default_factory=dict)  # fp16/bf16 layers left to the builder
    notes: list[str] = field(default_factory=list)


def build_qdq_model(float_model: Any, graph: Any, plan: QuantPlan, policy: QdqPolicy) -> tuple[Any, list[str]]:
    """A Q/DQ copy of an exported float onnx.ModelProto per `plan` (the input model and graph are not changed)."""
    import copy

    from deploy.export.qdq.insert import gemm_to_matmul, insert_qdq
    from deploy.export.qdq.int4 import apply_int4

    _check_policy(plan, policy)
    model = copy.deepcopy(float_model)
    graph = copy.deepcopy(graph)
    gemm_to_matmul(model, graph, [n for n, lp in plan.layers.items() if lp.option.precision == "int4"])
    notes = insert_qdq(model, graph, plan, policy)
    model = apply_int4(model, graph, plan, qdq=policy.int4_qdq)
    if any(lp.option.precision == "fp8" for lp in plan.layers.values()):
        _at_least_opset(model, 19)
    return model, notes


def _check_policy(plan: QuantPlan, policy: QdqPolicy) -> None:
    """Activations signed as the policy wants them (a policy's `signed_conv_inputs` lets a conv's input be either)."""
    signed = {lp.act_in.signed for lp in plan.layers.values()
              if lp.act_in is not None and not (policy.signed_conv_inputs and lp.kind == "conv")}
    if signed and signed != {policy.act_signed}:
        raise ConfigError(f"the plan was calibrated for the '{plan.policy}' policy; '{policy.name}' needs "
                          f"{'signed' if policy.act_signed else 'unsigned'} activations",
                          f"re-run quantization for the {policy.name} target")


def _at_least_opset(model: Any, version: int) -> None:
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx") and op.version < version:
            op.version = version


def float_onnx(module: nn.Module, inputs: Sequence[InputSpec], folder: Path, static: bool = False,
               plan: QuantPlan | None = None) -> tuple[Path, list[str]]:
    """Export the BatchNorm-folded float module (what the plan was calibrated on), with the plan's bias
    corrections applied to its low-precision layers; returns the path and notes."""
    from deploy.core.model.onnx_export import OnnxExportConfig, export_onnx
    from deploy.export.qdq.fold import fold_batchnorm
    from deploy.export.qdq.plan import round_weights, shift_biases

    folded, notes = fold_batchnorm(module)
    if plan is not None and plan.shifts:
        skipped = shift_biases(folded, plan)
        if skipped:
            notes.append(f"bias correction skipped where the layer width differs from the plan's: "
                         f"{', '.join(skipped[:5])}{' ...' if len(skipped) > 5 else ''}")
    if plan is not None and plan.rounded:
        skipped = round_weights(folded, plan)
        if skipped:
            notes.append(f"GPTQ rounding skipped where the layer's shape differs from the plan's: "
                         f"{', '.join(skipped[:5])}{' ...' if len(skipped) > 5 else ''}")
    specs = [InputSpec(s.name, s.concrete_shape(), s.dtype) for s in inputs] if static else list(inputs)
    path = export_onnx(folded, specs, Path(folder) / "float.onnx", OnnxExportConfig(dynamic=not static))
    return path, notes


def export_quantized(plan: QuantPlan, module: nn.Module, inputs: Sequence[InputSpec], path: str | Path,
                     policy: str | QdqPolicy | None = None) -> QuantizedExport:
    """Write the Q/DQ ONNX for `plan` (and OpenVINO IR for the openvino policy). `module` is the float model, with
    BatchNorm folded or not (a fake-quantized model is unwrapped first: QuantizedModel.export does it)."""
    import onnx

    from deploy.export.qdq.graph import layer_graph

    pol = policy if isinstance(policy, QdqPolicy) else policy_for(policy or plan.policy)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="deploy-qdq-") as tmp:
        float_path, notes = float_onnx(module, inputs, Path(tmp), plan=plan)
        float_model = onnx.load(str(float_path))
        graph = layer_graph(float_model, plan.layers)
        model, more = build_qdq_model(float_model, graph, plan, pol)
        save_atomic(model, path)
    result = QuantizedExport(path, None, pol.name, notes=notes + more)
    result.float_layers_precision = {n: lp.option.precision for n, lp in plan.layers.items()
                                     if lp.option.precision in ("fp16", "bf16")}
    if pol.openvino_ir:
        from deploy.export.openvino import save_ir

        result.openvino_xml = save_ir(path, path.with_suffix(".xml"))
    return result


def save_atomic(model: Any, path: Path) -> Path:
    import onnx

    from deploy.core.atomic_io import atomic_path

    with atomic_path(path) as tmp:
        onnx.save(model, str(tmp))
    return path
