"""TensorRT 10 on an NVIDIA GPU: build an engine from ONNX with the precisions the target profile allows, bind
torch.cuda buffers by address, and time each execute_async_v3 with CUDA events (device time, not host jitter).

Needs the `tensorrt` package and a CUDA GPU; without either, `prepare` raises RuntimeUnavailableError with a hint.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

from deploy.core.errors import MeasurementError, ModelLoadError, RuntimeUnavailableError, UserInputError
from deploy.profiles import Profile
from deploy.targets.runners.registry import DeviceTimed, RunnerConfig, register_runner

UNAVAILABLE = "TensorRT is not available here"
# our precision names -> TensorRT BuilderFlag names (fp32 needs no flag; int4 is weight-only, from Q/DQ in the graph)
BUILDER_FLAGS = {"f16": "FP16", "bf16": "BF16", "int8": "INT8", "fp8": "FP8"}
_PROFILE_PRECISIONS = {"fp16": "f16", "bf16": "bf16", "int8": "int8", "fp8": "fp8"}
WORKSPACE_BYTES = 4 << 30


def require_tensorrt() -> Any:
    """Import tensorrt and check for a CUDA GPU, or say in one line why this machine cannot run TensorRT."""
    try:
        import tensorrt as trt
    except Exception:
        raise RuntimeUnavailableError(UNAVAILABLE, "the tensorrt package does not import; on a machine with an "
                                      "NVIDIA GPU pip install tensorrt, or bench a local CPU target") from None
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except Exception:
        has_gpu = False
    if not has_gpu:
        raise RuntimeUnavailableError(UNAVAILABLE, "no CUDA GPU is visible to torch; run on a machine with an "
                                      "NVIDIA GPU, or bench a local CPU target")
    return trt


@register_runner("tensorrt")
class TensorRtRunner:
    """TensorRT engine built from an ONNX file for the feeds' shapes; buffers are torch.cuda tensors."""

    name = "tensorrt"

    def __init__(self, config: RunnerConfig):
        if config.precision is not None and config.precision not in (*BUILDER_FLAGS, "f32"):
            raise UserInputError(f"the tensorrt runner takes precision f32, {', '.join(BUILDER_FLAGS)}; "
                                 f"got {config.precision}")
        self.config = config
        self._info: dict[str, Any] = {}
        self._runtime: Any = None

    def precisions(self) -> list[str]:
        """Reduced precisions to enable: the one asked for, else every one the target profile lists."""
        if self.config.precision is not None:
            return [] if self.config.precision == "f32" else [self.config.precision]
        listed = getattr(self.config.profile, "precisions", ()) or ()
        return [_PROFILE_PRECISIONS[p] for p in listed if p in _PROFILE_PRECISIONS]

    def describe(self) -> dict[str, Any]:
        return {
            "runtime": self.name,
            "device": "cuda",
            "threads": self.config.threads,
            "precision": "+".join(["f32", *self.precisions()]),
            "timing": "cuda events",
            **self._info,
        }

    def build_engine(self, trt: Any, model: Path, feeds: dict[str, np.ndarray]) -> Any:
        """The engine for `model`, deserialized and ready to run."""
        serialized = self.serialize_engine(trt, model, feeds)
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))  # must outlive the engine it deserializes
        return self._runtime.deserialize_cuda_engine(serialized)

    def serialize_engine(self, trt: Any, model: Path, feeds: dict[str, np.ndarray]) -> Any:
        """Parse the ONNX file and build a serialized engine (a TensorRT plan) with the precision flags set."""
        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(model)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise ModelLoadError(f"TensorRT cannot parse {model}: {errors or 'unknown error'}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
        set_flags, missing = [], []
        for precision in self.precisions():
            flag = getattr(trt.BuilderFlag, BUILDER_FLAGS[precision], None)
            if flag is None:
                missing.append(precision)
                continue
            config.set_flag(flag)
            set_flags.append(BUILDER_FLAGS[precision])
        if self.config.precision == "f32":
            config.clear_flag(trt.BuilderFlag.TF32)  # an explicit f32 request means real fp32 math
        opt_profile = builder.create_optimization_profile()
        dynamic = False
        for i in range(network.num_inputs):
            tensor = network.get_input(i)
            if tensor.name not in feeds:
                raise MeasurementError(f"TensorRT sees an input '{tensor.name}' that has no feed")
            if any(d < 0 for d in tensor.shape):
                shape = tuple(feeds[tensor.name].shape)
                opt_profile.set_shape(tensor.name, shape, shape, shape)
                dynamic = True
        if dynamic:
            config.add_optimization_profile(opt_profile)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise MeasurementError("TensorRT failed to build an engine", "rerun with --debug for the builder log")
        self._info.update({"version": trt.__version__, "builder_flags": set_flags,
                           "flags_missing_in_this_version": missing})
        return serialized

    def prepare(self, model: str | Path, feeds: dict[str, np.ndarray]) -> Callable[[], object]:
        trt = require_tensorrt()
        import torch

        if not isinstance(model, (str, Path)):
            raise UserInputError("the tensorrt runner takes the path of an .onnx file")
        engine = self.build_engine(trt, Path(model), feeds)
        context = engine.create_execution_context()
        buffers: dict[str, Any] = {}
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                buffers[name] = torch.from_numpy(np.ascontiguousarray(feeds[name])).cuda()
                context.set_input_shape(name, tuple(buffers[name].shape))
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            if engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT:
                shape = tuple(context.get_tensor_shape(name))
                dtype = _torch_dtype(trt, engine.get_tensor_dtype(name))
                buffers[name] = torch.empty(shape, dtype=dtype, device="cuda")
            context.set_tensor_address(name, buffers[name].data_ptr())
        stream = torch.cuda.Stream()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        self._info.update({"gpu": torch.cuda.get_device_name(0), "includes_host_copies": False})

        def run_once(context=context, keep=buffers) -> float:
            start.record(stream)
            if not context.execute_async_v3(stream.cuda_stream):
                raise MeasurementError("TensorRT execute_async_v3 failed")
            end.record(stream)
            end.synchronize()
            return start.elapsed_time(end)  # milliseconds of device time

        run_once()
        return DeviceTimed(run_once)


def _torch_dtype(trt: Any, dtype: Any) -> Any:
    import torch

    table = {
        "FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT8": torch.int8,
        "INT32": torch.int32, "INT64": torch.int64, "BOOL": torch.bool, "UINT8": torch.uint8,
        "FP8": getattr(torch, "float8_e4m3fn", torch.uint8),
    }
    for name, torch_dtype in table.items():
        if getattr(trt.DataType, name, None) == dtype:
            return torch_dtype
    raise MeasurementError(f"TensorRT output dtype {dtype} has no torch equivalent")


def tensorrt_available() -> bool:
    try:
        require_tensorrt()
    except RuntimeUnavailableError:
        return False
    return True


def save_engine(model: str | Path, out: str | Path, feeds: dict[str, np.ndarray],
                profile: Profile | None = None) -> Path:
    """Build the TensorRT plan of an ONNX file for the feeds' shapes, with the profile's precisions, and write it."""
    trt = require_tensorrt()
    runner = TensorRtRunner(RunnerConfig(threads=1, precision=None, profile=profile))
    serialized = runner.serialize_engine(trt, Path(model), feeds)
    Path(out).write_bytes(bytes(serialized))
    return Path(out)
