"""The stages behind `deploy compress` around the plan search (deploy.compiler.plan): export and measure one
candidate, apply the chosen plan in the order that keeps each step correct (prune, recover, quantize on the final
weights, export), and write the report. Kept apart from job.py so each reads in one sitting."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import torch

from deploy.compiler.candidates import Family, export_fp32, fidelity_of, predicted_latency


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
        from deploy.compress.quant.apply import export_labels, plan_for, quantize_to_labels
        from deploy.compiler.candidates import quant_config

        built = planner.built_quant(float(decisions["level"])) if planner is not None else None
        if built is not None and result["recovery"] is None:  # calibrated on these very weights already
            exported, plan = export_labels(built.prep, module, setup.loaded.inputs, labels, path), \
                plan_for(built.prep, labels)
        else:
            exported, plan = quantize_to_labels(module, setup.loaded.inputs, setup.calibration,
                                                setup.target, labels, path, quant_config(request, setup))
        result["quantization"] = {"policy": plan.policy, "float_precision": plan.float_precision,
                                  "labels": plan.labels(), "notes": exported.notes,
                                  "files": [str(p.name) for p in (exported.onnx, exported.openvino_xml) if p]}
    else:
        export_fp32(module, setup, path)
        if setup.target.runtime == "openvino":
            from deploy.export.openvino import save_ir

            save_ir(path, out_dir / "model.xml")
    result["engine"] = _tensorrt_engine(setup, path, out_dir)
    dense_path = export_fp32(setup.loaded.module, setup, setup.workdir / "dense.onnx")
    note("measuring", 0.85)
    result["latency"] = _final_latency(setup, dense_path, path, max(2.0, request.measure_seconds), module, plan)
    result["fidelity"] = fidelity_of(setup, path)
    if result["fidelity"].get("non_finite_samples"):
        from deploy.core.errors import MeasurementError

        raise MeasurementError(f"the compressed model gives NaN or infinite outputs on "
                               f"{result['fidelity']['non_finite_samples']} held-out samples, and no candidate "
                               "without them remains", "try --precision fp32, or another budget")
    if request.eval_hook:
        from deploy.core.errors import UserInputError
        from deploy.core.user_code import call_user, import_object

        hook = import_object(request.eval_hook, "--eval", UserInputError)
        result["user_eval"] = call_user(hook, "--eval", request.eval_hook, str(path), error=UserInputError)
    result["size_mb"] = path.stat().st_size / 1e6
    result["dense_size_mb"] = dense_path.stat().st_size / 1e6
    result["module"] = module
    return result


def _tensorrt_engine(setup: Any, path: Path, out_dir: Path) -> str | None:
    """A TensorRT plan beside the ONNX file where TensorRT runs here; None (and a warning) where it does not."""
    if setup.target.runtime != "tensorrt":
        return None
    from deploy.targets.runners.tensorrt import save_engine, tensorrt_available

    if not tensorrt_available():
        setup.warnings.append("no TensorRT here: model.plan not built (build it on the device from model.onnx)")
        return None
    from deploy.targets.measure.feeds import make_feeds

    return save_engine(path, out_dir / "model.plan", make_feeds(setup.measure_specs), setup.target.profile).name


def _final_latency(setup: Any, dense: Path, final: Path, seconds: float, module: torch.nn.Module, plan: Any
                   ) -> dict[str, Any]:
    if not setup.target.measured:
        return {"source": "predicted", "original": predicted_latency(setup, dense, None, None),
                "result": predicted_latency(setup, final, module, plan), "shapes": _shapes(setup)}
    from deploy.targets.measure.feeds import make_feeds
    from deploy.targets.measure.loop import MeasureConfig, measure_interleaved
    feeds = make_feeds(setup.measure_specs)
    runner = setup.target.runner()
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
    from deploy.compiler.verdict import latency_verdict, size_verdict

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

    from deploy.compiler.budget import DEFAULT_FLOOR_VALUE

    if value is None or not math.isfinite(value) or value < DEFAULT_FLOOR_VALUE:
        shown = "not a number" if value is None or not math.isfinite(value) else f"{value:.4g}"
        return (f"fidelity below the default floor: {metric} {shown} < {DEFAULT_FLOOR_VALUE} (check the model "
                "on your own data before using it)")
    return None


def build_result(request: Any, setup: Any, decisions: dict[str, Any], result: dict[str, Any], out_dir: Path
                 ) -> dict[str, Any]:
    """report.json, report.html and deploy.toml; returns the report."""
    from deploy.core.analysis import analyze
    from deploy.core.metrics import primary_metric
    from deploy.core.model.load import from_module
    from deploy.compiler.plan_file import dumps_plan
    from deploy.core.atomic_io import atomic_write_json, atomic_write_text
    from deploy.compiler.report_html import render_html
    from deploy.compiler.verdict import EXIT_CODES
    from deploy.targets.measure.fingerprint import fingerprint

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
        "target": {"name": setup.target.profile.name, "asked": setup.target.asked, "note": setup.target.note,
                   "runtime": setup.target.runtime, "threads": setup.target.threads},
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
        "environment": fingerprint(setup.target.threads, setup.target.profile.name),
        "warnings": warnings,
    }
    if timing["source"] == "predicted":
        report["result"]["band_ms"] = timing["result"].get("band_ms")
        report["result"]["verified"] = timing["result"].get("verified")
    atomic_write_json(out_dir / "report.json", report)
    atomic_write_text(out_dir / "report.html", render_html(report))
    from deploy.core.model.load import layer_digest

    plan = {"request": {"model": request.model, "example": request.example, "arch": request.arch,
                        "model_sha256": setup.loaded.sha256, "layers_digest": layer_digest(setup.loaded.module),
                        "input_shapes": list(request.input_shapes), "target": setup.target.profile.name,
                        "calib": request.calib, "budget": budget},
            "decisions": _plan_only(decisions)}
    atomic_write_text(out_dir / "deploy.toml", dumps_plan(plan))
    return report
