"""The candidates a plan search weighs: the pruning family (dense to most pruned), each candidate built, exported
in the target's Q/DQ policy, timed in the target's runtime interleaved with the dense model (or predicted with its
band) and, where the search needs it, scored on held-out data. `Planner` keeps every candidate for the report."""
from __future__ import annotations

import copy
import dataclasses
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from deploy.core.errors import BudgetInfeasibleError, UserInputError

CANDIDATE_BLOCKS = 3  # blocks per candidate-vs-dense comparison (each compiles both models afresh)


def pruning_family(setup: Any, enabled: bool = True) -> Any:
    """The model's pruning family, or None where nothing may be pruned (a graph model, or pruning off)."""
    if not (enabled and setup.loaded.structural):
        return None
    from deploy.compress.families import PruneFamily
    from deploy.core.cache import cache_dir

    return PruneFamily(setup.loaded.module, setup.loaded.inputs, setup.calibration, setup.target,
                       cache_dir() / "sensitivity")


def export_fp32(module: torch.nn.Module, setup: Any, path: Path) -> Path:
    from deploy.core.model.onnx_export import OnnxExportConfig, export_onnx

    return export_onnx(module, setup.loaded.inputs, path, OnnxExportConfig(output_names=("output",)))


def export_candidate(module: torch.nn.Module, setup: Any, labels: dict[str, str] | None, prep: Any, path: Path
                     ) -> Any:
    """Export in float (labels None) or with the labelled per-layer precisions and `prep`'s calibration, following
    the target's Q/DQ policy; returns the quantization plan (None for float)."""
    if labels is None:
        export_fp32(module, setup, path)
        return None
    from deploy.compress.families import export_labelled

    return export_labelled(prep, module, setup.loaded.inputs, labels, path)


def prepare_run(setup: Any, path: Path) -> Callable[[], object]:
    """One inference of the exported file in the target's runtime, ready to time."""
    from deploy.targets.measure.feeds import make_feeds
    return setup.target.runner().prepare(path, make_feeds(setup.measure_specs))


def latency(setup: Any, path: Path, seconds: float, module: torch.nn.Module | None = None, plan: Any = None,
            baseline: Path | None = None) -> dict[str, Any]:
    """p50 measured in the target's runtime here, or predicted (with its band) for a device not at hand.
    Measured against `baseline` (the dense model's file) when given, in the blocks of the final report
    (targets.measure.paired): a candidate's p50 is what the report will say (a small model timed alone keeps its
    weights in cache and looks faster than it does next to anything else), and its ratio to the dense model has
    an interval that covers a session's placement."""
    if not setup.target.measured:
        return predicted_latency(setup, path, module, plan)
    from deploy.targets.measure.loop import MeasureConfig, measure
    from deploy.targets.measure.paired import measure_blocks

    config = MeasureConfig(warmup_min_s=0.1, warmup_min_runs=5, min_samples=32, min_seconds=seconds,
                           max_seconds=max(10.0, seconds * 4), blocks=CANDIDATE_BLOCKS)
    if baseline is None:
        result = measure(prepare_run(setup, path), config).to_dict()
        return {"latency_ms": result["summary"]["p50"], "source": "measured", "measurement": result}
    _, candidate, comparison = measure_blocks(lambda: prepare_run(setup, baseline), lambda: prepare_run(setup, path),
                                              config)
    result = candidate.to_dict()
    ratio = comparison.to_dict()
    return {"latency_ms": result["summary"]["p50"], "source": "measured", "measurement": result,
            "ratio_to_dense": ratio["ratio"], "ratio_ci": [ratio["ci_low"], ratio["ci_high"]],
            "block_ratios": ratio["block_ratios"]}


def planned_ms(timing: dict[str, Any]) -> float:
    """The latency a plan is judged by: the measured p50, or for a device not at hand the upper end of the predicted
    band, so that "met" holds wherever in its band the device turns out to be."""
    if timing.get("source") == "predicted" and timing.get("band_ms"):
        return float(timing["band_ms"][1])
    return float(timing["latency_ms"])


