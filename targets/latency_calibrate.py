"""`deploy profiles calibrate TARGET`: measure a device so its latencies can be priced and predicted.

Two products, both cached (see latency_cache): the op lookup table over a default shape grid for every precision
the profile lists and its runtime can run (single-op microbenchmarks, latency_table), and, unless --quick, the
fitted latency model of the device (layer tables of the reference models, latency_fit), after which
`predict_latency` for this profile is calibrated rather than "not yet verified against hardware".
`--runner ssh://...` times the table on a remote device through deploy.targets.ssh_runner.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from deploy.errors import RuntimeUnavailableError, UserInputError
from deploy.profiles import Profile
from deploy.targets.latency_ops import OpKey, conv_key, linear_key
from deploy.targets.measure import MeasureConfig

Progress = Callable[[str], None]
_RUNTIME_PRECISIONS = {"onnxruntime": ("fp32", "int8"), "openvino": ("fp32", "bf16", "int8"),
                       "tensorrt": ("fp32", "fp16", "int8")}  # tensorrt: on a remote device only
_WHY_NOT = {"int4": "weight-only int4 has no single-op microbenchmark yet",
            "fp16": "not a CPU runtime precision here", "fp8": "not a CPU runtime precision here",
            "bf16": "this runtime has no bf16 mode (OpenVINO has)"}


@dataclass(frozen=True)
class CalibrateRequest:
    target: str
    runner: str | None = None  # ssh://user@host[:port]
    quick: bool = False
    threads: int | None = None
    fit_model: bool | None = None  # None: fit unless quick (and only locally)


@dataclass(frozen=True)
class CalibrateResult:
    profile: str
    runtime: str
    threads: int
    device: str  # "local" or the runner URL
    table_path: str
    entries: int
    measured: int
    cached: int
    precisions: tuple[str, ...]
    skipped: dict[str, str]
    seconds: float
    model: dict[str, Any] = field(default_factory=dict)  # the fitted latency model's summary, if fitted

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def default_grid(precisions: tuple[str, ...], quick: bool = False) -> list[OpKey]:
    """Convs (3x3, 1x1, strided, depthwise) and linears/matmuls over widths typical of edge CNNs and encoders."""
    if quick:
        shapes = [conv_key(16, 16, 16), conv_key(32, 32, 16), linear_key(16, 64, 64), linear_key(16, 128, 128)]
    else:
        sizes = [(16, 56), (32, 56), (32, 28), (64, 28), (64, 14), (128, 14), (128, 7), (256, 7)]
        shapes = [conv_key(c, c, hw, 3) for c, hw in sizes] + [conv_key(c, c, hw, 1) for c, hw in sizes]
        shapes += [conv_key(c, 2 * c, hw, 3, stride=2) for c, hw in sizes[::2]]
        shapes += [conv_key(c, c, hw, 3, groups=c) for c, hw in sizes[::2]]
        dims = [(128, 128), (256, 256), (256, 1024), (512, 512), (768, 768), (768, 3072)]
        shapes += [linear_key(t, i, o) for t in (1, 128) for i, o in dims]
        shapes += [OpKey("matmul", s) for s in ((4, 128, 32, 128), (4, 128, 128, 32), (12, 128, 64, 128),
                                                (12, 128, 128, 64))]
    return [k.at(p) for p in precisions for k in shapes]


def table_precisions(profile: Profile, runtime: str) -> tuple[tuple[str, ...], dict[str, str]]:
    """The profile's precisions this runtime can time as single ops, and why the others are skipped."""
    from deploy.targets.fingerprint import cpu_flags

    runnable = _RUNTIME_PRECISIONS.get(runtime, ())
    keep, skipped = [], {}
    for prec in profile.precisions:
        if prec not in runnable:
            skipped[prec] = _WHY_NOT.get(prec, f"{runtime} cannot time it as a single op")
        elif prec == "bf16" and not {"avx512_bf16", "amx_bf16"} & cpu_flags():
            skipped[prec] = "this CPU has no bf16 instructions"
        else:
            keep.append(prec)
    return tuple(keep), skipped


