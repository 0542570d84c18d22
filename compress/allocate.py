"""The budget allocator: one option per unit, minimising summed distortion under a summed cost budget.

A multiple-choice knapsack solved exactly by dynamic programming over a bucketed budget. Pruning ratios, low-rank
ranks and precisions all reduce to it: each unit offers options (cost, distortion), distortions add up (the seed
paper's observation for pruning; checked, not assumed, by the callers), and the cost is parameters, MACs or latency.
Costs are rounded UP to buckets, so a plan that fits on the grid also fits in real cost. Ties go to the earlier
option, so the result is deterministic.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from deploy.core.errors import BudgetInfeasibleError

DEFAULT_STEPS = 4000
MIN_STEPS, MAX_STEPS = 2000, 10000


@dataclass(frozen=True)
class Option:
    cost: float
    distortion: float
    label: Any = None  # what the option means to its caller: a ratio, a rank, a precision


@dataclass(frozen=True)
class Unit:
    name: str
    options: tuple[Option, ...]

    def __post_init__(self) -> None:
        if not self.options:
            raise ValueError(f"unit {self.name!r} has no options")
        for opt in self.options:
            if opt.cost < 0 or not math.isfinite(opt.cost) or not math.isfinite(opt.distortion):
                raise ValueError(f"unit {self.name!r}: option costs must be finite and >= 0, distortions finite")


@dataclass
class Allocation:
    choice: dict[str, int]  # unit name -> index of the chosen option
    cost: float  # real (unrounded) cost of the chosen options, plus the fixed cost
    distortion: float  # predicted: the sum of the chosen options' distortions
    budget: float | None = None
    labels: dict[str, Any] = field(default_factory=dict)


def _check_steps(steps: int) -> int:
    if not MIN_STEPS <= steps <= MAX_STEPS:
        raise ValueError(f"steps must be between {MIN_STEPS} and {MAX_STEPS}, got {steps}")
    return steps


def _solve(units: Sequence[Unit], bucket: float, steps: int) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """dp[j]: least distortion with bucketed cost at most j; choices per unit for the backtrack."""
    inf = np.inf
    dp = np.zeros(steps + 1)  # with no units, any budget gives zero distortion
    picks = []
    buckets_per_unit = []
    for unit in units:
        costs = np.array([math.ceil(round(o.cost / bucket, 9)) for o in unit.options], dtype=np.int64)
        dists = np.array([o.distortion for o in unit.options], dtype=np.float64)
        best = np.full(steps + 1, inf)
        pick = np.full(steps + 1, -1, dtype=np.int64)
        for index, (c, d) in enumerate(zip(costs, dists)):
            if c > steps:
                continue
            candidate = np.full(steps + 1, inf)
            candidate[c:] = dp[: steps + 1 - c] + d
            better = candidate < best  # strict: ties keep the earlier option
            best[better] = candidate[better]
            pick[better] = index
        dp = best
        picks.append(pick)
        buckets_per_unit.append(costs)
    return dp, picks, buckets_per_unit


def _backtrack(units: Sequence[Unit], picks: list[np.ndarray], buckets: list[np.ndarray], j: int) -> dict[str, int]:
    choice = {}
    for unit, pick, costs in zip(reversed(units), reversed(picks), reversed(buckets)):
        index = int(pick[j])
        choice[unit.name] = index
        j -= int(costs[index])
    return choice


def _allocation(units: Sequence[Unit], choice: dict[str, int], fixed_cost: float, budget: float | None) -> Allocation:
    cost = fixed_cost + sum(u.options[choice[u.name]].cost for u in units)
    distortion = sum(u.options[choice[u.name]].distortion for u in units)
    labels = {u.name: u.options[choice[u.name]].label for u in units}
    return Allocation({u.name: choice[u.name] for u in units}, cost, distortion, budget, labels)


def least_cost(units: Sequence[Unit], fixed_cost: float = 0.0) -> float:
    return fixed_cost + sum(min(o.cost for o in u.options) for u in units)


def allocate(units: Sequence[Unit], budget: float, fixed_cost: float = 0.0, steps: int = DEFAULT_STEPS,
             unit_name: str = "") -> Allocation:
    """Least total distortion with total cost (fixed part included) at most `budget`."""
    _check_steps(steps)
    floor = least_cost(units, fixed_cost)
    if floor > budget:
        raise BudgetInfeasibleError(
            f"the budget {budget:g}{unit_name} is below the least achievable cost {floor:.4g}{unit_name}",
            f"raise the budget to at least {floor:.4g}{unit_name}", least_achievable=floor)
    room = budget - fixed_cost
    if not units:
        return _allocation(units, {}, fixed_cost, budget)
    if room <= 0:
        choice = {u.name: int(np.argmin([o.cost for o in u.options])) for u in units}
        return _allocation(units, choice, fixed_cost, budget)
    bucket = room / steps
    dp, picks, buckets = _solve(units, bucket, steps)
    if not np.isfinite(dp[steps]):
        # rounding costs up to buckets lost the cheapest plan; it fits in real cost, so take it
        choice = {u.name: int(np.argmin([o.cost for o in u.options])) for u in units}
        return _allocation(units, choice, fixed_cost, budget)
    j = int(np.flatnonzero(dp == dp[steps])[0])  # the cheapest budget that reaches the optimum
    return _allocation(units, _backtrack(units, picks, buckets, j), fixed_cost, budget)


def allocate_inverse(units: Sequence[Unit], max_distortion: float, fixed_cost: float = 0.0,
                     steps: int = DEFAULT_STEPS) -> Allocation:
    """The inverse problem: least total cost whose summed distortion is at most `max_distortion`."""
    _check_steps(steps)
    best_possible = sum(min(o.distortion for o in u.options) for u in units)
    if best_possible > max_distortion:
        raise BudgetInfeasibleError(
            f"no plan keeps distortion at or below {max_distortion:.4g}; the least reachable is {best_possible:.4g}",
            "relax the fidelity floor", least_achievable=best_possible)
    if not units:
        return _allocation(units, {}, fixed_cost, None)
    span = sum(max(o.cost for o in u.options) for u in units)
    if span <= 0:
        choice = {u.name: int(np.argmin([o.distortion for o in u.options])) for u in units}
        return _allocation(units, choice, fixed_cost, None)
    bucket = span / steps
    dp, picks, buckets = _solve(units, bucket, steps)
    reachable = np.flatnonzero(dp <= max_distortion + 1e-12)
    j = int(reachable[0])
    return _allocation(units, _backtrack(units, picks, buckets, j), fixed_cost, None)
