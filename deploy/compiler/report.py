"""What a run shows: report.json (every decision and measurement, raw samples included), report.html, and the
deploy.toml that replays it; the verdict against the budget and the warnings a person must see."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from deploy.core.data import CalibrationSet


def _p50(entry: dict[str, Any]) -> float:
    return entry["summary"]["p50"] if "summary" in entry else entry["latency_ms"]


def _plan_only(decisions: dict[str, Any]) -> dict[str, Any]:
    """The decisions without the search's own records (what deploy.toml keeps)."""
    return {k: v for k, v in decisions.items() if k not in ("candidates", "quant_problems", "layer_price_ms", "search")}


def _verdict(budget: dict[str, Any], result_ms: float, size_mb: float, timing: dict[str, Any]) -> str | None:
    """met / uncertain / missed for a latency or size budget; None for a fidelity floor (met by construction)."""
    from deploy.compiler.verdict import judged

    band = timing["result"].get("band_ms") if timing["source"] == "predicted" else timing.get("result_interval_ms")
    return judged(budget, result_ms, band, _speedup_ci(timing), size_mb)


def _speedup_ci(timing: dict[str, Any]) -> list[float] | None:
    """The speed-up's 95% interval from the final interleaved comparison (measured targets only)."""
    comparison = timing.get("comparison") or {}
    if timing.get("source") != "measured" or not comparison.get("ci_low"):
        return None
    return [1.0 / comparison["ci_high"], 1.0 / comparison["ci_low"]]


def _speedup(timing: dict[str, Any], original_ms: float, result_ms: float) -> float | None:
    """The speed-up the final interleaved comparison estimates (its ratio, the centre of `_speedup_ci`); the ratio
    of the two pooled p50s only where there is no comparison. The pooled p50s mix the blocks: on a machine whose
    speed shifted between blocks they gave 1.98x beside an interval of 1.78-1.90x."""
    ratio = (timing.get("comparison") or {}).get("ratio") if timing.get("source") == "measured" else None
    if ratio:
        return 1.0 / ratio
    return original_ms / result_ms if result_ms else None


def _missed_line(budget: dict[str, Any], result_ms: float, size_mb: float, speedup: float | None = None) -> str:
    if budget.get("kind") == "speedup" and speedup is not None:
        return (f"budget missed: the result measured a speed-up of {speedup:.3g}x over the original, interleaved, "
                f"against the {budget['value']:g}x asked (exit 4; the model and report are written)")
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


def _layer_row(name: str, layer: Any, after: dict[str, Any], labels: dict[str, str], ranks: dict[str, int],
               prices: dict[str, float]) -> dict[str, Any]:
    """One layer before and after: a factorized layer counts its two thin layers (and says its rank)."""
    parts = [after[name]] if name in after else [a for k, a in after.items() if k.startswith(name + ".")]
    precision = labels.get(name, "float" if parts else ("folded" if "Norm" in layer.type else "removed"))
    if name in ranks:
        precision = f"float, rank {ranks[name]}"
    return {"layer": name, "type": layer.type, "params": layer.params, "params_after": sum(p.params for p in parts),
            "macs": layer.macs, "macs_after": sum(p.macs for p in parts), "precision": precision,
            "latency_delta_ms": prices.get(name)}


def build_result(request: Any, setup: Any, decisions: dict[str, Any], result: dict[str, Any], passes: list[Any],
                 state: Any, out_dir: Path) -> dict[str, Any]:
    """report.json, report.html and deploy.toml (the header and the passes as a replay runs them); returns the
    report."""
    from deploy.core.analysis import analyze
    from deploy.core.metrics import primary_metric
    from deploy.core.model.load import from_module
    from deploy.compiler.plan_file import dumps_plan, header_for
    from deploy.compiler.to_passes import replayable, summary_of
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
    ranks = {k: v for k, v in (decisions.get("lowrank") or {}).get("ranks", {}).items()}
    ranks.update(summary_of(passes)["lowrank"]["ranks"])
    prices = decisions.get("layer_price_ms", {})
    layers = [_layer_row(n, l, after, labels, ranks, prices) for n, l in before.items()]
    # the run works in a partial folder renamed to -o at the end: a warning naming a file names it where it will be
    final = str(Path(request.out).resolve())
    warnings = [w.replace(str(out_dir.resolve()), final).replace(str(out_dir), final) for w in setup.warnings]
    verdict = _verdict(budget, result_ms, result["size_mb"], timing)
    if verdict == "missed":
        warnings.append(_missed_line(budget, result_ms, result["size_mb"], _speedup(timing, original_ms, result_ms)))
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
        "data": _data(setup.calibration),
        "budget": budget,
        "fidelity_metric": metric,
        "original": {"latency_ms": original_ms, "size_mb": result["dense_size_mb"], "fidelity": 1.0},
        "result": {"latency_ms": result_ms, "size_mb": result["size_mb"], "fidelity": value,
                   "fidelity_detail": result["fidelity"], "precision": result["precision"],
                   "speedup": _speedup(timing, original_ms, result_ms)},
        "budget_met": None if verdict is None else verdict == "met",
        "verdict": verdict,
        "exit_code": EXIT_CODES.get(verdict, 0),
        "decisions": {**_plan_only(decisions), **summary_of(passes)},
        "passes": [{"type": r.source, "seconds": r.data["seconds"]} for r in state.records if r.kind == "timing"],
        "candidates": decisions.get("candidates", []),
        "search": decisions.get("search"),  # the search's time limit, seconds and what the limit skipped
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
        report["result"]["latency_label"] = timing["result"].get("label")
        if not timing["result"].get("verified"):
            warnings.append(f"latency on {setup.target.profile.name} is predicted, {timing['result'].get('label')}")
    elif timing.get("result_interval_ms"):
        report["result"]["interval_ms"] = timing["result_interval_ms"]
        if _speedup_ci(timing):
            report["result"]["speedup_ci"] = _speedup_ci(timing)
    atomic_write_json(out_dir / "report.json", report)
    atomic_write_text(out_dir / "report.html", render_html(report))
    from deploy.core.model.load import layer_digest

    header = header_for(setup.loaded.sha256, layer_digest(setup.loaded.module), setup.target.profile.name, budget)
    atomic_write_text(out_dir / "deploy.toml", dumps_plan(header, replayable(passes, state)))
    return report


def _data(calibration: "CalibrationSet") -> dict[str, Any]:
    """Where the samples came from and how they were split (the held-out part is what the fidelity is on)."""
    return {"source": calibration.source, "calibration": len(calibration.calibration),
            "validation": len(calibration.validation), "held_out": len(calibration.held_out)}
