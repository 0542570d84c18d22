"""`deploy compress` as one library call: load, plan under one budget, apply, recover, export, measure, report.

The plan is found in a closed loop on the real target: structured pruning (the DP allocator over additive
distortion curves, priced in MACs) gives a one-knob family of models from "dense" to "most pruned"; each
precision option (fp32, int8 ...) gives another family. A latency budget is met by bisecting the knob with the
exported model measured in its runtime (or predicted, with its error band, for a device not at hand); a fidelity
floor by bisecting on held-out fidelity of the exported model. Recovery (distillation) then runs once on the choice.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from deploy.budget import Budget, fidelity_floor, latency_target_ms
from deploy.errors import BudgetInfeasibleError, ConfigError, UserInputError

ProgressFn = Callable[[str, float], None]
BISECTION_STEPS = 6
LATENCY_FILL = 0.85  # a latency budget is met when 0.85 x budget <= p50 <= budget, where the model family allows


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
    tokenizer: str | None = None
    budget: Budget = Budget()
    out: str = "out"
    force: bool = False
    plan: str | None = None  # a deploy.toml to replay
    precisions: tuple[str, ...] = ("fp32", "int8")  # precision families to consider (the profile may drop some)
    prune: bool = True
    recover_steps: int = 200
    recover_minutes: float = 1.0
    eval_hook: str | None = None
    threads: int | None = None
    measure_seconds: float = 1.0
    seed: int = 0


@dataclass
class Candidate:
    precision: str
    level: float  # 0 = dense, 1 = the most the pruning allocator can remove
    removed: dict[str, int]
    latency_ms: float
    fidelity: float
    size_mb: float
    band_ms: tuple[float, float] | None = None  # predicted latency's error band
    chosen: bool = False

    def row(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Setup:
    loaded: Any
    calibration: Any
    resolved: Any
    runtime: str
    threads: int
    local: bool
    workdir: Path
    reference: list[torch.Tensor] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def compress(request: CompressRequest, progress: ProgressFn | None = None) -> dict[str, Any]:
    """Run the job; the output folder appears complete (model, report.json, report.html, deploy.toml) or not at all."""
    from deploy.report import atomic_output_dir

    note = progress or (lambda phase, fraction: None)
    with atomic_output_dir(request.out, request.force) as tmp:
        setup = _setup(request, tmp / ".work")
        note("dense model", 0.05)
        from deploy.stages import build_result, run_plan, search_plan

        if request.plan:
            decisions = _replay_decisions(request.plan)
        else:
            decisions = search_plan(request, setup, note)
        result = run_plan(request, setup, decisions, tmp, note)
        report = build_result(request, setup, decisions, result, tmp)
        import shutil

        shutil.rmtree(tmp / ".work", ignore_errors=True)
    report["output"] = str(Path(request.out).resolve())
    return report


def _replay_decisions(path: str) -> dict[str, Any]:
    from deploy.plan_file import load_plan

    return load_plan(path)["decisions"]


def _setup(request: CompressRequest, workdir: Path) -> Setup:
    from deploy.data import DataConfig, load_calibration
    from deploy.profiles import resolve_target
    from deploy.targets.bench import default_threads

    resolved = resolve_target(request.target, request.profile_path)
    loaded = _load(request)
    if loaded.module is None:
        raise UserInputError("deploy compress takes a PyTorch model, not ONNX", "give the .pt/.pt2 it came from")
    calib = request.calib
    if calib is None:
        if not request.example:
            raise UserInputError("deploy compress needs calibration data", "pass --calib DATA (or --calib random)")
        calib = str(_example_calibration(workdir))
    calibration = load_calibration(calib, loaded.inputs, DataConfig(seed=request.seed), request.tokenizer)
    profile = resolved.profile
    local = profile.runs_locally()
    threads = request.threads or default_threads(profile)
    workdir.mkdir(parents=True, exist_ok=True)
    setup = Setup(loaded, calibration, resolved, profile.runtime if profile.runtime != "tensorrt" else "tensorrt",
                  threads, local, workdir, warnings=list(calibration.warnings))
    if resolved.note:
        setup.warnings.append(resolved.note)
    from deploy.evaluate import torch_outputs

    setup.reference = torch_outputs(loaded.module, calibration.batches("held_out", 32))
    return setup


def _load(request: CompressRequest) -> Any:
    from deploy.model_io import load_example, load_model

    if request.example == (request.model is not None):
        raise UserInputError("give a model file or --example (exactly one)", "see deploy compress --help")
    if request.example:
        return load_example()
    return load_model(request.model, arch=request.arch, trust_pickle=request.trust_pickle,
                      input_shapes=request.input_shapes)


def _example_calibration(workdir: Path) -> Path:
    from deploy.examples.digits_data import export_calibration_npz

    workdir.mkdir(parents=True, exist_ok=True)
    return export_calibration_npz(workdir / "digits_calibration.npz", n=256)
