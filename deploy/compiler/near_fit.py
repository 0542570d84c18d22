"""A precision-only plan measured within a few percent either side of the budget, outside the search's noise
margin, is timed again, as the final measurement will time it, before the search gives it up for pruning.

While searching, a candidate fits at <= SAFE x budget (plan.py): the final measurement repeats it with noise, and
the margin keeps that from turning a fit into a miss. Pruning levels are continuous, so their search lands inside
the margin; the dense model at its fastest precisions is one point, and throwing it away for sitting between SAFE
and 1 x budget costs the most faithful answer there is. all-MiniLM-L6-v2 asked for NNCF int8's latency (OpenVINO,
2 threads): its pure int8 plan measured 0.976x the budget at cosine 0.9985, and the search dropped a block instead
(0.919, 0.947 after recovery). Timed again as the final measurement is made (`final_measure_config`, interleaved
with the dense model, more blocks while its interval straddles the budget), it is kept where the p50 of that
measurement is within the budget. At another tool's latency the two int8 models tie, and the last percent is
noise, not a structure to cut: the same plan measured 0.999x (interval to 1.009x) in one run and 1.010x in the
next, and each time the search dropped a block (cosine 0.954 against 0.998). So a first measurement within
NEAR_MISS over the budget is timed again too, and the longer measurement decides. Its interval may still reach
past the budget: the verdict then says "uncertain" (exit 3), and `edge_line` names the budget at which the search
prunes for a certain fit instead.

Where the precision-only plan timed again is over the budget, pruning is needed, but only a percent or two of it:
the level search (aimed at its window's middle) cuts more than that, so the least pruning whose second measurement
fits is searched for too (`least_pruning_at_edge`) and competes with the other structures.
"""
from __future__ import annotations

import math
from typing import Any

from deploy.compiler.candidate import Candidate

NEAR_MISS = 1.05  # a precision-only plan measured within this share over the budget is timed again; given up
# there, it is named beside the answer
EDGE_STEPS = 3  # level steps of the search for the least pruning at the budget's edge


def fits_when_remeasured(planner: Any, candidate: Candidate, budget: float) -> bool:
    """Whether `candidate` (measured within NEAR_MISS x `budget` on the planner's scale) fits by the p50 of a
    measurement made as the final one (sequential, as the final one is: more blocks while the interval straddles
    the budget): its ratio to the dense model for a speed-up budget (the planner's scale), else its own p50.
    Recorded in the candidate's `remeasured`, with the interval (the ratio's, else the p50's) and whether all of
    it fits (`sure`). False for a predicted target (its latency is already the band's upper end)."""
    from deploy.compiler.apply import final_measure_config

    if not planner.setup.target.measured or candidate.latency_ms > NEAR_MISS * budget:
        return False
    if candidate.remeasured is not None and candidate.remeasured["budget_ms"] == budget:  # met again (the uniform
        return bool(candidate.remeasured["fits"])  # allocation's search); a re-plan's tighter budget times it anew

    def on_scale(ratio_ci: Any, interval_ms: Any) -> tuple[float, float]:
        """The interval the budget is judged on: the ratio's (x the dense model) for a speed-up budget."""
        if planner.relative and ratio_ci:
            return ratio_ci[0] * planner.dense.latency_ms, ratio_ci[1] * planner.dense.latency_ms
        return interval_ms[0], interval_ms[1]

    def decided(b: Any, comparison: Any) -> bool:
        from deploy.targets.measure.paired import median_interval

        low, high = on_scale((comparison.ci_low, comparison.ci_high), median_interval(b))
        return high <= budget or low > budget

    timing = planner.remeasured(candidate, final_measure_config(planner.request.measure_seconds), decided)
    low, high = on_scale(timing.get("ratio_ci"), timing["interval_ms"])
    p50 = planner.planned(timing)  # on the planner's scale, as every candidate's latency
    candidate.remeasured = {"p50_ms": p50, "interval_ms": [low, high], "budget_ms": budget, "fits": p50 <= budget,
                            "sure": high <= budget, "blocks": len(timing.get("block_ratios") or ())}
    planner.note("measuring candidates", 0.5, len(planner.candidates), planner.expected,
                 f"measured again: {candidate.origin}, {p50:.3g} ms (up to {high:.3g} ms) for {budget:.3g} ms")
    return p50 <= budget


