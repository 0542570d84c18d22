"""Input feeds for timing: the model's declared inputs, made concrete by the user's `--input-shape`, filled with
deterministic data. Latency rarely depends on values, but token ids and masks must still be valid.

`--input-shape` takes either `NAME:DIMS[:DTYPE]` (one input's full shape, e.g. `input_ids:1x128:int64`) or
`DIM=SIZE` (a named dynamic axis for every input that has it, e.g. `sequence=128`). Unnamed dynamic axes are 1.
"""
from __future__ import annotations

import re
from typing import Iterable, Sequence

import numpy as np

from deploy.errors import InputSpecError, nearest
from deploy.pipeline import InputSpec

NUMPY_DTYPES = ("float32", "float16", "float64", "int64", "int32", "int8", "uint8", "bool")
FEED_SEED = 0
_USAGE = "use NAME:DIMS[:DTYPE] (e.g. input_ids:1x128:int64) or DIM=SIZE (e.g. sequence=128)"


def parse_input_shape(text: str, default_dtype: str = "float32") -> InputSpec:
    """Parse `NAME:DIMS[:DTYPE]`, e.g. `pixel_values:1x3x224x224` or `input_ids:1x128:int64`."""
    parts = text.strip().split(":")
    if len(parts) not in (2, 3) or not parts[0] or not parts[1]:
        raise InputSpecError(f"--input-shape '{text}' is not NAME:DIMS[:DTYPE]", _USAGE)
    name, dims_text = parts[0].strip(), parts[1].strip().lower()
    dims: list[int] = []
    for dim in re.split(r"[x,]", dims_text):
        if not dim.strip().isdigit() or int(dim) < 1:
            raise InputSpecError(f"--input-shape '{text}': dimension '{dim}' is not a positive integer",
                                 "write dimensions as 1x3x224x224")
        dims.append(int(dim))
    dtype = parts[2].strip().lower() if len(parts) == 3 and parts[2].strip() else default_dtype
    if dtype not in NUMPY_DTYPES:
        close = nearest(dtype, NUMPY_DTYPES)
        hint = f"did you mean '{close}'?" if close else f"use one of {', '.join(NUMPY_DTYPES)}"
        raise InputSpecError(f"--input-shape '{text}': unknown dtype '{dtype}'", hint)
    return InputSpec(name, tuple(dims), dtype)


def _parse_dim_size(text: str) -> tuple[str, int]:
    name, _, size = text.partition("=")
    if not name.strip() or not size.strip().isdigit() or int(size) < 1:
        raise InputSpecError(f"--input-shape '{text}' is not DIM=SIZE with a positive size", _USAGE)
    return name.strip(), int(size)


def resolve_inputs(declared: Sequence[InputSpec], overrides: Iterable[str] = ()) -> list[InputSpec]:
    """The model's inputs with every dimension concrete: overrides checked against what the model declares."""
    by_name = {spec.name: spec for spec in declared}
    sizes: dict[str, int] = {}
    explicit: dict[str, InputSpec] = {}
    for text in overrides:
        if ":" not in text and "=" in text:
            dim, size = _parse_dim_size(text)
            sizes[dim] = size
            continue
        name = text.split(":", 1)[0].strip()
        if name not in by_name:
            close = nearest(name, by_name)
            hint = f"did you mean '{close}'?" if close else f"its inputs are: {', '.join(by_name) or 'none'}"
            raise InputSpecError(f"--input-shape names '{name}', but the model has no input of that name", hint)
        model_spec = by_name[name]
        spec = parse_input_shape(text, default_dtype=model_spec.dtype)
        _check_fits(spec, model_spec)
        explicit[name] = spec
    return [explicit.get(s.name) or InputSpec(s.name, s.concrete_shape(sizes), s.dtype) for s in declared]


def _check_fits(spec: InputSpec, model_spec: InputSpec) -> None:
    shown = "x".join(str(d) for d in model_spec.shape) or "a scalar"
    if len(spec.shape) != len(model_spec.shape):
        raise InputSpecError(f"input '{spec.name}' has {len(model_spec.shape)} dimensions ({shown}) in the model, "
                             f"--input-shape gave {len(spec.shape)}")
    for got, want in zip(spec.shape, model_spec.shape):
        if isinstance(want, int) and got != want:
            raise InputSpecError(f"input '{spec.name}' is {shown} in the model; --input-shape can only set its "
                                 f"dynamic dimensions, got {'x'.join(map(str, spec.shape))}")
    if spec.dtype != model_spec.dtype:
        raise InputSpecError(f"input '{spec.name}' is {model_spec.dtype} in the model, --input-shape says {spec.dtype}",
                             f"drop the dtype or write {model_spec.dtype}")


def make_feeds(specs: Sequence[InputSpec], seed: int = FEED_SEED) -> dict[str, np.ndarray]:
    """Deterministic stand-in data: normal floats; masks of ones, token types of zeros, other integers in [0, 100)."""
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for spec in specs:
        shape = tuple(int(d) for d in spec.concrete_shape())
        if spec.dtype not in NUMPY_DTYPES:
            raise InputSpecError(f"input '{spec.name}' has dtype {spec.dtype}, which timing feeds do not support",
                                 f"supported: {', '.join(NUMPY_DTYPES)}")
        dtype = np.dtype(spec.dtype)
        if dtype.kind == "f":
            value = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind == "b" or spec.name == "attention_mask":
            value = np.ones(shape, dtype=dtype)
        elif spec.name == "token_type_ids":
            value = np.zeros(shape, dtype=dtype)
        else:
            value = rng.integers(0, 100, size=shape).astype(dtype)
        feeds[spec.name] = np.ascontiguousarray(value)
    return feeds
