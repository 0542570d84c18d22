"""The elastic quantization space (EQ-Net): per layer, bit-width x granularity x symmetry, restricted to what the
target runtime actually runs fast.

"What is legal" lives here and only here; "what to choose" is the search's job. Each runtime's Q/DQ policy names
the forms it fuses into low-precision kernels (section 4 of DESIGN.md); a form outside that list would run as float
plus conversion overhead, so it is not offered at all. So asymmetric int8 WEIGHTS, which the simulation and the
exporter handle, are offered by no shipped policy (ONNX Runtime's U8S8, OpenVINO and TensorRT all want symmetric
int8 weights); activations are asymmetric uint8 (ONNX Runtime, OpenVINO) or symmetric int8 (TensorRT); int4 is
weight-only, per group, symmetric or not.
"""
from __future__ import annotations

from dataclasses import dataclass

from deploy.export.qdq.option import FLOAT_PRECISIONS, GROUP_SIZES, INT_PRECISIONS, QuantOption, option_by_label
from deploy.profiles import Profile
from deploy.targets.target import float_precision

__all__ = ["FLOAT_PRECISIONS", "GROUP_SIZES", "INT_PRECISIONS", "LayerShape", "QuantOption", "SpaceConfig",
           "layer_space", "option_by_label"]




@dataclass(frozen=True)
class LayerShape:
    """What the space needs to know about one layer."""

    name: str
    kind: str  # conv | linear
    in_features: int  # Linear in_features; Conv in_channels / groups * kh * kw (the reduction length)
    out_features: int


@dataclass(frozen=True)
class SpaceConfig:
    """The user's restriction of the elastic space (the runtime's restriction is applied on top)."""

    weight_bits: tuple[int, ...] = (4, 8)
    granularities: tuple[str, ...] = ("per-tensor", "per-channel", "per-group")
    float_precisions: tuple[str, ...] = ("fp32", "fp16", "bf16")
    group_sizes: tuple[int, ...] = GROUP_SIZES
    int4_symmetric: tuple[bool, ...] = (True, False)

    def __post_init__(self) -> None:
        if not self.weight_bits or any(b not in (4, 8) for b in self.weight_bits):
            raise ValueError(f"weight_bits must be drawn from (4, 8), got {self.weight_bits}")
        bad = [g for g in self.granularities if g not in ("per-tensor", "per-channel", "per-group")]
        if bad or not self.granularities:
            raise ValueError(f"granularities must be drawn from per-tensor, per-channel, per-group, got {bad}")
        if any(p not in FLOAT_PRECISIONS for p in self.float_precisions) or "fp32" not in self.float_precisions:
            raise ValueError(f"float_precisions must include fp32 and be drawn from {FLOAT_PRECISIONS}")
        if any(g < 16 or g & (g - 1) for g in self.group_sizes):
            raise ValueError(f"group sizes must be powers of two >= 16, got {self.group_sizes}")
        if not self.int4_symmetric:
            raise ValueError("int4_symmetric needs at least one of true/false")


def layer_space(layer: LayerShape, profile: Profile, config: SpaceConfig = SpaceConfig(),
                cpu_flags: set[str] | None = None) -> tuple[QuantOption, ...]:
    """Every option the target runs fast for this layer; the float option it runs in comes first."""
    policy = profile.qdq_policy
    precisions = set(profile.precisions)
    grans = set(config.granularities) & set(profile.weight_granularities)
    options = [QuantOption(float_precision(profile, cpu_flags))]
    if policy == "tensorrt":
        floats = [p for p in ("fp16", "bf16") if p in precisions and p in config.float_precisions]
        options += [QuantOption(p, 16, 16) for p in floats]
    if 8 in config.weight_bits and "int8" in precisions:
        act_sym = policy == "tensorrt"  # TensorRT: symmetric int8 everywhere; ORT CPU/OpenVINO: u8 activations
        for gran in ("per-channel",) if policy == "tensorrt" else ("per-channel", "per-tensor"):
            if gran in grans:  # TensorRT wants per-channel weights on axis 0
                options.append(QuantOption("int8", profile.int8_weight_bits, 8, gran, 0, True, act_sym))
    if policy == "tensorrt" and "fp8" in precisions:
        options.append(QuantOption("fp8", 8, 8, "per-tensor", 0, True, True))
    if 4 in config.weight_bits and "int4" in precisions and layer.kind == "linear" and "per-group" in grans \
            and policy in ("ort-cpu", "tensorrt"):
        for size in config.group_sizes:
            if size <= layer.in_features:
                for sym in config.int4_symmetric:
                    options.append(QuantOption("int4", 4, 32, "per-group", size, sym, False))
    return tuple(_unique(options))


def _unique(options: list[QuantOption]) -> list[QuantOption]:
    seen, out = set(), []
    for opt in options:
        if opt.label not in seen:
            seen.add(opt.label)
            out.append(opt)
    return out


