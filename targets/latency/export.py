"""The ONNX files latency work times: a torch module exported with static shapes (so node names carry module scopes),
and its int8 QDQ twin made with onnxruntime.quantization.quantize_static (per-channel weights), so the real int8
kernels run rather than a guess.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from deploy.core.spec import InputSpec

CALIBRATION_SAMPLES = 4


def export_static(module: torch.nn.Module, inputs: Sequence[InputSpec], path: str | Path) -> Path:
    """Export with every dimension fixed (timing wants static shapes) via the TorchScript exporter."""
    from deploy.core.model.onnx_export import OnnxExportConfig, export_onnx

    specs = [InputSpec(s.name, s.concrete_shape(), s.dtype) for s in inputs]
    names = _output_names(module, specs)
    return export_onnx(module, specs, path, OnnxExportConfig(dynamic=False, output_names=names))


def _output_names(module: torch.nn.Module, specs: Sequence[InputSpec]) -> tuple[str, ...]:
    """One name per output tensor, so multi-output modules (a matmul pair, an encoder) export cleanly."""
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        out = module.eval()(*(s.example(None, gen) for s in specs))
    count = len(out) if isinstance(out, (tuple, list)) else 1
    return ("output",) if count == 1 else tuple(f"output_{i}" for i in range(count))


def feeds_for(inputs: Sequence[InputSpec], seed: int = 0) -> dict[str, np.ndarray]:
    from deploy.targets.measure.feeds import make_feeds

    return make_feeds([InputSpec(s.name, s.concrete_shape(), s.dtype) for s in inputs], seed)


def quantize_qdq(model_path: str | Path, inputs: Sequence[InputSpec], out_path: str | Path,
                 nodes_to_quantize: Sequence[str] | None = None) -> Path:
    """Static int8 QDQ: uint8 activations, int8 per-channel weights, calibrated on a few random feeds."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter([feeds_for(inputs, seed) for seed in range(CALIBRATION_SAMPLES)])

        def get_next(self):  # noqa: ANN201 - the onnxruntime interface
            return next(self._it, None)

    out_path = Path(out_path)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # quantize_static logs "consider pre-processing" on the root logger every call
    try:
        quantize_static(str(model_path), str(out_path), _Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        nodes_to_quantize=list(nodes_to_quantize) if nodes_to_quantize else None)
    finally:
        root.setLevel(level)
    return out_path


def as_onnx(model: torch.nn.Module | str | Path, inputs: Sequence[InputSpec] | None,
            folder: Path) -> tuple[Path, list[InputSpec], set[str] | None]:
    """(ONNX path, concrete input specs, the module's names when we have the module): a module is exported into
    `folder`; a file is checked and used as is, its inputs defaulting to its own."""
    from deploy.core.errors import UserInputError

    if isinstance(model, torch.nn.Module):
        if not inputs:
            raise UserInputError("timing a torch module needs its input specs")
        specs = [InputSpec(s.name, s.concrete_shape(), s.dtype) for s in inputs]
        path = export_static(model, specs, folder / "model.onnx")
        return path, specs, {name for name, _ in model.named_modules()}
    from deploy.targets.model_files import load_onnx

    onnx_model = load_onnx(model)
    specs = list(inputs) if inputs else list(onnx_model.inputs)
    return Path(model), [InputSpec(s.name, s.concrete_shape(), s.dtype) for s in specs], None