def _point(timing: dict[str, Any]) -> float | None:
    return float(timing["latency_ms"]) if timing.get("source") == "predicted" else None


def predicted_latency(setup: Any, path: Path, module: torch.nn.Module | None, plan: Any) -> dict[str, Any]:
    """A Q/DQ file is priced from its float graph with each layer at its planned precision: Q/DQ nodes fuse away on
    the device, and the portable model reads layer shapes, not the device's kernels."""
    from deploy.targets.latency.prediction import predict_onnx

    if plan is None or module is None:
        return predict_onnx(path, setup.target, setup.measure_specs)
    from deploy.compress.families import precisions_of

    float_path = export_fp32(module, setup, setup.workdir / f"{path.stem}.float.onnx")
    return predict_onnx(path, setup.target, setup.measure_specs, float_path, precisions_of(plan))


def outputs_finite(setup: Any, path: Path) -> bool:
    """One held-out batch through the exported file in its runtime: are all outputs finite numbers?"""
    from deploy.targets.outputs import runtime_predictor

    run = runtime_predictor(setup.target, path, [s.name for s in setup.loaded.inputs])
    batch = setup.calibration.batches("held_out", 8)[0]
    return bool(torch.isfinite(run(batch)).all())


def fidelity_of(setup: Any, path: Path, split: str = "held_out") -> dict[str, Any]:
    """The exported file's fidelity on the held-out split (the report's number) or the validation split (what the
    search chooses by: choosing on held-out data would make the reported number optimistic)."""
    from deploy.compiler.evaluate import exported_fidelity

    reference = setup.validation_reference if split == "validation" else setup.reference
    return exported_fidelity(setup.loaded.module, path, setup.calibration, [s.name for s in setup.loaded.inputs],
                             setup.target, reference or None, split)


@dataclass
class Candidate:
    precision: str  # fp32 | int8 (every quantizable layer low precision) | mixed
    level: float  # 0 = dense, 1 = the most the pruning allocator may remove
    removed: dict[str, int]
    latency_ms: float  # what the planner plans on: the measured p50, or the upper end of a predicted band
    fidelity: float | None  # validation fidelity of the exported model (the planner's split); None until scored
    size_mb: float
    labels: dict[str, str] | None = None  # per-layer precision option; None: every layer in float
    band_ms: tuple[float, float] | None = None  # predicted latency's error band
    origin: str = ""
    chosen: bool = False
    ranks: dict[str, int] = dataclasses.field(default_factory=dict)  # low rank: layer -> rank (float layers)
    predicted_ms: float | None = None  # a predicted target's point estimate (latency_ms is its band's upper end)

    def row(self) -> dict[str, Any]:
        row = dataclasses.asdict(self)
        row.pop("labels")
        row["counts"] = dict(Counter(self.labels.values())) if self.labels else {"fp32": "all"}
        return row


def quant_config(request: Any, setup: Any) -> Any:
    """The quantization settings compress uses: the fast preset, the request's weight bits, the run's threads.
    int8 weights are per-channel only where the target has per-channel kernels: per-tensor runs no faster there
    and is less faithful, and each option costs a sensitivity pass per layer."""
    import dataclasses as dc

    from deploy.compress.quant.api import QuantizeConfig

    bits = tuple(b for b, p in ((8, "int8"), (4, "int4")) if p in request.precisions) or (8,)
    fast = QuantizeConfig.fast()
    grans = fast.space.granularities
    if "per-channel" in setup.target.profile.weight_granularities:
        grans = tuple(g for g in grans if g != "per-tensor")
    floats = ("fp32",) + tuple(p for p in ("fp16", "bf16") if p in request.precisions)
    return QuantizeConfig.fast(space=dc.replace(fast.space, weight_bits=bits, granularities=grans,
                                                float_precisions=floats))


