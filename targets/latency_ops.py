"""Single-op units for the latency lookup table (nn-Meter style): a key naming one op at one shape and precision,
and the one-op torch module that is exported and timed for it.

Ops: `conv` is Conv2d+BatchNorm+ReLU, the unit runtimes fuse into one kernel (shape: cin, cout, h, w, k, stride,
groups); `linear` is nn.Linear on `tokens` rows (tokens, in, out); `matmul` is a batched activation x activation
product as in attention (batch, m, k, n).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from deploy.errors import UserInputError
from deploy.pipeline import InputSpec

SHAPES = {"conv": ("cin", "cout", "h", "w", "k", "stride", "groups"), "linear": ("tokens", "in", "out"),
          "matmul": ("batch", "m", "k", "n")}
PRECISIONS = ("fp32", "fp16", "bf16", "int8")
_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1}


@dataclass(frozen=True)
class OpKey:
    """One op at one shape and precision (the runtime and thread count are the table's)."""

    op: str
    shape: tuple[int, ...]
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if self.op not in SHAPES:
            raise UserInputError(f"unknown op '{self.op}' for the latency table", f"ops: {', '.join(SHAPES)}")
        names = SHAPES[self.op]
        shape = tuple(int(v) for v in self.shape)
        if len(shape) != len(names) or any(v < 1 for v in shape):
            raise UserInputError(f"op '{self.op}' takes a shape of positive ({', '.join(names)}), got {self.shape}")
        if self.precision not in PRECISIONS:
            raise UserInputError(f"latency table precision must be one of {', '.join(PRECISIONS)}")
        if self.op == "conv" and (shape[0] % shape[6] or shape[1] % shape[6]):
            raise UserInputError(f"conv groups ({shape[6]}) must divide cin ({shape[0]}) and cout ({shape[1]})")
        object.__setattr__(self, "shape", shape)

    @property
    def dims(self) -> dict[str, int]:
        return dict(zip(SHAPES[self.op], self.shape))

    @property
    def macs(self) -> int:
        d = self.dims
        if self.op == "conv":
            ho, wo = _out(d["h"], d["stride"]), _out(d["w"], d["stride"])
            return d["cout"] * ho * wo * (d["cin"] // d["groups"]) * d["k"] * d["k"]
        if self.op == "linear":
            return d["tokens"] * d["in"] * d["out"]
        return d["batch"] * d["m"] * d["k"] * d["n"]

    @property
    def group(self) -> str:
        """Keys interpolated together: same op, precision and kernel configuration."""
        if self.op != "conv":
            return f"{self.op}|{self.precision}"
        d = self.dims
        kind = "dw" if d["groups"] == d["cin"] and d["groups"] > 1 else ("g" if d["groups"] > 1 else "dense")
        return f"conv|k{d['k']}|s{d['stride']}|{kind}|{self.precision}"

    @property
    def text(self) -> str:
        return f"{self.op}:{'x'.join(map(str, self.shape))}:{self.precision}"

    @classmethod
    def from_text(cls, text: str) -> "OpKey":
        op, shape, precision = text.split(":")
        return cls(op, tuple(int(v) for v in shape.split("x")), precision)

    def with_dims(self, **changes: int) -> "OpKey":
        """The same op with some dimensions changed, e.g. a conv at 40% of its output channels."""
        dims = self.dims
        unknown = set(changes) - set(dims)
        if unknown:
            raise UserInputError(f"op '{self.op}' has no dimension '{sorted(unknown)[0]}'")
        dims.update(changes)
        return OpKey(self.op, tuple(dims[n] for n in SHAPES[self.op]), self.precision)

    def at(self, precision: str) -> "OpKey":
        return OpKey(self.op, self.shape, precision)


def _out(size: int, stride: int) -> int:
    return math.ceil(size / stride)


def conv_key(cin: int, cout: int, hw: int | tuple[int, int], k: int = 3, stride: int = 1, groups: int = 1,
             precision: str = "fp32") -> OpKey:
    h, w = (hw, hw) if isinstance(hw, int) else hw
    return OpKey("conv", (cin, cout, h, w, k, stride, groups), precision)


def linear_key(tokens: int, in_features: int, out_features: int, precision: str = "fp32") -> OpKey:
    return OpKey("linear", (tokens, in_features, out_features), precision)


def lowrank_keys(key: OpKey, rank: int) -> tuple[OpKey, OpKey]:
    """A linear factored at `rank`: in -> rank, then rank -> out."""
    if key.op != "linear":
        raise UserInputError("low rank pricing applies to linear ops")
    d = key.dims
    tokens, prec = d["tokens"], key.precision
    return linear_key(tokens, d["in"], rank, prec), linear_key(tokens, rank, d["out"], prec)


class _MatMul(nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.matmul(a, b)


def single_op(key: OpKey, seed: int = 0) -> tuple[nn.Module, list[InputSpec]]:
    """The one-op module timed for `key` (eval mode, fixed random weights and BatchNorm statistics, so the folded
    biases differ and int8 quantization forms the fused int8 kernel) and its input specs."""
    torch.manual_seed(seed)
    d = key.dims
    if key.op == "conv":
        pad = d["k"] // 2
        module = nn.Sequential(nn.Conv2d(d["cin"], d["cout"], d["k"], d["stride"], pad, groups=d["groups"], bias=False),
                               nn.BatchNorm2d(d["cout"]), nn.ReLU())
        with torch.no_grad():
            bn = module[1]
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.1, 0.1)
            bn.running_mean.uniform_(-0.1, 0.1)
            bn.running_var.uniform_(0.5, 1.5)
        return module.eval(), [InputSpec("x", (1, d["cin"], d["h"], d["w"]))]
    if key.op == "linear":
        shape = (1, d["in"]) if d["tokens"] == 1 else (1, d["tokens"], d["in"])
        return nn.Linear(d["in"], d["out"]).eval(), [InputSpec("x", shape)]
    specs = [InputSpec("a", (d["batch"], d["m"], d["k"])), InputSpec("b", (d["batch"], d["k"], d["n"]))]
    return _MatMul().eval(), specs


def probe_module() -> tuple[nn.Module, list[InputSpec]]:
    """The smallest model a runtime can run: its time is the per-inference cost outside any op."""
    return nn.ReLU().eval(), [InputSpec("x", (1, 8))]


def element_bytes(precision: str) -> int:
    return _BYTES[precision]
