"""`deploy regress`, the CI latency gate, as a library call: measure the model (against the baseline model
interleaved, or alone against a stored baseline file), decide with `regress.decide`, return a result whose JSON
also renders the markdown summary and the JUnit XML (`regress.report`). `--update` rewrites the baseline instead.

Measuring is `bench`'s job (`run_bench`): the gate adds no timing loop of its own.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deploy.core.errors import EXIT_OK, UserInputError
from deploy.targets.regress.decide import GateConfig, Verdict, decide

SCHEMA = "deploy.regress"
SCHEMA_VERSION = 1
UPDATED = "updated"


@dataclass(frozen=True)
class RegressRequest:
    """The whole `deploy regress` command line. `measure=None` means: like the baseline file (or the default)."""

    model_path: Path
    baseline: Path | None = None
    baseline_model: Path | None = None
    update: bool = False
    gate: GateConfig = GateConfig()
    measure: Any = None  # MeasureConfig | None
    target: str | None = None
    profile_path: Path | None = None
    runtime: str | None = None
    threads: int | None = None
    input_shapes: tuple[str, ...] = ()
    precision: str | None = None
    trust_pickle: bool = False
    clock: str | None = None  # wall | cpu; None: the baseline file's, else wall

    def __post_init__(self) -> None:
        if self.update and self.baseline is None:
            raise UserInputError("--update needs --baseline FILE: the file to (re)write")
        if self.update and self.baseline_model is not None:
            raise UserInputError("--update measures MODEL alone and writes the baseline; --baseline-model does not "
                                 "apply", "drop --baseline-model")
        if self.baseline is None and self.baseline_model is None:
            raise UserInputError("nothing to compare against", "give --baseline FILE (create it with --update) "
                                 "or --baseline-model OLD.onnx")


@dataclass(frozen=True)
class RegressResult:
    """The gate's answer: outcome, the two measurements, the verdict (None after --update) and what to watch."""

    outcome: str
    mode: str  # "interleaved" | "baseline" | "update"
    new: Any  # Measurement
    old: Any  # Measurement | None
    verdict: Verdict | None
    gate: GateConfig
    baseline: str | None
    baseline_model: str | None
    fingerprint_diff: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    seconds: float = 0.0

    @property
    def exit_code(self) -> int:
        return self.verdict.exit_code if self.verdict is not None else EXIT_OK

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA, "schema_version": SCHEMA_VERSION, "outcome": self.outcome, "exit_code": self.exit_code,
            "mode": self.mode, "model": self.new.model, "baseline": self.baseline,
            "baseline_model": self.baseline_model, "gate": self.gate.to_dict(),
            "verdict": self.verdict.to_dict() if self.verdict else None,
            "fingerprint_diff": list(self.fingerprint_diff), "warnings": list(self.warnings),
            "seconds": self.seconds, "new": self.new.to_dict(), "old": self.old.to_dict() if self.old else None,
        }


def regress(request: RegressRequest, progress: Any = None) -> RegressResult:
    """Run the gate. `progress` is a measure.ProgressFn (e.g. from progress_bar()) or None."""
    start = time.perf_counter()
    if request.update:
        result = _update(request, progress)
    elif request.baseline_model is not None:
        result = _interleaved(request, progress)
    else:
        result = _against_file(request, progress)
    return dataclasses.replace(result, seconds=round(time.perf_counter() - start, 3))


def _bench_request(request: RegressRequest, model: Path, baseline: Any = None, compare: Path | None = None) -> Any:
    """bench's request; what the user left unset comes from the baseline file, so like is measured against like."""
    from deploy.targets.bench import BenchRequest
    from deploy.targets.measure.loop import MeasureConfig

    stored_runtime = (baseline.runtime if baseline is not None else {}) or {}
    measure = request.measure or (baseline.config if baseline is not None else MeasureConfig())
    shapes = request.input_shapes or _stored_shapes(baseline)
    return BenchRequest(
        model_path=model, target=request.target or (None if request.profile_path else _get(baseline, "target")),
        profile_path=request.profile_path, runtime=request.runtime or stored_runtime.get("runtime"),
        threads=request.threads if request.threads is not None else stored_runtime.get("threads"),
        input_shapes=shapes, measure=measure, compare=compare, precision=request.precision,
        trust_pickle=request.trust_pickle, clock=request.clock or stored_runtime.get("clock") or "wall",
    )


def _get(obj: Any, name: str) -> Any:
    return getattr(obj, name, None) if obj is not None else None


