"""The quantization plan as data: per layer, the chosen option and the calibrated activation parameters.

A plan is everything export needs besides the weights (weight scales are recomputed from the final weights, so a
plan stays valid after recovery training), and where GPTQ rounded them, the rounded weights (compress.quant.gptq;
not in the JSON: a replay calibrates again and rounds the same). It round-trips through JSON so a run can be
replayed from `deploy.toml`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from deploy.export.qdq.option import QuantOption

PLAN_SCHEMA = "deploy.quant_plan"
PLAN_VERSION = 1


@dataclass(frozen=True)
class ActParams:
    """Per-tensor affine activation quantization: q = clamp(round(x / scale) + zero_point, qmin, qmax)."""

    scale: float
    zero_point: int
    signed: bool  # int8 (signed) or uint8
    method: str = "minmax"  # how the range was calibrated: minmax | percentile | mse | fp8
    bits: int = 8

    def __post_init__(self) -> None:
        if not (self.scale > 0 and math.isfinite(self.scale)):
            raise ValueError(f"activation scale must be positive and finite, got {self.scale}")
        if not self.qmin <= self.zero_point <= self.qmax:
            raise ValueError(f"zero point {self.zero_point} outside [{self.qmin}, {self.qmax}]")

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1 if self.signed else (1 << self.bits) - 1

    @property
    def symmetric(self) -> bool:
        return self.signed and self.zero_point == 0

    def to_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "zero_point": self.zero_point, "signed": self.signed, "method": self.method,
                "bits": self.bits}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ActParams":
        return cls(float(data["scale"]), int(data["zero_point"]), bool(data["signed"]), str(data.get("method", "")),
                   int(data.get("bits", 8)))


def act_params_from_range(lo: float, hi: float, symmetric: bool, method: str = "minmax") -> ActParams:
    """uint8 asymmetric (the range widened to include 0, so zero is exact) or int8 symmetric (zero point 0)."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if symmetric:
        bound = max(abs(lo), abs(hi), 1e-8)
        return ActParams(bound / 127.0, 0, True, method)
    span = max(hi - lo, 1e-8)
    scale = span / 255.0
    zero_point = int(min(255, max(0, round(-lo / scale))))
    return ActParams(scale, zero_point, False, method)


@dataclass(frozen=True)
class LayerPlan:
    """One layer: its option; the params of its input tensor and (policy permitting) its output tensor."""

    name: str
    kind: str  # conv | linear
    option: QuantOption
    act_in: ActParams | None = None
    act_out: ActParams | None = None
    smooth: tuple[float, ...] = ()  # SmoothQuant factors s (input / s, weight * s), per input channel
    relu_after: bool = False  # the output Q sits after a ReLU (its range starts at 0)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "option": self.option.to_dict(), "label": self.option.label,
                "act_in": self.act_in.to_dict() if self.act_in else None,
                "act_out": self.act_out.to_dict() if self.act_out else None,
                "smooth": list(self.smooth), "relu_after": self.relu_after}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LayerPlan":
        return cls(data["name"], data["kind"], QuantOption.from_dict(data["option"]),
                   ActParams.from_dict(data["act_in"]) if data.get("act_in") else None,
                   ActParams.from_dict(data["act_out"]) if data.get("act_out") else None,
                   tuple(float(s) for s in data.get("smooth", ())), bool(data.get("relu_after", False)))


