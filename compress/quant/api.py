"""Mixed-precision quantization from an elastic space, searched under a latency budget: the `quantize` pass and
its Python API.

    quantized, report = quantize_model(module, inputs, calibration, target, QuantizeConfig(budget=0.7))
    quantized.export(inputs, "out/model.onnx")

Phases (DESIGN 3.2): prepare + calibrate (prepare: fold BN, per-tensor ranges, SmoothQuant), sensitivity
(sensitivity: QuantNAS noise per layer and option), price (cost: measured on the real runtime, or a
labelled roofline proxy), then the allocator's plan for the budget (search.allocator_plan), applied. The plan
meets the budget on the cost model's estimate (`deploy compress` calls the same allocator and steers the estimate
onto measured latency). Nothing here imports a runtime at module level.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import torch
from torch import nn

from deploy.compress.distill import DistillConfig
from deploy.export.qdq.plan import QuantPlan
from deploy.compress.quant.prepare import CalibrationConfig
from deploy.compress.quant.space import SpaceConfig
from deploy.core.errors import ConfigError
from deploy.core.passes import Context, State, register_pass
from deploy.core.spec import InputSpec
from deploy.core.data import CalibrationSet
from deploy.profiles import Profile
from deploy.targets.target import Target, as_target


# Tried per tensor besides no smoothing. Measured on MiniLM (benchmarks/int8_fidelity.py, 1,000 held-out
# docstrings): one alpha of 0.5 for every tensor lowered the pooled cosine (0.9916 -> 0.9853); this per-tensor
# choice raised it to 0.9975. A grid reaching 0.98 did worse on 300 (0.9968 vs 0.9974): the layer-output error it
# ranks by is a local proxy.
SMOOTH_ALPHAS = (0.25, 0.5, 0.75, 0.85, 0.95)


@dataclass(frozen=True)
class QuantizeConfig:
    budget: float = 0.75  # latency budget as a fraction of the float model's (estimated) latency
    budget_ms: float = 0.0  # an absolute budget in ms; > 0 overrides `budget`
    cost: Literal["auto", "measured", "proxy"] = "auto"  # auto: measured where the target runs on this machine
    price_seconds: float = 0.4  # per A/B timing when pricing options on the real runtime
    space: SpaceConfig = SpaceConfig()
    calibration: CalibrationConfig = CalibrationConfig()
    sensitivity: Literal["noise", "quant"] = "noise"  # QuantNAS noise injection, or hard fake quantization
    noise_draws: int = 2
    sensitivity_batches: int = 2
    sensitivity_samples: int = 0  # samples per sensitivity batch; 0: the calibration batch size
    cache: bool = True  # reuse sensitivities from deploy.core.cache.cache_dir() / "sensitivity" when nothing changed
    skip: tuple[str, ...] = ()  # layers never quantized
    recover: bool = False  # distill through the fake quantization afterwards
    distill: DistillConfig = DistillConfig()
    # A plan to apply as it is (layer -> option label, as `deploy compress` found it): calibrate, no search.
    labels: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0.05 <= self.budget <= 2.0:
            raise ValueError(f"budget must be a fraction of the float latency in [0.05, 2], got {self.budget}")
        if self.budget_ms < 0:
            raise ValueError(f"budget_ms must be >= 0, got {self.budget_ms}")
        if self.cost not in ("auto", "measured", "proxy"):
            raise ValueError(f"cost must be auto, measured or proxy, got {self.cost!r}")
        if self.sensitivity not in ("noise", "quant"):
            raise ValueError(f"sensitivity must be noise or quant, got {self.sensitivity!r}")
        if self.sensitivity_samples < 0:
            raise ValueError(f"sensitivity_samples must be >= 0, got {self.sensitivity_samples}")
        if self.noise_draws < 1 or self.sensitivity_batches < 1 or self.price_seconds <= 0:
            raise ValueError("noise_draws and sensitivity_batches must be >= 1, price_seconds > 0")

    @classmethod
    def fast(cls, **overrides: Any) -> "QuantizeConfig":
        """The preset for `deploy compress` and other interactive use (about 5x faster to build than the default
        on a BERT-small encoder): sensitivities from one batch of 4 samples and one noise draw; activation ranges
        from up to 256 calibration samples (min-max, mean of per-sample min-max or MSE per tensor, probes of 8; 16
        samples left MiniLM's pooled cosine 0.006 below NNCF's on 256), SmoothQuant with the alpha chosen per
        tensor (no smoothing among the choices), int8 weights rounded by GPTQ (all-MiniLM-L6-v2's pooled cosine
        0.9975 -> 0.9985, NNCF's 0.9980), bias correction on 64 samples; int4 offered in one form (group
        128, asymmetric) instead of four; 0.15 s per pricing A/B. `overrides` replace any field, e.g.
        `QuantizeConfig.fast(budget=0.6)`."""
        fields = dict(
            price_seconds=0.15, noise_draws=1, sensitivity_batches=1, sensitivity_samples=4,
            space=SpaceConfig(group_sizes=(128,), int4_symmetric=(False,)),
            calibration=CalibrationConfig(methods=("minmax", "mean_minmax", "mse"), batches=16, batch_size=16,
                                          probe_samples=8, smoothquant=True, smooth_alphas=SMOOTH_ALPHAS,
                                          bias_samples=64, gptq=True))
        fields.update(overrides)
        return cls(**fields)


@dataclass
class QuantizedModel:
    """The fake-quantized torch model (computes what the exported model computes), its plan, and the float model
    it was calibrated on (BatchNorm folded)."""

    module: nn.Module
    plan: QuantPlan
    float_module: nn.Module

    def export(self, inputs: Sequence[InputSpec], path: Any, policy: Any = None) -> Any:
        from deploy.export.qdq.writer import export_quantized

        from deploy.compress.quant.fold import unwrap

        return export_quantized(self.plan, unwrap(self.module), inputs, path, policy)


def _cost_model(config: QuantizeConfig, target: Target, has_graph: bool) -> Any:
    from deploy.compress.quant.cost import MeasuredCost, ProxyCost

    local = target.measured and target.runtime in ("onnxruntime", "openvino")
    if config.cost == "measured" or (config.cost == "auto" and local and has_graph):
        return MeasuredCost(min_seconds=config.price_seconds)
    return ProxyCost()


@dataclass
class QuantProblem:
    """Everything that does not depend on the budget: the calibrated plan, the sensitivities, the price table.
    Solve it for several budgets without repeating the slow part (`solve_budget`)."""

    prep: Any  # prepare.Prepared
    space: Any  # search.SearchSpace
    batches: list  # the sensitivity / candidate-evaluation batches
    reference: list  # the float model's outputs on them
    seconds: dict[str, float]


def build_problem(module: nn.Module, inputs: Sequence[InputSpec], calibration: CalibrationSet, target: Target | Profile,
                  config: QuantizeConfig = QuantizeConfig(), prices_from: QuantProblem | None = None
                  ) -> QuantProblem:
    """Prepare and calibrate, measure every layer's sensitivity to every option, price the options.
    `prices_from`: a sibling problem (the same network before channel pruning) whose price table is rescaled to
    this model's layer sizes instead of timing every option again; callers that steer on measured latency (deploy
    compress) correct what the rescaling misses."""
    target = as_target(target)
    from deploy.compress.quant.cost import PricingInput, boundaries_for
    from deploy.compress.quant.prepare import prepare
    from deploy.compress.quant.search import SearchSpace
    from deploy.compress.quant.sensitivity import run

    clock = _Clock()
    prep = prepare(module, inputs, calibration, target, config.space, config.calibration, config.skip)
    clock.lap("prepare")
    if prep.graph is None:
        raise ValueError("quantization needs the model's ONNX graph: " + "; ".join(prep.notes))
    size = config.sensitivity_samples or config.calibration.batch_size
    batches = calibration.leading("calibration", size, config.sensitivity_batches)
    reference = run(prep.folded, batches)
    sens = _cached_sensitivity(prep, batches, reference, config)
    clock.lap("sensitivity")
    if prices_from is not None:
        table = _rescaled_table(prices_from, prep)
    else:
        cost = _cost_model(config, target, prep.graph is not None)
        table = cost.price(PricingInput(prep.float_onnx, prep.graph, prep.plan, prep.spaces, list(inputs), target))
    clock.lap("price")
    space = SearchSpace(prep.spaces, sens, table, boundaries_for(prep.graph, prep.plan))
    return QuantProblem(prep, space, batches, reference, clock.laps)


def _rescaled_table(sibling: QuantProblem, prep: Any) -> Any:
    """The sibling's price table with each layer's kernel deltas scaled by its MAC ratio (channel pruning keeps the
    spatial size, so in x out features is the ratio) and the base by the whole model's; Q/DQ on a tensor scale with
    the layer that produces or reads it."""
    from dataclasses import replace

    old = {s.name: s.in_features * s.out_features for s in sibling.prep.shapes}
    new = {s.name: s.in_features * s.out_features for s in prep.shapes}
    ratio = {n: new[n] / old[n] for n in new if old.get(n)}
    total = sum(new.values()) / max(1, sum(old[n] for n in new if n in old))
    table = sibling.space.table
    kernel = {n: {k: v * ratio.get(n, total) for k, v in deltas.items()} for n, deltas in table.kernel.items()}
    readers = prep.graph.input_groups() if prep.graph is not None else {}
    boundary = {}
    for tensor, ms in table.boundary.items():
        layers = readers.get(tensor) or [prep.graph.producer(tensor)] if prep.graph is not None else []
        scales = [ratio[n] ** 0.5 for n in layers if n in ratio]  # a tensor's size: one side of the layer
        boundary[tensor] = ms * (sum(scales) / len(scales) if scales else total ** 0.5)
    note = f"rescaled from the unpruned model's {table.source} prices by each layer's MAC ratio"
    return replace(table, base_ms=table.base_ms * total, kernel=kernel, boundary=boundary,
                   source=f"{table.source}+rescaled", notes=[*table.notes, note])


def solve_budget(problem: QuantProblem, calibration: CalibrationSet, config: QuantizeConfig
                 ) -> tuple[QuantizedModel, dict[str, Any]]:
    """The allocator's plan for `config`'s budget, applied to the problem's one fake-quantized model (solving again
    for another budget re-points it); the report says how the plan was found and how additive its distortion was."""
    from deploy.compress.quant.apply import tied_labels
    from deploy.compress.quant.search import allocator_plan
    from deploy.compress.quant.sensitivity import plan_distortion
    from deploy.compress.quant.sim import set_mode, set_options

    prep, sp = problem.prep, problem.space
    clock = _Clock()
    budget_ms = config.budget_ms or config.budget * sp.latency(sp.float_labels())
    labels, alloc, how = allocator_plan(sp, budget_ms)
    estimated_ms = sp.latency(labels)
    clock.lap("search")
    simulated = plan_distortion(prep.qmodel, sp.options(labels), problem.batches, problem.reference)
    options = sp.options(tied_labels(prep, labels))
    plan = prep.plan.with_options(options)
    set_options(prep.qmodel, options)
    set_mode(prep.qmodel, "quant")
    prep.qmodel.quant_plan = plan
    sens, table = sp.sensitivity, sp.table
    report = {
        "policy": plan.policy, "float_precision": plan.float_precision, "cost_model": table.source,
        "budget_ms": budget_ms, "labels": plan.labels(), "counts": dict(Counter(plan.labels().values())),
        "spaces": {n: [o.label for o in opts] for n, opts in prep.spaces.items()},
        "calibration": prep.calibration, "sensitivity": sens, "price_table": table.to_dict(),
        "allocation": {"how": how, "dp_cost_ms": alloc.cost, "dp_distortion": alloc.distortion,
                       "estimated_ms": estimated_ms},
        "chosen": {"labels": labels, "latency_ms": estimated_ms, "origin": "allocator", "distortion": simulated},
        "additivity": {"predicted": sp.distortion(labels), "simulated": simulated},
        "notes": prep.notes + table.notes, "plan": plan.to_dict(), "seconds": {**problem.seconds, **clock.laps},
    }
    if config.recover and any(not o.is_float for o in options.values()):
        from dataclasses import replace

        from deploy.compress.distill import distill
        from deploy.compress.quant.gptq import install_rounded

        install_rounded(prep.qmodel, {})  # training moves the weights off GPTQ's grid: export rounds them anew
        plan = replace(plan, rounded={})
        prep.qmodel.quant_plan = plan

        report["recovery"] = distill(prep.qmodel, prep.folded, calibration, config.distill).__dict__
    return QuantizedModel(prep.qmodel, plan, prep.folded), report


def quantize_model(module: nn.Module, inputs: Sequence[InputSpec], calibration: CalibrationSet, target: Target | Profile,
                   config: QuantizeConfig = QuantizeConfig()) -> tuple[QuantizedModel, dict[str, Any]]:
    """Plan and apply mixed precision for `target` under the budget; returns the quantized model and a JSON-able
    report."""
    target = as_target(target)
    problem = build_problem(module, inputs, calibration, target, config)
    return solve_budget(problem, calibration, config)


SENSITIVITY_CACHE_VERSION = 2  # 2: GPTQ-rounded weights are part of the plan


def sensitivity_key(prep: Any, batches: Sequence[tuple], config: QuantizeConfig) -> str:
    """Everything the per-layer sensitivities depend on: the folded weights, the calibrated plan (activation
    ranges, SmoothQuant factors, policy, bias corrections), each layer's options and simulation flags, the exact
    batch bytes, the probe (noise or quant) and its draws."""
    import hashlib
    import json

    from deploy.compress.prune.sensitivity import model_hash
    from deploy.compress.quant.gptq import fingerprint as gptq_fingerprint

    digest = hashlib.sha256()
    for batch in batches:
        for t in batch:
            digest.update(f"{tuple(t.shape)}:{t.dtype}".encode())
            digest.update(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    signature = {"version": SENSITIVITY_CACHE_VERSION, "model": model_hash(prep.folded), "data": digest.hexdigest(),
                 "plan": prep.plan.to_dict(), "spaces": {n: [o.to_dict() for o in opts] for n, opts in prep.spaces.items()},
                 "flags": {n: repr(f) for n, f in prep.flags.items()}, "mode": config.sensitivity,
                 "draws": config.noise_draws, "bias_shifts": prep.plan.shifts,
                 "rounded": gptq_fingerprint(prep.plan.rounded)}
    return hashlib.sha256(json.dumps(signature, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _cached_sensitivity(prep: Any, batches: Sequence[tuple], reference: list, config: QuantizeConfig
                        ) -> dict[str, dict[str, float]]:
    """option_distortions, read from / written to the on-disk cache (like the pruning curves) when allowed."""
    import json
    from pathlib import Path

    from deploy.compress.quant.sensitivity import option_distortions

    path = None
    if config.cache:
        from deploy.core.cache import cache_dir

        path = Path(cache_dir()) / "sensitivity" / f"quant-{sensitivity_key(prep, batches, config)}.json"
        if path.exists():
            try:
                data = json.loads(path.read_text())
                if set(data) == set(prep.spaces):
                    return {n: {k: float(v) for k, v in d.items()} for n, d in data.items()}
            except (ValueError, TypeError, AttributeError):
                pass  # a damaged entry is recomputed
    sens = option_distortions(prep.qmodel, prep.spaces, batches, reference, config.sensitivity, config.noise_draws)
    if path is not None:
        from deploy.core.atomic_io import atomic_write_text

        atomic_write_text(path, json.dumps(sens))
    return sens


class _Clock:
    """Wall seconds per phase, for the report (where a long run spent its time)."""

    def __init__(self) -> None:
        import time

        self._time = time.perf_counter
        self._last = self._time()
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = self._time()
        self.laps[name] = round(now - self._last, 2)
        self._last = now


# version 2: no `search` / `measure_finalists` fields (the NSGA-II refinement was removed); version 1 entries refused
@register_pass("quantize", QuantizeConfig, version=2, needs_calibration=True, invalidates=("sensitivity",))
class QuantizePass:
    """Quantizes the module: with `labels`, calibrates and applies that per-layer plan (afresh, with its own
    settings: a plan search's calibrations round to nearest, the plan applied by GPTQ); without, searches a plan
    under the budget.
    Afterwards `state.module` is the float model the plan was calibrated on (BatchNorm folded, any recovered
    weights) and `state.attached["quant_plan"]` the plan the export pass writes as Q/DQ."""

    def __init__(self, config: QuantizeConfig):
        self.config = config

    def run(self, state: State, ctx: Context) -> State:
        from deploy.compress.quant.fold import unwrap

        if self.config.labels:
            from deploy.compress.quant.apply import plan_for, refused_labels
            from deploy.compress.quant.prepare import prepare

            prep = prepare(state.module, state.inputs, ctx.calibration, state.target, self.config.space,
                           self.config.calibration, self.config.skip)
            unknown = sorted(set(self.config.labels) - set(prep.spaces))
            if unknown:
                raise ConfigError(f"the precision plan names layers this model does not have "
                                  f"({', '.join(unknown[:3])}{' ...' if len(unknown) > 3 else ''})",
                                  "replay a plan with the model it was made for")
            foreign = refused_labels(prep, self.config.labels, state.target.profile)
            if foreign:
                name, label = foreign[0]
                offered = ", ".join(o.label for o in prep.spaces[name])
                raise ConfigError(f"the precision plan asks for {label}, which this target does not run for layer "
                                  f"{name} (its options there: {offered})",
                                  "re-plan without --plan (a plan made before its profile changed names old options)")
            plan = plan_for(prep, self.config.labels)
            state.module, state.attached["quant_plan"] = prep.folded, plan
            state.record(self.name, "decision", policy=plan.policy, float_precision=plan.float_precision,
                         labels=plan.labels(), counts=dict(Counter(plan.labels().values())), notes=list(prep.notes))
            return state
        quantized, report = quantize_model(state.module, state.inputs, ctx.calibration, state.target, self.config)
        state.module, state.attached["quant_plan"] = unwrap(quantized.module), quantized.plan
        ctx.stats[self.name] = {"plan": quantized.plan}
        state.record(self.name, "decision", **report)
        return state
