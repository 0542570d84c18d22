"""Torch-free facts about a model file: its content hash and an ONNX graph's declared inputs, so that `bench` and
`regress` on an ONNX file start without importing torch."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from deploy.core.spec import InputSpec


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def onnx_input_specs(model: Any) -> list[InputSpec]:
    from onnx import helper

    initializers = {init.name for init in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor = value.type.tensor_type
        dims: list[int | str] = []
        for axis, dim in enumerate(tensor.shape.dim):
            if dim.HasField("dim_value") and dim.dim_value > 0:
                dims.append(int(dim.dim_value))
            else:
                dims.append(dim.dim_param or ("batch" if axis == 0 else f"dim{axis}"))
        dtype = helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
        specs.append(InputSpec(value.name, tuple(dims), dtype))
    return specs
