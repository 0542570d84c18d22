"""The TensorRT 10 `trtexec` command that builds an exported model's engine on the device, for a target whose GPU is
not at hand: `deploy compress` prints it beside model.onnx, and benchmarks/gpu_check.sh builds with the same flags.

- shapes: every input with a symbolic dimension gets --minShapes (each symbolic dim 1), --optShapes (the shape the
  latency was planned at) and --maxShapes (the larger of that and `max_sizes`); static inputs need none;
- precision: a Q/DQ model is built --stronglyTyped (TensorRT takes each tensor's type from the graph, so the plan's
  int8 and float layers run as planned); a float model gets --fp16 / --bf16 where the plan runs layers in them.
"""
from __future__ import annotations

import shlex
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from deploy.core.spec import InputSpec

PRECISION_FLAGS = {"fp16": "--fp16", "bf16": "--bf16"}


def _dims(shape: Iterable[int]) -> str:
    return "x".join(str(int(d)) for d in shape)


def shape_flags(inputs: Sequence[InputSpec], sizes: Mapping[str, int] | None = None,
                max_sizes: Mapping[str, int] | None = None) -> list[str]:
    """--minShapes/--optShapes/--maxShapes over the inputs that have a symbolic dimension (none if all static)."""
    dynamic = [s for s in inputs if any(not isinstance(d, int) for d in s.shape)]
    if not dynamic:
        return []
    opt_sizes = {"batch": 1, **(sizes or {})}
    lows, opts, highs = [], [], []
    for spec in dynamic:
        opt = spec.concrete_shape(opt_sizes)
        low = tuple(d if isinstance(d, int) else 1 for d in spec.shape)
        high = tuple(d if isinstance(d, int) else max(o, int((max_sizes or {}).get(d, o)))
                     for d, o in zip(spec.shape, opt))
        lows.append(f"{spec.name}:{_dims(low)}")
        opts.append(f"{spec.name}:{_dims(opt)}")
        highs.append(f"{spec.name}:{_dims(high)}")
    return [f"--minShapes={','.join(lows)}", f"--optShapes={','.join(opts)}", f"--maxShapes={','.join(highs)}"]


def precision_flags(has_qdq: bool, precisions: Iterable[str]) -> list[str]:
    """--stronglyTyped for a Q/DQ model (its types are the plan); else the reduced float precisions it uses."""
    if has_qdq:
        return ["--stronglyTyped"]
    return [PRECISION_FLAGS[p] for p in sorted(set(precisions)) if p in PRECISION_FLAGS]


def has_qdq(onnx_path: str | Path) -> bool:
    """Does the file hold QuantizeLinear/DequantizeLinear nodes (an explicitly quantized model)?"""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)


def trtexec_command(onnx_path: str | Path, inputs: Sequence[InputSpec], precisions: Iterable[str] = (),
                    engine_path: str | Path | None = None, sizes: Mapping[str, int] | None = None,
                    max_sizes: Mapping[str, int] | None = None, qdq: bool | None = None) -> list[str]:
    """The argument list (argv) of trtexec building `onnx_path`'s engine into `engine_path` (default: model.plan
    beside it). `precisions`: the plan's layer precisions (fp32, fp16, bf16, int8 ...); `qdq`: None reads the file."""
    onnx_path = Path(onnx_path)
    engine = Path(engine_path) if engine_path is not None else onnx_path.with_suffix(".plan")
    explicit = has_qdq(onnx_path) if qdq is None else qdq
    return ["trtexec", f"--onnx={onnx_path.name if engine.parent == onnx_path.parent else onnx_path}",
            f"--saveEngine={engine.name if engine.parent == onnx_path.parent else engine}",
            *shape_flags(inputs, sizes, max_sizes), *precision_flags(explicit, precisions)]


def as_shell(argv: Sequence[str]) -> str:
    return " ".join(shlex.quote(a) for a in argv)


def hand_off(onnx_path: str | Path, inputs: Sequence[InputSpec], precisions: Iterable[str], target: str,
             sizes: Mapping[str, int] | None = None) -> list[str]:
    """What a person does on the device: copy the model, build the engine, measure it from here."""
    onnx_path = Path(onnx_path)
    command = as_shell(trtexec_command(onnx_path, inputs, precisions, sizes=sizes))
    shapes = " ".join(f"--input-shape {s.name}:{_dims(s.concrete_shape({'batch': 1, **(sizes or {})}))}"
                      for s in inputs)
    return [f"on the device, in the folder holding {onnx_path.name}: {command}",
            f"to measure it from here: deploy bench {onnx_path} --target {target} {shapes} "
            f"--runner ssh://USER@DEVICE".replace("  ", " ")]
