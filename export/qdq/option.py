"""One precision option of one layer (precision, weight and activation bits, granularity, symmetry) and its
stable label ('fp32', 'w8a8-pc-sa', 'w4-g32-a'): the vocabulary plans, exports and reports share."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

FLOAT_PRECISIONS = ("fp32", "fp16", "bf16")
INT_PRECISIONS = ("int8", "int4", "fp8")
GROUP_SIZES = (32, 128)  # int4 block sizes MatMulNBits runs well (powers of two >= 16)


@dataclass(frozen=True)
class QuantOption:
    """One point of the elastic space for one layer.

    `act_bits` 32/16 means activations stay float (weight-only int4, or a float precision). Granularity is the
    weights'; activations are always per-tensor (what every runtime here fuses).
    """

    precision: str  # fp32 | fp16 | bf16 | fp8 | int8 | int4
    weight_bits: int = 32
    act_bits: int = 32
    granularity: str = ""  # per-tensor | per-channel | per-group | "" for float
    group_size: int = 0
    weight_symmetric: bool = True
    act_symmetric: bool = False

    def __post_init__(self) -> None:
        if self.precision not in FLOAT_PRECISIONS + INT_PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}")
        if self.precision in ("int8", "int4") and self.granularity not in ("per-tensor", "per-channel", "per-group"):
            raise ValueError(f"{self.precision} needs a granularity, got {self.granularity!r}")
        if self.granularity == "per-group" and self.group_size < 16:
            raise ValueError("per-group quantization needs group_size >= 16")

    @property
    def label(self) -> str:
        """Short, stable name: 'fp32', 'bf16', 'w8a8-pc-sa' (sym weights, asym activations), 'w4-g32-a'."""
        if self.precision in FLOAT_PRECISIONS or self.precision == "fp8":
            return self.precision
        sym = lambda s: "s" if s else "a"  # noqa: E731
        gran = {"per-tensor": "pt", "per-channel": "pc", "per-group": f"g{self.group_size}"}[self.granularity]
        if self.act_bits >= 16:
            return f"w{self.weight_bits}-{gran}-{sym(self.weight_symmetric)}"
        return f"w{self.weight_bits}a{self.act_bits}-{gran}-{sym(self.weight_symmetric)}{sym(self.act_symmetric)}"

    @property
    def is_float(self) -> bool:
        return self.precision in FLOAT_PRECISIONS

    @property
    def quantizes_activations(self) -> bool:
        return self.act_bits <= 8

    @property
    def kernel_class(self) -> str:
        """Options that run the same kernel cost the same: the cost table is keyed by this, not the label."""
        if self.precision == "int4":
            return f"int4-g{self.group_size}"
        return self.precision

    def to_dict(self) -> dict[str, Any]:
        return {"precision": self.precision, "weight_bits": self.weight_bits, "act_bits": self.act_bits,
                "granularity": self.granularity, "group_size": self.group_size,
                "weight_symmetric": self.weight_symmetric, "act_symmetric": self.act_symmetric}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "QuantOption":
        return cls(**data)


FP32 = QuantOption("fp32")


def option_by_label(options: tuple[QuantOption, ...], label: str) -> QuantOption:
    for opt in options:
        if opt.label == label:
            return opt
    raise KeyError(f"no option {label!r}; have {', '.join(o.label for o in options)}")
