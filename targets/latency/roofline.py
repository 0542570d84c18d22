"""The roofline bound of one node on a device profile: the slower of doing its MACs at peak throughput and moving
its bytes at full bandwidth, plus the profile's per-op overhead. MACs count channels padded to the block a vector
kernel computes at that precision (`pad_multiple`). CPU profiles give peak and bandwidth per core, so
they scale with the thread count; GPUs and edge SoCs give whole-device numbers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from deploy.profiles import Profile
from deploy.targets.latency.nodes import THIN_CHANNELS, NodeRecord

ELEMENT_BYTES = {"fp32": 4.0, "fp16": 2.0, "bf16": 2.0, "fp8": 1.0, "int8": 1.0, "int4": 0.5}
_PEAK_FALLBACK = {"int8": ("int8", "fp16", "fp32"), "int4": ("int4", "int8", "fp16", "fp32"),
                  "fp16": ("fp16", "bf16", "fp32"), "bf16": ("bf16", "fp16", "fp32"), "fp8": ("fp8", "int8", "fp16")}


@dataclass(frozen=True)
class Roof:
    compute_ms: float
    memory_ms: float
    overhead_ms: float

    @property
    def bound(self) -> str:
        return "compute" if self.compute_ms >= self.memory_ms else "memory"

    @property
    def ms(self) -> float:
        return max(self.compute_ms, self.memory_ms) + self.overhead_ms


def peak_tops(profile: Profile, precision: str) -> float:
    """The profile's peak at `precision`, else at the nearest precision it lists (int8 -> fp16 -> fp32)."""
    for name in _PEAK_FALLBACK.get(precision, (precision, "fp32")) + ("fp32",):
        if name in profile.peak_tops:
            return profile.peak_tops[name]
    return min(profile.peak_tops.values())


def scale_for(profile: Profile, threads: int) -> float:
    return float(max(threads, 1)) if profile.kind == "cpu" else 1.0


def pad_multiple(profile: Profile, precision: str) -> int:
    """Channels a kernel computes as one block: the profile's multiple is in fp32 lanes; narrower types pack 4 bytes
    per lane for dot products (int8 VNNI, bf16 pairs), so they pad to proportionally fewer channels."""
    return max(1, round(profile.channel_multiple * ELEMENT_BYTES.get(precision, 4.0) / 4.0))


def narrowness(node: NodeRecord, profile: Profile) -> tuple[float, float, float]:
    """(1 if the narrowest channel count is below one vector width, how far it is below 2 and below 8 widths in
    log units); zeros for wide ops.

    Padding aside, narrow ops run below peak (short inner loops, poor register blocking), some kernels falling
    to a slow path below one full vector, steeply below two widths and gently up to eight; the latency model fits
    how much per op kind."""
    wide = [c for c in node.channels if c > THIN_CHANNELS]
    if not wide:
        return 0.0, 0.0, 0.0
    narrowest, width = min(wide), float(max(profile.channel_multiple, 1))
    return (float(narrowest < width), max(0.0, math.log(2 * width / narrowest)),
            max(0.0, math.log(8 * width / narrowest)))


def roofline(node: NodeRecord, profile: Profile, threads: int, precision: str | None = None) -> Roof:
    """Bound of `node` on `profile`; `precision` prices it at another precision than it was recorded in (its bytes
    scale by the element size)."""
    prec = precision or node.precision
    scale = scale_for(profile, threads)
    size_ratio = ELEMENT_BYTES.get(prec, 4.0) / ELEMENT_BYTES.get(node.precision, 4.0)
    macs = node.padded_macs(pad_multiple(profile, prec))
    compute_s = 2.0 * macs / (peak_tops(profile, prec) * 1e12 * scale)
    memory_s = node.bytes * size_ratio / (profile.memory_bandwidth_gbs * 1e9 * scale)
    return Roof(compute_s * 1e3, memory_s * 1e3, profile.op_overhead_us / 1e3)
