"""Open an ONNX file for timing: check it is one (one clear line when not), hash it, read its declared inputs."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from deploy.errors import ModelLoadError
from deploy.pipeline import InputSpec
from deploy.targets.files import sha256_file

# ONNX TensorProto element types -> our dtype names (those timing feeds can make)
_ONNX_DTYPES = {1: "float32", 2: "uint8", 3: "int8", 6: "int32", 7: "int64", 9: "bool", 10: "float16", 11: "float64",
                16: "bfloat16"}


@dataclass(frozen=True)
class OnnxModel:
    """An ONNX file we have checked: where it is, its content hash, and its graph inputs (dynamic axes by name)."""

    path: Path
    sha256: str
    inputs: tuple[InputSpec, ...]


def load_onnx(path: str | Path) -> OnnxModel:
    """Validate an ONNX file and read its inputs; every failure is a one-line ModelLoadError (exit 2)."""
    import onnx

    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"model file {path} does not exist", "check the path")
    if not path.is_file():
        raise ModelLoadError(f"{path} is not a file", "give the path of an .onnx file")
    if path.suffix.lower() != ".onnx":
        raise ModelLoadError(f"{path} is not an ONNX file (expected the .onnx extension)",
                             "bench and regress measure exported models; export it to ONNX first")
    if path.stat().st_size == 0:
        raise ModelLoadError(f"model file {path} is empty (0 bytes)", "re-export the model")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf DecodeError and friends
        raise ModelLoadError(f"{path} is not a valid ONNX model ({type(exc).__name__})",
                             "the file is corrupt or not ONNX; re-export it") from None
    if not proto.graph.node or not proto.graph.output:
        raise ModelLoadError(f"{path} is not a valid ONNX model (its graph has no nodes or no outputs)",
                             "the file is corrupt or not ONNX; re-export it")
    initializers = {init.name for init in proto.graph.initializer}
    inputs = []
    for value in proto.graph.input:
        if value.name in initializers:
            continue
        tensor = value.type.tensor_type
        dtype = _ONNX_DTYPES.get(tensor.elem_type)
        if dtype is None:
            raise ModelLoadError(f"{path}: input '{value.name}' has ONNX element type {tensor.elem_type}, "
                                 "which bench cannot feed", "bench takes float, integer and bool inputs")
        dims: list[int | str] = []
        for i, dim in enumerate(tensor.shape.dim):
            if dim.HasField("dim_value") and dim.dim_value > 0:
                dims.append(int(dim.dim_value))
            else:
                dims.append(dim.dim_param or f"{value.name}_dim{i}")
        inputs.append(InputSpec(value.name, tuple(dims), dtype))
    return OnnxModel(path, sha256_file(path), tuple(inputs))
