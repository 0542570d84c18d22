"""`deploy search` as one library call: the latency-vs-fidelity Pareto front over (precision, pruning level),
every trial exported and measured on the target (hardware in the loop), in a resumable optuna study.

Precision is fp32, int8 (every layer at its fastest option) or mixed: the quantization allocator's least-distortion
plan at a point `mix` between the fastest and the float model's estimated latency (0 = fastest, 1 = float)."""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from deploy.compress.study import StudyConfig, TrialOutcome, run_study
from deploy.compiler.job import CompressRequest

SEED_LEVELS = (0.0, 0.25, 0.5, 0.75)


@dataclass(frozen=True)
class SearchRequest:
    compress: CompressRequest
    search: StudyConfig = StudyConfig()


class PlanSpace:
    """Precision x pruning level (x mix for mixed plans), or low rank (float, `level` = how much of the
    factorizable MACs it cuts); allocator solutions at several budgets seed the study. Both axes are asked for on
    first use: a resumed study with every trial done asks for neither, so no pruning or low-rank family is built."""

    def __init__(self, precisions: Callable[[], list[str]], can_prune: Callable[[], bool]):
        self._precisions, self._can_prune = precisions, can_prune

    @functools.cached_property
    def precisions(self) -> list[str]:
        return self._precisions()

    @functools.cached_property
    def can_prune(self) -> bool:
        return self._can_prune() or "lowrank" in self.precisions

    def suggest(self, trial: Any) -> dict[str, Any]:
        precision = trial.suggest_categorical("precision", self.precisions)
        level = trial.suggest_float("level", 0.0, 1.0) if self.can_prune else 0.0
        params = {"precision": precision, "level": round(level, 4)}
        if "mixed" in self.precisions:
            params["mix"] = round(trial.suggest_float("mix", 0.0, 1.0), 3)
        return params

    def seeds(self) -> list[dict[str, Any]]:
        levels = SEED_LEVELS if self.can_prune else (0.0,)
        extra = {"mix": 0.5} if "mixed" in self.precisions else {}
        return [{"precision": p, "level": lv, **extra} for p in self.precisions for lv in levels]


def _labels(planner: Any, params: dict[str, Any]) -> dict[str, str] | None:
    if params["precision"] == "fp32":
        return None
    if params["precision"] == "int8":  # every layer in low precision, even where this CPU runs fp32 faster
        return planner.low_precision()
    from deploy.compress.quant.search import allocator_plan

    sp = planner.quant(0.0).space
    fast, slow = sp.latency(planner.fastest()), sp.latency(sp.float_labels())
    return allocator_plan(sp, fast + float(params.get("mix", 0.5)) * (slow - fast))[0]


def search(request: SearchRequest, progress: Callable[..., None] | None = None) -> dict[str, Any]:
    """Run the study; input errors leave nothing behind (no OUT/ made for them, no OUT/.work), and a study in
    OUT that was made for another model or target is refused rather than mixed into one front."""
    import shutil

    from deploy.core.atomic_io import atomic_write_json, check_writable_file

    out = Path(request.compress.out)
    if out.exists() and not out.is_dir():
        from deploy.core.errors import UserInputError

        raise UserInputError(f"-o {out} is a file", "give the search a folder (it is created, or resumed)")
    check_writable_file(out / "study.db", "-o")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        summary = _run(request, out, progress)
    except BaseException:
        if created and not any((out / "trials").glob("[!.]*")):  # nothing of value yet: leave no trace
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(out / ".work", ignore_errors=True)
    from deploy.compiler.search_html import render_search_html, write_front_png
    from deploy.core.atomic_io import atomic_write_text

    atomic_write_json(out / "front.json", summary)
    write_front_png(summary, out / "front.png")
    atomic_write_text(out / "report.html", render_search_html(summary))
    return summary


def _run(request: SearchRequest, out: Path, progress: Callable[..., None] | None) -> dict[str, Any]:
    from deploy.compiler.job import _setup
    from deploy.core.model.load import layer_digest
    from deploy.compiler.candidates import Planner

    from deploy.compress.study import check_identity, open_study

    setup = _setup(request.compress, out / ".work")
    identity = {"model_sha256": setup.loaded.sha256, "layers_digest": layer_digest(setup.loaded.module),
                "target": setup.target.profile.name, "batch": str(request.compress.batch),
                "precisions": ",".join(request.compress.precisions), "prune": str(request.compress.prune),
                "lowrank": str(request.compress.lowrank)}
    check_identity(open_study(request.search, out), identity)  # before any measuring
    planner = Planner(request.compress, setup)
    planner.split = "held_out"  # each trial is scored for the person choosing from the front; nothing is tuned on it
    @functools.cache
    def time_once() -> None:
        """The dense model and the fastest precision plan (the price table's picks), timed once, before the first
        trial this run evaluates: a resumed study with every trial done measures nothing."""
        planner.time_against_dense()
        if planner.quantizes:
            planner.fastest()

    @functools.cache
    def lowrank() -> Any:
        return planner.lowrank_family() if "fp32" in request.compress.precisions else None

    def precisions() -> list[str]:
        names = (["fp32"] if "fp32" in request.compress.precisions else []) + \
            (["int8", "mixed"] if planner.quantizes else [])
        return names + (["lowrank"] if lowrank() is not None else [])

    def evaluate(params: dict[str, Any], folder: Path) -> TrialOutcome:
        time_once()  # in the run's own work folder, not the trial's
        setup.workdir = folder
        if params["precision"] == "lowrank":
            fraction = 1.0 - float(params["level"]) * (1.0 - lowrank().least_fraction())
            cand = planner.evaluate_ranks(lowrank().ranks(fraction), "search trial", fidelity=True)
        else:
            cand = planner.evaluate(float(params["level"]), _labels(planner, params), "search trial", fidelity=True)
        model = folder / "model.onnx"
        planner.file_of(cand).rename(model)
        details = {"removed": cand.removed, "ranks": cand.ranks, "size_mb": cand.size_mb, "band_ms": cand.band_ms}
        (folder / "trial.json").write_text(json.dumps({**params, **details, "latency_ms": cand.latency_ms,
                                                       "fidelity": cand.fidelity}, indent=2))
        return TrialOutcome(cand.latency_ms, cand.fidelity, str(folder), details)

    space = PlanSpace(precisions, lambda: planner.can_prune)
    summary = run_study(space, evaluate, out, request.search, progress, identity)
    summary["target"] = setup.target.profile.name
    summary["latency_source"] = "measured" if setup.target.measured else "predicted"
    summary.update(_labels_of(request.compress, setup))
    return summary


def _labels_of(request: CompressRequest, setup: Any) -> dict[str, Any]:
    """What the front is drawn against: the fidelity metric, and the budget or floor the request named."""
    from deploy.compiler.budget import DEFAULT_FLOORS, fidelity_floor
    from deploy.core.metrics import task_of

    task = task_of(setup.reference[0])
    floor = fidelity_floor(request.budget, task)
    return {"fidelity_metric": DEFAULT_FLOORS[task][0], "floor": floor[1] if floor else None,
            "budget_ms": request.budget.value if request.budget.kind == "latency_ms" else None}
