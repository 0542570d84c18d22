"""The pruning problem of one model: its legal units, their element rankings, distortion curves and option
costs, built once so that the DP, the baselines and the additivity check all choose from the same facts."""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import torch
from torch import nn

from deploy.compress.allocate import DEFAULT_STEPS, MAX_STEPS, MIN_STEPS
from deploy.compress.prune.cost import CostModel, CountedCost, MeasuredLatency, OptionCosts, Plan, median_ms
from deploy.compress.prune.edit import Masker, remove_physically
from deploy.compress.prune.refit import InputMoments, readers
from deploy.compress.prune.trace import CallTrace, PrefixReuse, SkipPlan, unit_plans
from deploy.compress.prune.units import PruneUnit, UnitConfig, find_units
from deploy.compress.prune.sensitivity import (Curves, OutputProbe, ProbeData, distortion_curves, measured_counts, ranking,
                                         removal_for)
from deploy.core.errors import BudgetInfeasibleError, ConfigError
from deploy.core.spec import InputSpec
from deploy.profiles import Profile
from deploy.targets.target import Target, as_target


class NothingToPruneError(ConfigError):
    """The model has no unit pruning can remove (a recurrent model, or only layers that produce its outputs)."""


@dataclass(frozen=True)
class PruneConfig:
    """mode: structured (channels, FFN neurons, heads), unstructured (per-layer magnitude) or 2:4 (targets that
    run it). method: dp (the paper), or the baselines uniform / global. budget: a fraction of the unpruned
    model's cost (budget_is_fraction) or an absolute number of params, MACs or milliseconds."""

    mode: Literal["structured", "unstructured", "2:4"] = "structured"
    method: Literal["dp", "uniform", "global"] = "dp"
    budget_kind: Literal["params", "macs", "latency"] = "macs"
    budget: float = 0.5
    budget_is_fraction: bool = True
    grid_step: float = 0.05
    grid_max: float = 0.9
    importance: Literal["l2"] = "l2"
    samples: int = 64  # calibration samples the distortion curves are measured on (at most; see probe_macs)
    batch_size: int = 16
    # Measuring the curves: `curve_points` non-zero counts per unit, spaced geometrically (0: every legal count),
    # the rest interpolated; and at most `probe_macs` of estimated work (MACs, plus a MAC-equivalent for each
    # element a layer writes) for all curve passes together, which lowers the samples (never below
    # MIN_PROBE_SAMPLES) on models whose forward pass is large (0: always `samples`).
    curve_points: int = 7
    probe_macs: float = 6e11
    latency_threads: int = 1
    dp_steps: int = DEFAULT_STEPS
    # A plan to apply as it is (unit -> elements removed, as `deploy compress` found it): no search, no curves.
    removed: dict[str, int] = field(default_factory=dict)
    # Whole blocks dropped before `removed` applies (prune.depth; names as in the unpruned model).
    blocks: tuple[str, ...] = ()
    # Structured mode: refit the linear layers that read removed channels to their unpruned outputs on the
    # calibration data (prune.refit), in the curves the allocator plans on and in the pruned model.
    refit: bool = True

    def __post_init__(self) -> None:
        if not (self.budget > 0 and math.isfinite(self.budget)):
            raise ValueError(f"budget must be a positive number, got {self.budget}")
        if self.budget_is_fraction and self.budget > 1.0:
            raise ValueError(f"a fractional budget must be at most 1, got {self.budget}")
        if not 0.0 < self.grid_step <= 0.5:
            raise ValueError(f"grid_step must be in (0, 0.5], got {self.grid_step}")
        if not 0.0 < self.grid_max < 1.0:
            raise ValueError(f"grid_max must be in (0, 1), got {self.grid_max}")
        if self.samples < 1 or self.batch_size < 1 or self.latency_threads < 1:
            raise ValueError("samples, batch_size and latency_threads must be at least 1")
        if self.curve_points < 0 or self.curve_points == 1:
            raise ValueError(f"curve_points must be 0 (every count) or at least 2, got {self.curve_points}")
        if not (self.probe_macs >= 0 and math.isfinite(self.probe_macs)):
            raise ValueError(f"probe_macs must be a finite number >= 0, got {self.probe_macs}")
        if not MIN_STEPS <= self.dp_steps <= MAX_STEPS:
            raise ValueError(f"dp_steps must be between {MIN_STEPS} and {MAX_STEPS}, got {self.dp_steps}")
        if self.budget_kind == "latency" and self.mode != "structured":
            raise ValueError(f"{self.mode} sparsity does not speed up dense kernels here: budget it in params or macs")
        if self.method == "global" and self.mode == "2:4":
            raise ValueError("2:4 has no global variant: use method dp or uniform")

    @property
    def grid(self) -> tuple[float, ...]:
        steps = int(math.floor(self.grid_max / self.grid_step + 1e-9))
        return tuple(round(i * self.grid_step, 6) for i in range(steps + 1))


@dataclass
class PruneProblem:
    """Everything plans are chosen from. Built once; plans, baselines and checks reuse it."""

    module: nn.Module
    inputs: list[InputSpec]
    example: tuple[torch.Tensor, ...]
    config: PruneConfig
    channel_multiple: int
    units: list[PruneUnit]
    rankings: dict[str, torch.Tensor]
    curves: Curves
    probe: OutputProbe
    cost: CostModel
    costs: OptionCosts
    seconds: dict[str, float] = field(default_factory=dict)
    refit: InputMoments | None = None

    def removal(self, removed: Plan) -> dict[str, torch.Tensor]:
        return removal_for(self.rankings, dict(removed))

    def build(self, removed: Plan) -> nn.Module:
        """The physically pruned copy for a plan."""
        return remove_physically(self.module, self.example, self.units, self.removal(removed), self.refit)

    def masked_distortion(self, removed: Plan) -> float:
        """Measured distortion of a whole plan, by masking (equal to the physically pruned model's)."""
        with Masker(self.module, self.units, self.refit).applied(self.removal(removed)):
            return self.probe.distortion()

    def budget(self, value: float, is_fraction: bool) -> float:
        return value * self.costs.base if is_fraction else value

    def max_plan(self) -> dict[str, int]:
        return {u.name: max(u.options) for u in self.units}


