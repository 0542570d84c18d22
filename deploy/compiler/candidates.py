"""The candidates a plan search weighs: the pruning family (dense to most pruned), depth mixes (blocks dropped,
each with its own pruning family), each candidate built and handed to `candidate_files` to be exported, timed and
scored. `Planner` keeps every candidate for the report."""
from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path
from typing import Any, Callable

import torch

from deploy.compiler.candidate import Candidate, precision_word, structure_label, structure_of
from deploy.compiler.candidate_files import (export_candidate, export_fp32, fidelity_of, latency, outputs_finite,
                                             planned_ms, point_ms)
from deploy.compiler.quant_settings import quant_config
from deploy.compiler.search_clock import SearchClock
from deploy.core.errors import BudgetInfeasibleError, UserInputError


def pruning_family(setup: Any, warn: bool = True) -> Any:
    """The pruning family, or None where nothing may be pruned: a graph model, or nothing pruning can remove (a
    recurrent model; only output layers), which a warning names when `warn` (the user's model, not a depth mix)."""
    if not setup.loaded.structural:
        return None
    from deploy.compress.families import PruneFamily
    from deploy.compress.prune.problem import NothingToPruneError
    from deploy.core.cache import cache_dir

    try:
        return PruneFamily(setup.loaded.module, setup.loaded.inputs, setup.calibration, setup.target,
                           cache_dir() / "sensitivity")
    except NothingToPruneError as exc:
        if warn:
            setup.warnings.append(f"pruning found nothing to remove: {exc.hint}")
        return None


