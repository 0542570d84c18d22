"""OpenVINO on the CPU, set up for latency: LATENCY hint, one stream, a pinned thread count, static input shapes,
and an EXPLICIT inference precision. Left unset, OpenVINO quietly runs fp32 models in bf16 on CPUs with AVX-512
BF16 or AMX, so every number we record says which precision it was taken in (read back from the compiled model).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

from deploy.core.errors import MeasurementError, ModelLoadError, RuntimeUnavailableError, UserInputError
from deploy.targets.target import has_bf16
from deploy.targets.runners.registry import RunnerConfig, register_runner

_OV_PRECISIONS = {"f32": "f32", "bf16": "bf16"}


@register_runner("openvino")
class OpenVinoRunner:
    """OpenVINO Runtime, CPU plugin, one synchronous InferRequest."""

    name = "openvino"

    def __init__(self, config: RunnerConfig):
        precision = config.precision or "f32"
        if precision not in _OV_PRECISIONS:
            raise UserInputError(f"the openvino runner takes precision f32 or bf16, got {precision}")
        if precision == "bf16" and not has_bf16():
            raise RuntimeUnavailableError("this CPU has no bf16 support (avx512_bf16 or amx_bf16)",
                                          "use --precision f32")
        self.config = config
        self.precision_hint = precision
        self._compiled_info: dict[str, Any] = {}

    def describe(self) -> dict[str, Any]:
        import openvino as ov

        return {
            "runtime": self.name,
            "version": ov.get_version(),
            "device": "CPU",
            "threads": self.config.threads,
            "performance_hint": "LATENCY",
            "num_streams": 1,
            "precision_hint": self.precision_hint,
            "precision": self._compiled_info.get("inference_precision", self.precision_hint),
            **self._compiled_info,
        }

    def compile(self, model: str | Path, feeds: dict[str, np.ndarray]) -> Any:
        """Read, reshape to the feeds' static shapes and compile with the latency properties set explicitly."""
        import openvino as ov
        import openvino.properties as props
        import openvino.properties.hint as hints

        core = ov.Core()
        try:
            ov_model = core.read_model(str(model))
        except Exception as exc:
            raise ModelLoadError(f"openvino cannot read {model}: {_first_line(exc)}") from None
        shapes = {}
        for port in ov_model.inputs:
            name = next((n for n in port.get_names() if n in feeds), None)
            if name is None:
                raise MeasurementError(f"openvino sees an input '{port.get_any_name()}' that has no feed",
                                       f"feeds given: {', '.join(feeds)}")
            shapes[port] = ov.PartialShape(list(feeds[name].shape))
        try:
            ov_model.reshape(shapes)
        except Exception as exc:
            raise MeasurementError(f"openvino cannot reshape the model to the input shapes: {_first_line(exc)}",
                                   "check --input-shape") from None
        properties = {
            hints.performance_mode: hints.PerformanceMode.LATENCY,
            props.num_streams: 1,
            props.inference_num_threads: self.config.threads,
            hints.inference_precision: ov.Type.bf16 if self.precision_hint == "bf16" else ov.Type.f32,
        }
        try:
            compiled = core.compile_model(ov_model, "CPU", properties)
        except Exception as exc:
            raise MeasurementError(f"openvino cannot compile the model: {_first_line(exc)}") from None
        self._compiled_info = {
            "inference_precision": _type_name(compiled.get_property("INFERENCE_PRECISION_HINT")),
            "threads_read_back": int(compiled.get_property("INFERENCE_NUM_THREADS")),
            "num_streams_read_back": int(compiled.get_property("NUM_STREAMS")),
        }
        if self._compiled_info["inference_precision"] != self.precision_hint:
            raise MeasurementError(f"openvino compiled in {self._compiled_info['inference_precision']} although "
                                   f"{self.precision_hint} was set")
        return compiled

    def prepare(self, model: str | Path, feeds: dict[str, np.ndarray]) -> Callable[[], object]:
        import openvino as ov

        if not isinstance(model, (str, Path)):
            raise UserInputError("the openvino runner takes the path of an .onnx (or OpenVINO .xml) file")
        compiled = self.compile(model, feeds)
        request = compiled.create_infer_request()
        arrays = {name: np.ascontiguousarray(arr) for name, arr in feeds.items()}
        for port in compiled.inputs:
            name = next(n for n in port.get_names() if n in arrays)
            request.set_tensor(port, ov.Tensor(arrays[name], shared_memory=True))
        try:
            request.infer()
        except Exception as exc:
            raise MeasurementError(f"openvino failed to run the model: {_first_line(exc)}") from None

        def run_once(request=request, keep=arrays) -> None:
            request.infer()

        return run_once


def _type_name(value: Any) -> str:
    """ov.Type.bf16 -> 'bf16', ov.Type.f32 -> 'f32' (what INFERENCE_PRECISION_HINT takes)."""
    name = getattr(value, "to_string", lambda: str(value))()
    return {"bfloat16": "bf16", "float32": "f32", "float16": "f16"}.get(name, name)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
