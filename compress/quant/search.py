"""The per-layer precision assignment under a latency budget: the allocator, the one quantization searcher.

The shared multiple-choice knapsack (deploy.compress.allocate) gives the additive optimum: each option priced as an
island (kernel delta + both Q/DQ ends) with its QuantNAS sensitivity. The latency estimate is not additive (a Q/DQ
between two int8 layers fuses away), so a plan that misses the budget on it is re-planned at marginal prices, then
repaired greedily. An NSGA-II refinement with an accuracy predictor was removed: at the same budgets it returned the
allocator's plan on ONNX Runtime and at most marginally better ones on OpenVINO, for seconds more per budget
(benchmarks/results/quantization_searchers.json).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from deploy.compress.allocate import Allocation, Option, Unit, allocate
from deploy.compress.quant.cost import Boundaries, PriceTable, option_cost, plan_latency
from deploy.export.qdq.option import QuantOption, option_by_label
from deploy.core.errors import BudgetInfeasibleError

Labels = dict[str, str]


@dataclass
class SearchSpace:
    """Everything the search reads: per-layer options, their sensitivities, the price table and boundary rules."""

    spaces: dict[str, tuple[QuantOption, ...]]
    sensitivity: dict[str, dict[str, float]]
    table: PriceTable
    bounds: Boundaries

    def options(self, labels: Labels) -> dict[str, QuantOption]:
        return {n: option_by_label(self.spaces[n], label) for n, label in labels.items()}

    def latency(self, labels: Labels) -> float:
        return plan_latency(self.options(labels), self.table, self.bounds)

    def float_labels(self) -> Labels:
        return {n: opts[0].label for n, opts in self.spaces.items()}

    def units(self, context: Labels | None = None) -> tuple[list[Unit], float]:
        """Allocator units and the fixed cost. Without `context` each option is priced as an island (kernel delta
        and both Q/DQ ends); with one, at its marginal latency given every other layer as in `context` (so an
        int8 layer between int8 neighbours pays no boundary). Costs are shifted to be >= 0."""
        units, fixed = [], self.table.base_ms
        for name, opts in self.spaces.items():
            if context is None:
                prices = [option_cost(name, o, self.table, self.bounds) for o in opts]
            else:
                here = dict(context)
                here[name] = opts[0].label
                floor = self.latency(here)
                prices = []
                for o in opts:
                    here[name] = o.label
                    prices.append(self.latency(here) - floor)
            low = min(prices)
            fixed += low
            units.append(Unit(name, tuple(Option(p - low, self.sensitivity[name][o.label], o.label)
                                          for p, o in zip(prices, opts))))
        return units, fixed

    def distortion(self, labels: Labels) -> float:
        return sum(self.sensitivity[n][label] for n, label in labels.items())

    def fastest(self) -> Labels:
        """Per layer the option with the smallest kernel time (a starting context, not a guaranteed optimum)."""
        def kernel(name: str, o: QuantOption) -> float:
            return 0.0 if o.is_float else self.table.kernel.get(name, {}).get(o.kernel_class, 0.0)
        return {n: min(opts, key=lambda o: kernel(n, o)).label for n, opts in self.spaces.items()}


def _dp(sp: SearchSpace, budget_ms: float, context: Labels | None) -> tuple[Labels, Allocation] | None:
    units, fixed = sp.units(context)
    try:
        alloc = allocate(units, budget_ms, fixed_cost=fixed, unit_name=" ms")
    except BudgetInfeasibleError:
        return None
    return {n: str(label) for n, label in alloc.labels.items()}, alloc


def repair(sp: SearchSpace, labels: Labels, budget_ms: float) -> Labels | None:
    """Greedy on the non-additive estimate: while over budget, take the single-layer change that buys the most
    latency per unit of added distortion. None when no change helps."""
    labels = dict(labels)
    while sp.latency(labels) > budget_ms:
        now_ms, now_d = sp.latency(labels), sp.distortion(labels)
        best, best_score = None, math.inf
        for name, opts in sp.spaces.items():
            for opt in opts:
                if opt.label == labels[name]:
                    continue
                trial = {**labels, name: opt.label}
                gain = now_ms - sp.latency(trial)
                if gain <= 1e-12:
                    continue
                score = (sp.distortion(trial) - now_d) / gain
                if score < best_score:
                    best, best_score = trial, score
        if best is None:
            return None
        labels = best
    return labels


def improve(sp: SearchSpace, labels: Labels, budget_ms: float) -> Labels:
    """Greedy the other way: from a feasible plan, take the single-layer change that removes the most distortion
    per unit of added latency while the estimate stays within the budget; stop when none does."""
    labels = dict(labels)
    while True:
        now_ms, now_d = sp.latency(labels), sp.distortion(labels)
        best, best_score = None, 0.0
        for name, opts in sp.spaces.items():
            for opt in opts:
                trial = {**labels, name: opt.label}
                gain = now_d - sp.distortion(trial)
                ms = sp.latency(trial)
                if gain <= 0 or ms > budget_ms:
                    continue
                score = gain / max(ms - now_ms, 1e-9)
                if score > best_score:
                    best, best_score = trial, score
        if best is None:
            return labels
        labels = best


def allocator_plan(sp: SearchSpace, budget_ms: float, rounds: int = 3) -> tuple[Labels, Allocation, str]:
    """The allocator's plan and how it was found: the DP with island prices (the additive optimum) when its
    non-additive latency estimate fits; else the DP re-priced at the margin around its last plan (a few rounds);
    else that plan repaired greedily on the estimate."""
    first = _dp(sp, budget_ms, None)
    if first and sp.latency(first[0]) <= budget_ms:
        return first[0], first[1], "dp-island-prices"
    context = first[0] if first else sp.fastest()
    best: tuple[Labels, Allocation] | None = None
    last = first
    for _ in range(rounds):
        found = _dp(sp, budget_ms, context)
        if found is None:
            break
        last = found
        if sp.latency(found[0]) <= budget_ms and (best is None or sp.distortion(found[0]) < sp.distortion(best[0])):
            best = found
        if found[0] == context:
            break
        context = found[0]
    if best is not None:
        return best[0], best[1], "dp-marginal-prices"
    start = last[0] if last else sp.fastest()
    fixed, how = repair(sp, start, budget_ms), "dp-repaired"
    if fixed is None and sp.latency(sp.fastest()) <= budget_ms:  # greedy repair stuck between islands
        fixed, how = improve(sp, sp.fastest(), budget_ms), "fastest-improved"
    if fixed is None:
        least = min(sp.latency(sp.fastest()), sp.latency(start))
        raise BudgetInfeasibleError(f"no precision plan meets {budget_ms:.4g} ms (estimated); the fastest found "
                                    f"runs in {least:.4g} ms", f"raise the budget to at least {least:.4g} ms",
                                    least_achievable=least)
    alloc = last[1] if last else Allocation({}, sp.latency(fixed), sp.distortion(fixed), budget_ms)
    return fixed, alloc, how
