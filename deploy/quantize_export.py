"""Export a module in a low precision for the target, calibrated on the run's real calibration data.

int8 follows the target's Q/DQ policy; on CPU profiles with ONNX Runtime that is QDQ with uint8 asymmetric
activations and int8 symmetric per-channel weights (U8S8), which ONNX Runtime fuses into QLinear kernels.
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import torch

from deploy.errors import UserInputError

# Ops kept in float for every model: quantizing them costs fidelity (LayerNorm, Softmax, GELU) or adds Q/DQ
# islands without a fused int8 kernel (residual Add).
FLOAT_OPS = ("LayerNormalization", "Softmax", "Gelu", "Erf", "Add", "Div", "Sqrt", "Pow", "ReduceMean")


def quantize_for_target(module: torch.nn.Module, setup: Any, precision: str, path: Path) -> Path:
    from deploy.export.onnx import OnnxExportConfig, export_onnx

    if precision != "int8":
        raise UserInputError(f"precision '{precision}' is not supported by deploy compress yet", "use fp32 or int8")
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    names = [s.name for s in setup.loaded.inputs]
    batches = setup.calibration.batches("calibration", 8)[:16]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter([{n: t.numpy() for n, t in zip(names, b)} for b in batches])

        def get_next(self):  # noqa: ANN201 - onnxruntime's interface
            return next(self._it, None)

    quiet = logging.getLogger()
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # onnxruntime.quantization logs advice through the root logger
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        float_path = export_onnx(module, setup.loaded.inputs, Path(tmp) / "float.onnx",
                                 OnnxExportConfig(output_names=("output",)))
        quantize_static(str(float_path), str(path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=["Conv", "MatMul", "Gemm"],
                        extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})
    quiet.setLevel(level)
    return path