def calibrate(request: CalibrateRequest, progress: Progress | None = None) -> CalibrateResult:
    """Build (or complete) the device's lookup table and, unless quick, fit its latency model."""
    from deploy.profiles import resolve_target
    from deploy.targets.latency_table import LatencyTable, TableConfig

    start = time.perf_counter()
    say = progress or (lambda _: None)
    profile = resolve_target(request.target).profile
    timer, device_key, threads = _timer(request, profile)
    precisions, skipped = table_precisions(profile, profile.runtime)
    if not precisions:
        raise UserInputError(f"no precision of '{profile.name}' can be timed as single ops with {profile.runtime}")
    budget = MeasureConfig.quick(min_samples=20, min_seconds=0.05) if request.quick else TableConfig().measure
    table = LatencyTable(TableConfig(profile.runtime, threads, budget), timer, device_key)
    keys = default_grid(precisions, request.quick)
    say(f"timing {len(keys)} single ops ({', '.join(precisions)}) with {profile.runtime}, {threads} thread(s)")
    table.build(keys)
    model: dict[str, Any] = {}
    fit = request.fit_model if request.fit_model is not None else not request.quick
    if fit and timer is None:
        model = fit_device_model(profile, threads, request.quick, say)
    return CalibrateResult(profile.name, profile.runtime, threads, request.runner or "local", str(table.path),
                           len(table.entries), table.stats.measured, table.stats.hits, precisions, skipped,
                           round(time.perf_counter() - start, 2), model)


def fit_device_model(profile: Profile, threads: int, quick: bool = False,
                     say: Progress | None = None) -> dict[str, Any]:
    """Layer tables of the reference models -> fitted latency model, saved for `predict_latency`."""
    from deploy.targets import latency_cache
    from deploy.targets.latency_fit import fit_calibration
    from deploy.targets.latency_model import save_calibration
    from deploy.targets.layer_table import LayerTableConfig

    say = say or (lambda _: None)
    # one thread: time by process CPU, so other tenants of a shared host do not land in the fit (latency_clock)
    config = LayerTableConfig(threads=threads, clock="cpu" if threads == 1 else "wall")
    models = [reference_training_model(ref, threads, config) for ref in _references(quick, say)]
    calibration = fit_calibration(models, profile, threads, profile.runtime, latency_cache.env_key(threads))
    path = save_calibration(calibration, profile)
    return {"path": str(path), "models": calibration.n_models, "band": calibration.band,
            "kinds": len(calibration.factors)}


def _references(quick: bool, say: Progress) -> list[Any]:
    from deploy.targets.latency_reference import reference_set

    refs = reference_set(quick)
    say(f"profiling {len(refs)} reference models for the latency model")
    return refs


def reference_training_model(ref: Any, threads: int, config: Any = None) -> Any:
    """One reference model's layer table as a fitting example (exported, quantized if int8, profiled; cached)."""
    import tempfile
    from pathlib import Path

    from deploy.targets.latency_export import export_static, quantize_qdq
    from deploy.targets.latency_fit import TrainingModel
    from deploy.targets.layer_table import LayerTableConfig, layer_table_of_file

    module, specs = ref.build(), ref.inputs()
    with tempfile.TemporaryDirectory(prefix="deploy-ref-") as tmp:
        path = export_static(module, specs, Path(tmp) / "model.onnx")
        if ref.precision == "int8":
            path = quantize_qdq(path, specs, Path(tmp) / "model_int8.onnx")
        table = layer_table_of_file(path, specs, config or LayerTableConfig(threads=threads),
                                    {name for name, _ in module.named_modules()})
    return TrainingModel(ref.name, table.nodes, table.e2e_p50_ms)


def _timer(request: CalibrateRequest, profile: Profile) -> tuple[Any, str | None, int]:
    """(timer or None for this machine, device key for the cache, threads); refuses what cannot be timed."""
    from deploy.targets.bench import check_measurable, default_threads

    if request.threads is not None and request.threads < 1:
        raise UserInputError("--threads must be >= 1")
    if request.runner is None:
        check_measurable(profile, profile.runtime)
        return None, None, request.threads or default_threads(profile)
    if not request.runner.startswith("ssh://"):
        raise UserInputError(f"--runner '{request.runner}' is not an ssh:// URL", "write ssh://user@host[:port]")
    try:
        from deploy.targets import ssh_runner
    except ImportError:
        raise RuntimeUnavailableError("--runner ssh:// needs the SSH runner (deploy.targets.ssh_runner), which this "
                                      "build does not have", "calibrate locally: leave out --runner") from None
    from deploy.targets.latency_cache import short_hash

    url = ssh_runner.parse_ssh_url(request.runner)  # a malformed URL fails here, before any op is exported
    threads = request.threads or (profile.cores if profile.kind == "cpu" and profile.cores > 0 else 1)

    def remote(path: Any, feeds: dict, precision: str, config: MeasureConfig) -> Any:
        hint = {"fp16": "f16", "int8": None}.get(precision)
        remote_config = ssh_runner.remote_config_for(profile, profile.runtime, threads, hint, config)
        return ssh_runner.measure_remote(request.runner, path, feeds, remote_config)

    return remote, short_hash({"device": str(url), "runtime": profile.runtime}), threads
