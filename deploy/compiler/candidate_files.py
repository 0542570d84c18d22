"""One candidate's file: exported in float or with its per-layer precisions (the target's Q/DQ policy), checked
for finite outputs, timed in the target's runtime interleaved with the dense model (or predicted with its band),
and scored on the validation or held-out split."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

CANDIDATE_BLOCKS = 3  # blocks per candidate-vs-dense comparison (each compiles both models afresh)


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
            baseline: Path | None = None, config: Any = None, decided: Any = None) -> dict[str, Any]:
    """p50 measured in the target's runtime here, or predicted (with its band) for a device not at hand.
    Measured against `baseline` (the dense model's file) when given, in the blocks of the final report
    (targets.measure.paired): a candidate's p50 is what the report will say (a small model timed alone keeps its
    weights in cache and looks faster than it does next to anything else), and its ratio to the dense model has
    an interval that covers a session's placement. `config`: another measurement's (default: a candidate's);
    `decided`: a sequential comparison's question (`measure_blocks`)."""
    if not setup.target.measured:
        return predicted_latency(setup, path, module, plan)
    from deploy.targets.measure.loop import MeasureConfig, measure
    from deploy.targets.measure.paired import measure_blocks, median_interval

    config = config or MeasureConfig(warmup_min_s=0.1, warmup_min_runs=5, min_samples=32, min_seconds=seconds,
                                     max_seconds=max(10.0, seconds * 4), blocks=CANDIDATE_BLOCKS)
    if baseline is None:
        result = measure(prepare_run(setup, path), config).to_dict()
        return {"latency_ms": result["summary"]["p50"], "source": "measured", "measurement": result}
    _, candidate, comparison = measure_blocks(lambda: prepare_run(setup, baseline), lambda: prepare_run(setup, path),
                                              config, decided=decided)
    result = candidate.to_dict()
    ratio = comparison.to_dict()
    return {"latency_ms": result["summary"]["p50"], "source": "measured", "measurement": result,
            "interval_ms": list(median_interval(candidate)), "ratio_to_dense": ratio["ratio"],
            "ratio_ci": [ratio["ci_low"], ratio["ci_high"]], "block_ratios": ratio["block_ratios"]}


def planned_ms(timing: dict[str, Any]) -> float:
    """The latency a plan is judged by: the measured p50, or for a device not at hand the upper end of the predicted
    band, so that "met" holds wherever in its band the device turns out to be."""
    if timing.get("source") == "predicted" and timing.get("band_ms"):
        return float(timing["band_ms"][1])
    return float(timing["latency_ms"])


def point_ms(timing: dict[str, Any]) -> float | None:
    """A predicted target's point estimate (None where measured)."""
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
