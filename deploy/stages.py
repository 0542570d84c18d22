"""The stages behind `deploy compress`: price and pick a plan (search_plan), apply it (run_plan), and write the
report (build_result). Kept apart from job.py so each reads in one sitting."""
from __future__ import annotations

import copy
import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable

import torch

from deploy.budget import fidelity_floor, latency_target_ms
from deploy.errors import BudgetInfeasibleError, ConfigError, UserInputError

BISECTION_STEPS = 6
LATENCY_FILL = 0.85


# --- pricing one candidate ----------------------------------------------------------------------------------------

class Family:
    """Models from one pruning problem: level 0 is dense, level 1 the most the allocator may remove."""

    def __init__(self, setup: Any, enabled: bool):
        self.setup = setup
        self.problem = None
        if enabled and setup.loaded.structural:
            from deploy.compress.prune import PruneConfig, build_problem
            from deploy.cache import cache_dir

            samples = list(setup.calibration.calibration)
            self.problem = build_problem(setup.loaded.module, setup.loaded.inputs, samples,
                                         setup.resolved.profile, PruneConfig(budget_kind="macs", samples=64),
                                         cache_dir() / "sensitivity")
        elif enabled:
            setup.warnings.append("pruning skipped: the model is a graph (TorchScript or .pt2); pruning needs the "
                                  "Python module (state_dict + --arch)")

    def removed(self, level: float) -> dict[str, int]:
        if self.problem is None or level <= 0:
            return {}
        from deploy.compress.prune import plan_dp

        least = self.problem.cost.of_plan(self.problem.max_plan())
        base = self.problem.costs.base
        return plan_dp(self.problem, least + (base - least) * (1.0 - min(level, 1.0)))

    def build(self, removed: dict[str, int]) -> torch.nn.Module:
        if not removed:
            return copy.deepcopy(self.setup.loaded.module).eval()
        return self.problem.build(removed).eval()


def export_model(module: torch.nn.Module, setup: Any, precision: str, path: Path) -> Path:
    """Export in `precision` following the target's Q/DQ policy; returns the ONNX path."""
    from deploy.export.onnx import OnnxExportConfig, export_onnx

    names = ("output",)
    if precision == "fp32":
        return export_onnx(module, setup.loaded.inputs, path, OnnxExportConfig(output_names=names))
    from deploy.quantize_export import quantize_for_target

    return quantize_for_target(module, setup, precision, path)


def latency(setup: Any, path: Path, seconds: float, module: torch.nn.Module | None = None) -> dict[str, Any]:
    """p50 measured in the target's runtime here, or predicted (with its band) for a device not at hand."""
    if not setup.local:
        return _predicted(setup, path, module)
    from deploy.targets.feeds import make_feeds
    from deploy.targets.measure import MeasureConfig, measure
    from deploy.targets.runner import get_runner

    specs = [dataclasses.replace(s, shape=s.concrete_shape()) for s in setup.loaded.inputs]
    runner = get_runner(setup.runtime, setup.threads, None, setup.resolved.profile)
    run_once = runner.prepare(path, make_feeds(specs))
    config = MeasureConfig(warmup_min_s=0.1, warmup_min_runs=5, min_samples=32, min_seconds=seconds,
                           max_seconds=max(10.0, seconds * 4))
    result = measure(run_once, config).to_dict()
    return {"latency_ms": result["summary"]["p50"], "source": "measured", "measurement": result}


def _predicted(setup: Any, path: Path, module: torch.nn.Module | None) -> dict[str, Any]:
    """A Q/DQ file is priced from its float graph at int8: Q/DQ nodes fuse away on the device."""
    from deploy.latency_prediction import predict_onnx

    float_path = None
    if module is not None and path.name != "dense.onnx":
        float_path = export_model(module, setup, "fp32", setup.workdir / f"{path.stem}.float.onnx")
    return predict_onnx(path, setup, float_path)


def fidelity_of(setup: Any, path: Path) -> dict[str, Any]:
    from deploy.evaluate import exported_fidelity

    runtime = "openvino" if setup.runtime == "openvino" else "onnxruntime"
    return exported_fidelity(setup.loaded.module, path, setup.calibration, [s.name for s in setup.loaded.inputs],
                             runtime, setup.reference)


