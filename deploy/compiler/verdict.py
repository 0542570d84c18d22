"""The answer to "was the budget met?", the same word and exit code everywhere (CLI, report.json, report.html).

met (exit 0): the whole interval of the measured p50 (over the blocks of the final measurement), or the whole
predicted band, is within the budget; uncertain (exit 3): that interval or band straddles the budget; missed
(exit 4): all of it is over. A speed-up budget measured here is judged the same way on the interval of the
speed-up from the final interleaved comparison. The model and the report are written in every case. The final
measurement times more blocks while its interval straddles the budget (`settles`), so "uncertain" is what remains
after up to three rounds, each interval at the confidence that keeps the whole design at 95%.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

from deploy.core.errors import EXIT_INCONCLUSIVE, EXIT_MISSED, EXIT_OK

EXIT_CODES = {"met": EXIT_OK, "uncertain": EXIT_INCONCLUSIVE, "missed": EXIT_MISSED}


def latency_verdict(p50_ms: float, budget_ms: float, band_ms: Sequence[float] | None = None) -> str:
    """`band_ms`: the predicted band, or the measured p50's interval; without one the p50 alone decides."""
    if band_ms:
        low, high = band_ms
        if high <= budget_ms:
            return "met"
        return "missed" if low > budget_ms else "uncertain"
    return "met" if p50_ms <= budget_ms else "missed"


def speedup_verdict(speedup_ci: Sequence[float], asked: float) -> str:
    """A speed-up budget judged by the final interleaved comparison's interval of the speed-up (drift-free: the
    original's own p50 from an earlier measurement never enters it)."""
    low, high = speedup_ci
    if low >= asked:
        return "met"
    return "missed" if high < asked else "uncertain"


def size_verdict(size_mb: float, budget_mb: float) -> str:
    return "met" if size_mb <= budget_mb else "missed"


def judged(budget: dict[str, Any], p50_ms: float, interval_ms: Sequence[float] | None,
           speedup_ci: Sequence[float] | None, size_mb: float | None = None) -> str | None:
    """The verdict on `budget` (the decisions' record of it): a speed-up on the interval of the speed-up where
    there is one, a latency on the p50's interval (or predicted band), a size on the file; None for a fidelity
    floor (met by construction)."""
    if budget.get("kind") == "speedup" and speedup_ci:
        return speedup_verdict(speedup_ci, budget["value"])
    if budget.get("target_ms") is not None:
        return latency_verdict(p50_ms, budget["target_ms"], interval_ms)
    if budget.get("kind") == "size_mb" and size_mb is not None:
        return size_verdict(size_mb, budget["value"])
    return None


def settles(budget: dict[str, Any]) -> Callable[[Any, Any], bool] | None:
    """For the final measurement (sequential, `measure_blocks`): whether a look's interval settles the verdict on
    `budget` (the decisions' record of it), met or missed, so that no more blocks are timed; None where the budget
    is not a latency."""
    from deploy.targets.measure.paired import median_interval

    if budget.get("kind") != "speedup" and budget.get("target_ms") is None:
        return None

    def settled(b: Any, comparison: Any) -> bool:  # a speed-up is judged on the comparison, a latency on b alone
        if budget.get("kind") == "speedup":
            return judged(budget, math.nan, None, [1.0 / comparison.ci_high, 1.0 / comparison.ci_low]) != "uncertain"
        return judged(budget, b.summary["p50"], median_interval(b), None) != "uncertain"
    return settled