def _stored_shapes(baseline: Any) -> tuple[str, ...]:
    """The baseline's concrete inputs as --input-shape strings (NAME:DIMS:DTYPE)."""
    inputs = ((_get(baseline, "model") or {}).get("inputs")) or []
    return tuple(f"{i['name']}:{'x'.join(str(d) for d in i['shape'])}:{i['dtype']}" for i in inputs)


def _measurement_warnings(*pairs: tuple[str, Any]) -> list[str]:
    """Each measurement's own warnings (noise, quick mode), labelled by side, without repeats."""
    out = [f"{label}: {w}" for label, m in pairs if m is not None for w in m.warnings]
    return list(dict.fromkeys(out))


def _update(request: RegressRequest, progress: Any) -> RegressResult:
    from deploy.targets.bench import run_bench
    from deploy.targets.regress.baseline import write_baseline

    new = run_bench(_bench_request(request, request.model_path), progress).measurement
    write_baseline(request.baseline, new)
    return RegressResult(UPDATED, "update", new, None, None, request.gate, str(request.baseline), None,
                         warnings=tuple(_measurement_warnings(("new", new))))


def _interleaved(request: RegressRequest, progress: Any) -> RegressResult:
    """Old and new in independent blocks in one run (measure.paired): the old model is A, the new model B."""
    from deploy.targets.bench import run_bench
    from deploy.targets.regress.baseline import read_baseline

    stored = read_baseline(request.baseline) if request.baseline is not None else None
    bench_request = _bench_request(request, request.baseline_model, stored, compare=request.model_path)
    _check_blocks(bench_request.measure.blocks, request.gate.alpha)
    bench = run_bench(bench_request, progress)
    old, new = bench.measurement, bench.other
    warnings = _measurement_warnings(("baseline model", old), ("new", new))
    stored_sha = ((_get(stored, "model") or {}).get("sha256"))
    if stored_sha and stored_sha != (old.model or {}).get("sha256"):
        warnings.append(f"the baseline file {request.baseline} was measured on another model file than "
                        f"--baseline-model {request.baseline_model}; the verdict uses --baseline-model")
    blocks = [blk["n"] for blk in (new.structure or {}).get("blocks", [])]
    verdict = decide(old.samples_ms, new.samples_ms, request.gate, bench.comparison, blocks)
    return RegressResult(verdict.outcome, "interleaved", new, old, verdict, request.gate,
                         str(request.baseline) if request.baseline else None, str(request.baseline_model),
                         warnings=tuple(warnings))


def _check_blocks(blocks: int, alpha: float) -> None:
    """With n blocks the sign test's smallest p-value is 2 / 2^n: fewer blocks could never flag a regression."""
    import math

    least = max(2, math.ceil(math.log2(2 / alpha) + 1e-9))
    if 1 < blocks < least:
        raise UserInputError(f"--blocks {blocks} can never reach --alpha {alpha:g}: the sign test over n blocks "
                             f"gives p >= 2/2^n", f"use --blocks 1 or at least {least} blocks")


def _against_file(request: RegressRequest, progress: Any) -> RegressResult:
    """Fresh samples against stored ones: only as good as the environments are alike, so differences are listed."""
    from deploy.targets.bench import run_bench
    from deploy.targets.measure.fingerprint import diff_fingerprints
    from deploy.targets.regress.baseline import UPDATE_HINT, read_baseline

    stored = read_baseline(request.baseline)
    new = run_bench(_bench_request(request, request.model_path, stored), progress).measurement
    stored_inputs = (stored.model or {}).get("inputs")
    if stored_inputs and stored_inputs != (new.model or {}).get("inputs"):
        raise UserInputError(f"the baseline {request.baseline} was measured with inputs {_stored_shapes(stored)}, "
                             f"this run with {_stored_shapes(new)}",
                             "pass the baseline's --input-shape, or " + UPDATE_HINT.format(path=request.baseline))
    diff = tuple(diff_fingerprints(stored.fingerprint, new.fingerprint))
    warnings = _measurement_warnings(("baseline", stored), ("new", new))
    if diff:
        warnings.insert(0, f"environment differs from the baseline's ({', '.join(diff)}): latency may have moved "
                           "for that reason alone; compare interleaved with --baseline-model, or refresh the "
                           "baseline on this machine with --update")
    verdict = decide(stored.samples_ms, new.samples_ms, request.gate)
    return RegressResult(verdict.outcome, "baseline", new, stored, verdict, request.gate, str(request.baseline), None,
                         fingerprint_diff=diff, warnings=tuple(warnings))
