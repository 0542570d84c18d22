"""Searching the per-layer precision assignment under a latency budget.

1. The allocator (the shared multiple-choice knapsack) gives the additive optimum: per layer, options priced as
   islands (kernel delta + both Q/DQ ends) with their QuantNAS sensitivities.
2. Candidates around it (the allocator at a sweep of budgets, its neighbours, random points) are simulated for
   real; an accuracy predictor is fitted on them (EQ-Net's CQAP), its Spearman measured on held-out candidates.
3. NSGA-II (optuna, seeded) explores latency (the non-additive estimate, boundaries fused where both sides are
   int8) against predicted distortion, under the budget as a constraint; the best few feasible points go back
   to the caller to be measured for real next to the allocator's.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from deploy.compress.allocate import Allocation, Option, Unit, allocate
from deploy.compress.quant.cost import Boundaries, PriceTable, option_cost, plan_latency
from deploy.compress.quant.predictor import AccuracyPredictor, holdout_split, spearman
from deploy.export.qdq.option import QuantOption, option_by_label
from deploy.core.errors import BudgetInfeasibleError

Labels = dict[str, str]


@dataclass(frozen=True)
class SearchConfig:
    enabled: bool = True  # False: the allocator's plan only
    trials: int = 60  # NSGA-II trials (each scored by the predictor, not simulated)
    predictor_samples: int = 24  # candidates simulated to fit the predictor
    test_fraction: float = 0.25  # of those, held out to report the predictor's Spearman
    finalists: int = 3  # refined candidates handed back to be measured for real
    ridge: float = 1e-2
    seed: int = 0

    def __post_init__(self) -> None:
        if self.trials < 1 or self.finalists < 1:
            raise ValueError("trials and finalists must be >= 1")
        if self.predictor_samples < 8:
            raise ValueError(f"predictor_samples must be >= 8 (train and held-out), got {self.predictor_samples}")
        if not 0.1 <= self.test_fraction <= 0.5:
            raise ValueError(f"test_fraction must be in [0.1, 0.5], got {self.test_fraction}")


@dataclass
class Candidate:
    labels: Labels
    latency_ms: float  # estimated (price table + boundaries)
    origin: str  # allocator | sweep | neighbour | random | nsga2
    distortion: float | None = None  # simulated output MSE
    predicted: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"labels": self.labels, "latency_ms": self.latency_ms, "origin": self.origin,
                "distortion": self.distortion, "predicted": self.predicted}


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


@dataclass
class SearchResult:
    allocator: Candidate
    allocation: dict[str, Any]
    refined: list[Candidate] = field(default_factory=list)
    measured: list[Candidate] = field(default_factory=list)  # the predictor's training + held-out candidates
    predictor: dict[str, Any] = field(default_factory=dict)
    trials: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"allocator": self.allocator.to_dict(), "allocation": self.allocation,
                "refined": [c.to_dict() for c in self.refined], "measured": [c.to_dict() for c in self.measured],
                "predictor": self.predictor, "trials": self.trials}


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


def training_candidates(sp: SearchSpace, budget_ms: float, count: int, seed: int) -> list[tuple[Labels, str]]:
    """Diverse candidates near the frontier: the allocator at budgets from the fastest plan to the float model,
    one-layer neighbours of the allocator's plan, and a few random points."""
    rng = random.Random(seed)
    units, fixed = sp.units()
    low = fixed + sum(min(o.cost for o in u.options) for u in units)
    high = max(sp.table.base_ms, budget_ms, low) * 1.02
    seen: set[tuple[str, ...]] = set()
    out: list[tuple[Labels, str]] = []

    def add(labels: Labels, origin: str) -> None:
        key = tuple(labels[n] for n in sp.spaces)
        if key not in seen:
            seen.add(key)
            out.append((labels, origin))

    sweep = max(4, count // 3)
    for i in range(sweep):
        found = _dp(sp, low + (high - low) * (i + 0.5) / sweep, None)
        if found is not None:
            add(found[0], "sweep")
    base = allocator_plan(sp, budget_ms)[0]
    names = list(sp.spaces)
    tries = 0
    while len(out) < count and tries < 50 * count:
        tries += 1
        labels = dict(base)
        if rng.random() < 0.7:  # neighbours: change one or two layers
            for name in rng.sample(names, min(len(names), rng.choice((1, 2)))):
                labels[name] = rng.choice(sp.spaces[name]).label
            add(labels, "neighbour")
        else:
            add({n: rng.choice(sp.spaces[n]).label for n in names}, "random")
    return out[:count]


def fit_predictor(sp: SearchSpace, measured: Sequence[Candidate], config: SearchConfig
                  ) -> tuple[AccuracyPredictor, dict[str, Any]]:
    """Fit on a training split, report Spearman on the held-out split, then refit on everything."""
    spaces = {n: tuple(o.label for o in opts) for n, opts in sp.spaces.items()}
    train, test = holdout_split(len(measured), config.test_fraction, config.seed)
    predictor = AccuracyPredictor(spaces, sp.sensitivity, config.ridge)
    predictor.fit([measured[i].labels for i in train], [measured[i].distortion for i in train])
    truth = [measured[i].distortion for i in test]
    predicted = [predictor.predict(measured[i].labels) for i in test]
    additive = [predictor.additive(measured[i].labels) for i in test]
    report = {"model": "ridge on per-layer option indicators + log additive sensitivity",
              "train": len(train), "test": len(test), "spearman_test": spearman(truth, predicted),
              "spearman_additive_test": spearman(truth, additive)}
    predictor.fit([c.labels for c in measured], [c.distortion for c in measured])
    return predictor, report


def nsga2(sp: SearchSpace, predictor: AccuracyPredictor, budget_ms: float, seeds: Sequence[Labels],
          config: SearchConfig) -> list[Candidate]:
    """Optuna NSGA-II over per-layer options: minimise (estimated latency, predicted distortion), latency within
    the budget as a constraint. Returns feasible distinct candidates, best predicted first."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.NSGAIISampler(population_size=max(8, min(24, config.trials // 3)), seed=config.seed)
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=sampler)
    for labels in seeds:
        study.enqueue_trial(labels)
    choices = {n: [o.label for o in opts] for n, opts in sp.spaces.items()}

    def objective(trial: Any) -> tuple[float, float]:
        labels = {n: trial.suggest_categorical(n, c) for n, c in choices.items()}
        latency = sp.latency(labels)
        trial.set_user_attr("latency_ms", latency)
        trial.set_constraint("latency_budget", latency - budget_ms)  # feasible when <= 0
        return latency, predictor.predict(labels)

    study.optimize(objective, n_trials=config.trials + len(seeds))
    found: dict[tuple[str, ...], Candidate] = {}
    for t in study.trials:
        if t.values is None or t.user_attrs["latency_ms"] > budget_ms:
            continue
        labels = {n: t.params[n] for n in choices}
        key = tuple(labels.values())
        if key not in found:
            found[key] = Candidate(labels, t.user_attrs["latency_ms"], "nsga2", predicted=t.values[1])
    return sorted(found.values(), key=lambda c: (c.predicted, c.latency_ms))


def search(sp: SearchSpace, evaluate: Callable[[Labels], float], budget_ms: float, config: SearchConfig
           ) -> SearchResult:
    """Allocator first; then, if enabled, predictor + NSGA-II refinement. `evaluate` simulates one candidate."""
    labels, alloc, how = allocator_plan(sp, budget_ms)
    allocator = Candidate(labels, sp.latency(labels), "allocator", evaluate(labels))
    result = SearchResult(allocator, {"how": how, "dp_cost_ms": alloc.cost, "dp_distortion": alloc.distortion,
                                      "additive_distortion": sp.distortion(labels), "budget_ms": budget_ms,
                                      "estimated_ms": allocator.latency_ms})
    if not config.enabled:
        return result
    measured = [allocator]
    for cand, origin in training_candidates(sp, budget_ms, config.predictor_samples - 1, config.seed):
        if cand != labels:
            measured.append(Candidate(cand, sp.latency(cand), origin, evaluate(cand)))
    predictor, report = fit_predictor(sp, measured, config)
    feasible = sorted((c for c in measured if c.latency_ms <= budget_ms), key=lambda c: c.distortion)
    seeds = [labels] + [c.labels for c in feasible[:5] if c.labels != labels]
    refined = [c for c in nsga2(sp, predictor, budget_ms, seeds, config) if c.labels != labels]
    result.refined = refined[: config.finalists]
    result.measured = measured
    result.predictor = report
    result.trials = config.trials + len(seeds)
    return result


def finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)
