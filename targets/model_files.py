"""Open an ONNX file for timing: check it is one (one clear line when not), hash it, read its declared inputs."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from deploy.core.errors import ModelLoadError
from deploy.core.model.files import file_sha256, onnx_input_specs
from deploy.core.spec import InputSpec


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
    from deploy.core.model.onnx_guard import external_data_files

    external_data_files(proto, path)  # refuses data outside the model's folder before any runtime reads it
    if not proto.graph.node or not proto.graph.output:
        raise ModelLoadError(f"{path} is not a valid ONNX model (its graph has no nodes or no outputs)",
                             "the file is corrupt or not ONNX; re-export it")
    try:
        inputs = tuple(onnx_input_specs(proto))
    except Exception as exc:  # an element type numpy has no name for
        raise ModelLoadError(f"{path}: cannot read its inputs ({type(exc).__name__}: {exc})",
                             "bench takes float, integer and bool inputs") from None
    return OnnxModel(path, file_sha256(path), inputs)


def load_openvino_ir(path: str | Path) -> OnnxModel:
    """An OpenVINO IR (.xml beside its .bin), as `deploy compress --target cpu-openvino` writes it: checked, hashed
    (both files) and its inputs read, the same record an ONNX file gets."""
    import hashlib

    import openvino as ov

    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"model file {path} does not exist", "check the path")
    weights = path.with_suffix(".bin")
    if not weights.is_file():
        raise ModelLoadError(f"{path} has no weights file {weights.name} beside it", "keep the .xml and .bin together")
    try:
        model = ov.Core().read_model(str(path))
    except Exception as exc:
        raise ModelLoadError(f"{path} is not a valid OpenVINO IR ({' '.join(str(exc).split())[:120]})",
                             "re-export it") from None
    specs = []
    for index, port in enumerate(model.inputs):
        dims: list[int | str] = []
        for axis, dim in enumerate(port.get_partial_shape()):
            dims.append(dim.get_length() if dim.is_static else ("batch" if axis == 0 else f"dim{axis}"))
        names = sorted(port.get_names())
        specs.append(InputSpec(names[0] if names else f"input_{index}", tuple(dims),
                               port.get_element_type().to_dtype().name))
    digest = hashlib.sha256(bytes.fromhex(file_sha256(path)) + bytes.fromhex(file_sha256(weights))).hexdigest()
    return OnnxModel(path, digest, tuple(specs))
