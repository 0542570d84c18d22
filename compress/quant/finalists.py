"""The last step of the search: the allocator's plan and the refined ones, measured for real.

Each finalist is simulated on held-out data; where the target runs here, it is also exported as Q/DQ, checked
against what the runtime really runs in int8 (optimised graph / runtime model), timed A/B against the float model
on the same runtime, and run on the held-out samples for its real fidelity. The final plan is the most faithful
one whose MEASURED latency ratio meets the budget (else the fastest measured, flagged).
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch

from deploy.compress.quant.search import Candidate, SearchResult, SearchSpace
from deploy.core.metrics import fidelity, primary_metric
from deploy.core.spec import InputSpec
from deploy.core.data import CalibrationSet
from deploy.targets.target import Target


def _held_out(calibration: CalibrationSet) -> tuple[list[tuple[torch.Tensor, ...]], torch.Tensor | None]:
    samples = calibration.held_out
    mask = None
    if len(samples[0]) >= 2 and samples[0][1].dtype in (torch.int64, torch.int32) and samples[0][1].dim() == 2:
        mask = torch.cat([s[1] for s in samples])
    return samples, mask


def _sim_fidelity(prep: Any, sp: SearchSpace, labels: dict[str, str], calibration: CalibrationSet,
                  reference: list[torch.Tensor]) -> dict[str, Any]:
    from deploy.compress.quant.sensitivity import run
    from deploy.compress.quant.sim import quant_layers, set_mode, set_options

    saved = {n: (m.plan, m.mode) for n, m in quant_layers(prep.qmodel).items()}
    try:
        set_options(prep.qmodel, sp.options(labels))
        set_mode(prep.qmodel, "quant")
        outs = run(prep.qmodel, calibration.batches("held_out", 64))
    finally:
        for n, m in quant_layers(prep.qmodel).items():
            m.plan, m.mode = saved[n]
    _, mask = _held_out(calibration)
    return fidelity(reference, outs, calibration.held_out_labels, mask)


def _runtime_outputs(path: Path, target: Target, samples: Sequence[tuple[torch.Tensor, ...]],
                     names: Sequence[str]) -> torch.Tensor:
    """Run a static batch-1 model on every held-out sample, one at a time, in the target's runtime."""
    from deploy.targets.outputs import runtime_predictor

    run = runtime_predictor(target, path, names)
    return torch.cat([run(sample) for sample in samples])


def _measure(prep: Any, sp: SearchSpace, finalists: list[Candidate], calibration: CalibrationSet,
             inputs: Sequence[InputSpec], target: Target, config: Any, reference: torch.Tensor
             ) -> list[dict[str, Any]]:
    """Export each finalist (static shapes), verify its runtime precisions, time it A/B vs float, run held-out."""
    import onnx

    from deploy.export.qdq.policy import policy_for
    from deploy.export.qdq.writer import build_qdq_model
    from deploy.export.qdq.verify import layer_precisions, mismatches
    from deploy.targets.measure.feeds import make_feeds
    from deploy.targets.measure.loop import MeasureConfig, measure_interleaved

    policy = policy_for(prep.plan.policy)
    specs = [InputSpec(s.name, s.concrete_shape(), s.dtype) for s in inputs]
    feeds = make_feeds(specs)
    runner = target.runner()
    mconf = MeasureConfig(warmup_min_s=0.1, warmup_min_runs=5, min_samples=64,
                          min_seconds=max(1.0, 2 * config.price_seconds))
    samples, mask = _held_out(calibration)
    rows = []
    with tempfile.TemporaryDirectory(prefix="deploy-qfinal-") as tmp:
        base_path = Path(tmp) / "float.onnx"
        onnx.save(prep.float_onnx, str(base_path))
        base_run = runner.prepare(base_path, feeds)
        for i, cand in enumerate(finalists):
            plan = prep.plan.with_options(sp.options(cand.labels))
            model, _ = build_qdq_model(prep.float_onnx, prep.graph, plan, policy)
            path = Path(tmp) / f"finalist{i}.onnx"
            onnx.save(model, str(path))
            wrong = mismatches(plan, layer_precisions(path, plan, policy.runtime, target.threads))
            a, b, cmp = measure_interleaved(base_run, runner.prepare(path, feeds), mconf)
            outs = _runtime_outputs(path, target, samples, [s.name for s in specs])
            fid = fidelity(reference, outs, calibration.held_out_labels, mask)
            rows.append({"float_ms": cmp.median_a, "measured_ms": cmp.median_b, "ratio": cmp.ratio,
                         "ratio_ci": [cmp.ci_low, cmp.ci_high], "runtime_fidelity": _plain(fid),
                         "runtime_mse": float(fid["mse"]), "precision_mismatches": wrong,
                         "cov": [a.summary.get("cov"), b.summary.get("cov")]})
    return rows


def _plain(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (float(v) if isinstance(v, (int, float)) else v) for k, v in d.items()}


def choose_final(prep: Any, sp: SearchSpace, result: SearchResult, calibration: CalibrationSet,
                 inputs: Sequence[InputSpec], target: Target, config: Any, budget_ms: float
                 ) -> tuple[Candidate, dict[str, Any]]:
    """Pick the final plan among the allocator's and the refined candidates; report every number used."""
    from deploy.compress.quant.sensitivity import run

    finalists = [result.allocator] + list(result.refined)
    reference = run(prep.folded, calibration.batches("held_out", 64))
    rows = []
    for cand in finalists:
        sim = _sim_fidelity(prep, sp, cand.labels, calibration, reference)
        rows.append({"origin": cand.origin, "labels": cand.labels, "estimated_ms": cand.latency_ms,
                     "sim_heldout_mse": float(sim["mse"]), "sim_fidelity": _plain(sim)})
    measurable = target.measured and target.runtime in ("onnxruntime", "openvino")
    measured = bool(config.measure_finalists and measurable)
    if measured:
        for row, extra in zip(rows, _measure(prep, sp, finalists, calibration, inputs, target, config, torch.cat(reference))):
            row.update(extra)
    budget_ratio = budget_ms / max(sp.table.base_ms, 1e-12)
    key_mse = "runtime_mse" if measured else "sim_heldout_mse"
    feasible = [i for i, r in enumerate(rows) if (r["ratio"] <= budget_ratio if measured else True)]
    if feasible:
        best = min(feasible, key=lambda i: (rows[i][key_mse], rows[i].get("ratio", rows[i]["estimated_ms"])))
    else:
        best = min(range(len(rows)), key=lambda i: rows[i]["ratio"])
    alloc_row = rows[0]
    refined = [i for i in range(1, len(rows)) if i in feasible]
    beat = bool(refined) and (0 not in feasible or min(rows[i][key_mse] for i in refined) < alloc_row[key_mse])
    metric = primary_metric(rows[best]["runtime_fidelity" if measured else "sim_fidelity"])
    report = {"measured_on_runtime": measured, "budget_ratio": budget_ratio, "rows": rows, "chosen_index": best,
              "chosen_origin": rows[best]["origin"], "within_budget": best in feasible,
              "refinement_beat_allocator": beat, "compared_by": key_mse, "chosen_metric": list(metric)}
    return finalists[best], report
