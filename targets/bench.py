"""`deploy bench` as a library call: resolve the target, pick the runtime, load the model, build feeds, measure
(or measure two models interleaved), and return the result with its environment.

Everything that can be refused is refused before any timing, in one line: a target whose latency is predicted
rather than measured, a CPU that lacks the target's flags, TensorRT without TensorRT, a bad model file.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from deploy.core.errors import UserInputError
from deploy.targets.measure.loop import MeasureConfig, Measurement, ProgressFn, measure
from deploy.targets.measure.clock import check_clock, timed
from deploy.targets.measure.paired import measure_blocks
from deploy.targets.measure.stats import Comparison
from deploy.targets.target import Target

COMPARISON_SCHEMA = "deploy.comparison"
COMPARISON_SCHEMA_VERSION = 1


@dataclass(frozen=True)
class BenchRequest:
    """What to measure and how: the whole of `deploy bench`'s command line as one frozen config."""

    model_path: Path
    target: str | None = None  # None with no profile_path: 'cpu', this machine
    profile_path: Path | None = None
    runtime: str | None = None  # None: the profile's runtime
    threads: int | None = None  # None: physical cores, capped at the profile's cores
    input_shapes: tuple[str, ...] = ()
    measure: MeasureConfig = MeasureConfig()
    compare: Path | None = None  # a second model, measured interleaved with the first
    precision: str | None = None
    runner: str | None = None  # ssh://user@host[:port]: measure on that device instead (see targets.runners.remote)
    trust_pickle: bool = False  # the torch runtime may unpickle a model file (runs code from it)
    clock: str = "wall"  # wall | cpu (thread CPU time of one inference thread; see measure.clock)


@dataclass(frozen=True)
class BenchResult:
    """One measurement, or two and their comparison (B = `compare` against A = the model)."""

    measurement: Measurement
    other: Measurement | None = None
    comparison: Comparison | None = None
    note: str = ""  # how the target name resolved ("'cpu' resolved to ..."), for the user

    def to_dict(self) -> dict[str, Any]:
        if self.other is None or self.comparison is None:
            return self.measurement.to_dict()
        return {
            "schema": COMPARISON_SCHEMA,
            "schema_version": COMPARISON_SCHEMA_VERSION,
            "a": self.measurement.to_dict(),
            "b": self.other.to_dict(),
            "comparison": self.comparison.to_dict(),
        }


def bench(model_path: str | Path, *, target: str | None = None, profile_path: str | Path | None = None,
          runtime: str | None = None, threads: int | None = None, input_shapes: Sequence[str] = (),
          config: MeasureConfig | None = None, compare: str | Path | None = None, precision: str | None = None,
          progress: bool | ProgressFn = False, runner: str | None = None, clock: str = "wall") -> dict[str, Any]:
    """Measure a model's latency on this machine for a target; returns the JSON-ready result (see measure.py)."""
    request = BenchRequest(
        model_path=Path(model_path), target=target, profile_path=Path(profile_path) if profile_path else None,
        runtime=runtime, threads=threads, input_shapes=tuple(input_shapes), measure=config or MeasureConfig(),
        compare=Path(compare) if compare else None, precision=precision, runner=runner, clock=clock,
    )
    if progress is True:
        from deploy.targets.measure.progress import progress_bar

        with progress_bar() as report:
            return run_bench(request, report).to_dict()
    return run_bench(request, progress or None).to_dict()


def run_bench(request: BenchRequest, progress: ProgressFn | None = None) -> BenchResult:
    """The work behind `bench`; the CLI calls this to also get the resolution note."""
    from deploy.targets.measure.fingerprint import fingerprint
    from deploy.targets.target import resolve

    target = resolve(request.target or (None if request.profile_path else "cpu"), request.profile_path,
                     request.runtime or _runtime_for_file(request.model_path), request.threads)
    if request.runner:  # the device is elsewhere: none of this machine's checks apply
        return _remote_bench(request, target, progress)
    target.require_measurable()
    check_clock(request.clock, target.threads)
    model, model_info, feeds = load_for_bench(request.model_path, target.runtime, request.input_shapes,
                                              request.trust_pickle)
    runner = target.runner(request.precision)
    context = {"target": target.name, "fingerprint": fingerprint(target.threads, target.name)}
    if request.compare is None:
        result = measure(timed(runner.prepare(model, feeds), request.clock), request.measure, progress)
        return BenchResult(_with(result, model_info, _described(runner, request.clock), context), note=target.note)
    other, other_info, other_feeds = load_for_bench(request.compare, target.runtime, request.input_shapes,
                                                    request.trust_pickle)
    _check_same_inputs(model_info, other_info)
    runner_b = target.runner(request.precision)
    a, b, comparison = measure_blocks(lambda: timed(runner.prepare(model, feeds), request.clock),
                                      lambda: timed(runner_b.prepare(other, other_feeds), request.clock),
                                      request.measure, progress)
    return BenchResult(_with(a, model_info, _described(runner, request.clock), context),
                       _with(b, other_info, _described(runner_b, request.clock), context), comparison, target.note)


