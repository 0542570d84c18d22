"""Layer-adaptive pruning (the seed paper): choose one ratio per unit by dynamic programming on additive output
distortion under a params, MACs or latency budget; apply it physically; check the additivity it rests on.

Pieces: units (what is legal), sensitivity (importance and distortion curves), cost (what a plan
costs), problem (all of it for one model), allocate (the multiple-choice knapsack), edit (masking and
surgery), prune_baselines (uniform, global magnitude). This module chooses DP plans, checks additivity, and offers
the `prune_model` API, `replay` and the registered `prune` pass.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from deploy.compress.allocate import Option, Unit, allocate, least_cost
from deploy.compress.prune.baselines import global_magnitude, plan_uniform
from deploy.compress.prune.cost import Plan
from deploy.compress.prune.depth import dropped
from deploy.compress.prune.edit import remove_physically
from deploy.compress.prune.problem import PruneConfig, PruneProblem, build_problem, check_reachable, input_moments
from deploy.compress.prune.units import UnitConfig, all_units, check_plan, ratio_of
from deploy.compress.prune.refit import InputMoments
from deploy.compress.prune.sensitivity import OutputProbe, ProbeData, model_hash, ranking
from deploy.core.errors import ConfigError
from deploy.core.passes import Context, State, register_pass
from deploy.core.spec import InputSpec
from deploy.core.data import CalibrationSet
from deploy.profiles import Profile
from deploy.targets.target import Target, as_target

__all__ = ["PruneConfig", "PruneReport", "PruneProblem", "build_problem", "plan_dp", "plan_uniform",
           "global_magnitude", "additivity_check", "additivity_sweep", "prune_model", "execute", "replay",
           "PrunePass"]

ADDITIVITY_FACTOR = 2.0  # warn when a plan's measured distortion exceeds this multiple of the prediction
EXACT_ROUNDS = 20  # bisection steps on the DP's own budget until the EXACT cost fits


@dataclass
class PruneReport:
    """Every decision and measurement of one pruning run, as plain data for report.json."""

    method: str
    mode: str
    budget_kind: str
    budget: float  # absolute
    base_cost: float
    cost: float  # exact cost of the pruned model
    cost_unit: str
    removed: dict[str, int]  # unit -> elements removed
    elements: dict[str, list[int]]  # unit -> which elements (channels, heads), for replay
    units: list[dict[str, Any]]
    predicted_distortion: float | None
    measured_distortion: float  # on the calibration batches, physically pruned model
    reference_power: float  # mean squared output of the unpruned model, to read distortions against
    held_out: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    refit: bool = False  # the readers of removed channels were refit on the calibration samples (prune.refit)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- choosing plans -------------------------------------------------------------------------------------------------

def allocator_units(problem: PruneProblem) -> tuple[list[Unit], float]:
    """One allocator Unit per prunable unit: options (cost, distortion, label = elements removed)."""
    units, fixed = [], problem.costs.base
    for unit in problem.units:
        deltas = problem.costs.deltas[unit.name]
        floor = min(deltas)
        fixed += floor
        curve = problem.curves.curves[unit.name]
        options = tuple(Option(d - floor, curve.at(n), n) for n, d in zip(unit.options, deltas))
        units.append(Unit(unit.name, options))
    return units, fixed


def plan_dp(problem: PruneProblem, budget: float, rounds: int = EXACT_ROUNDS) -> dict[str, int]:
    """Least summed distortion under the budget. Costs are additive only approximately (a conv between two pruned
    groups loses rows AND columns), so when the exact cost of the DP's plan is over, the DP's own budget is
    bisected down until it is not; of the plans that fit, the one with the least predicted distortion wins."""
    check_reachable(problem, budget)
    units, fixed = allocator_units(problem)
    steps, unit = problem.config.dp_steps, problem.cost.unit
    best: dict[str, int] = problem.max_plan()  # fits: checked above

    def solve(target: float) -> tuple[dict[str, int], bool]:
        allocation = allocate(units, target, fixed, steps, unit)
        plan = {n: int(c) for n, c in allocation.labels.items() if int(c) > 0}
        return plan, problem.cost.of_plan(plan) <= budget * (1 + 1e-9)

    plan, fits = solve(budget)
    if fits:
        return plan
    low, high = least_cost(units, fixed), budget
    for _ in range(rounds):
        mid = (low + high) / 2
        plan, fits = solve(mid)
        if fits:
            low = mid
            if problem.curves.predicted(plan) < problem.curves.predicted(best):
                best = plan
        else:
            high = mid
    return best


PLANNERS: dict[str, Callable[[PruneProblem, float], dict[str, int]]] = {"dp": plan_dp, "uniform": plan_uniform}


# --- additivity ----------------------------------------------------------------------------------------------------

def additivity_check(problem: PruneProblem, plans: Sequence[Plan]) -> dict[str, Any]:
    """Predicted (summed curves) vs measured (all units masked together) distortion for each plan, and their
    Spearman rank correlation over the plans."""
    rows, warnings = [], []
    for plan in plans:
        predicted = problem.curves.predicted(dict(plan))
        measured = problem.masked_distortion(plan)
        rows.append({"cost": problem.cost.of_plan(plan), "predicted": predicted, "measured": measured})
        if measured > ADDITIVITY_FACTOR * predicted and measured > 0:
            warnings.append(f"a plan's measured distortion {measured:.4g} exceeds {ADDITIVITY_FACTOR:g}x the "
                            f"predicted {predicted:.4g}: distortions do not add up well here")
    spearman = None
    if len(rows) >= 3:
        from scipy.stats import spearmanr

        value = spearmanr([r["predicted"] for r in rows], [r["measured"] for r in rows]).statistic
        spearman = None if value is None or math.isnan(value) else float(value)
    return {"plans": rows, "spearman": spearman, "warnings": warnings}


def additivity_sweep(problem: PruneProblem, count: int = 12) -> dict[str, Any]:
    """DP plans at `count` budgets between the least achievable cost and the full model."""
    least = problem.cost.of_plan(problem.max_plan())
    base = problem.costs.base
    budgets = [least + (base - least) * (i + 0.5) / count for i in range(count)]
    return additivity_check(problem, [plan_dp(problem, b) for b in budgets])


# --- the API and the pass -----------------------------------------------------------------------------------------

def _samples_of(calibration: CalibrationSet) -> tuple[list[tuple[torch.Tensor, ...]], list[tuple[torch.Tensor, ...]], Any]:
    if hasattr(calibration, "calibration"):
        return list(calibration.calibration), list(calibration.held_out), calibration.held_out_labels
    return list(calibration), [], None


def prune_model(module: nn.Module, inputs: Sequence[InputSpec], calibration: CalibrationSet, target: Target | Profile,
                config: PruneConfig = PruneConfig(), cache_dir: Path | None = None
                ) -> tuple[nn.Module, PruneReport]:
    """Prune a copy of `module` under the config's budget; the original is left unchanged.

    `calibration` is a deploy.core.data.CalibrationSet (its held-out part gives held-out fidelity) or a list of
    sample tuples (batch 1 each, in input order).
    """
    samples, held_out, labels = _samples_of(calibration)
    problem = build_problem(module, inputs, samples, as_target(target), config, cache_dir)
    return execute(problem, config.method, problem.budget(config.budget, config.budget_is_fraction),
                   held_out, labels)


def execute(problem: PruneProblem, method: str, budget: float, held_out: Sequence[tuple[torch.Tensor, ...]] = (),
            labels: torch.Tensor | None = None) -> tuple[nn.Module, PruneReport]:
    """Choose a plan with `method` under an absolute budget, build it, and report."""
    t0 = time.perf_counter()
    warnings: list[str] = []
    if method == "global":
        pruned, removed, predicted = global_magnitude(problem, budget), {}, None
        if problem.config.mode == "unstructured":
            removed = {u.name: int((pruned.get_submodule(u.root).weight == 0).sum()) for u in problem.units}
    else:
        removed = PLANNERS[method](problem, budget)
        check_plan(problem.units, removed)
        pruned, predicted = problem.build(removed), problem.curves.predicted(removed)
    seconds = {**problem.seconds, "plan": time.perf_counter() - t0}
    measured = problem.probe.distortion(pruned)
    if predicted is not None and measured > ADDITIVITY_FACTOR * predicted and measured > 0:
        warnings.append(f"measured distortion {measured:.4g} exceeds {ADDITIVITY_FACTOR:g}x the predicted "
                        f"{predicted:.4g}: the additive model is off for this plan")
    report = PruneReport(
        method=method, mode=problem.config.mode, budget_kind=problem.cost.name, budget=budget,
        base_cost=problem.costs.base, cost=problem.cost.of_module(pruned), cost_unit=problem.cost.unit.strip(),
        removed=dict(removed), elements=_elements(problem, removed), units=_unit_rows(problem, removed),
        predicted_distortion=predicted, measured_distortion=measured,
        reference_power=problem.curves.reference_power, held_out=held_out_fidelity(problem, pruned, held_out, labels),
        warnings=warnings, seconds={k: round(v, 3) for k, v in seconds.items()},
        refit=problem.refit is not None and method != "global")
    return pruned, report


def _elements(problem: PruneProblem, removed: Plan) -> dict[str, list[int]]:
    kinds = {u.name: u.kind for u in problem.units}
    return {n: sorted(int(i) for i in problem.rankings[n][:c]) for n, c in removed.items()
            if kinds[n] in ("channels", "heads")}


def _unit_rows(problem: PruneProblem, removed: Plan) -> list[dict[str, Any]]:
    return [{"unit": u.name, "kind": u.kind, "size": u.size, "kept": u.size - int(removed.get(u.name, 0)),
             "ratio": ratio_of(u, int(removed.get(u.name, 0)))} for u in problem.units]


def held_out_fidelity(problem: PruneProblem, pruned: nn.Module, held_out: Sequence[tuple[torch.Tensor, ...]],
                      labels: torch.Tensor | None) -> dict[str, Any]:
    if not held_out:
        return {}
    from deploy.core.metrics import fidelity

    data = ProbeData.from_samples(held_out, problem.probe.data.input_names, len(held_out), 32)
    probe = OutputProbe(problem.module, data)
    reference, candidate = torch.cat(probe.reference), torch.cat(probe.outputs(pruned))
    mask = None
    if "attention_mask" in data.input_names:
        mask = torch.cat([b[data.input_names.index("attention_mask")] for b in data.batches])
    return fidelity(reference, candidate, labels, mask)


def replay(module: nn.Module, inputs: Sequence[InputSpec], report: dict[str, Any],
           samples: Sequence[tuple[torch.Tensor, ...]] | None = None) -> nn.Module:
    """Rebuild a pruned model from a recorded report (PruneReport.to_dict()): the recorded channels and heads,
    or for sparse modes the recorded counts of the smallest weights; a refit plan needs the calibration `samples`
    it was refit on. Global-magnitude results are not replayable this way (Torch-Pruning chose them)."""
    if report["method"] == "global" and report["mode"] == "structured":
        raise ConfigError("a global-magnitude plan records no per-unit elements", "re-run the prune pass")
    if report.get("refit") and not samples:
        raise ConfigError("the plan's pruned layers were refit on calibration data",
                          "replay it with the calibration samples the prune pass had")
    return apply_removed(module, inputs, report["mode"], report["removed"], report.get("elements", {}),
                         samples if report.get("refit") else None)


def apply_removed(module: nn.Module, inputs: Sequence[InputSpec], mode: str, removed: dict[str, int],
                  elements: dict[str, list[int]] | None = None,
                  samples: Sequence[tuple[torch.Tensor, ...]] | None = None,
                  moments: InputMoments | None = None) -> nn.Module:
    """A physically pruned copy for a plan (unit -> count removed): each unit loses its `count` least important
    elements by magnitude (or exactly the listed `elements`); with `samples` (structured mode), the linear layers
    reading removed channels are refit on them (`prune.refit`; `moments`: their input moments collected before on
    this module and these samples). Deterministic: the plan search's candidates and a replayed deploy.toml get the
    same model from the same calibration samples."""
    gen = torch.Generator().manual_seed(0)
    example = tuple(spec.example({"batch": 2}, gen) for spec in inputs)
    config = UnitConfig(mode, 1, (0.0,), sparse_2_4=mode == "2:4")
    units = [u for u in all_units(module, example, config) if u.name in removed and int(removed[u.name]) > 0]
    unknown = sorted(set(n for n, c in removed.items() if int(c) > 0) - {u.name for u in units})
    if unknown:
        raise ConfigError(f"the pruning plan names units this model does not have ({', '.join(unknown[:3])})",
                          "replay a plan with the model it was made for")
    removal: dict[str, torch.Tensor] = {}
    for unit in units:
        if elements and unit.name in elements:
            removal[unit.name] = torch.tensor(elements[unit.name], dtype=torch.long)
        else:
            removal[unit.name] = ranking(module, unit)[: int(removed[unit.name])]
    refit = input_moments(module, units, samples, [s.name for s in inputs], moments) \
        if samples and mode == "structured" else None
    return remove_physically(module, example, units, removal, refit)


def moments_key(module: nn.Module) -> str:
    """The key under which a plan search lends the prune pass the refit's input moments it collected on the same
    weights (blocks dropped) and the same calibration samples."""
    return f"refit-moments:{model_hash(module)}"


# version 2: a plan's pruned model has the readers of removed channels refit on the calibration data (prune.refit)
@register_pass("prune", PruneConfig, version=2, needs_calibration=True,
               invalidates=("sensitivity", "quantize", "lowrank"))
class PrunePass:
    """Structured or sparse pruning under a budget (see PruneConfig); records the whole plan."""

    def __init__(self, config: PruneConfig):
        self.config = config

    def run(self, state: State, ctx: Context) -> State:
        if not any(isinstance(m, (nn.Conv2d, nn.Linear)) for m in state.module.modules()):
            raise ConfigError("pruning needs the Python module (state_dict + --arch, or a trusted pickle)",
                              "graph-only models (TorchScript, .pt2) have no layers to edit")
        if self.config.removed or self.config.blocks:  # a plan found before (deploy compress, deploy.toml)
            module = dropped(state.module, self.config.blocks) if self.config.blocks else state.module
            if self.config.removed:
                if self.config.refit and ctx.calibration is None:
                    raise ConfigError("the prune pass refits the layers reading removed channels on calibration "
                                      "data, and none was given", "give calibration data, or set refit = false")
                samples = list(ctx.calibration.calibration) if self.config.refit else None
                module = apply_removed(module, state.inputs, self.config.mode, self.config.removed, samples=samples,
                                       moments=ctx.prebuilt.get(moments_key(module)) if samples else None)
            state.module = module
            state.record(self.name, "decision", removed=dict(self.config.removed), mode=self.config.mode,
                         blocks=list(self.config.blocks))
            return state
        pruned, report = prune_model(state.module, state.inputs, ctx.calibration, state.target, self.config,
                                     ctx.cache_dir)
        state.record(self.name, "decision", **report.to_dict())
        for message in report.warnings:
            state.record(self.name, "warning", message=message)
        state.module = pruned
        return state
