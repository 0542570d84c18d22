"""`deploy profiles calibrate TARGET`: measure this machine so its latencies can be predicted with an earned band.

The reference models (small CNNs and BERT-style encoders over a grid of widths, fp32 and int8) are exported,
profiled per node in the target's runtime and fitted into the device's latency model (latency.fit), cached under
the cache folder; `predict_latency` for this profile is then calibrated rather than "not yet verified against
hardware". Only a device at hand can be calibrated: the per-node profiles come from the runtime's own profiler.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from deploy.core.errors import UserInputError
from deploy.profiles import Profile

Progress = Callable[[str], None]


@dataclass(frozen=True)
class CalibrateRequest:
    target: str
    quick: bool = False  # a small reference set: a smoke test, not for decisions
    threads: int | None = None


@dataclass(frozen=True)
class CalibrateResult:
    profile: str
    runtime: str
    threads: int
    seconds: float
    model: dict[str, Any] = field(default_factory=dict)  # the fitted latency model's summary

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def calibrate(request: CalibrateRequest, progress: Progress | None = None) -> CalibrateResult:
    """Fit this machine's latency model for the target's profile."""
    from deploy.targets.target import resolve

    start = time.perf_counter()
    if request.threads is not None and request.threads < 1:
        raise UserInputError("--threads must be >= 1")
    target = resolve(request.target, threads=request.threads)
    target.require_measurable()
    model = fit_device_model(target.profile, target.threads, request.quick, progress)
    return CalibrateResult(target.profile.name, target.runtime, target.threads,
                           round(time.perf_counter() - start, 2), model)


def fit_device_model(profile: Profile, threads: int, quick: bool = False,
                     say: Progress | None = None) -> dict[str, Any]:
    """Layer tables of the reference models -> fitted latency model, saved for `predict_latency`."""
    from deploy.targets.latency import cache as latency_cache
    from deploy.targets.latency.fit import fit_calibration
    from deploy.targets.latency.model import save_calibration
    from deploy.targets.latency.layer_table import LayerTableConfig

    say = say or (lambda _: None)
    # one thread: time by process CPU, so other tenants of a shared host do not land in the fit (measure.clock)
    config = LayerTableConfig(threads=threads, clock="cpu" if threads == 1 else "wall")
    models = [reference_training_model(ref, threads, config) for ref in _references(quick, say)]
    calibration = fit_calibration(models, profile, threads, profile.runtime, latency_cache.env_key(threads))
    path = save_calibration(calibration, profile)
    return {"path": str(path), "models": calibration.n_models, "band": calibration.band,
            "kinds": len(calibration.factors)}


def _references(quick: bool, say: Progress) -> list[Any]:
    from deploy.targets.latency.reference import reference_set

    refs = reference_set(quick)
    say(f"profiling {len(refs)} reference models for the latency model")
    return refs


def reference_training_model(ref: Any, threads: int, config: Any = None) -> Any:
    """One reference model's layer table as a fitting example (exported, quantized if int8, profiled; cached)."""
    import tempfile
    from pathlib import Path

    from deploy.targets.latency.export import export_static, quantize_qdq
    from deploy.targets.latency.fit import TrainingModel
    from deploy.targets.latency.layer_table import LayerTableConfig, layer_table_of_file

    module, specs = ref.build(), ref.inputs()
    with tempfile.TemporaryDirectory(prefix="deploy-ref-") as tmp:
        path = export_static(module, specs, Path(tmp) / "model.onnx")
        if ref.precision == "int8":
            path = quantize_qdq(path, specs, Path(tmp) / "model_int8.onnx")
        table = layer_table_of_file(path, specs, config or LayerTableConfig(threads=threads),
                                    {name for name, _ in module.named_modules()})
    return TrainingModel(ref.name, table.nodes, table.e2e_p50_ms)