def _evaluate(family: Family, setup: Any, precision: str, level: float, seconds: float,
              candidates: list[Any]) -> Any:
    from deploy.job import Candidate
    from deploy.metrics import primary_metric

    removed = family.removed(level)
    module = family.build(removed)
    path = setup.workdir / f"candidate-{len(candidates)}.onnx"
    export_model(module, setup, precision, path)
    timing = latency(setup, path, seconds, module)
    metric = primary_metric(fidelity_of(setup, path))[1]
    candidate = Candidate(precision, round(level, 4), removed, timing["latency_ms"], metric,
                          path.stat().st_size / 1e6, timing.get("band_ms"))
    candidates.append(candidate)
    return candidate


# --- choosing -----------------------------------------------------------------------------------------------------

def _precisions(request: Any, setup: Any) -> list[str]:
    allowed = set(setup.resolved.profile.precisions) | {"fp32"}
    chosen = [p for p in request.precisions if p in allowed]
    if not chosen:
        raise UserInputError(f"none of the precisions {', '.join(request.precisions)} runs on "
                             f"{setup.resolved.profile.name}", f"use {', '.join(sorted(allowed))}")
    return chosen


def search_plan(request: Any, setup: Any, note: Callable[[str, float], None]) -> dict[str, Any]:
    """Pick precision and pruning level for the budget with the exported model measured (or predicted)."""
    from deploy.metrics import task_of

    family = Family(setup, request.prune)
    precisions = _precisions(request, setup)
    candidates: list[Any] = []
    seconds = request.measure_seconds
    evaluate = lambda p, lv: _evaluate(family, setup, p, lv, seconds, candidates)  # noqa: E731
    task = task_of(setup.reference[0])
    dense = evaluate("fp32", 0.0)
    note("searching", 0.2)
    target = latency_target_ms(request.budget, dense.latency_ms)
    floor = fidelity_floor(request.budget, task)
    if target is not None:
        choice = _meet_latency(evaluate, precisions, target, dense, family.problem is not None)
    elif floor is not None:
        choice = _meet_floor(evaluate, precisions, floor, dense, family.problem is not None)
    else:
        choice = _meet_size(evaluate, precisions, request.budget.value, dense, family.problem is not None)
    choice.chosen = True
    note("planned", 0.6)
    return {
        "precision": choice.precision, "level": choice.level, "prune": {"removed": choice.removed},
        "budget": {"kind": request.budget.kind, "value": request.budget.value, "target_ms": target,
                   "floor": list(floor) if floor else None, "described": request.budget.describe()},
        "dense_latency_ms": dense.latency_ms, "candidates": [c.row() for c in candidates],
        "recover": {"steps": request.recover_steps, "minutes": request.recover_minutes, "seed": request.seed},
    }


def _bisect(evaluate, precision: str, ok: Callable[[Any], bool], prefer_low: bool) -> Any | None:
    """Bisect the pruning level in [0, 1]. prefer_low: the least pruning that is ok (latency, size budgets);
    else the most pruning that is still ok (fidelity floors)."""
    low, high = 0.0, 1.0
    best = None
    for _ in range(BISECTION_STEPS):
        mid = (low + high) / 2
        cand = evaluate(precision, mid)
        if ok(cand):
            best = cand
            if prefer_low:
                high = mid
            else:
                low = mid
        else:
            if prefer_low:
                low = mid
            else:
                high = mid
    return best


def _meet_latency(evaluate, precisions: list[str], target: float, dense: Any, can_prune: bool) -> Any:
    fits = lambda c: c.latency_ms <= target  # noqa: E731
    edges = {p: (dense if p == "fp32" else evaluate(p, 0.0)) for p in precisions}
    fastest = {p: evaluate(p, 1.0) for p in precisions} if can_prune else edges
    best_possible = min(c.latency_ms for c in fastest.values())
    if best_possible > target:
        raise BudgetInfeasibleError(
            f"the latency budget {target:.3g} ms is below the fastest achievable {best_possible:.3g} ms "
            f"(dense fp32: {dense.latency_ms:.3g} ms)", f"raise the budget to at least {best_possible:.3g} ms",
            least_achievable=best_possible)
    feasible = []
    for p in precisions:
        if fits(edges[p]):
            feasible.append(edges[p])
        elif can_prune and fits(fastest[p]):
            found = _bisect(evaluate, p, fits, prefer_low=True)
            feasible.append(found or fastest[p])
    return max(feasible, key=lambda c: (round(c.fidelity, 4), c.latency_ms))


