"""A precision-only plan that measured inside the budget but inside the search's noise margin is timed again, as
the final measurement will time it, before the search gives it up for pruning.

While searching, a candidate fits at <= SAFE x budget (plan.py): the final measurement repeats it with noise, and
the margin keeps that from turning a fit into a miss. Pruning levels are continuous, so their search lands inside
the margin; the dense model at its fastest precisions is one point, and throwing it away for sitting between SAFE
and 1 x budget costs the most faithful answer there is. all-MiniLM-L6-v2 asked for NNCF int8's latency (OpenVINO,
2 threads): its pure int8 plan measured 0.976x the budget at cosine 0.9985, and the search dropped a block instead
(0.919, 0.947 after recovery). Timed again as the final measurement is made (`final_measure_config`, interleaved
with the dense model, more blocks while its interval straddles the budget), it is kept where the whole interval of
that measurement is within the budget: the rule the verdict calls "met". The final measurement is another draw: a
plan kept at the edge can still come out "uncertain" (exit 3), which says what is true of it.
"""
from __future__ import annotations

from typing import Any

from deploy.compiler.candidate import Candidate


def fits_when_remeasured(planner: Any, candidate: Candidate, budget: float) -> bool:
    """Whether `candidate` (measured within `budget` on the planner's scale) still fits with the whole interval of
    a measurement made as the final one (sequential, as the final one is: more blocks while the interval straddles
    the budget): its ratio to the dense model's interval for a speed-up budget (the planner's scale), else its
    p50's. Recorded in the candidate's `remeasured`. False for a predicted target (its latency is already the
    band's upper end)."""
    from deploy.compiler.apply import final_measure_config

    if not planner.setup.target.measured or candidate.latency_ms > budget:
        return False
    if candidate.remeasured is not None:  # the uniform allocation meets the same dense plan again
        return bool(candidate.remeasured["fits"])

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
    candidate.remeasured = {"interval_ms": [low, high], "budget_ms": budget, "fits": high <= budget,
                            "blocks": len(timing.get("block_ratios") or ())}
    planner.note("measuring candidates", 0.5, len(planner.candidates), planner.expected,
                 f"measured again: {candidate.origin}, up to {high:.3g} ms for {budget:.3g} ms")
    return high <= budget