class Planner:
    """Builds, exports and measures candidates; keeps every one for the report."""

    def __init__(self, request: Any, setup: Any):
        self.request, self.setup = request, setup
        self.candidates: list[Candidate] = []
        self._family: Any = None
        self._lowrank: Any = None
        self._modules: dict[float, torch.nn.Module] = {}
        self._quant: dict[float, Any] = {}
        self._preps: dict[float, Any] = {}  # calibrations of levels whose precision problem is not built
        self._fastest: dict[float, dict[str, str]] = {}
        self._baseline: Path | None = None  # the dense model's file, every candidate is timed against
        self.dense: Candidate | None = None
        self.note: Callable[..., None] = lambda *args, **kwargs: None  # progress: one call per candidate measured
        self.expected = 1  # how many candidates the search may measure at most (for N/M and the ETA)
        self.split = "validation"  # candidates are compared on validation data; the held-out split is the report's
        self.relative = getattr(getattr(request, "budget", None), "kind", None) == "speedup"  # plan on ratios
        allowed = set(setup.target.profile.precisions)
        self.quantizes = any(p in allowed and p in request.precisions for p in ("int8", "int4"))
        self.can_prune = request.prune and setup.loaded.structural
        if request.prune and not setup.loaded.structural:
            setup.warnings.append("pruning skipped: the model is a graph (TorchScript or .pt2); pruning needs the "
                                  "Python module (state_dict + --arch)")
        if "fp32" not in request.precisions and not self.quantizes:
            raise UserInputError(f"none of the precisions {', '.join(request.precisions)} runs on "
                                 f"{setup.target.profile.name}",
                                 f"use {', '.join(sorted(allowed | {'fp32'}))}")

    # --- the two knobs ----------------------------------------------------------------------------------------

    def family(self) -> Any:
        """The pruning family (built on first use), or None where the model cannot be pruned."""
        if self._family is None:
            self._family = pruning_family(self.setup, True) or False
        return self._family or None

    def lowrank_family(self) -> Any:
        """The low-rank family of the dense model (built on first use), or None where nothing may be factorized."""
        if self._lowrank is None:
            family = None
            if getattr(self.request, "lowrank", True) and self.setup.loaded.structural:
                from deploy.compress.families import LowRankFamily

                family = LowRankFamily(self.setup.loaded.module, self.setup.calibration, self.setup.target)
                family = None if family.empty else family
            self._lowrank = family or False
        return self._lowrank or None

    def evaluate_ranks(self, ranks: dict[str, int], origin: str, fidelity: bool = False) -> Candidate:
        """A low-rank candidate of the dense model, in float: exported, timed against the dense model, maybe
        scored."""
        module = self.lowrank_family().build(ranks)
        path = self._path(len(self.candidates))
        export_fp32(module, self.setup, path)
        timing = latency(self.setup, path, self.request.measure_seconds, module, None, self._baseline)
        value = None
        if fidelity:
            from deploy.core.metrics import primary_metric

            value = primary_metric(fidelity_of(self.setup, path, self.split))[1]
        candidate = Candidate("fp32", 0.0, {}, self._planned(timing), value, path.stat().st_size / 1e6, None,
                              timing.get("band_ms"), origin, ranks=dict(ranks), predicted_ms=_point(timing))
        return self._keep(candidate)

    def removed(self, level: float) -> dict[str, int]:
        family = self.family() if level > 0 else None
        return family.removed(level) if family is not None else {}

    def module(self, level: float) -> torch.nn.Module:
        if level not in self._modules:
            if len(self._modules) > 3:  # keep memory flat on big models
                self._modules.pop(next(k for k in self._modules if k != 0.0))
            self._modules[level] = (copy.deepcopy(self.setup.loaded.module).eval() if level <= 0
                                    else self.family().build(self.removed(level)))
        return self._modules[level]

    def prebuilt(self, decisions: dict[str, Any]) -> dict[str, Any]:
        """What the apply step may reuse: the calibrated precision problem of the chosen level, keyed by the
        weights it was calibrated on (a recovered model has other weights, so it calibrates afresh)."""
        level = float(decisions.get("level", 0.0))
        built = self.built_quant(level)
        if built is None:
            return {}
        from deploy.compress.quant.api import weights_key

        return {weights_key(self.module(level)): built.prep}

    def built_quant(self, level: float) -> Any | None:
        """The precision problem already built for `level`, if any."""
        return self._quant.get(level)

    def calibrated(self, level: float) -> Any:
        """The calibration of the model at `level` (its SmoothQuant factors fit its pruned layers), built alone
        where its precision problem is not (a size budget may export a level the search never priced)."""
        if level not in self._quant and level not in self._preps:
            from deploy.compress.families import calibrated
            self._preps[level] = calibrated(self.module(level), self.setup.loaded.inputs, self.setup.calibration,
                                            self.setup.target, quant_config(self.request, self.setup))
        return self._quant[level].prep if level in self._quant else self._preps[level]

    def quant(self, level: float) -> Any:
        """The precision problem (calibration, sensitivities, prices) of the model at `level`."""
        if level not in self._quant:
            from deploy.compress.families import precision_problem

            config = quant_config(self.request, self.setup)
            sibling = self.quant(0.0) if level > 0 else None  # a pruned model's prices: the dense one's, rescaled
            self._quant[level] = precision_problem(self.module(level), self.setup.loaded.inputs,
                                                   self.setup.calibration, self.setup.target, config,
                                                   prices_from=sibling)
        return self._quant[level]

    def time_against_dense(self) -> None:
        """Time every later candidate interleaved with the dense model (as the final report does)."""
        if self.setup.target.measured:
            self._baseline = export_fp32(self.setup.loaded.module, self.setup,
                                         self.setup.workdir / "dense-baseline.onnx")

    def fastest(self, level: float = 0.0) -> dict[str, str]:
        """The plan the price table estimates fastest: every layer at its fastest kernel, or every layer in low
        precision (int8 islands pay Q/DQ at both ends, so an all-int8 chain can beat a kernel-by-kernel pick), or
        the allocator's plan at the smaller of those two estimates."""
        if level in self._fastest:
            return self._fastest[level]
        from deploy.compress.quant.search import allocator_plan

        sp = self.quant(level).space
        kernel = sp.fastest()
        low = {n: min((o for o in opts if not o.is_float), default=opts[0],
                      key=lambda o: sp.table.kernel.get(n, {}).get(o.kernel_class, 0.0)).label
               for n, opts in sp.spaces.items()}
        if "fp32" not in self.request.precisions:  # float layers are not allowed: every layer low precision
            self._fastest[level] = low
            return low
        plans = [kernel, low]
        try:
            plans.append(allocator_plan(sp, min(sp.latency(kernel), sp.latency(low)))[0])
        except BudgetInfeasibleError:
            pass
        self._fastest[level] = min(plans, key=sp.latency)
        return self._fastest[level]

    def smallest(self) -> dict[str, str]:
        """Every layer at its fewest weight bits (a size budget's plan: how fast a kernel runs does not matter)."""
        sp = self.quant(0.0).space
        return {n: min(opts, key=lambda o: (o.weight_bits, o.is_float)).label for n, opts in sp.spaces.items()}

    def layer_prices(self, choice: Candidate) -> dict[str, float]:
        """Each low-precision layer's estimated change of latency from its precision (the measured price table of
        the chosen pruning level; < 0 is faster): the report's per-layer view."""
        problem = self.built_quant(choice.level)
        if problem is None or not choice.labels:
            return {}
        sp = problem.space
        return {name: sp.table.kernel.get(name, {}).get(option.kernel_class, 0.0)
                for name, option in sp.options(choice.labels).items() if not option.is_float}

    # --- one candidate ------------------------------------------------------------------------------------------

    def evaluate(self, level: float, labels: dict[str, str] | None, origin: str, fidelity: bool = False
                 ) -> Candidate:
        module = self.module(level)
        path = self._path(len(self.candidates))
        prep = self.calibrated(level) if labels is not None else None
        plan = export_candidate(module, self.setup, labels, prep, path)
        if not outputs_finite(self.setup, path):  # rejected: it can never be chosen, whatever the budget
            candidate = Candidate(_precision_name(labels, prep), round(level, 4), self.removed(level), math.inf,
                                  0.0, math.inf, labels, None, f"{origin} (rejected: NaN or infinite outputs)")
            return self._keep(candidate)
        timing = latency(self.setup, path, self.request.measure_seconds, module, plan, self._baseline)
        value = None
        if fidelity:
            from deploy.core.metrics import primary_metric

            value = primary_metric(fidelity_of(self.setup, path, self.split))[1]
        candidate = Candidate(_precision_name(labels, prep), round(level, 4), self.removed(level),
                              self._planned(timing), value, path.stat().st_size / 1e6, labels,
                              timing.get("band_ms"), origin, predicted_ms=_point(timing))
        return self._keep(candidate)

    def _planned(self, timing: dict[str, Any]) -> float:
        """The latency a candidate is planned on. For a speed-up budget: its interleaved ratio to the dense model
        times the dense model's p50, so that a dense measurement that came out slow or fast (a shared machine in
        its first seconds) scales the target and every candidate alike; else the measured p50 (or a band's top)."""
        if self.relative and self.dense is not None and timing.get("ratio_to_dense"):
            return float(timing["ratio_to_dense"]) * self.dense.latency_ms
        return planned_ms(timing)

    def _keep(self, candidate: Candidate) -> Candidate:
        self.candidates.append(candidate)
        done = len(self.candidates)
        self.expected = max(self.expected, done + 1)
        last = f"last {candidate.latency_ms:.3g} ms ({candidate.origin})" if math.isfinite(candidate.latency_ms) \
            else f"last rejected ({candidate.origin})"
        self.note("measuring candidates", 0.1 + 0.5 * done / self.expected, done, self.expected, last)
        return candidate

    def score_all(self) -> None:
        """Held-out fidelity for every candidate not yet scored, so the report can plot what the search measured."""
        for index, candidate in enumerate(self.candidates):
            if candidate.fidelity is None and math.isfinite(candidate.latency_ms):
                self.note("scoring candidates", 0.6, index + 1, len(self.candidates))
                self.with_fidelity(candidate)

    def with_fidelity(self, candidate: Candidate) -> Candidate:
        if candidate.fidelity is None:
            from deploy.core.metrics import primary_metric

            index = next(i for i, c in enumerate(self.candidates) if c is candidate)
            candidate.fidelity = primary_metric(fidelity_of(self.setup, self._path(index), self.split))[1]
        return candidate

    def _path(self, index: int) -> Path:
        return self.setup.workdir / f"candidate-{index}.onnx"


def _precision_name(labels: dict[str, str] | None, prep: Any) -> str:
    if labels is None:
        return "fp32"
    from deploy.compress.families import options_of

    options = options_of(prep.spaces, labels).values()
    low = [o for o in options if not o.is_float]
    if not low:
        return "fp32"
    kinds = {o.precision for o in low}
    return kinds.pop() if len(low) == len(options) and len(kinds) == 1 else "mixed"


def problem_summary(problem: Any) -> dict[str, Any]:
    """A precision problem in the report: its size, its cost model, where its time went, its latency range."""
    sp = problem.space
    return {"layers": len(sp.spaces), "cost_model": sp.table.source, "seconds": problem.seconds,
            "estimated_float_ms": sp.latency(sp.float_labels()), "estimated_fastest_ms": sp.latency(sp.fastest())}