def _described(runner: Any, clock: str) -> dict[str, Any]:
    return {**runner.describe(), "clock": clock}


def _remote_bench(request: BenchRequest, target: Target, progress: ProgressFn | None) -> BenchResult:
    """`deploy bench --runner ssh://...`: one measurement on that device (no --compare)."""
    import time

    from deploy.targets.runners.remote import measure_remote, remote_config_for
    from deploy.targets.runners.ssh import parse_ssh_url

    if request.clock != "wall":
        raise UserInputError("--clock cpu times inferences on this machine, not on a remote device",
                             "drop --clock with --runner ssh://")
    if request.compare is not None:
        raise UserInputError("--compare is not supported with --runner ssh://",
                             "measure each model remotely with --json and compare the files with `deploy regress`")
    config = remote_config_for(target.profile, target.runtime, request.threads, request.precision, request.measure)
    started = time.perf_counter()
    result = measure_remote(request.runner, request.model_path, list(request.input_shapes), config, progress)
    remote_note = f"measured on {parse_ssh_url(request.runner)} in {time.perf_counter() - started:.1f} s"
    return BenchResult(result, note="; ".join(n for n in (target.note, remote_note) if n))


def _runtime_for_file(path: Path) -> str | None:
    """An OpenVINO IR runs in OpenVINO whatever the target's default runtime."""
    return "openvino" if Path(path).suffix.lower() == ".xml" else None


def _with(m: Measurement, model_info: dict[str, Any], runtime: dict[str, Any], context: dict[str, Any]) -> Measurement:
    return dataclasses.replace(m, model=model_info, runtime=runtime, **context)


def _is_dim_size(text: str) -> bool:
    return ":" not in text and "=" in text


def load_for_bench(path: Path, runtime: str, input_shapes: Sequence[str],
                   trust_pickle: bool = False) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """(what the runner runs, the model's record for the result, the input feeds)."""
    from deploy.targets.measure.feeds import make_feeds, resolve_inputs

    if runtime == "torch":
        from deploy.core.model.load import load_model

        loaded = load_model(path, input_shapes=[t for t in input_shapes if not _is_dim_size(t)],
                            trust_pickle=trust_pickle)
        if loaded.module is None:
            raise UserInputError(f"the torch runtime runs PyTorch models (.pt, .pt2), not {Path(path).name}",
                                 "for an .onnx file use --runtime ort or --runtime openvino")
        specs = resolve_inputs(loaded.inputs, [t for t in input_shapes if _is_dim_size(t)])
        model, sha256 = loaded.module, loaded.sha256
    else:
        onnx_model = _open_exported(Path(path), runtime)
        specs = resolve_inputs(onnx_model.inputs, input_shapes)
        model, sha256 = onnx_model.path, onnx_model.sha256
    info = {"path": str(path), "sha256": sha256, "inputs": [s.to_dict() for s in specs]}
    return model, info, make_feeds(specs)


def _open_exported(path: Path, runtime: str) -> Any:
    """An ONNX file, or an OpenVINO IR (.xml) for the OpenVINO runtime, checked and with its inputs read."""
    from deploy.targets.model_files import load_onnx, load_openvino_ir

    if path.suffix.lower() != ".xml":
        return load_onnx(path)
    if runtime != "openvino":
        raise UserInputError(f"{path.name} is an OpenVINO IR; it runs in OpenVINO, not {runtime}",
                             "drop --runtime, or pass --runtime openvino")
    return load_openvino_ir(path)


def _check_same_inputs(a: dict[str, Any], b: dict[str, Any]) -> None:
    if a["inputs"] != b["inputs"]:
        raise UserInputError(f"--compare: {b['path']} takes inputs {_shapes(b)}, {a['path']} takes {_shapes(a)}",
                             "compare models with the same inputs")


def _shapes(info: dict[str, Any]) -> str:
    return ", ".join(f"{i['name']}:{'x'.join(map(str, i['shape']))}:{i['dtype']}" for i in info["inputs"])