@dataclass
class QuantPlan:
    """The whole model: the Q/DQ policy it was calibrated for and one LayerPlan per quantizable layer."""

    policy: str  # ort-cpu | openvino | tensorrt
    layers: dict[str, LayerPlan]
    float_precision: str = "fp32"  # what float layers run in (bf16 on OpenVINO with AVX-512 BF16)
    notes: list[str] = field(default_factory=list)
    # bias correction: per layer and option label, the per-output-channel shift subtracted from the bias
    shifts: dict[str, dict[str, tuple[float, ...]]] = field(default_factory=dict)
    # GPTQ: per layer and option label, the float weight (on that option's integer grid) that replaces the layer's
    rounded: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    # params of tensors that are no layer's input or output but are quantized with the layer they feed (the policy's
    # `pool_inputs`: a global pool's input): tensor -> params
    tensors: dict[str, ActParams] = field(default_factory=dict)

    def labels(self) -> dict[str, str]:
        return {name: lp.option.label for name, lp in self.layers.items()}

    def with_options(self, options: dict[str, QuantOption]) -> "QuantPlan":
        """The same calibration with other per-layer options (the search's candidates)."""
        layers = {n: replace(lp, option=options.get(n, lp.option)) for n, lp in self.layers.items()}
        return QuantPlan(self.policy, layers, self.float_precision, list(self.notes), self.shifts, self.rounded,
                         self.tensors)

    def rounded_weight(self, name: str) -> torch.Tensor | None:
        """GPTQ's weight of `name` at its current option (None: rounded to nearest)."""
        return self.rounded.get(name, {}).get(self.layers[name].option.label)

    def bias_shift(self, name: str) -> tuple[float, ...]:
        """The bias correction of `name` at its current option (empty: none)."""
        return self.shifts.get(name, {}).get(self.layers[name].option.label, ())

    def count(self, precision: str) -> int:
        return sum(lp.option.precision == precision for lp in self.layers.values())

    def to_dict(self) -> dict[str, Any]:
        shifts = {n: list(self.bias_shift(n)) for n in self.layers if self.bias_shift(n)}
        return {"schema": PLAN_SCHEMA, "version": PLAN_VERSION, "policy": self.policy,
                "float_precision": self.float_precision, "notes": list(self.notes),
                "layers": [lp.to_dict() for lp in self.layers.values()], "bias_shift": shifts,
                "tensors": {t: p.to_dict() for t, p in self.tensors.items()}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "QuantPlan":
        if data.get("schema") != PLAN_SCHEMA or data.get("version") != PLAN_VERSION:
            raise ValueError(f"not a {PLAN_SCHEMA} v{PLAN_VERSION} document")
        layers = {lp.name: lp for lp in (LayerPlan.from_dict(d) for d in data["layers"])}
        shifts = {n: {layers[n].option.label: tuple(float(v) for v in values)}
                  for n, values in data.get("bias_shift", {}).items()}
        tensors = {t: ActParams.from_dict(p) for t, p in data.get("tensors", {}).items()}
        return cls(data["policy"], layers, data.get("float_precision", "fp32"), list(data.get("notes", [])), shifts,
                   tensors=tensors)


def round_weights(folded: nn.Module, plan: QuantPlan) -> list[str]:
    """Put GPTQ's weight of each layer at its current option into the float model, in place (export then rounds
    it to the same integers). A layer whose shape differs (a pruned sibling exported with the dense model's plan)
    keeps its own weight, rounded to nearest; returns their names."""
    skipped = []
    for name in plan.layers:
        weight = plan.rounded_weight(name)
        if weight is None:
            continue
        layer = folded.get_submodule(name)
        if tuple(layer.weight.shape) != tuple(weight.shape):
            skipped.append(name)
            continue
        with torch.no_grad():
            layer.weight.copy_(weight)
    return skipped


def shift_biases(folded: nn.Module, plan: QuantPlan) -> list[str]:
    """Subtract each layer's correction at its current option from the float model's bias, in place (what export
    writes). A layer whose width differs from its correction's (a pruned sibling exported with the dense model's
    plan) is left alone; returns their names."""
    skipped = []
    for name in plan.layers:
        shift = plan.bias_shift(name)
        if not shift:
            continue
        layer = folded.get_submodule(name)
        width = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
        if width != len(shift):
            skipped.append(name)
            continue
        delta = torch.tensor(shift, dtype=layer.weight.dtype)
        with torch.no_grad():
            if layer.bias is None:
                layer.bias = nn.Parameter(-delta)
            else:
                layer.bias.sub_(delta)
    return skipped
