"""Where an ONNX file's external data lives, checked before any runtime (or the SSH runner) reads it.

An initializer (or a constant inside a node attribute or subgraph) may keep its bytes in another file named by
its `location`. A location that is absolute, climbs out of the model's folder (`../`), or reaches out through a
link would let a model file make a runtime read, or `bench --runner ssh://` ship, any file of the user's. Such
a model is refused with one line; the files that are allowed are returned so they can travel with the model.
"""
from __future__ import annotations

from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from deploy.core.errors import ModelLoadError


def external_data_files(proto: Any, model_path: Path) -> list[str]:
    """Relative paths of the external-data files `proto` names, each checked to stay inside the model's folder."""
    from onnx import TensorProto
    from onnx.external_data_helper import _get_all_tensors

    folder = model_path.resolve().parent
    found: list[str] = []
    for tensor in _get_all_tensors(proto):
        if tensor.data_location != TensorProto.EXTERNAL:
            continue
        entries = {e.key: e.value for e in tensor.external_data}
        location = entries.get("location", "")
        _check_location(location, tensor.name, model_path, folder)
        if location not in found:
            found.append(location)
    return found


def _check_location(location: str, tensor: str, model_path: Path, folder: Path) -> None:
    refuse = ModelLoadError(f"{model_path.name}: tensor {tensor!r} keeps its data at {location!r}, outside the "
                            "model's folder", "keep external data files next to the .onnx file (a relative name "
                            "without '..'); re-save the model with onnx.save(..., save_as_external_data=True)")
    if not location or "\x00" in location:
        raise ModelLoadError(f"{model_path.name}: tensor {tensor!r} has external data without a location",
                             "re-save the model") from None
    windows = PureWindowsPath(location)
    posix = PurePosixPath(location)
    if posix.is_absolute() or windows.is_absolute() or windows.drive or location.startswith(("\\", "/")):
        raise refuse
    if ".." in posix.parts or ".." in windows.parts:
        raise refuse
    target = (folder / location).resolve()
    if target != folder and folder not in target.parents:  # a link that leads out of the folder
        raise refuse
