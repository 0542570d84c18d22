"""The roofline of a device nobody here can measure, fitted on latencies others published for it.

Every published batch-1 latency is priced by the roofline `predict_nodes` uses without a calibration: the sum over
executed nodes of max(compute, memory) at peak, divided by an efficiency, plus the per-op overhead. One efficiency per
device is fitted so that the median log error over its points is zero (a median, because a few publications measure
differently from the rest). Its band comes from leave-one-model-out: each model's points (every precision and source
of it) are predicted by a fit made without them, and the band is the 90% quantile of |ln(predicted / published)|.
A device with fewer than MIN_POINTS points or MIN_FAMILIES architecture families gets no fit: a handful of numbers
from one family says nothing about the next model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

from deploy.profiles import Profile
from deploy.profiles.schema import PublishedFit
from deploy.targets.latency.nodes import NodeRecord

MIN_POINTS = 6
MIN_FAMILIES = 3
BAND_QUANTILE = 0.9
EFFICIENCY_RANGE = (0.01, 1.0)  # a share of peak: never above it


@dataclass(frozen=True)
class PricedPoint:
    """One published latency and the roofline terms of its model at its precision on the device."""

    model: str
    family: str
    bound_ms: float  # sum of max(compute, memory) at 100% of peak
    overhead_ms: float  # sum of the per-op overheads
    published_ms: float

    def predict(self, efficiency: float) -> float:
        return self.bound_ms / efficiency + self.overhead_ms

    def log_error(self, efficiency: float) -> float:
        return math.log(self.predict(efficiency) / self.published_ms)


def roofline_terms(nodes: Sequence[NodeRecord], profile: Profile, threads: int,
                   precision_map: str | Mapping[str, str] | None = None) -> tuple[float, float]:
    """(sum of max(compute, memory) ms at peak, sum of overhead ms): the two terms predict_nodes combines."""
    from deploy.targets.latency.graph import precision_for
    from deploy.targets.latency.roofline import roofline

    bound = overhead = 0.0
    for node in nodes:
        prec = precision_for(node.module, precision_map, node.precision) if precision_map is not None else None
        roof = roofline(node, profile, threads, prec)
        bound += max(roof.compute_ms, roof.memory_ms)
        overhead += roof.overhead_ms
    return bound, overhead


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])


def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default), so small samples do not jump to their maximum."""
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (pos - low) * (ordered[high] - ordered[low])


def fit_efficiency(points: Sequence[PricedPoint]) -> float:
    """The efficiency at which the median log error is zero (bisection: every prediction falls as it rises),
    clamped to EFFICIENCY_RANGE."""
    low, high = (math.log(e) for e in EFFICIENCY_RANGE)

    def bias(log_eff: float) -> float:
        return median([p.log_error(math.exp(log_eff)) for p in points])

    if bias(high) >= 0:
        return EFFICIENCY_RANGE[1]
    if bias(low) <= 0:
        return EFFICIENCY_RANGE[0]
    for _ in range(60):
        mid = 0.5 * (low + high)
        if bias(mid) > 0:
            low = mid
        else:
            high = mid
    return math.exp(0.5 * (low + high))


def leave_one_model_out(points: Sequence[PricedPoint]) -> list[float]:
    """Each point's log error under the fit made without every point of its model (same order as `points`);
    NaN when no other model is left to fit on."""
    errors = []
    for point in points:
        rest = [p for p in points if p.model != point.model]
        errors.append(point.log_error(fit_efficiency(rest)) if rest else math.nan)
    return errors


def families(points: Sequence[PricedPoint]) -> int:
    return len({p.family for p in points})


def qualifies(points: Sequence[PricedPoint]) -> bool:
    return len(points) >= MIN_POINTS and families(points) >= MIN_FAMILIES


def fit_published(points: Sequence[PricedPoint], source: str = "") -> PublishedFit | None:
    """The fit a profile stores, or None when the points do not pass the rule."""
    if not qualifies(points):
        return None
    errors = [abs(e) for e in leave_one_model_out(points) if not math.isnan(e)]
    return PublishedFit(efficiency=round(fit_efficiency(points), 4), band=round(quantile(errors, BAND_QUANTILE), 4),
                        points=len(points), architectures=families(points), source=source)


def fit_label(fit: PublishedFit) -> str:
    """What a prediction from a published fit says about itself (console and report)."""
    return (f"fitted on {fit.points} published latencies ({fit.architectures} architectures), roofline at "
            f"{fit.efficiency:.0%} of peak; band x/÷ {math.exp(fit.band):.2f}: 90% of leave-one-model-out errors")
