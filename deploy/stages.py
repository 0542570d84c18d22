"""The stages behind `deploy compress` around the plan search (deploy.plan_search): export and measure one
candidate, apply the chosen plan in the order that keeps each step correct (prune, recover, quantize on the final
weights, export), and write the report. Kept apart from job.py so each reads in one sitting."""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any, Callable

import torch


# --- the pruning family and one candidate's export and measurements ------------------------------------------------

class Family:
    """Models from one pruning problem: level 0 is dense, level 1 the most the allocator may remove."""

    def __init__(self, setup: Any, enabled: bool = True):
        self.setup = setup
        self.problem = None
        if enabled and setup.loaded.structural:
            from deploy.cache import cache_dir
            from deploy.compress.prune import PruneConfig, build_problem

            samples = list(setup.calibration.calibration)
            self.problem = build_problem(setup.loaded.module, setup.loaded.inputs, samples,
                                         setup.resolved.profile, PruneConfig(budget_kind="macs", samples=64),
                                         cache_dir() / "sensitivity")

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


def export_fp32(module: torch.nn.Module, setup: Any, path: Path) -> Path:
    from deploy.export.onnx import OnnxExportConfig, export_onnx

    return export_onnx(module, setup.loaded.inputs, path, OnnxExportConfig(output_names=("output",)))


def export_candidate(module: torch.nn.Module, setup: Any, labels: dict[str, str] | None, prep: Any, path: Path
                     ) -> Any:
    """Export in float (labels None) or with the labelled per-layer precisions and `prep`'s calibration, following
    the target's Q/DQ policy; returns the quantization plan (None for float)."""
    if labels is None:
        export_fp32(module, setup, path)
        return None
    from deploy.compress.quant_apply import export_labels, plan_for

    export_labels(prep, module, setup.loaded.inputs, labels, path)
    return plan_for(prep, labels)


def prepare_run(setup: Any, path: Path) -> Callable[[], object]:
    """One inference of the exported file in the target's runtime, ready to time."""
    from deploy.targets.feeds import make_feeds
    from deploy.targets.runner import get_runner

    runner = get_runner(setup.runtime, setup.threads, setup.runtime_precision, setup.resolved.profile)
    return runner.prepare(path, make_feeds(setup.measure_specs))


def latency(setup: Any, path: Path, seconds: float, module: torch.nn.Module | None = None, plan: Any = None,
            baseline: Callable[[], object] | None = None) -> dict[str, Any]:
    """p50 measured in the target's runtime here, or predicted (with its band) for a device not at hand.
    Measured interleaved with `baseline` (the dense model) when given: the same protocol as the final report's, so
    a candidate's p50 is what the report will say (a small model timed alone keeps its weights in cache and looks
    faster than it does next to anything else)."""
    if not setup.local:
        return _predicted(setup, path, module, plan)
    from deploy.targets.measure import MeasureConfig, measure, measure_interleaved

    run_once = prepare_run(setup, path)
    config = MeasureConfig(warmup_min_s=0.1, warmup_min_runs=5, min_samples=32, min_seconds=seconds,
                           max_seconds=max(10.0, seconds * 4))
    if baseline is None:
        result = measure(run_once, config).to_dict()
        return {"latency_ms": result["summary"]["p50"], "source": "measured", "measurement": result}
    _, candidate, comparison = measure_interleaved(baseline, run_once, config)
    result = candidate.to_dict()
    return {"latency_ms": result["summary"]["p50"], "source": "measured", "measurement": result,
            "ratio_to_dense": comparison.to_dict()["ratio"]}


def _predicted(setup: Any, path: Path, module: torch.nn.Module | None, plan: Any) -> dict[str, Any]:
    """A Q/DQ file is priced from its float graph with each layer at its planned precision: Q/DQ nodes fuse away on
    the device, and the portable model reads layer shapes, not the device's kernels."""
    from deploy.latency_prediction import predict_onnx

    if plan is None or module is None:
        return predict_onnx(path, setup)
    from deploy.compress.quant_apply import precision_map

    float_path = export_fp32(module, setup, setup.workdir / f"{path.stem}.float.onnx")
    return predict_onnx(path, setup, float_path, precision_map(plan))


def outputs_finite(setup: Any, path: Path) -> bool:
    """One held-out batch through the exported file in its runtime: are all outputs finite numbers?"""
    from deploy.evaluate import runtime_predictor

    runtime = "openvino" if setup.runtime == "openvino" else "onnxruntime"
    run = runtime_predictor(path, [s.name for s in setup.loaded.inputs], runtime, precision=setup.runtime_precision)
    batch = setup.calibration.batches("held_out", 8)[0]
    return bool(torch.isfinite(run(batch)).all())


def fidelity_of(setup: Any, path: Path) -> dict[str, Any]:
    from deploy.evaluate import exported_fidelity

    runtime = "openvino" if setup.runtime == "openvino" else "onnxruntime"
    return exported_fidelity(setup.loaded.module, path, setup.calibration, [s.name for s in setup.loaded.inputs],
                             runtime, setup.reference, setup.runtime_precision)


# --- applying -----------------------------------------------------------------------------------------------------