def _meet_floor(evaluate, precisions: list[str], floor: tuple[str, float], dense: Any, can_prune: bool) -> Any:
    metric, minimum = floor
    ok = lambda c: c.fidelity >= minimum  # noqa: E731
    feasible = []
    for p in precisions:
        start = dense if p == "fp32" else evaluate(p, 0.0)
        if not ok(start):
            continue
        feasible.append(start)
        if can_prune:
            found = _bisect(evaluate, p, ok, prefer_low=False)
            if found is not None:
                feasible.append(found)
    if not feasible:
        raise BudgetInfeasibleError(f"no candidate keeps {metric} >= {minimum:.4g}", "lower the floor (--max-drop)")
    return min(feasible, key=lambda c: (c.latency_ms, -c.fidelity))


def _meet_size(evaluate, precisions: list[str], size_mb: float, dense: Any, can_prune: bool) -> Any:
    fits = lambda c: c.size_mb <= size_mb  # noqa: E731
    feasible = []
    smallest = None
    for p in precisions:
        start = dense if p == "fp32" else evaluate(p, 0.0)
        if fits(start):
            feasible.append(start)
            continue
        if can_prune:
            end = evaluate(p, 1.0)
            smallest = end if smallest is None or end.size_mb < smallest.size_mb else smallest
            if fits(end):
                feasible.append(_bisect(evaluate, p, fits, prefer_low=True) or end)
    if not feasible:
        least = smallest.size_mb if smallest else dense.size_mb
        raise BudgetInfeasibleError(f"the size budget {size_mb:g} MB is below the smallest achievable {least:.3g} MB",
                                    f"raise --size-mb to at least {least:.3g}", least_achievable=least)
    return max(feasible, key=lambda c: (round(c.fidelity, 4), -c.size_mb))


# --- applying -----------------------------------------------------------------------------------------------------

