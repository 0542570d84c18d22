"""One executed runtime node as the latency tables and the latency model see it: what it is (op type, precision),
how much work it does (MACs, bytes moved), which torch module it came from, and its median time.

Work is computed from tensor shapes the runtime reports, so a fused node (Conv+BN+ReLU, MatMul+Add) is counted as
what it really runs.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

DTYPE_BYTES = {
    "float": 4, "float32": 4, "f32": 4, "double": 8, "float64": 8, "f64": 8, "float16": 2, "f16": 2,
    "bfloat16": 2, "bf16": 2, "int8": 1, "i8": 1, "uint8": 1, "u8": 1, "int16": 2, "uint16": 2, "i16": 2,
    "int32": 4, "i32": 4, "uint32": 4, "int64": 8, "i64": 8, "uint64": 8, "bool": 1, "boolean": 1,
    "int4": 0.5, "uint4": 0.5, "i4": 0.5, "u4": 0.5,
}
_CONV_TYPES = {"Conv", "FusedConv", "QLinearConv", "ConvInteger", "NhwcConv", "NhwcFusedConv", "ConvTranspose",
               "Convolution", "GroupConvolution", "ConvolutionBackpropData"}
_MATMUL_TYPES = {"MatMul", "Gemm", "FusedGemm", "FusedMatMul", "QGemm", "QLinearMatMul", "MatMulInteger",
                 "DynamicQuantizeMatMul", "MatMulNBits", "FullyConnected", "Attention", "MultiHeadAttention"}

THIN_CHANNELS = 4
Shape = tuple[str, tuple[int, ...]]  # (dtype, dims)


@dataclass(frozen=True)
class NodeRecord:
    """One node of the executed graph. `module` is the torch module path ("" the root), None when unmapped;
    `ms` is the median time per inference (0.0 for a structure-only record)."""

    name: str
    op_type: str
    module: str | None
    precision: str
    macs: int
    bytes: int
    ms: float = 0.0
    exec_type: str = ""
    mapped_by: str = ""  # name | tensor | initializer | anchor | neighbor | original-names
    variant: str = ""  # conv: 1x1 | kxk | dw | thin; matmul: 2d | batched (attention-style, both operands activations)
    channels: tuple[int, ...] = ()  # conv: (out, in per group); matmul: (N, K): what vector units pad

    def padded_macs(self, multiple: int) -> float:
        """MACs with channels rounded up to the device's multiple (kernels compute whole vector blocks); inputs
        narrower than half a block (an RGB stem, depthwise) are not padded."""
        if not self.channels or multiple <= 1 or not self.macs:
            return float(self.macs)
        factor = 1.0
        for size in self.channels:
            if size >= multiple / 2:
                factor *= math.ceil(size / multiple) * multiple / size
        return self.macs * factor

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "NodeRecord":
        return cls(**{**data, "channels": tuple(data.get("channels", ()))})


def op_class(op_type: str) -> str:
    """The family of a runtime op: 'Conv' for Conv/FusedConv/QLinearConv/Convolution, 'MatMul' for Gemm/MatMul/
    FullyConnected/QGemm/MatMulInteger..., else the op type itself. Anchors keep their family across fusions."""
    if op_type in _CONV_TYPES or ("Conv" in op_type and "Convert" not in op_type):
        return "Conv"
    if op_type in _MATMUL_TYPES or any(m in op_type for m in ("MatMul", "Gemm", "FullyConnected")):
        return "MatMul"
    return op_type


def numel(dims: Sequence[int]) -> int:
    return int(math.prod(int(d) for d in dims)) if dims else 1


def shape_bytes(shapes: Sequence[Shape]) -> int:
    return int(sum(numel(dims) * DTYPE_BYTES.get(dtype.lower(), 4) for dtype, dims in shapes))


def node_macs(op_type: str, inputs: Sequence[Shape], outputs: Sequence[Shape]) -> int:
    """Multiply-accumulates of a conv or matmul-like node from its shapes (0 for everything else)."""
    family = op_class(op_type)
    if not outputs or family not in ("Conv", "MatMul"):
        return 0
    out = numel(outputs[0][1])
    operands = _operands(op_type, inputs)
    if len(operands) < 2:
        return 0
    a, w = operands[0][1], operands[1][1]
    if family == "Conv":
        if len(w) < 3:
            return 0
        per_output = numel(w[2:]) if len(w) == len(a) + 1 else numel(w[1:])  # grouped weights: [G, O/G, I/G, k..]
        return int(out * per_output)
    if not a:
        return 0
    k = a[-1]
    if op_type in ("Gemm", "FusedGemm", "QGemm") and len(a) == 2 and out and len(outputs[0][1]) == 2:
        k = numel(a) // max(outputs[0][1][0], 1)  # transA: the reduced dim is whatever is not M
    return int(out * k)


def _operands(op_type: str, inputs: Sequence[Shape]) -> list[Shape]:
    """The data operands (activation, weight) of an op whose quantized form interleaves scales and zero points."""
    if op_type in ("QLinearConv", "QLinearMatMul", "QGemm"):
        return [inputs[i] for i in (0, 3) if i < len(inputs)]
    return list(inputs[:2])


def node_variant(op_type: str, inputs: Sequence[Shape]) -> str:
    """A finer kind for the two op families whose efficiency differs most by configuration."""
    family = op_class(op_type)
    operands = _operands(op_type, inputs)
    if family == "Conv" and len(operands) >= 2 and len(operands[1][1]) >= 3:
        a, w = operands[0][1], operands[1][1]
        grouped = len(w) == len(a) + 1
        per_group_in = w[2] if grouped else w[1]
        if per_group_in == 1 and len(a) > 2 and a[1] > 1 and a[-1] > 1:
            return "dw"
        if per_group_in <= THIN_CHANNELS:
            return "thin"  # a stem on RGB input: vector kernels cannot fill their lanes along channels
        kernel = w[3:] if grouped else w[2:]
        return "1x1" if numel(kernel) == 1 else "kxk"
    if family == "MatMul" and len(operands) >= 2:
        a, b = operands[0][1], operands[1][1]
        return "batched" if len(a) >= 3 and len(b) >= 3 and numel(b[:-2]) > 1 else "2d"
    return ""


def node_channels(op_type: str, inputs: Sequence[Shape], outputs: Sequence[Shape]) -> tuple[int, ...]:
    """(out channels, in channels per group) of a conv; (N, K) of a matmul; () otherwise."""
    family = op_class(op_type)
    operands = _operands(op_type, inputs)
    if len(operands) < 2 or not outputs or family not in ("Conv", "MatMul"):
        return ()
    a, w = operands[0][1], operands[1][1]
    if family == "Conv":
        if len(w) < 3:
            return ()
        grouped = len(w) == len(a) + 1
        return (int(w[0] * w[1]), int(w[2])) if grouped else (int(w[0]), int(w[1]))
    out = outputs[0][1]
    return (int(out[-1]), int(a[-1])) if out and a else ()


def precision_of(op_type: str, inputs: Sequence[Shape], exec_type: str = "") -> str:
    """fp32 / bf16 / fp16 / int8, from the exec type (OpenVINO says e.g. jit_avx512_I8) or the operand types."""
    tag = exec_type.lower().rsplit("_", 1)[-1] if exec_type else ""
    if tag in ("i8", "u8", "int8"):
        return "int8"
    if tag in ("bf16", "f16", "f32"):
        return {"bf16": "bf16", "f16": "fp16", "f32": "fp32"}[tag]
    if op_type.startswith(("QLinear", "QGemm")) or op_type.endswith("Integer") or op_type in (
            "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "DynamicQuantizeMatMul"):
        return "int8"
    if op_type == "MatMulNBits":
        return "int4"
    first = inputs[0][0].lower() if inputs else "float"
    if first in ("bfloat16", "bf16"):
        return "bf16"
    if first in ("uint8", "int8", "u8", "i8"):
        return "int8"
    return "fp16" if first in ("float16", "f16") else "fp32"