def build_problem(module: nn.Module, inputs: Sequence[InputSpec], samples: Sequence[tuple[torch.Tensor, ...]],
                  target: Target | Profile, config: PruneConfig, cache_dir: Path | None = None,
                  cost: CostModel | None = None) -> PruneProblem:
    """Find the legal units, rank their elements, measure (or load) the distortion curves and price the options.

    `cost` overrides the config's cost model (e.g. a latency predictor); otherwise params/MACs are counted and
    latency is measured in the target's runtime on this machine (at `config.latency_threads`).
    """
    module = module.eval()
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(0)
    example = tuple(spec.example({"batch": 2}, gen) for spec in inputs)
    target = as_target(target)
    profile = target.profile
    multiple = int(profile.width_step)
    try:
        unit_config = UnitConfig(config.mode, multiple, config.grid, profile.sparse_2_4)
    except ValueError as exc:
        raise ConfigError(f"{exc} ({profile.name})", "use mode structured or unstructured") from None
    if cost is None and config.budget_kind == "latency":
        _check_measurable(target)
    units = find_units(module, example, unit_config)
    if not units:
        raise NothingToPruneError(f"found nothing to prune in {config.mode} mode",
                                  "the model has no prunable conv/linear groups or attention heads")
    rankings = {u.name: ranking(module, u, config.importance) for u in units}
    names = [s.name for s in inputs]
    trace = CallTrace.record(module, ProbeData.from_samples(samples, names, 1, 1).batches[0])
    plans = unit_plans(module, trace, units)
    timings["units"] = time.perf_counter() - t0
    count = probe_samples(trace, plans, units, config)
    data = ProbeData.from_samples(samples, names, count, config.batch_size)
    probe = OutputProbe(module, data)
    reuse = PrefixReuse(module, trace, plans, data.batches)
    t_refit = time.perf_counter()
    refit = input_moments(module, units, samples, names) if config.refit and config.mode == "structured" else None
    timings["refit"] = time.perf_counter() - t_refit
    curves = distortion_curves(probe, units, config.importance, cache_dir, config.curve_points, reuse, refit)
    timings["curves"] = curves.seconds
    problem = PruneProblem(module, list(inputs), example, config, multiple, units, rankings, curves, probe,
                           cost=None, costs=None, seconds=timings, refit=refit)  # type: ignore[arg-type]
    t1 = time.perf_counter()
    problem.cost = cost or default_cost(problem, target)
    problem.costs = OptionCosts.measure(problem.cost, units)
    timings["costs"] = time.perf_counter() - t1
    return problem


def input_moments(module: nn.Module, units: Sequence[PruneUnit], samples: Sequence[tuple[torch.Tensor, ...]],
                  names: Sequence[str], lent: InputMoments | None = None) -> InputMoments | None:
    """The refit's input moments for the linear layers `units` read from; None where there are none. `lent`:
    moments collected before on the same module and samples (the plan search's), used where they cover every
    such layer (a layer's moments do not depend on which others were collected beside it)."""
    layers = readers(module, units)
    if not layers:
        return None
    if lent is not None and all(name in lent.moments for name in layers):
        return InputMoments({name: lent.moments[name] for name in layers})
    return InputMoments.collect(module, layers, samples, names)


MIN_PROBE_SAMPLES = 2


def probe_samples(trace: CallTrace, plans: dict[str, SkipPlan], units: Sequence[PruneUnit],
                  config: PruneConfig) -> int:
    """Calibration samples for the curves: `config.samples`, fewer when measuring every curve point on that many
    would exceed `config.probe_macs` of work (a pass per point, from the unit's first layer on, plus the
    reference pass)."""
    if config.probe_macs <= 0:
        return config.samples
    total = trace.work * trace.batch
    per_sample = trace.work
    for unit in units:
        points = len(measured_counts(unit.options, config.curve_points)) - 1
        saved = plans[unit.name].saved_work / total if total > 0 else 0.0
        per_sample += points * trace.work * (1.0 - saved)
    if per_sample <= 0:
        return config.samples
    return min(config.samples, max(MIN_PROBE_SAMPLES, int(config.probe_macs // per_sample)))


def default_cost(problem: PruneProblem, target: Target) -> CostModel:
    kind = problem.config.budget_kind
    if kind in ("params", "macs"):
        return CountedCost(kind, problem.module, problem.inputs, problem.units)
    timing = dataclasses.replace(target, threads=problem.config.latency_threads)
    return MeasuredLatency(problem.build, problem.inputs, median_ms(timing, problem.inputs))


def _check_measurable(target: Target) -> None:
    if not target.measured:
        raise ConfigError(f"a latency budget needs {target.name} at hand to measure on",
                          "budget in macs, or run on the target")


def check_reachable(problem: PruneProblem, budget: float) -> None:
    least = problem.cost.of_plan(problem.max_plan())
    if least > budget:
        unit = problem.cost.unit
        raise BudgetInfeasibleError(f"the budget {budget:.4g}{unit} is below the least achievable cost {least:.4g}"
                                    f"{unit} (every unit pruned to the grid's maximum)",
                                    f"raise the budget to at least {least:.4g}{unit}", least_achievable=least)
