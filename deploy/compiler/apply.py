"""Applying a plan: its passes run through `run_pipeline` (prune -> lowrank -> recover -> quantize -> export),
then the proof: the result measured against the original, interleaved, in the target's runtime (or predicted with
its band), and its held-out fidelity in that runtime. A replayed deploy.toml goes through the same function."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from deploy.compiler.candidate_files import export_fp32, fidelity_of, predicted_latency
from deploy.compiler.to_passes import precision_name
from deploy.compiler.verdict import settles
from deploy.core.passes import Context, PassTiming, State, run_pipeline

FINAL_BLOCKS = 6  # the final original-vs-result measurement: enough blocks for a 97% order-statistic interval


def apply_plan(passes: list[Any], request: Any, setup: Any, out_dir: Path, note: Callable[..., None],
               prebuilt: dict[str, Any] | None = None, budget: dict[str, Any] | None = None
               ) -> tuple[dict[str, Any], State]:
    """Run the passes on the loaded model, then measure and score what they wrote. `prebuilt` lends what the plan
    search built for the same weights (the prune pass's refit moments); `budget` (the decisions' record) lets
    the final measurement time more blocks until its verdict is settled (`settles`)."""
    import copy

    from deploy.core.cache import cache_dir

    note("applying the plan", 0.65)
    state = State(copy.deepcopy(setup.loaded.module).eval(), list(setup.loaded.inputs), setup.target,
                  original=setup.loaded.module)
    ctx = Context(calibration=setup.calibration, cache_dir=cache_dir() / "sensitivity", out_dir=out_dir,
                  instruments=[PassTiming()], prebuilt=dict(prebuilt or {}), seed=request.seed)
    state = run_pipeline(passes, state, ctx)
    if "model.onnx" not in state.artifacts:
        from deploy.core.errors import ConfigError

        raise ConfigError("the plan has no export pass: nothing was written", "end the pass list with an export pass")
    path = state.artifacts["model.onnx"]
    plan = state.attached.get("quant_plan")
    result: dict[str, Any] = {"precision": precision_name(plan), "records": state.records,
                              "quantization": _quantization(plan, state)}
    setup.warnings.extend(r.data["message"] for r in state.records if r.kind == "warning" and "message" in r.data)
    dense_path = export_fp32(setup.loaded.module, setup, setup.workdir / "dense.onnx")
    note("measuring", 0.85)
    result["latency"] = _final_latency(setup, dense_path, path, request.measure_seconds, state.module, plan,
                                       settles(budget or {}))
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
    result["module"] = state.module
    result["recovery"] = next((r.data for r in state.records if r.source == "recover" and r.kind == "decision"),
                              None)
    return result, state


def _quantization(plan: Any, state: State) -> dict[str, Any] | None:
    if plan is None:
        return None
    export = next((r.data for r in state.records if r.source == "export" and r.kind == "decision"), {})
    return {"policy": plan.policy, "float_precision": plan.float_precision, "labels": plan.labels(),
            "notes": export.get("notes", []), "files": export.get("files", [])}


def final_measure_config(measure_seconds: float) -> Any:
    """How the result is measured against the original (and a near fit timed again, `near_fit`): FINAL_BLOCKS
    blocks sharing at least 64 samples and max(2, `measure_seconds`) s per model."""
    from deploy.targets.measure.loop import MeasureConfig

    seconds = max(2.0, measure_seconds)
    return MeasureConfig(min_samples=64, min_seconds=seconds, max_seconds=max(20.0, 4 * seconds), blocks=FINAL_BLOCKS)


def _final_latency(setup: Any, dense: Path, final: Path, measure_seconds: float, module: torch.nn.Module,
                   plan: Any, decided: Any = None) -> dict[str, Any]:
    if not setup.target.measured:
        return {"source": "predicted", "original": predicted_latency(setup, dense, None, None),
                "result": predicted_latency(setup, final, module, plan), "shapes": _shapes(setup)}
    from deploy.targets.measure.feeds import make_feeds
    from deploy.targets.measure.paired import measure_blocks, median_interval
    feeds = make_feeds(setup.measure_specs)
    runner = setup.target.runner()
    a, b, comparison = measure_blocks(lambda: runner.prepare(dense, feeds), lambda: runner.prepare(final, feeds),
                                      final_measure_config(measure_seconds), decided=decided)
    return {"source": "measured", "original": a.to_dict(), "result": b.to_dict(), "comparison": comparison.to_dict(),
            "result_interval_ms": list(median_interval(b)), "shapes": _shapes(setup), "runtime": runner.describe()}


def _shapes(setup: Any) -> dict[str, list[int]]:
    return {s.name: list(s.shape) for s in setup.measure_specs}
