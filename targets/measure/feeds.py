"""Input feeds for timing: the model's declared inputs, made concrete by the user's `--input-shape`, filled with
deterministic data. Latency rarely depends on values, but token ids and masks must still be valid.

`--input-shape` takes the grammar every command takes (`NAME:DIMS[:DTYPE]`, e.g. `input_ids:1x128:int64`; the name
may be left out for a one-input model), or `DIM=SIZE` to size a named dynamic axis of every input that has it
(e.g. `sequence=128`). A dtype left out is the model's own. Dynamic axes nobody sized are 1.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Iterable, Sequence

import numpy as np

from deploy.core.errors import InputSpecError, nearest
from deploy.core.spec import InputSpec

NUMPY_DTYPES = ("float32", "float16", "float64", "int64", "int32", "int8", "uint8", "bool")
FEED_SEED = 0
_USAGE = "use NAME:DIMS[:DTYPE] (e.g. input_ids:1x128:int64) or DIM=SIZE (e.g. sequence=128)"
_DIMS_ONLY = re.compile(r"^\d+(x\d+)*$")


def parse_input_shape(text: str, default_dtype: str | None = None) -> InputSpec:
    """Parse `NAME:DIMS[:DTYPE]` as deploy.core.model.load does; a dtype left out becomes `default_dtype` when given."""
    from deploy.core.model.load import parse_input_shape as parse_shape

    spec = parse_shape(text)
    parts = text.strip().split(":")
    named = not _DIMS_ONLY.match(parts[0])
    has_dtype = len(parts) == 3 or (len(parts) == 2 and not named)
    if default_dtype and not has_dtype:
        spec = dataclasses.replace(spec, dtype=default_dtype)
    return spec if named else dataclasses.replace(spec, name="")


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
        spec = parse_input_shape(text)
        name = spec.name or (next(iter(by_name)) if len(by_name) == 1 else "")
        if not name:
            raise InputSpecError(f"--input-shape '{text}' names no input, and the model has {len(by_name)}",
                                 f"write NAME:DIMS with NAME one of: {', '.join(by_name)}")
        if name not in by_name:
            close = nearest(name, by_name)
            hint = f"did you mean '{close}'?" if close else f"its inputs are: {', '.join(by_name) or 'none'}"
            raise InputSpecError(f"--input-shape names '{name}', but the model has no input of that name", hint)
        model_spec = by_name[name]
        spec = dataclasses.replace(parse_input_shape(text, default_dtype=model_spec.dtype), name=name)
        _check_fits(spec, model_spec)
        explicit[name] = spec
    return [InputSpec(s.name, explicit.get(s.name, s).concrete_shape(sizes), s.dtype) for s in declared]


def _check_fits(spec: InputSpec, model_spec: InputSpec) -> None:
    shown = "(" + ", ".join(str(d) for d in model_spec.shape) + ")"
    if len(spec.shape) != len(model_spec.shape):
        raise InputSpecError(f"input '{spec.name}' has {len(model_spec.shape)} dimensions {shown} in the model, "
                             f"--input-shape gave {len(spec.shape)}")
    for got, want in zip(spec.shape, model_spec.shape):
        if isinstance(want, int) and got != want:
            raise InputSpecError(f"input '{spec.name}' is {shown} in the model; --input-shape can only set its "
                                 f"named (dynamic) dimensions, got {'x'.join(map(str, spec.shape))}")
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
