"""The second level of a plan: precisions re-planned on one (pruned) model to spend the latency its budget leaves,
the allocator's estimate steered onto measured latency in a closed loop."""
from __future__ import annotations

from typing import Any

from deploy.compiler.candidate import Candidate
from deploy.core.errors import BudgetInfeasibleError

PRECISION_STEPS = 4  # closed-loop steps of the precision allocator's budget


def estimate_for(target: float, points: list[tuple[float, float]]) -> float:
    """The allocator's estimate that should measure `target`: linear through the two measured points nearest to
    it (estimate -> measured), or proportional with one point."""
    pts = sorted(set(points), key=lambda p: abs(p[1] - target))
    if len(pts) == 1 or abs(pts[0][1] - pts[1][1]) < 1e-9:
        est, measured = pts[0]
        return est * target / measured
    (e1, m1), (e2, m2) = pts[0], pts[1]
    return e1 + (target - m1) * (e2 - e1) / (m2 - m1)


def fill_precision(planner: Any, level: float, window: tuple[float, float], points: list[tuple[float, float]],
                   fits: Candidate) -> Candidate:
    """Spend the latency left on precision: the allocator's least-distortion plan for an estimate steered onto
    the measured latency. `fits` (all fastest) is the fallback; the least-distortion plan that fits is returned."""
    from deploy.compress.quant.search import allocator_plan

    sp = planner.quant(level).space
    target = window[1]
    best, seen = fits, {tuple(sorted((fits.labels or {}).items()))}
    for _ in range(PRECISION_STEPS):
        estimate = estimate_for(sum(window) / 2, points)
        try:
            labels = allocator_plan(sp, estimate)[0]
        except BudgetInfeasibleError:
            break
        key = tuple(sorted(labels.items()))
        if key in seen:
            break
        seen.add(key)
        cand = planner.evaluate(level, labels, f"precision allocator at {estimate:.4g} ms (estimated)")
        points.append((sp.latency(labels), cand.latency_ms))
        if cand.latency_ms <= target and (best.latency_ms > target or
                                          distortion(sp, labels) < distortion(sp, best.labels or {})):
            best = cand
        if window[0] <= cand.latency_ms <= target:
            break
    return best


def distortion(sp: Any, labels: dict[str, str]) -> float:
    """The allocator's additive distortion of `labels` on `sp` (labels from a sibling model map by name)."""
    from deploy.compress.families import options_of

    return sum(sp.sensitivity[n].get(o.label, 0.0) for n, o in options_of(sp.spaces, labels).items())