class Planner:
    """Builds, exports and measures candidates; keeps every one for the report. A depth mix or the uniform
    allocation (`mix`) is a planner of its own over the model with some blocks dropped and its own pruning family,
    sharing this one's candidates, dense model and timing."""

    def __init__(self, request: Any, setup: Any, parent: "Planner | None" = None, blocks: tuple[str, ...] = (),
                 allocation: str = "dp"):
        self.request, self.setup = request, setup
        self.parent, self.blocks, self.allocation = parent, blocks, allocation
        self._mixes: dict[tuple[tuple[str, ...], str], Planner] = {}
        self._drop_order: list[tuple[str, float]] | None = None
        self.candidates: list[Candidate] = parent.candidates if parent else []
        self._family: Any = None
        self._lowrank: Any = None
        self._modules: dict[float, torch.nn.Module] = {}
        self._removed: dict[float, dict[str, int]] = {}
        self._quant: dict[float, Any] = {}
        self._preps: dict[float, Any] = {}  # calibrations of levels whose precision problem is not built
        self._fastest: dict[float, list[Candidate]] = {}
        self._baseline: Path | None = None  # the dense model's file, every candidate is timed against
        self.dense: Candidate | None = None
        self.note: Callable[..., None] = lambda *args, **kwargs: None  # progress: one call per candidate measured
        self.expected = 1  # how many candidates the search may measure at most (for N/M and the ETA)
        self.split = "validation"  # candidates are compared on validation data; the held-out split is the report's
        # on ratios to the dense model where the budget is not in ms: drift between measurements cancels out
        budget = getattr(request, "budget", None)
        self.relative = budget is not None and (budget.kind == "speedup" or budget.is_fidelity_floor)
        allowed = set(setup.target.profile.precisions)
        self.quantizes = any(p in allowed and p in request.precisions for p in ("int8", "int4"))
        # short recoveries where the plan is recovered; the search's time limit (`search` sets the request's)
        self.trials, self.clock = (parent.trials, parent.clock) if parent else (None, SearchClock())
        if parent is not None:
            self._baseline, self.dense, self.note, self.expected = parent._baseline, parent.dense, parent.note, 1
            return
        if request.prune and not setup.loaded.structural:
            setup.warnings.append("pruning skipped: the model is a graph (TorchScript or .pt2); pruning needs the "
                                  "Python module (state_dict + --arch)")
        if "fp32" not in request.precisions and not self.quantizes:
            raise UserInputError(f"none of the precisions {', '.join(request.precisions)} runs on "
                                 f"{setup.target.profile.name}",
                                 f"use {', '.join(sorted(allowed | {'fp32'}))}")

    # --- the two knobs ----------------------------------------------------------------------------------------

    @property
    def can_prune(self) -> bool:
        """Pruning is on and the pruning family (built on this first ask) exists: the model is a Python module in
        which pruning found something to remove."""
        return bool(self.request.prune and self.family() is not None)

    def family(self) -> Any:
        """The pruning family (built on first use), or None where the model cannot be pruned; the uniform
        allocation's is a view of the same problem as the DP's."""
        if self._family is None:
            if self.allocation == "uniform":
                dp = self._twin().family()
                self._family = dp.uniform() if dp is not None else False
            else:
                self._family = pruning_family(self.setup, warn=not self.blocks) or False
        return self._family or None

    def _twin(self) -> "Planner | None":
        """The DP allocation's planner of the same blocks, if this is another allocation's."""
        return self.mix(self.blocks) if self.allocation != "dp" else None

    def _shares(self, level: float) -> bool:
        """Whether this planner's model at `level` is its twin's (dense; the most pruning where both allocations
        remove the same), so that its module and calibration are built once."""
        if self._twin() is None or 0 < level < 1:
            return False
        return level <= 0 or self.removed(level) == self._twin().removed(level)

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
        """A low-rank candidate of the dense model in float: exported, timed against it; scored with `fidelity`."""
        module = self.lowrank_family().build(ranks)
        path = self._path(len(self.candidates))
        export_fp32(module, self.setup, path)
        timing = latency(self.setup, path, self.request.measure_seconds, module, None, self._baseline)
        candidate = Candidate("fp32", 0.0, {}, self.planned(timing), None, path.stat().st_size / 1e6, None,
                              timing.get("band_ms"), origin, ranks=dict(ranks), predicted_ms=point_ms(timing),
                              blocks=self.blocks)
        candidate = self._keep(candidate)
        return self.with_fidelity(candidate) if fidelity else candidate

    def removed(self, level: float) -> dict[str, int]:
        """The units removed at `level` (the family's plan, solved once per level)."""
        if level not in self._removed:
            family = self.family() if level > 0 else None
            self._removed[level] = family.removed(level) if family is not None else {}
        return dict(self._removed[level])

    def module(self, level: float) -> torch.nn.Module:
        if self._shares(level):
            return self._twin().module(level)
        if level not in self._modules:
            if len(self._modules) > 3:  # keep memory flat on big models
                self._modules.pop(next(k for k in self._modules if k != 0.0))
            self._modules[level] = (copy.deepcopy(self.setup.loaded.module).eval() if level <= 0
                                    else self.family().build(self.removed(level)))
        return self._modules[level]

    def prebuilt(self, decisions: dict[str, Any]) -> dict[str, Any]:
        """What the apply step may reuse, keyed by the weights it was made on: the pruning family's refit moments.
        Not the search's calibrations: they round to nearest (`quant_config`), the plan applied by GPTQ."""
        owner, level = self.mix(*structure_of(decisions)), float(decisions.get("level", 0.0))
        family = owner.family() if level > 0 else None
        return family.lent() if family is not None else {}

    # --- depth mixes ------------------------------------------------------------------------------------------

    def drop_order(self) -> list[tuple[str, float]]:
        """The droppable blocks in the order depth pruning drops them (greedy least output change on calibration
        data), at most half of them (rounded up); empty where the model has none or pruning is off."""
        if self._drop_order is None:
            self._drop_order = []
            if self.can_prune and getattr(self.request, "depth", True) and self.parent is None:
                from deploy.compress.prune.depth import drop_order, droppable_blocks

                module = self.setup.loaded.module
                batches = self.setup.calibration.leading("calibration", 8, 4)
                blocks = droppable_blocks(module, batches[0])
                self._drop_order = drop_order(module, blocks, batches, (len(blocks) + 1) // 2)
        return self._drop_order

    def mix(self, blocks: tuple[str, ...], allocation: str = "dp") -> "Planner":
        """The planner of the model with `blocks` dropped and pruned by `allocation` (the root for none and the
        DP's); every planner asks the root, which keeps them."""
        if self.parent is not None:
            return self.parent.mix(blocks, allocation)
        if not blocks and allocation == "dp":
            return self
        key = (tuple(blocks), allocation)
        if key not in self._mixes:
            setup = self.setup
            if blocks:
                from deploy.compress.prune.depth import dropped

                setup = copy.copy(self.setup)
                setup.loaded = dataclasses.replace(self.setup.loaded,
                                                   module=dropped(self.setup.loaded.module, blocks))
            self._mixes[key] = Planner(self.request, setup, self, tuple(blocks), allocation)
        return self._mixes[key]

    def owner(self, candidate: Candidate) -> "Planner":
        return self.mix(candidate.blocks, candidate.allocation)

    def problems(self) -> dict[str, Any]:
        """Every precision problem built, by level (a depth mix's with its blocks dropped: "N blocks, level")."""
        from deploy.compress.families import problem_summary

        out = {str(level): problem_summary(p) for level, p in self._quant.items()}
        for (blocks, allocation), sub in self._mixes.items():
            label = structure_label(blocks, allocation)
            out.update({f"{label}, {level}": problem_summary(p) for level, p in sub._quant.items()})
        return out

    def built_quant(self, level: float) -> Any | None:
        """The precision problem already built for `level`, if any."""
        if self._shares(level):
            return self._twin().built_quant(level)
        return self._quant.get(level)

    def calibrated(self, level: float) -> Any:
        """The calibration of the model at `level` (its SmoothQuant factors fit its pruned layers), built alone
        where its precision problem is not (a size budget may export a level the search never priced)."""
        if self._shares(level):
            return self._twin().calibrated(level)
        if level not in self._quant and level not in self._preps:
            from deploy.compress.families import calibrated
            # a pruned level a latency budget's search times, judged after its trial recovery: `quant_config`'s
            # `timing` (a floor or a size budget judges the level's own fidelity)
            # (a depth mix's every level: it is recovered whatever its width pruning)
            timing = (level > 0 or bool(self.blocks)) and self.trials is not None \
                and self.request.budget.kind in ("latency_ms", "speedup")
            self._preps[level] = calibrated(self.module(level), self.setup.loaded.inputs, self.setup.calibration,
                                            self.setup.target, quant_config(self.request, self.setup, True, timing))
        return self._quant[level].prep if level in self._quant else self._preps[level]

    def quant(self, level: float) -> Any:
        """The precision problem (calibration, sensitivities, prices) of the model at `level`."""
        if self._shares(level):
            return self._twin().quant(level)
        if level not in self._quant:
            from deploy.compress.families import precision_problem

            config = quant_config(self.request, self.setup, search=True)
            # a pruned model's prices: the dense one's, rescaled (a depth mix's: the whole model's)
            sibling = self.quant(0.0) if level > 0 else (self.parent.quant(0.0) if self.parent else None)
            self._quant[level] = precision_problem(self.module(level), self.setup.loaded.inputs,
                                                   self.setup.calibration, self.setup.target, config,
                                                   prices_from=sibling)
        return self._quant[level]

    def time_against_dense(self) -> None:
        """Time every later candidate interleaved with the dense model (as the final report does)."""
        if self.setup.target.measured:
            self._baseline = export_fp32(self.setup.loaded.module, self.setup,
                                         self.setup.workdir / "dense-baseline.onnx")

    def fastest(self, level: float = 0.0) -> dict[str, str]:  # the labels of `fastest_candidate`
        return self.fastest_candidate(level).labels or {}

    def fastest_candidate(self, level: float = 0.0) -> Candidate:
        """The fastest precision plan of the model at `level`, by measurement: every layer at its fastest kernel
        by the price table, every layer in low precision, and the allocator's plan at the smaller of those two
        estimates, each exported and timed (the distinct ones). The table prices each layer's kernel alone; on
        OpenVINO an all-int8 chain runs faster than the sum of its parts (quantization fuses into the producing
        convolution), so on a ResNet the table's pick (19 of 21 convs in bf16) measured 0.90 ms where all-int8
        measured 0.70 ms."""
        return self.fastest_measured(level)[0]

    def fastest_measured(self, level: float = 0.0) -> list[Candidate]:
        """The distinct picks for the fastest plan (`fastest_plans`), each measured once, fastest first; a depth
        mix's: the dense model's fastest measured plan on the layers it keeps (`_as_dense`)."""
        if self._shares(level):
            return self._twin().fastest_measured(level)
        if level not in self._fastest:
            plans = self.fastest_plans(level) if self.parent is None or level > 0 else \
                [("the dense model's fastest precisions", self._as_dense())]
            self._fastest[level] = sorted((self.evaluate(level, labels, origin) for origin, labels in plans),
                                          key=lambda c: c.latency_ms)
        return self._fastest[level]

    def _as_dense(self) -> dict[str, str]:
        """The root's fastest measured precisions on this mix's layers (names survive a block dropped): a mix's
        own picks cost a precision problem of its model and three exports each, about 30 s a mix on
        all-MiniLM-L6-v2, to pick per layer what the dense model's measurement already picked."""
        dense = self.parent.fastest()
        spaces = self.calibrated(0.0).spaces
        return {name: dense[name] if dense.get(name) in {o.label for o in opts}
                else next((o for o in opts if not o.is_float), opts[0]).label for name, opts in spaces.items()}

    def low_precision(self, level: float = 0.0) -> dict[str, str]:
        """Every layer in its fastest low-precision option by the price table (search's "int8" trial)."""
        sp = self.quant(level).space
        return {n: min((o for o in opts if not o.is_float), default=opts[0],
                       key=lambda o: sp.table.kernel.get(n, {}).get(o.kernel_class, 0.0)).label
                for n, opts in sp.spaces.items()}

    def fastest_plans(self, level: float) -> list[tuple[str, dict[str, str]]]:
        """The picks `fastest_measured` times: all low precision, the table's fastest kernels, the allocator's."""
        from deploy.compress.quant.search import allocator_plan

        sp, low = self.quant(level).space, self.low_precision(level)
        kernel = sp.fastest()
        prefix = "dense, " if level <= 0 else ""
        plans = [(f"{prefix}every layer in low precision", low)]
        if "fp32" in self.request.precisions:  # else float layers are not allowed: every layer low precision
            plans.append((f"{prefix}fastest kernel per layer (price table)", kernel))
            try:
                plans.append((f"{prefix}precision allocator at the fastest estimate",
                              allocator_plan(sp, min(sp.latency(kernel), sp.latency(low)))[0]))
            except BudgetInfeasibleError:
                pass
        distinct: list[tuple[str, dict[str, str]]] = []
        for origin, labels in plans:
            if all(labels != seen for _, seen in distinct):
                distinct.append((origin, labels))
        return distinct

    def smallest(self) -> dict[str, str]:
        """Every layer at its fewest weight bits (a size budget's plan: how fast a kernel runs does not matter)."""
        sp = self.quant(0.0).space
        return {n: min(opts, key=lambda o: (o.weight_bits, o.is_float)).label for n, opts in sp.spaces.items()}

    def layer_prices(self, choice: Candidate) -> dict[str, float]:
        """Each low-precision layer's estimated change of latency from its precision (the measured price table of
        the chosen pruning level; < 0 is faster): the report's per-layer view."""
        problem = self.owner(choice).built_quant(choice.level)
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
            candidate = Candidate(precision_word(labels, prep), round(level, 4), self.removed(level), math.inf,
                                  0.0, math.inf, labels, None, f"{origin} (rejected: NaN or infinite outputs)",
                                  blocks=self.blocks, allocation=self.allocation)
            return self._keep(candidate)
        timing = latency(self.setup, path, self.request.measure_seconds, module, plan, self._baseline)
        candidate = Candidate(precision_word(labels, prep), round(level, 4), self.removed(level),
                              self.planned(timing), None, path.stat().st_size / 1e6, labels,
                              timing.get("band_ms"), origin, predicted_ms=point_ms(timing), blocks=self.blocks,
                              allocation=self.allocation)
        candidate = self._keep(candidate)
        return self.with_fidelity(candidate) if fidelity else candidate

    def remeasured(self, candidate: Candidate, config: Any, decided: Any = None) -> dict[str, Any]:
        """`candidate`'s file timed again against the dense model, measured as `config` and `decided` say."""
        return latency(self.setup, self.file_of(candidate), self.request.measure_seconds, baseline=self._baseline,
                       config=config, decided=decided)

    def planned(self, timing: dict[str, Any]) -> float:
        """The latency a candidate is planned on. For a speed-up budget or a floor: its interleaved ratio to the
        dense model times the dense model's p50, so that a dense measurement that came out slow or fast (a shared
        machine in its first seconds) scales the target and every candidate alike, and a floor's fastest is the
        lowest ratio, not the p50 of a quiet spell; else the measured p50 (or a band's top)."""
        if self.relative and self.dense is not None and timing.get("ratio_to_dense"):
            return float(timing["ratio_to_dense"]) * self.dense.latency_ms
        return planned_ms(timing)

    def _keep(self, candidate: Candidate) -> Candidate:
        if self.parent is not None:
            return self.parent._keep(candidate)
        label = structure_label(candidate.blocks, candidate.allocation)
        if label:
            candidate.origin = f"{label}, {candidate.origin}"
        self.candidates.append(candidate)
        done = len(self.candidates)
        self.expected = max(self.expected, done + 1)
        last = f"last {candidate.latency_ms:.3g} ms ({candidate.origin})" if math.isfinite(candidate.latency_ms) \
            else f"last rejected ({candidate.origin})"
        self.note("measuring candidates", 0.1 + 0.5 * done / self.expected, done, self.expected, last)
        return candidate

    def score_all(self, limited: bool = True) -> None:
        """Validation fidelity for every candidate not yet scored, so the report can plot what the search measured;
        `limited`: not past the search's time limit (the choice has scored the candidates it compared)."""
        pending = [c for c in self.candidates if c.fidelity is None and math.isfinite(c.latency_ms)]
        if not pending or (limited and self.clock.out_of_time("the validation score of every candidate (report)")):
            return
        for index, candidate in enumerate(pending):
            self.note("scoring candidates", 0.6, index + 1, len(pending))
            self.with_fidelity(candidate)

    def with_fidelity(self, candidate: Candidate) -> Candidate:
        if candidate.fidelity is None:
            from deploy.core.metrics import primary_metric

            result = fidelity_of(self.setup, self.file_of(candidate), self.split)
            candidate.fidelity = primary_metric(result)[1]
            candidate.sqnr_db = float(result["sqnr_db"]) if result.get("sqnr_db") is not None else None
        return candidate

    def file_of(self, candidate: Candidate) -> Path:
        """`candidate`'s exported model, named by its place in `candidates`."""
        return self._path(next(i for i, c in enumerate(self.candidates) if c is candidate))

    def _path(self, index: int) -> Path:
        return self.setup.workdir / f"candidate-{index}.onnx"