def run_plan(request: Any, setup: Any, decisions: dict[str, Any], out_dir: Path,
             note: Callable[[str, float], None]) -> dict[str, Any]:
    """Apply the decisions: prune, recover, export in the chosen precision, then measure against the original."""
    removed = {k: int(v) for k, v in decisions.get("prune", {}).get("removed", {}).items()}
    family = Family(setup, bool(removed))
    module = family.build(removed)
    result: dict[str, Any] = {"recovery": None}
    recover = decisions.get("recover", {})
    if removed and int(recover.get("steps", 0)) > 0:
        from deploy.compress.distill import DistillConfig, distill

        note("recovering", 0.65)
        config = DistillConfig(steps=int(recover["steps"]), recover_minutes=float(recover.get("minutes", 1.0)),
                               seed=int(recover.get("seed", 0)), eval_every=max(1, int(recover["steps"]) // 8))
        result["recovery"] = dataclasses.asdict(distill(module, setup.loaded.module, setup.calibration, config))
    note("exporting", 0.8)
    path = export_model(module, setup, decisions["precision"], out_dir / "model.onnx")
    if setup.runtime == "openvino":
        import openvino as ov

        ov.save_model(ov.convert_model(str(path)), str(out_dir / "model.xml"))
    dense_path = export_model(setup.loaded.module, setup, "fp32", setup.workdir / "dense.onnx")
    note("measuring", 0.85)
    result["latency"] = _final_latency(setup, dense_path, path, max(2.0, request.measure_seconds), module)
    result["fidelity"] = fidelity_of(setup, path)
    if request.eval_hook:
        from deploy.model_io import import_object

        result["user_eval"] = import_object(request.eval_hook, "--eval")(str(path))
    result["size_mb"] = path.stat().st_size / 1e6
    result["dense_size_mb"] = dense_path.stat().st_size / 1e6
    result["module"] = module
    return result


def _final_latency(setup: Any, dense: Path, final: Path, seconds: float, module: torch.nn.Module) -> dict[str, Any]:
    if not setup.local:
        return {"source": "predicted", "original": _predicted(setup, dense, None),
                "result": _predicted(setup, final, module)}
    from deploy.targets.feeds import make_feeds
    from deploy.targets.measure import MeasureConfig, measure_interleaved
    from deploy.targets.runner import get_runner

    specs = [dataclasses.replace(s, shape=s.concrete_shape()) for s in setup.loaded.inputs]
    feeds = make_feeds(specs)
    runner = get_runner(setup.runtime, setup.threads, None, setup.resolved.profile)
    run_a, run_b = runner.prepare(dense, feeds), runner.prepare(final, feeds)
    config = MeasureConfig(min_samples=64, min_seconds=seconds, max_seconds=max(20.0, 4 * seconds))
    a, b, comparison = measure_interleaved(run_a, run_b, config)
    return {"source": "measured", "original": a.to_dict(), "result": b.to_dict(), "comparison": comparison.to_dict(),
            "shapes": {s.name: list(s.shape) for s in specs}, "runtime": runner.describe()}


# --- reporting ----------------------------------------------------------------------------------------------------

def _p50(entry: dict[str, Any]) -> float:
    return entry["summary"]["p50"] if "summary" in entry else entry["latency_ms"]


def build_result(request: Any, setup: Any, decisions: dict[str, Any], result: dict[str, Any], out_dir: Path
                 ) -> dict[str, Any]:
    """report.json, report.html and deploy.toml; returns the report."""
    from deploy.analysis import analyze
    from deploy.metrics import primary_metric
    from deploy.model_io import from_module
    from deploy.plan_file import dumps_plan
    from deploy.report import atomic_write_json, atomic_write_text
    from deploy.report_html import render_html
    from deploy.targets.fingerprint import fingerprint

    module = result.pop("module")
    timing = result["latency"]
    metric, value = primary_metric(result["fidelity"])
    original_ms, result_ms = _p50(timing["original"]), _p50(timing["result"])
    budget = decisions.get("budget", {})
    target_ms = budget.get("target_ms")
    before = {l.name: l for l in analyze(setup.loaded).layers}
    after = {l.name: l for l in analyze(from_module(module, setup.loaded.inputs)).layers}
    layers = [{"layer": n, "type": l.type, "params": l.params, "params_after": after[n].params if n in after else 0,
               "macs": l.macs, "macs_after": after[n].macs if n in after else 0} for n, l in before.items()]
    warnings = list(setup.warnings)
    if setup.calibration.is_random:
        warnings.append("calibration data is random (--calib random): the fidelity numbers mean nothing")
    report = {
        "schema": "deploy.report", "schema_version": 1,
        "model": {"path": str(setup.loaded.path) if setup.loaded.path else None, "sha256": setup.loaded.sha256,
                  "format": setup.loaded.format, "inputs": [s.to_dict() for s in setup.loaded.inputs]},
        "target": {"name": setup.resolved.profile.name, "asked": setup.resolved.asked, "note": setup.resolved.note,
                   "runtime": setup.runtime, "threads": setup.threads},
        "latency_source": timing["source"],
        "budget": budget,
        "fidelity_metric": metric,
        "original": {"latency_ms": original_ms, "size_mb": result["dense_size_mb"], "fidelity": 1.0},
        "result": {"latency_ms": result_ms, "size_mb": result["size_mb"], "fidelity": value,
                   "fidelity_detail": result["fidelity"], "precision": decisions["precision"],
                   "speedup": original_ms / result_ms if result_ms else None},
        "budget_met": None if target_ms is None else result_ms <= target_ms,
        "decisions": {k: v for k, v in decisions.items() if k != "candidates"},
        "candidates": decisions.get("candidates", []),
        "recovery": result["recovery"],
        "user_eval": result.get("user_eval"),
        "latency": timing,
        "layers": layers,
        "environment": fingerprint(setup.threads, setup.resolved.profile.name),
        "warnings": warnings,
    }
    if timing["source"] == "predicted":
        report["result"]["band_ms"] = timing["result"].get("band_ms")
        report["result"]["verified"] = timing["result"].get("verified")
    atomic_write_json(out_dir / "report.json", report)
    atomic_write_text(out_dir / "report.html", render_html(report))
    plan = {"request": {"model": request.model, "example": request.example, "arch": request.arch,
                        "input_shapes": list(request.input_shapes), "target": setup.resolved.profile.name,
                        "calib": request.calib, "budget": budget},
            "decisions": {k: v for k, v in decisions.items() if k != "candidates"}}
    atomic_write_text(out_dir / "deploy.toml", dumps_plan(plan))
    return report
