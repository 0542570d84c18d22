"""`deploy compress` as one library call: load, plan under one budget, apply, measure, report.

The plan is found in a closed loop on the real target (deploy.compiler.plan): pruning levels and low-rank factors
from the DP allocator and per-layer precisions from the quantization allocator, every candidate exported and
measured in the target's runtime (or predicted, with its error band, for a device not at hand). The plan becomes a
list of pass configs (deploy.compiler.to_passes) applied once through run_pipeline (deploy.compiler.apply): prune,
lowrank, recover by distillation, quantize on the final weights, export; then measured against the original.
`--plan deploy.toml` replays such a list instead of searching.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from deploy.compiler.budget import Budget
from deploy.core.data import CalibrationSet
from deploy.core.errors import UserInputError
from deploy.core.model.load import LoadedModel
from deploy.core.spec import InputSpec
from deploy.targets.target import Target

ProgressFn = Callable[[str, float], None]


# fp16 / bf16 count only where the profile runs them (TensorRT GPUs, AVX-512 BF16 CPUs); --precision fp32 opts out
DEFAULT_PRECISIONS = ("fp32", "fp16", "bf16", "int8")
KNOWN_PRECISIONS = ("fp32", "fp16", "bf16", "fp8", "int8", "int4")


@dataclass(frozen=True)
class CompressRequest:
    """The whole of `deploy compress`'s command line as one config."""

    model: str | None = None
    example: bool = False
    arch: str | None = None
    trust_pickle: bool = False
    input_shapes: tuple[str, ...] = ()
    target: str | None = "cpu"
    profile_path: str | None = None
    calib: str | None = None
    held_out: str | None = None  # data the report is scored on; None: a share of `calib` is held out
    tokenizer: str | None = None
    budget: Budget = Budget()
    out: str = "out"
    force: bool = False
    plan: str | None = None  # a deploy.toml to replay
    precisions: tuple[str, ...] = DEFAULT_PRECISIONS  # precisions layers may take (the profile may drop some)
    batch: int = 1  # the batch size latency is measured (and a TensorRT plan built) at
    prune: bool = True
    lowrank: bool = False  # low-rank factorization as a knob of the plan (float layers); opt-in, see CLI.md
    depth: bool = True  # depth mixes (whole blocks dropped) where pruning is needed
    recover_steps: int | None = None  # None: as many as recover_minutes allow; 0: no recovery
    recover_minutes: float | None = None  # None: compress.recover.default_minutes of the model's MACs
    recover_bf16: bool | None = None  # recovery's passes in bf16 autocast; None: `compress` sets it where this CPU
    # runs bf16 in hardware (a planner built without `compress` reads None as f32)
    search_minutes: float | None = None  # the plan search's time limit (search_clock); None: none
    eval_hook: str | None = None
    threads: int | None = None
    measure_seconds: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = [p for p in self.precisions if p not in KNOWN_PRECISIONS]
        if unknown:
            raise UserInputError(f"unknown precision '{unknown[0]}'", f"use one of {', '.join(KNOWN_PRECISIONS)}")


@dataclass
class Setup:
    """What every stage of one run shares: the model, its data, the target, and the reference outputs."""

    loaded: LoadedModel
    calibration: CalibrationSet
    target: Target
    workdir: Path
    measure_specs: list[InputSpec] = field(default_factory=list)  # the inputs at the shapes latency is measured at
    reference: list[torch.Tensor] = field(default_factory=list)  # the original's outputs on the held-out split
    warnings: list[str] = field(default_factory=list)
    validation_reference: list[torch.Tensor] = field(default_factory=list)  # ... and on the validation split


def compress(request: CompressRequest, progress: ProgressFn | None = None) -> dict[str, Any]:
    """Run the job; the output folder appears complete (model, report.json, report.html, deploy.toml) or not at all.
    The plan (searched for the budget, or read from --plan) is a list of passes applied through run_pipeline."""
    import shutil

    from deploy.compiler.apply import apply_plan
    from deploy.compiler.plan_file import load_plan
    from deploy.compiler.report import build_result
    from deploy.core.atomic_io import atomic_output_dir

    note = progress or (lambda phase, fraction, *rest, **kw: None)
    with atomic_output_dir(request.out, request.force, inputs_of(request)) as tmp:
        plan = load_plan(request.plan) if request.plan else None  # a malformed plan is refused before any work
        setup = _setup(request, tmp / ".work", plan_header=plan[0] if plan else None)
        if request.recover_minutes is None:
            from deploy.compress.recover import default_minutes
            from deploy.core.analysis import analyze

            request = dataclasses.replace(request, recover_minutes=default_minutes(analyze(setup.loaded).total_macs))
        if request.recover_bf16 is None:
            from deploy.targets.target import has_bf16

            request = dataclasses.replace(request, recover_bf16=has_bf16())
        note("dense model", 0.05)
        planner = None
        if plan is not None:
            header, passes = plan
            decisions: dict[str, Any] = {"budget": dict(header.get("budget", {})), "replayed_from": str(request.plan)}
            prebuilt: dict[str, Any] = {}
        else:
            from deploy.compiler.plan import search
            from deploy.compiler.to_passes import plan_passes

            decisions, planner = search(request, setup, note)
            passes, prebuilt = plan_passes(decisions, request, setup), planner.prebuilt(decisions)
        result, state = apply_plan(passes, request, setup, tmp, note, prebuilt, decisions["budget"])
        again, why = _second_look(planner, decisions, result["latency"], setup) if planner else (None, "")
        if again is not None:
            from deploy.compiler.to_passes import plan_passes

            note(why, 0.9)
            decisions, passes = again, plan_passes(again, request, setup)
            result, state = apply_plan(passes, request, setup, tmp, note, planner.prebuilt(again), again["budget"])
        report = build_result(request, setup, decisions, result, passes, state, tmp)
        shutil.rmtree(tmp / ".work", ignore_errors=True)
    report["output"] = str(Path(request.out).resolve())
    return report


