"""Choose a rank per layer under a budget, apply the factorization, and optionally recover by distillation.

Ranks come from the shared allocator: each factorizable layer offers "keep" plus a grid of ranks, each priced by
its cost (parameters or MACs) and by the output distortion measured with only that layer factorised.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from deploy.compress.allocate import Option, Unit, allocate
from deploy.compress.distill import DistillConfig, distill
from deploy.compress.distill_loss import has_module
from deploy.core.metrics import first_tensor
from deploy.compress.lowrank.factor import (FactorizeConfig, factorizable, factorize, input_covariance, layer_cost,
                                     max_useful_rank, replace_module, round_rank)
from deploy.core.errors import ConfigError
from deploy.core.passes import Context, State, register_pass
from deploy.core.data import CalibrationSet


@dataclass(frozen=True)
class LowRankConfig:
    budget: float = 0.5  # fraction of the factorizable layers' cost to keep
    cost: Literal["params", "macs"] = "params"
    rank_fractions: tuple[float, ...] = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875)  # of the max useful rank
    factorize: FactorizeConfig = FactorizeConfig()
    recover: bool = True
    distill: DistillConfig = DistillConfig()
    skip: tuple[str, ...] = ()  # layer names never factorised (e.g. the classifier)
    calibration_batches: int = 4
    # A plan to apply as it is (layer -> rank, as `deploy compress` found it): factorize those layers, no search
    # and no recovery here (a recover pass follows in the plan).
    ranks: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0.0 < self.budget <= 1.0:
            raise ValueError(f"budget must be in (0, 1], got {self.budget}")
        if self.cost not in ("params", "macs"):
            raise ValueError(f"cost must be 'params' or 'macs', got {self.cost!r}")
        if not self.rank_fractions or any(not 0 < f <= 1 for f in self.rank_fractions):
            raise ValueError("rank_fractions must be non-empty, each in (0, 1]")


@dataclass
class LowRankPlan:
    ranks: dict[str, int]  # layer -> rank; layers absent are kept whole
    predicted_distortion: float
    cost_before: float
    cost_after: float
    curves: dict[str, list[dict[str, float]]] = field(default_factory=dict)


def candidate_layers(module: nn.Module, config: LowRankConfig) -> list[str]:
    mode = config.factorize.conv_mode
    return [n for n, m in module.named_modules() if n and n not in config.skip and factorizable(m, mode)]


def _collect_inputs(module: nn.Module, names: list[str], batches: list[tuple[torch.Tensor, ...]]
                    ) -> tuple[dict[str, list[torch.Tensor]], dict[str, int]]:
    """Each layer's inputs on the calibration batches, and its output positions per sample (for MACs)."""
    inputs: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    positions: dict[str, int] = {}
    handles = []
    for name in names:
        def hook(mod, args, out, name=name):
            inputs[name].append(args[0].detach())
            positions[name] = int(out[0].numel() // (out.shape[1] if isinstance(mod, nn.Conv2d) else out.shape[-1]))
        handles.append(module.get_submodule(name).register_forward_hook(hook))
    try:
        with torch.no_grad():
            for batch in batches:
                module(*batch)
    finally:
        for h in handles:
            h.remove()
    return inputs, positions


@dataclass
class RankCurves:
    """Every factorizable layer's rank options, each with its cost and measured output distortion (only that layer
    factorized), and the input covariances the activation-aware SVD whitens by. Measured once; any budget is then
    an allocation over them."""

    units: list[Unit]
    covs: dict[str, torch.Tensor | None]
    total_cost: float
    curves: dict[str, list[dict[str, float]]] = field(default_factory=dict)


def rank_curves(module: nn.Module, calibration: CalibrationSet, multiple: int, config: LowRankConfig) -> RankCurves:
    """Distortion curves per layer over the rank grid (rounded to the device's channel multiple)."""
    module = module.eval()
    names = candidate_layers(module, config)
    batches = calibration.leading("calibration", 16, config.calibration_batches)
    with torch.no_grad():
        reference = [first_tensor(module(*b)) for b in batches]
    acts, positions = _collect_inputs(module, names, batches)
    covs = {n: input_covariance(acts[n], module.get_submodule(n)) for n in names} \
        if config.factorize.activation_aware else {n: None for n in names}
    mode = config.factorize.conv_mode
    units, curves, total = [], {}, 0.0
    for name in names:
        layer = module.get_submodule(name)
        scale = positions.get(name, 1) if config.cost == "macs" else 1
        full = layer_cost(layer, None, mode) * scale
        total += full
        limit = max_useful_rank(layer, mode)
        ranks = sorted({round_rank(int(f * limit), multiple, limit) for f in config.rank_fractions})
        ranks = [r for r in ranks if layer_cost(layer, r, mode) < layer_cost(layer, None, mode)]
        options = [Option(float(full), 0.0, None)]
        curve = []
        for rank in ranks:
            distortion = _distortion(module, name, factorize(layer, rank, covs[name], config.factorize), batches,
                                     reference)
            cost = float(layer_cost(layer, rank, mode) * scale)
            options.append(Option(cost, distortion, rank))
            curve.append({"rank": rank, "cost": cost, "distortion": distortion})
        curves[name] = curve
        units.append(Unit(name, tuple(options)))
    return RankCurves(units, covs, total, curves)


def choose_ranks(curves: RankCurves, budget_fraction: float, unit: str = "cost") -> tuple[dict[str, int], Any]:
    """The least-distortion ranks whose cost is at most `budget_fraction` of the factorizable layers' cost."""
    allocation = allocate(curves.units, budget_fraction * curves.total_cost, fixed_cost=0.0, unit_name=f" {unit}")
    return {n: r for n, r in allocation.labels.items() if r is not None}, allocation


def plan_ranks(module: nn.Module, calibration: CalibrationSet, multiple: int, config: LowRankConfig
               ) -> tuple[LowRankPlan, dict]:
    """Distortion curves per layer, then the allocator's choice under the budget."""
    curves = rank_curves(module, calibration, multiple, config)
    ranks, allocation = choose_ranks(curves, config.budget, config.cost)
    plan = LowRankPlan(ranks, allocation.distortion, curves.total_cost, allocation.cost, curves.curves)
    return plan, curves.covs


def layer_covariances(module: nn.Module, calibration: CalibrationSet, names: list[str], config: LowRankConfig
                      ) -> dict[str, torch.Tensor | None]:
    """The input covariances of the named layers on the calibration batches (what a replay whitens by)."""
    if not config.factorize.activation_aware:
        return {n: None for n in names}
    batches = calibration.leading("calibration", 16, config.calibration_batches)
    acts, _ = _collect_inputs(module.eval(), names, batches)
    return {n: input_covariance(acts[n], module.get_submodule(n)) for n in names}


def _distortion(module: nn.Module, name: str, replacement: nn.Module, batches, reference) -> float:
    original = module.get_submodule(name)
    replace_module(module, name, replacement)
    try:
        with torch.no_grad():
            errors = [torch.mean((first_tensor(module(*b)) - r) ** 2).item() for b, r in zip(batches, reference)]
    finally:
        replace_module(module, name, original)
    return float(sum(errors) / len(errors))


def apply_ranks(module: nn.Module, ranks: dict[str, int], covs: dict[str, torch.Tensor | None],
                config: FactorizeConfig) -> nn.Module:
    """A factorised copy; the input module is left untouched."""
    result = copy.deepcopy(module)
    for name, rank in ranks.items():
        replace_module(result, name, factorize(result.get_submodule(name), rank, covs.get(name), config))
    return result.eval()


def lowrank_model(module: nn.Module, calibration: CalibrationSet, multiple: int, config: LowRankConfig = LowRankConfig(),
                  progress: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """The Python API: plan, factorise, recover. Returns the new module and a report dict."""
    plan, covs = plan_ranks(module, calibration, multiple, config)
    result = apply_ranks(module, plan.ranks, covs, config.factorize)
    report: dict[str, Any] = {"ranks": plan.ranks, "predicted_distortion": plan.predicted_distortion,
                              "cost_before": plan.cost_before, "cost_after": plan.cost_after, "cost": config.cost,
                              "curves": plan.curves}
    if config.recover and plan.ranks:
        outcome = distill(result, module, calibration, config.distill, progress=progress)
        report["recovery"] = outcome.__dict__
    return result, report


@register_pass("lowrank", LowRankConfig, needs_calibration=True, invalidates=("sensitivity",))
class LowRankPass:
    def __init__(self, config: LowRankConfig):
        self.config = config

    def run(self, state: State, ctx: Context) -> State:
        if self.config.ranks:  # a plan found before (deploy compress, deploy.toml): apply it as it is
            names = list(self.config.ranks)
            unknown = [n for n in names if not has_module(state.module, n)]
            if unknown:
                raise ConfigError(f"the low-rank plan names layers this model does not have ({', '.join(unknown[:3])})",
                                  "replay a plan with the model it was made for")
            covs = layer_covariances(state.module, ctx.calibration, names, self.config)
            state.module = apply_ranks(state.module, dict(self.config.ranks), covs, self.config.factorize)
            state.record(self.name, "decision", ranks=dict(self.config.ranks))
            return state
        module, report = lowrank_model(state.module, ctx.calibration, state.target.profile.width_step, self.config)
        state.module = module
        state.record(self.name, "decision", **report)
        return state

