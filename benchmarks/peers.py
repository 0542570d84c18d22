"""The peer tools, each called the way its documentation tells a user to, producing a model file to time.

A `Method` is one row: which tool builds the artifact, and which runtime (at which precision hint) runs it. The
shared artifacts (the fp32 ONNX export, ORT's pre-processed graph, the Torch-Pruning model, the NNCF model) are
built once per model by the `Workspace` and reused by every row that needs them.
"""
from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from peer_cases import Case

PRUNE_RATIO = 0.5


def artifact_bytes(path: Path) -> int:
    """Bytes on disk: an ONNX file, or an OpenVINO IR's .xml plus .bin."""
    size = path.stat().st_size
    weights = path.with_suffix(".bin")
    return size + (weights.stat().st_size if path.suffix == ".xml" and weights.exists() else 0)


class Workspace:
    """Per-model artifacts, built on first use and cached (several rows share each)."""

    def __init__(self, case: Case, folder: Path):
        self.case, self.folder, self._built = case, folder, {}
        self.seconds: dict[Path, float] = {}  # wall time to build each artifact (the tool's own cost)
        self.base_run: Callable[[], object] | None = None  # the ORT fp32 session every row is timed against

    def get(self, name: str, build: Callable[["Workspace", Path], Path], suffix: str = ".onnx") -> Path:
        if name not in self._built:
            start = time.perf_counter()
            path = build(self, self.folder / f"{self.case.name}_{name}{suffix}")
            self._built[name], self.seconds[path] = path, round(time.perf_counter() - start, 2)
        return self._built[name]

    @property
    def fp32(self) -> Path:
        return self.get("fp32", lambda ws, path: export(ws.case, ws.case.module, path))

    @property
    def preprocessed(self) -> Path:
        return self.get("pre", _ort_preprocess)

    @property
    def pruned(self) -> Path:
        return self.get("tp50", lambda ws, path: export(ws.case, prune_uniform(ws.case, PRUNE_RATIO), path))

    @property
    def nncf(self) -> Path:
        return self.get("nncf_int8", _nncf_int8, suffix=".xml")


def export(case: Case, module: nn.Module, path: Path) -> Path:
    from deploy.core.model.onnx_export import OnnxExportConfig, export_onnx

    return export_onnx(module, case.inputs, path, OnnxExportConfig(output_names=(case.output_name,)))


def _ort_preprocess(ws: Workspace, path: Path) -> Path:
    """ORT's recommended step before quantizing: shape inference plus graph optimisation."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    quant_pre_process(str(ws.fp32), str(path))
    return path


def ort_dynamic(ws: Workspace, path: Path) -> Path:
    """ORT `quantize_dynamic` with its defaults (int8 weights, activations quantized at run time)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(ws.preprocessed), str(path), weight_type=QuantType.QInt8)
    return path


def ort_static(ws: Workspace, path: Path) -> Path:
    """ORT `quantize_static`: QDQ, uint8 activations / int8 weights (fast on x86 VNNI), per-channel, MinMax."""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self, feeds: list[dict]):
            self._it = iter(feeds)

        def get_next(self) -> dict | None:
            return next(self._it, None)

    quantize_static(str(ws.preprocessed), str(path), Reader(ws.case.calib), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax)
    return path


def _nncf_int8(ws: Workspace, path: Path) -> Path:
    """NNCF post-training quantization of the OpenVINO model (SmoothQuant etc. via model_type for transformers)."""
    import nncf
    import openvino as ov

    nncf.set_log_level(logging.ERROR)
    model = ov.Core().read_model(str(ws.fp32))
    model_type = nncf.ModelType.TRANSFORMER if ws.case.transformer else None
    advanced = None  # NNCF's default overflow fix: 7-bit weights in the first layer only
    if getattr(ws.case, "overflow_fix_everywhere", False):  # for a CPU without VNNI, as OpenVINO's docs advise
        advanced = nncf.AdvancedQuantizationParameters(overflow_fix=nncf.OverflowFix.ENABLE)
    quantized = nncf.quantize(model, nncf.Dataset(ws.case.calib), subset_size=len(ws.case.calib),
                              model_type=model_type, advanced_parameters=advanced)
    ov.save_model(quantized, str(path))
    return path


def prune_uniform(case: Case, ratio: float) -> nn.Module:
    """Torch-Pruning: the same ratio for every prunable group, L2-magnitude importance, no fine-tuning."""
    import torch_pruning as tp

    module = copy.deepcopy(case.module).eval()
    roots = {id(m) for m in case.prune_roots(module)}
    ignored = [m for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and id(m) not in roots]
    example = tuple(torch.from_numpy(case.timing_feeds[s.name]) for s in case.inputs)
    pruner = tp.pruner.BasePruner(module, example, importance=tp.importance.MagnitudeImportance(p=2),
                                  pruning_ratio=ratio, ignored_layers=ignored)
    pruner.step()
    return module


@dataclass(frozen=True)
class Method:
    """One peer row: `artifact` builds (or fetches) the model file; `runtime`/`precision` say how it is run."""

    key: str
    label: str
    tool: str
    runtime: str  # 'onnxruntime' | 'openvino'
    precision: str | None
    artifact: Callable[[Workspace], Path]
    note: str = ""


def _built(name: str, build: Callable[[Workspace, Path], Path]) -> Callable[[Workspace], Path]:
    return lambda ws: ws.get(name, build)


METHODS: tuple[Method, ...] = (
    Method("ort_fp32", "ONNX Runtime fp32", "onnxruntime", "onnxruntime", None, lambda ws: ws.fp32,
           "second session of the baseline model: an A/A check of the measurement"),
    Method("ort_dynamic", "ORT quantize_dynamic int8", "onnxruntime", "onnxruntime", None,
           _built("ort_dynamic", ort_dynamic), "default op types, int8 weights"),
    Method("ort_static", "ORT quantize_static int8 (QDQ U8S8, per-channel)", "onnxruntime", "onnxruntime", None,
           _built("ort_static", ort_static), "all op types (the default), MinMax calibration"),
    Method("ov_fp32", "OpenVINO fp32", "openvino", "openvino", "f32", lambda ws: ws.fp32),
    Method("ov_bf16", "OpenVINO bf16", "openvino", "openvino", "bf16", lambda ws: ws.fp32),
    Method("nncf_int8", "NNCF int8 on OpenVINO (rest f32)", "nncf", "openvino", "f32", lambda ws: ws.nncf),
    Method("nncf_int8_bf16", "NNCF int8 on OpenVINO (rest bf16)", "nncf", "openvino", "bf16", lambda ws: ws.nncf,
           "OpenVINO's default on a bf16-capable CPU"),
    Method("tp50_ort", "Torch-Pruning 50% uniform, ORT fp32", "torch-pruning", "onnxruntime", None,
           lambda ws: ws.pruned, "no fine-tuning"),
    Method("tp50_ov_bf16", "Torch-Pruning 50% uniform, OpenVINO bf16", "torch-pruning", "openvino", "bf16",
           lambda ws: ws.pruned, "no fine-tuning"),
)
BASELINE = "ort_fp32"
BUDGET_REFERENCE = "nncf_int8"  # deploy is asked for this row's measured p50, and for half of it