def _second_look(planner: Any, decisions: dict[str, Any], timing: dict[str, Any], setup: Setup
                 ) -> tuple[dict[str, Any] | None, str]:
    """After the final measurement against the original: a missed budget is planned once more against a tighter
    one; a floor's answer that measured slower than the original gives way to the original. The new decisions (and
    what the progress line says), or None."""
    from deploy.compiler.floor_and_size import dense_if_slower
    from deploy.compiler.plan import replan_after_miss

    if timing["source"] != "measured":
        return None, ""
    again = replan_after_miss(planner, decisions, timing["result"]["summary"]["p50"],
                              timing["original"]["summary"]["p50"])
    if again is not None:
        return again, "re-planning after a miss"
    dense = dense_if_slower(planner, decisions, timing)
    if dense is None:
        return None, ""
    fell = dense["fell_back_to_dense"]
    setup.warnings.append(f"the fastest candidate that keeps the floor ({fell['instead_of']}) measured "
                          f"{fell['ratio']:.3g}x the original's p50 in the final comparison (95% CI "
                          f"{fell['ratio_ci'][0]:.3g}-{fell['ratio_ci'][1]:.3g}x), slower: the original model is "
                          "written instead, exported unchanged")
    return dense, "the original is faster: writing it"


def inputs_of(request: CompressRequest) -> list[str]:
    """The files and folders a run reads: an output folder must never hold (and so replace) one of them."""
    from pathlib import Path as _Path

    named = [request.model, request.plan, request.tokenizer, request.profile_path]
    if request.calib and _Path(request.calib).exists():
        named.append(request.calib)
    return [p for p in named if p]


def _setup(request: CompressRequest, workdir: Path, plan_header: dict[str, Any] | None = None) -> Setup:
    """The run's shared state; a replayed plan's header is checked against the model and target first, so a plan
    made for another model or target is refused before any data is read."""
    from deploy.core.data import DataConfig, load_calibration, torch_takes_any_batch
    from deploy.core.model.checks import check_finite_weights
    from deploy.targets.target import resolve

    target = resolve(request.target, request.profile_path, threads=request.threads)
    loaded = _load(request)
    if loaded.module is None:
        raise UserInputError("deploy compress takes a PyTorch model, not ONNX", "give the .pt/.pt2 it came from")
    if plan_header is not None:
        from deploy.compiler.plan_file import check_header
        from deploy.core.model.load import layer_digest

        check_header(request.plan, plan_header, loaded.sha256, layer_digest(loaded.module), target.profile.name)
    check_finite_weights(loaded.module)
    calib = request.calib
    if calib is None:
        if not request.example:
            raise UserInputError("deploy compress needs calibration data", "pass --calib DATA (or --calib random)")
        calib = str(_example_calibration(workdir))
    calibration = load_calibration(calib, loaded.inputs, DataConfig(seed=request.seed), request.tokenizer,
                                   request.held_out)
    calibration.torch_any_batch = torch_takes_any_batch(loaded.module, calibration)
    workdir.mkdir(parents=True, exist_ok=True)
    setup = Setup(loaded, calibration, target, workdir, _measure_specs(loaded.inputs, request.batch),
                  warnings=list(calibration.warnings))
    if target.note:
        setup.warnings.append(target.note)
    from deploy.compiler.evaluate import torch_outputs

    setup.reference = torch_outputs(loaded.module, calibration.batches("held_out", 32))
    setup.validation_reference = torch_outputs(loaded.module, calibration.batches("validation", 32))
    if not all(bool(torch.isfinite(r).all()) for r in setup.reference):
        from deploy.core.errors import DataError

        raise DataError("the model's own outputs on the held-out data hold NaN or infinite values, so no fidelity "
                        "can be measured", "check the model and the calibration data (--calib)")
    return setup


def _measure_specs(inputs: list[InputSpec], batch: int) -> list[InputSpec]:
    """The inputs at the shapes latency is measured at: the dynamic batch axis set to `batch`."""
    if batch < 1:
        raise UserInputError(f"--batch must be >= 1, got {batch}", "pass a positive batch size")
    if batch != 1 and not any(s.shape and s.shape[0] == "batch" for s in inputs):
        raise UserInputError(f"--batch {batch} needs a dynamic batch axis, but the inputs are "
                             f"{', '.join(f'{s.name}:{list(s.shape)}' for s in inputs)}",
                             "export or describe the model with a 'batch' first dimension (--input-shape)")
    return [dataclasses.replace(s, shape=s.concrete_shape({"batch": batch})) for s in inputs]


def _load(request: CompressRequest) -> Any:
    from deploy.core.model.load import load_example, load_model

    if request.example == (request.model is not None):
        raise UserInputError("give a model file or --example (exactly one)", "see deploy compress --help")
    if request.example:
        return load_example(request.input_shapes)
    return load_model(request.model, arch=request.arch, trust_pickle=request.trust_pickle,
                      input_shapes=request.input_shapes)


def _example_calibration(workdir: Path) -> Path:
    from deploy.examples.digits_data import export_calibration_npz

    workdir.mkdir(parents=True, exist_ok=True)
    return export_calibration_npz(workdir / "digits_calibration.npz", n=256)