def least_pruning_at_edge(planner: Any, budget: float, pruned: Candidate, safe: float) -> Candidate | None:
    """Where the dense model at its fastest precisions was timed again and missed the budget by a little, the least
    pruning at the same precisions that fits when timed again as the final measurement times it. The level search
    aims at the middle of its window, the noise margin below it, so it cuts a tenth of the latency where a
    hundredth was missing: the distorted-digits ResNet asked for NNCF int8's latency timed its int8 plan again at
    1.013x the budget, the level search answered 0.20 (validation top-1 0.96), and a block dropped won instead
    (held-out 0.9685 against NNCF's 0.9731, where pure int8 scored 0.988); with this search the next run kept level
    0.059 (0.9769 at 0.994x NNCF's p50). Regula falsi on the level between the two, aiming halfway between the
    margin (`safe` x budget) and the budget: a step inside the margin fits as any candidate does and is kept as
    the lightest so far; a step between the margin and the budget is timed again and is the answer where that p50
    fits. None where nothing lighter than `pruned` fits, or the time limit stops the step."""
    from deploy.compiler.candidate import falsi_step, measured_before

    if pruned.level <= 0 or pruned.blocks or pruned.labels is None or not planner.quantizes:
        return None
    fast = planner.fastest_measured(0.0)[0]
    again = fast.remeasured
    if pruned.labels != fast.labels or not again or again["fits"] \
            or again["budget_ms"] != budget or planner.clock.out_of_time("the least pruning at the budget's edge"):
        return None
    aim, best = (safe + 1) / 2 * budget, None
    (a, f_a), (b, f_b) = (0.0, again["p50_ms"] - aim), (pruned.level, pruned.latency_ms - aim)
    for _ in range(EDGE_STEPS):  # (not a `SearchClock.step`: a few candidates, its trial comes with the others')
        level = falsi_step(a, f_a, b, f_b)
        cand = (measured_before(planner.candidates, planner.blocks, planner.allocation, planner.removed(level),
                                fast.labels) or planner.evaluate(level, fast.labels, "least pruning at the edge"))
        if cand.latency_ms <= safe * budget:
            best, (b, f_b) = (cand if cand is not pruned else best), (level, cand.latency_ms - aim)
            continue
        if cand.latency_ms <= budget and fits_when_remeasured(planner, cand, budget):
            return cand
        a, f_a = level, max(cand.latency_ms, (cand.remeasured or {}).get("p50_ms", 0.0)) - aim
    return best


def edge_line(planner: Any, choice: Candidate, budget: float) -> str | None:
    """Where the answer is a precision-only plan (the dense model's, or a depth mix's) or the least pruning at the
    edge, kept by its second measurement's p50 while that interval reaches past the budget: one line saying so,
    with the budget under which the search prunes (more) instead (under the interval's low end, where this plan is
    surely over). None otherwise."""
    again = choice.remeasured
    if not again or not again["fits"] or again.get("sure", True):
        return None
    (low, high), p50 = again["interval_ms"], again["p50_ms"]
    flag = (f"--speedup {math.ceil(planner.dense.latency_ms / low * 1000) / 1000:g}" if planner.relative
            else f"--budget-ms {math.floor(low * 1000) / 1000:g}")
    kept = (f"{len(choice.blocks)} block{'s' if len(choice.blocks) > 1 else ''} dropped and no width pruned"
            if choice.blocks else f"the least pruning that fits (level {choice.level:.3g})" if choice.level > 0
            else "the unpruned model")  # a depth mix's plan, or the least pruning (`least_pruning_at_edge`)
    more = " more" if choice.level > 0 else ""
    return (f"at the edge: kept {kept} at its fastest precisions (its p50 timed again {p50 / budget:.3f}x "
            f"the budget, its interval up to {high / budget:.3f}x) rather than prune{more} for the last percent, which "
            f"is noise here; the budget may not hold (the verdict says so); {flag} would prune{more} for a certain fit")


def near_miss_line(planner: Any, choice: Candidate, budget: float, safe: float) -> str | None:
    """Where the answer prunes (or factorizes) but the dense model at its fastest precisions was given up within
    NEAR_MISS over the budget and ranks above the answer on the validation split (the answer after its trial
    recovery, where it had one): one line naming the budget that keeps the unpruned model. A budget set at another
    tool's latency lands on this edge: all-MiniLM-L6-v2 asked for NNCF int8's p50 measured its own int8 plan at
    0.98x that budget in one run and 1.004x in another (pooled cosine 0.9986), and the second run dropped a block
    (0.918 after its trial recovery). None where nothing was given up near the budget. `safe`: the share of the
    budget the search keeps candidates at (plan.SAFE)."""
    from deploy.compiler.trial_recovery import needs_recovery, promise
    from deploy.core.metrics import PRIMARY, task_of

    if not needs_recovery(choice) or not planner.setup.target.measured or not planner.quantizes:
        return None
    fast = planner.fastest_measured(0.0)[0]  # measured by the search before it turned to pruning
    if fast.latency_ms <= safe * budget:  # kept by the search, and still ranked below the answer
        return None
    over = max(fast.latency_ms, (fast.remeasured or {}).get("p50_ms", 0.0))
    if over > NEAR_MISS * budget or promise(planner, fast) <= promise(planner, choice):
        return None
    keep = over / safe  # a budget this measurement is inside of with the search's margin
    flag = (f"--speedup {max(1.0, math.floor(planner.dense.latency_ms / keep * 1000) / 1000):g}" if planner.relative
            else f"--budget-ms {math.ceil(keep * 1000) / 1000:g}")
    metric = PRIMARY[task_of(planner.setup.reference[0])]
    again = f" (timed again: {over / budget:.3f}x)" if over > fast.latency_ms else ""
    return (f"near miss: the unpruned model at its fastest precisions measured {fast.latency_ms / budget:.3f}x the "
            f"budget{again} and was more faithful on validation ({metric} {planner.with_fidelity(fast).fidelity:.4g})"
            f" than the plan chosen ({_shown(choice)}); {flag} would have kept it, unpruned")


def _shown(choice: Candidate) -> str:
    """The chosen plan's validation fidelity as the search compared it."""
    if choice.trial is not None:
        return f"{choice.trial['fidelity']:.4g} after its trial recovery"
    return f"{choice.fidelity:.4g}"
