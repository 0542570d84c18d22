"""The baselines the DP is measured against, at the same exact budget: one uniform ratio for every unit, and
Torch-Pruning's global magnitude pruning (one |w| threshold across layers in unstructured mode)."""
from __future__ import annotations

import copy

import torch
from torch import nn

from deploy.compress.prune.problem import PruneProblem, check_reachable
from deploy.compress.prune.units import attention_modules, attention_projections, output_layer, output_sum
from deploy.core.errors import BudgetInfeasibleError


def uniform_plan(problem: PruneProblem, ratio: float) -> dict[str, int]:
    """`ratio` of every unit's elements, each rounded to its nearest legal option (the pruning benchmark's
    baseline; the planner's uniform allocation is `graded_uniform_plan`)."""
    return {u.name: u.nearest_option(ratio) for u in problem.units if u.nearest_option(ratio) > 0}


def graded_uniform_plan(problem: PruneProblem, ratio: float) -> dict[str, int]:
    """`ratio` of every unit's elements, each unit at one of its two legal options around that: the deeper one for
    the units nearest to it, in that order, while the plan's additive cost saving stays within half a unit's step of
    the saving the exact ratio would make (each unit's cost interpolated between its two options). Rounding every unit
    to its nearest option moves the plan in steps: with 16-channel multiples on the digits ResNet the uniform ratios
    0.60 and 0.65 measured 0.31 and 0.24 ms, nothing between, for a window of 0.27-0.31 ms."""
    plan: dict[str, int] = {}
    wanted, steps = 0.0, []
    for unit in problem.units:
        want = min(ratio, 1.0) * unit.size
        low = max(o for o in unit.options if o <= want)
        high = min((o for o in unit.options if o >= want), default=low)
        plan[unit.name] = low
        if high > low:  # the saving of the deeper option over the shallower, and the exact ratio's share of it
            gain = problem.costs.delta(unit.name, low) - problem.costs.delta(unit.name, high)
            share = (want - low) / (high - low)
            wanted += share * gain
            steps.append((share, unit.name, high, gain))
    made = 0.0
    for _, name, high, gain in sorted(steps, key=lambda s: (-s[0], s[1])):
        if made + gain / 2 <= wanted:
            plan[name], made = high, made + gain
    return {name: n for name, n in plan.items() if n > 0}


def plan_uniform(problem: PruneProblem, budget: float, iterations: int = 20) -> dict[str, int]:
    """The same ratio for every unit (rounded to its legal options): the smallest that fits the budget."""
    check_reachable(problem, budget)
    if problem.cost.of_plan({}) <= budget:
        return {}
    low, high = 0.0, max(problem.config.grid)
    best = problem.max_plan()
    for _ in range(iterations):
        mid = (low + high) / 2
        plan = uniform_plan(problem, mid)
        if problem.cost.of_plan(plan) <= budget:
            high, best = mid, plan
        else:
            low = mid
    return best


def global_magnitude(problem: PruneProblem, budget: float, step: float = 0.1, refine: int = 6) -> nn.Module:
    """Torch-Pruning's global magnitude pruning (one ranking of normalised group L2 scores across the model),
    at the smallest global ratio that fits the budget. Its cost is not monotone in the ratio (groups that would
    pass max_pruning_ratio are skipped), so the ratio is scanned upwards, then bisected inside the first step
    that fits. Unstructured: one |w| threshold across all layers."""
    if problem.config.mode == "unstructured":
        return problem.build(_global_threshold_plan(problem, budget, 14))
    if problem.cost.of_plan({}) <= budget:
        return copy.deepcopy(problem.module)
    low, fitting = 0.0, None
    for i in range(1, int(max(problem.config.grid) / step + 1e-9) + 1):
        candidate = _tp_global(problem, i * step)
        if problem.cost.of_module(candidate) <= budget:
            fitting, high = candidate, i * step
            break
        low = i * step
    if fitting is None:
        raise BudgetInfeasibleError(f"global magnitude pruning cannot reach {budget:.4g}{problem.cost.unit} "
                                    f"at any global ratio up to {max(problem.config.grid)}", "raise the budget")
    for _ in range(refine):
        mid = (low + high) / 2
        candidate = _tp_global(problem, mid)
        if problem.cost.of_module(candidate) <= budget:
            high, fitting = mid, candidate
        else:
            low = mid
    return fitting


def _tp_global(problem: PruneProblem, ratio: float) -> nn.Module:
    import torch_pruning as tp

    model = copy.deepcopy(problem.module).eval()
    if ratio <= 0:
        return model
    ignored = {n for n in {output_layer(model, problem.example)} if n} | attention_projections(model)
    ignored |= {proj for _, _, proj in attention_modules(model)}  # its head handling fails on transformers 5
    pruner = tp.pruner.MagnitudePruner(
        model, problem.example, importance=tp.importance.GroupMagnitudeImportance(p=2), global_pruning=True,
        pruning_ratio=ratio, max_pruning_ratio=max(problem.config.grid),
        ignored_layers=[model.get_submodule(n) for n in sorted(ignored)], round_to=problem.channel_multiple,
        output_transform=output_sum)
    pruner.step()
    return model


def _global_threshold_plan(problem: PruneProblem, budget: float, iterations: int) -> dict[str, int]:
    weights = {u.name: problem.module.get_submodule(u.root).weight.detach().abs().reshape(-1) for u in problem.units}
    everything = torch.cat(list(weights.values())).sort().values
    cap = max(problem.config.grid)

    def plan_at(q: float) -> dict[str, int]:
        threshold = everything[min(int(q * len(everything)), len(everything) - 1)]
        return {n: min(int((w < threshold).sum()), int(cap * len(w))) for n, w in weights.items()}

    low, high = 0.0, cap
    best = plan_at(high)
    for _ in range(iterations):
        mid = (low + high) / 2
        plan = plan_at(mid)
        if problem.cost.of_plan(plan) <= budget:
            high, best = mid, plan
        else:
            low = mid
    return {n: c for n, c in best.items() if c > 0}