def run_plan(request: Any, setup: Any, decisions: dict[str, Any], out_dir: Path,
             note: Callable[[str, float], None], planner: Any = None) -> dict[str, Any]:
    """Apply the decisions: prune, recover, quantize (calibrated on the final weights), export in the target's
    formats, then measure against the original. `planner` (from the search, None on replay) lends what it built."""
    removed = {k: int(v) for k, v in decisions.get("prune", {}).get("removed", {}).items()}
    family = planner.family() if planner is not None and removed else Family(setup, bool(removed))
    module = family.build(removed)
    result: dict[str, Any] = {"recovery": None, "quantization": None}
    recover = decisions.get("recover", {})
    if removed and int(recover.get("steps", 0)) > 0:
        from deploy.compress.distill import DistillConfig, distill

        note("recovering", 0.65)
        config = DistillConfig(steps=int(recover["steps"]), recover_minutes=float(recover.get("minutes", 1.0)),
                               seed=int(recover.get("seed", 0)), eval_every=max(1, int(recover["steps"]) // 8))
        result["recovery"] = dataclasses.asdict(distill(module, setup.loaded.module, setup.calibration, config))
    note("exporting", 0.8)
    path = out_dir / "model.onnx"
    labels = decisions.get("quantize", {}).get("labels")
    plan = None
    if labels:
        from deploy.compress.quant_apply import export_labels, plan_for, quantize_to_labels
        from deploy.plan_search import quant_config

        built = planner.built_quant(float(decisions["level"])) if planner is not None else None
        if built is not None and result["recovery"] is None:  # calibrated on these very weights already
            exported, plan = export_labels(built.prep, module, setup.loaded.inputs, labels, path), \
                plan_for(built.prep, labels)
        else:
            exported, plan = quantize_to_labels(module, setup.loaded.inputs, setup.calibration,
                                                setup.resolved.profile, labels, path, quant_config(request, setup))
        result["quantization"] = {"policy": plan.policy, "float_precision": plan.float_precision,
                                  "labels": plan.labels(), "notes": exported.notes,
                                  "files": [str(p.name) for p in (exported.onnx, exported.openvino_xml) if p]}
    else:
        export_fp32(module, setup, path)
        if setup.runtime == "openvino":
            from deploy.export.openvino import save_ir

            save_ir(path, out_dir / "model.xml")
    result["engine"] = _tensorrt_engine(setup, path, out_dir)
    dense_path = export_fp32(setup.loaded.module, setup, setup.workdir / "dense.onnx")
    note("measuring", 0.85)
    result["latency"] = _final_latency(setup, dense_path, path, max(2.0, request.measure_seconds), module, plan)
    result["fidelity"] = fidelity_of(setup, path)
    if result["fidelity"].get("non_finite_samples"):
        from deploy.errors import MeasurementError

        raise MeasurementError(f"the compressed model gives NaN or infinite outputs on "
                               f"{result['fidelity']['non_finite_samples']} held-out samples, and no candidate "
                               "without them remains", "try --precision fp32, or another budget")
    if request.eval_hook:
        from deploy.errors import UserInputError
        from deploy.user_code import call_user, import_object

        hook = import_object(request.eval_hook, "--eval", UserInputError)
        result["user_eval"] = call_user(hook, "--eval", request.eval_hook, str(path), error=UserInputError)
    result["size_mb"] = path.stat().st_size / 1e6
    result["dense_size_mb"] = dense_path.stat().st_size / 1e6
    result["module"] = module
    return result


def _tensorrt_engine(setup: Any, path: Path, out_dir: Path) -> str | None:
    """A TensorRT plan beside the ONNX file where TensorRT runs here; None (and a warning) where it does not."""
    if setup.runtime != "tensorrt":
        return None
    from deploy.targets.tensorrt_runner import save_engine, tensorrt_available

    if not tensorrt_available():
        setup.warnings.append("no TensorRT here: model.plan not built (build it on the device from model.onnx)")
        return None
    from deploy.targets.feeds import make_feeds

    return save_engine(path, out_dir / "model.plan", make_feeds(setup.measure_specs), setup.resolved.profile).name


def _final_latency(setup: Any, dense: Path, final: Path, seconds: float, module: torch.nn.Module, plan: Any
                   ) -> dict[str, Any]:
    if not setup.local:
        return {"source": "predicted", "original": _predicted(setup, dense, None, None),
                "result": _predicted(setup, final, module, plan), "shapes": _shapes(setup)}
    from deploy.targets.feeds import make_feeds
    from deploy.targets.measure import MeasureConfig, measure_interleaved
    from deploy.targets.runner import get_runner

    feeds = make_feeds(setup.measure_specs)
    runner = get_runner(setup.runtime, setup.threads, setup.runtime_precision, setup.resolved.profile)
    run_a, run_b = runner.prepare(dense, feeds), runner.prepare(final, feeds)
    config = MeasureConfig(min_samples=64, min_seconds=seconds, max_seconds=max(20.0, 4 * seconds))
    a, b, comparison = measure_interleaved(run_a, run_b, config)
    return {"source": "measured", "original": a.to_dict(), "result": b.to_dict(), "comparison": comparison.to_dict(),
            "shapes": _shapes(setup), "runtime": runner.describe()}


def _shapes(setup: Any) -> dict[str, list[int]]:
    return {s.name: list(s.shape) for s in setup.measure_specs}


# --- reporting ----------------------------------------------------------------------------------------------------

def _p50(entry: dict[str, Any]) -> float:
    return entry["summary"]["p50"] if "summary" in entry else entry["latency_ms"]


def _plan_only(decisions: dict[str, Any]) -> dict[str, Any]:
    """The decisions without the search's own records (what deploy.toml keeps)."""
    return {k: v for k, v in decisions.items() if k not in ("candidates", "quant_problems")}


def _verdict(budget: dict[str, Any], result_ms: float, size_mb: float, timing: dict[str, Any]) -> str | None:
    """met / uncertain / missed for a latency or size budget; None for a fidelity floor (met by construction)."""
    from deploy.verdict import latency_verdict, size_verdict

    if budget.get("target_ms") is not None:
        band = timing["result"].get("band_ms") if timing["source"] == "predicted" else None
        return latency_verdict(result_ms, budget["target_ms"], band)
    if budget.get("kind") == "size_mb":
        return size_verdict(size_mb, budget["value"])
    return None


def _missed_line(budget: dict[str, Any], result_ms: float, size_mb: float) -> str:
    if budget.get("target_ms") is not None:
        return (f"budget missed: the result measured p50 {result_ms:.4g} ms against the budget "
                f"{budget['target_ms']:.4g} ms (exit 4; the model and report are written)")
    return f"budget missed: the result is {size_mb:.4g} MB against {budget['value']:g} MB (exit 4)"


def _floor_warning(metric: str, value: float, budget: dict[str, Any]) -> str | None:
    """Below the default fidelity floor (0.99), whatever budget was asked: a person must see it."""
    import math

    from deploy.budget import DEFAULT_FLOOR_VALUE

    if value is None or not math.isfinite(value) or value < DEFAULT_FLOOR_VALUE:
        shown = "not a number" if value is None or not math.isfinite(value) else f"{value:.4g}"
        return (f"fidelity below the default floor: {metric} {shown} < {DEFAULT_FLOOR_VALUE} (check the model "
                "on your own data before using it)")
    return None


def build_result(request: Any, setup: Any, decisions: dict[str, Any], result: dict[str, Any], out_dir: Path
                 ) -> dict[str, Any]:
    """report.json, report.html and deploy.toml; returns the report."""
    from deploy.analysis import analyze
    from deploy.metrics import primary_metric
    from deploy.model_io import from_module
    from deploy.plan_file import dumps_plan
    from deploy.atomic_io import atomic_write_json, atomic_write_text
    from deploy.report_html import render_html
    from deploy.verdict import EXIT_CODES
    from deploy.targets.fingerprint import fingerprint

    module = result.pop("module")
    timing = result["latency"]
    metric, value = primary_metric(result["fidelity"])
    original_ms, result_ms = _p50(timing["original"]), _p50(timing["result"])
    budget = decisions.get("budget", {})
    before = {l.name: l for l in analyze(setup.loaded).layers}
    after = {l.name: l for l in analyze(from_module(module, setup.loaded.inputs)).layers}
    labels = (result.get("quantization") or {}).get("labels", {})
    layers = [{"layer": n, "type": l.type, "params": l.params, "params_after": after[n].params if n in after else 0,
               "macs": l.macs, "macs_after": after[n].macs if n in after else 0,
               "precision": labels.get(n, "float" if n in after else "removed")} for n, l in before.items()]
    warnings = list(setup.warnings)
    if setup.calibration.is_random:
        warnings.append("calibration data is random (--calib random): the fidelity numbers mean nothing")
    verdict = _verdict(budget, result_ms, result["size_mb"], timing)
    if verdict == "missed":
        warnings.append(_missed_line(budget, result_ms, result["size_mb"]))
    floor = _floor_warning(metric, value, budget)
    if floor:
        warnings.append(floor)
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
        "budget_met": None if verdict is None else verdict == "met",
        "verdict": verdict,
        "exit_code": EXIT_CODES.get(verdict, 0),
        "decisions": _plan_only(decisions),
        "candidates": decisions.get("candidates", []),
        "quant_problems": decisions.get("quant_problems", {}),
        "recovery": result["recovery"],
        "quantization": result["quantization"],
        "files": sorted(p.name for p in out_dir.iterdir() if p.is_file()) + ["report.json", "report.html",
                                                                            "deploy.toml"],
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
    from deploy.model_io import layer_digest

    plan = {"request": {"model": request.model, "example": request.example, "arch": request.arch,
                        "model_sha256": setup.loaded.sha256, "layers_digest": layer_digest(setup.loaded.module),
                        "input_shapes": list(request.input_shapes), "target": setup.resolved.profile.name,
                        "calib": request.calib, "budget": budget},
            "decisions": _plan_only(decisions)}
    atomic_write_text(out_dir / "deploy.toml", dumps_plan(plan))
    return report
