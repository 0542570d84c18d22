"""Fidelity floors and size budgets: the same knobs as a latency budget (precision per layer, the pruning level),
bisected on validation fidelity (a floor: the fastest candidate that keeps it) or on the exported file's size (the
most faithful candidate that fits)."""
from __future__ import annotations

from typing import Any, Callable

from deploy.compiler.candidate import Candidate, decisions_for, faithfulness
from deploy.compiler.candidates import Planner
from deploy.core.errors import BudgetInfeasibleError

BISECT_STEPS = 6  # bisection steps on the pruning level
PRECISION_BISECT_STEPS = 5  # bisection steps on the precision allocator's estimated latency


# --- fidelity floors ----------------------------------------------------------------------------------------------

def _bisect(evaluate: Callable[[float], Candidate], ok: Callable[[Candidate], bool], low: float, high: float,
            prefer_low: bool, steps: int = BISECT_STEPS) -> Candidate | None:
    """Bisect a knob in [low, high]. prefer_low: the smallest value that is ok; else the largest."""
    best = None
    for _ in range(steps):
        mid = (low + high) / 2
        cand = evaluate(mid)
        if ok(cand) == prefer_low:
            if ok(cand):
                best = cand
            high = mid
        else:
            if ok(cand):
                best = cand
            low = mid
    return best


def meet_floor(planner: Planner, metric: str, minimum: float, dense: Candidate) -> Candidate:
    """The fastest candidate whose held-out fidelity (exported model, in its runtime) stays above the floor."""
    from deploy.compress.quant.search import allocator_plan

    ok = lambda c: c.fidelity is not None and c.fidelity >= minimum  # noqa: E731
    planner.with_fidelity(dense)
    feasible = [dense] if ok(dense) and "fp32" in planner.request.precisions else []
    labels = None
    if planner.quantizes:
        fast = planner.with_fidelity(planner.fastest_candidate())
        if ok(fast):
            feasible.append(fast)
            labels = fast.labels
        else:  # the least estimated latency whose precision plan keeps the floor
            sp = planner.quant(0.0).space
            lo, hi = sp.latency(fast.labels), sp.latency(sp.float_labels())

            def at(estimate: float) -> Candidate:
                plan = allocator_plan(sp, estimate)[0]
                return planner.evaluate(0.0, plan, f"precision allocator at {estimate:.4g} ms", fidelity=True)

            found = _bisect(at, ok, lo, hi, prefer_low=True, steps=PRECISION_BISECT_STEPS)
            feasible += [found] if found else []
    if planner.can_prune and (labels is not None or "fp32" in planner.request.precisions):
        found = _bisect(lambda lv: planner.evaluate(lv, labels, "pruning level for the floor", fidelity=True),
                        ok, 0.0, 1.0, prefer_low=False)
        feasible += [found] if found else []
    if not feasible:
        raise BudgetInfeasibleError(f"no candidate keeps {metric} >= {minimum:.4g}", "lower the floor (--max-drop)")
    return min(feasible, key=lambda c: (c.latency_ms, -(c.fidelity or 0.0)))


def dense_if_slower(planner: Planner, decisions: dict[str, Any], timing: dict[str, Any]) -> dict[str, Any] | None:
    """A floor's answer is the fastest candidate that keeps it, picked on short timings; where the final
    interleaved comparison shows it slower than the original (the whole 95% interval of the ratio above 1), the
    original is both faster and faithful: the decisions for the dense model, or None to keep the answer."""
    budget, comparison, dense = decisions["budget"], timing.get("comparison") or {}, planner.dense
    if budget.get("floor") is None or budget.get("target_ms") is not None or timing.get("source") != "measured":
        return None
    if not comparison.get("ci_low") or comparison["ci_low"] <= 1.0 or dense.chosen:
        return None
    if "fp32" not in planner.request.precisions or (dense.fidelity or 0.0) < budget["floor"][1]:
        return None
    chosen = next((c for c in planner.candidates if c.chosen), None)
    fell = {"instead_of": chosen.origin if chosen else None, "ratio": comparison["ratio"],
            "ratio_ci": [comparison["ci_low"], comparison["ci_high"]]}
    return {**decisions_for(planner, dense, budget), "fell_back_to_dense": fell}


# --- size budgets ---------------------------------------------------------------------------------------------------

def meet_size(planner: Planner, size_mb: float, dense: Candidate) -> Candidate:
    """The most faithful candidate whose exported file fits: float or the smallest precisions, pruned as little as
    fits."""
    fits = lambda c: c.size_mb <= size_mb  # noqa: E731
    families: list[tuple[dict[str, str] | None, Candidate]] = []
    if "fp32" in planner.request.precisions:
        families.append((None, dense))
    if planner.quantizes:
        small = planner.evaluate(0.0, planner.smallest(), "dense, fewest bits per layer")
        families.append((small.labels, small))
    feasible, smallest = [], min(c.size_mb for _, c in families)
    for labels, start in families:
        if fits(start):
            feasible.append(start)
            continue
        if planner.can_prune:
            end = planner.evaluate(1.0, labels, "most pruning")
            smallest = min(smallest, end.size_mb)
            if fits(end):
                found = _bisect(lambda lv: planner.evaluate(lv, labels, "pruning level for the size"), fits,
                                0.0, 1.0, prefer_low=True)
                feasible.append(found or end)
    if not feasible:
        raise BudgetInfeasibleError(f"the size budget {size_mb:g} MB is below the smallest achievable "
                                    f"{smallest:.3g} MB", f"raise --size-mb to at least {smallest:.3g}",
                                    least_achievable=smallest)
    for cand in feasible:
        planner.with_fidelity(cand)
    return max(feasible, key=lambda c: (*faithfulness(c), -c.size_mb))
