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
from typing import Any

FLOAT_PRECISIONS = ("fp32", "fp16", "bf16")
INT_PRECISIONS = ("int8", "int4", "fp8")
GROUP_SIZES = (32, 128)  # int4 block sizes MatMulNBits runs well (powers of two >= 16)
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


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


def runtime_float(profile: Any, cpu_flags: set[str] | None = None) -> str:
    """The precision float layers run in: OpenVINO picks bf16 on CPUs that have it (an explicit choice, labelled)."""
    if profile.qdq_policy == "openvino" and "bf16" in profile.precisions and _has_bf16(cpu_flags):
        return "bf16"
    return "fp32"


def _has_bf16(cpu_flags: set[str] | None) -> bool:
    if cpu_flags is None:
        from deploy.profiles.schema import local_cpu_flags

        cpu_flags = local_cpu_flags()
    return any(f in cpu_flags for f in BF16_FLAGS)


def layer_space(layer: LayerShape, profile: Any, config: SpaceConfig = SpaceConfig(),
                cpu_flags: set[str] | None = None) -> tuple[QuantOption, ...]:
    """Every option the target runs fast for this layer; the float option it runs in comes first."""
    policy = profile.qdq_policy
    precisions = set(profile.precisions)
    grans = set(config.granularities) & set(profile.weight_granularities)
    options = [QuantOption(runtime_float(profile, cpu_flags))]
    if policy == "tensorrt":
        floats = [p for p in ("fp16", "bf16") if p in precisions and p in config.float_precisions]
        options += [QuantOption(p, 16, 16) for p in floats]
    if 8 in config.weight_bits and "int8" in precisions:
        act_sym = policy == "tensorrt"  # TensorRT: symmetric int8 everywhere; ORT CPU/OpenVINO: u8 activations
        for gran in ("per-channel",) if policy == "tensorrt" else ("per-channel", "per-tensor"):
            if gran in grans:  # TensorRT wants per-channel weights on axis 0
                options.append(QuantOption("int8", 8, 8, gran, 0, True, act_sym))
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


def option_by_label(options: tuple[QuantOption, ...], label: str) -> QuantOption:
    for opt in options:
        if opt.label == label:
            return opt
    raise KeyError(f"no option {label!r}; have {', '.join(o.label for o in options)}")
