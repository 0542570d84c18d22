"""The compiler's view of the passes' search spaces: the pruning family of a model (dense at level 0, the most the
DP allocator may remove at level 1), a precision problem (calibration, sensitivities, prices), and a candidate
written with a per-layer precision plan. The plan search (deploy.compiler) weighs candidates through these and
never reaches into a pass's internals; what it decides becomes pass configs.
"""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any, Sequence

import torch

from deploy.core.data import CalibrationSet
from deploy.core.spec import InputSpec
from deploy.targets.target import Target

Labels = dict[str, str]


class PruneFamily:
    """Models from one pruning problem: `removed(level)` is the plan at a level in [0, 1] (0 dense, 1 the most the
    problem allows, the same model for either allocation), `build(removed)` the physically pruned copy.
    allocation "dp": the DP over measured, additive distortion curves; "uniform": one ratio for every unit
    (`uniform`), which a short recovery may bring back further where the curves, measured one unit at a time
    before recovery, stop predicting (heavily pruned CNNs)."""

    def __init__(self, module: torch.nn.Module, inputs: Sequence[InputSpec], calibration: CalibrationSet,
                 target: Target, cache_dir: Path | None = None):
        from deploy.compress.prune.api import PruneConfig, build_problem

        self.module = module
        self.allocation = "dp"
        self.problem = build_problem(module, inputs, list(calibration.calibration), target,
                                     PruneConfig(budget_kind="macs", samples=64), cache_dir)

    def uniform(self) -> "PruneFamily":
        """The same problem with one ratio for every unit (level x the grid's largest ratio), graded between the
        units' legal options so that the cost follows the level (`graded_uniform_plan`)."""
        view = copy.copy(self)
        view.allocation = "uniform"
        return view

    def removed(self, level: float) -> dict[str, int]:
        if level <= 0:
            return {}
        if self.allocation == "uniform":
            from deploy.compress.prune.baselines import graded_uniform_plan

            return graded_uniform_plan(self.problem, min(level, 1.0) * max(self.problem.config.grid))
        from deploy.compress.prune.api import plan_dp

        least = self.problem.cost.of_plan(self.problem.max_plan())
        base = self.problem.costs.base
        return plan_dp(self.problem, least + (base - least) * (1.0 - min(level, 1.0)))

    def build(self, removed: dict[str, int]) -> torch.nn.Module:
        if not removed:
            return copy.deepcopy(self.module).eval()
        return self.problem.build(removed).eval()

    def lent(self) -> dict[str, Any]:
        """What the prune pass that applies a plan of this family may reuse (`Context.prebuilt`): the refit's
        input moments, collected on the same weights and calibration samples."""
        if self.problem.refit is None:
            return {}
        from deploy.compress.prune.api import moments_key

        return {moments_key(self.module): self.problem.refit}


def precision_problem(module: torch.nn.Module, inputs: Sequence[InputSpec], calibration: CalibrationSet,
                      target: Target, config: Any, prices_from: Any = None) -> Any:
    """The quantize pass's problem for `module`: calibration, per-layer sensitivities and prices (quant.api)."""
    from deploy.compress.quant.api import build_problem

    return build_problem(module, inputs, calibration, target, config, prices_from=prices_from)


def calibrated(module: torch.nn.Module, inputs: Sequence[InputSpec], calibration: CalibrationSet, target: Target,
               config: Any) -> Any:
    """The quantize pass's calibration of `module` alone (no sensitivities, no prices)."""
    from deploy.compress.quant.prepare import prepare

    return prepare(module, inputs, calibration, target, config.space, config.calibration, config.skip)


def recover(student: torch.nn.Module, teacher: torch.nn.Module, calibration: CalibrationSet, config: Any) -> Any:
    """Distil `student` in place towards `teacher` (the recover pass's training); returns what it did."""
    from deploy.compress.distill import distill

    return distill(student, teacher, calibration, config)


def problem_summary(problem: Any) -> dict[str, Any]:
    """A precision problem in the report: its size, its cost model, where its time went, its latency range."""
    sp = problem.space
    return {"layers": len(sp.spaces), "cost_model": sp.table.source, "seconds": problem.seconds,
            "estimated_float_ms": sp.latency(sp.float_labels()), "estimated_fastest_ms": sp.latency(sp.fastest())}


def options_of(spaces: dict[str, tuple[Any, ...]], labels: Labels) -> dict[str, Any]:
    """Each layer's option for `labels` (a layer not named keeps its float option)."""
    from deploy.compress.quant.apply import options_for

    return options_for(spaces, labels)


def export_labelled(prep: Any, module: torch.nn.Module, inputs: Sequence[InputSpec], labels: Labels,
                    path: Path) -> Any:
    """Write `module` with the labelled precisions and `prep`'s calibration in the target's Q/DQ policy, as ONNX only
    (a candidate is timed and scored from it; OpenVINO IR is written for the plan applied): returns the plan
    written. The IR took about 2% of all-MiniLM-L6-v2's plan search."""
    from deploy.compress.quant.apply import plan_for
    from deploy.export.qdq.policy import policy_for
    from deploy.export.qdq.writer import export_quantized

    plan = plan_for(prep, labels)
    export_quantized(plan, module, inputs, path, dataclasses.replace(policy_for(plan.policy), openvino_ir=False))
    return plan


def precisions_of(plan: Any) -> dict[str, str]:
    """{layer: precision, '*': rest}: how the latency model prices a plan for a device not at hand."""
    from deploy.compress.quant.apply import precision_map

    return precision_map(plan)


class LowRankFamily:
    """Factorized models of one network: per layer a rank grid (rounded to the device's channel multiple), each
    option priced in MACs and by its measured output distortion; `ranks(fraction)` the least-distortion ranks
    keeping that fraction of the factorizable layers' MACs, `build(ranks)` the factorized copy."""

    def __init__(self, module: torch.nn.Module, calibration: CalibrationSet, target: Target):
        from deploy.compress.lowrank.api import LowRankConfig, rank_curves

        self.module = module
        self.config = LowRankConfig(cost="macs")
        self.curves = rank_curves(module, calibration, target.profile.width_step, self.config)

    @property
    def empty(self) -> bool:
        """No layer has a rank that saves anything."""
        return all(len(unit.options) <= 1 for unit in self.curves.units)

    def least_fraction(self) -> float:
        """The smallest MAC fraction the rank grid reaches."""
        least = sum(min(o.cost for o in unit.options) for unit in self.curves.units)
        return least / self.curves.total_cost if self.curves.total_cost else 1.0

    def ranks(self, fraction: float) -> dict[str, int]:
        from deploy.compress.lowrank.api import choose_ranks

        return choose_ranks(self.curves, min(1.0, max(fraction, self.least_fraction())), "macs")[0]

    def distortion(self, ranks: dict[str, int]) -> float:
        """The curves' additive distortion of a set of ranks."""
        total = 0.0
        for unit in self.curves.units:
            if unit.name in ranks:
                total += next(o.distortion for o in unit.options if o.label == ranks[unit.name])
        return total

    def build(self, ranks: dict[str, int]) -> torch.nn.Module:
        from deploy.compress.lowrank.api import apply_ranks

        if not ranks:
            return copy.deepcopy(self.module).eval()
        return apply_ranks(self.module, ranks, self.curves.covs, self.config.factorize)
