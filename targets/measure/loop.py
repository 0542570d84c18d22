"""The measurement loop: warm up, then time one inference at a time until there are enough samples AND enough
seconds, all under the host-wide lock; keep every raw sample. Two models are compared in independent blocks of
interleaved rounds (measure.paired), built on the round loop here.

`Measurement.to_dict()` is the JSON of `deploy bench --json` and of regression baselines (schema below, version 1).
"""
from __future__ import annotations

import dataclasses
import gc
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Iterator, Sequence

from deploy.core import stop
from deploy.core.errors import ConfigError, UserInputError
from deploy.targets.measure.lock import LockRecord, measurement_lock
from deploy.targets.measure.stats import summarize

SCHEMA = "deploy.measurement"
SCHEMA_VERSION = 1
ProgressFn = Callable[[str, float], None]  # (phase: "warmup" | "sampling", fraction done in [0, 1])

log = logging.getLogger(__name__)
log.addHandler(logging.NullHandler())  # warnings travel in the result; callers decide whether to print them
_PROGRESS_EVERY_S = 0.05


@dataclass(frozen=True)
class MeasureConfig:
    """How long to measure. Sampling stops when there are >= min_samples AND >= min_seconds have passed, or at
    max_seconds (warm-up included) with a warning if that came first."""

    warmup_min_s: float = 0.2
    warmup_min_runs: int = 10
    min_samples: int = 64
    min_seconds: float = 3.0
    max_seconds: float = 60.0
    is_quick: bool = False  # a sub-second budget for tests and smoke runs: not for decisions
    confidence: float = 0.95
    cov_warn: float = 0.10
    lock_timeout_s: float = 600.0
    blocks: int = 12  # a comparison of two models: independent blocks (measure.paired), each with fresh sessions
    min_sample_ms: float = 1.0  # in a comparison, a sample is the mean of k inferences covering at least this

    def __post_init__(self) -> None:
        for name in ("warmup_min_s", "min_seconds", "lock_timeout_s"):
            if getattr(self, name) < 0:
                raise ConfigError(f"measure config: {name} must be >= 0, got {getattr(self, name)}")
        if self.min_sample_ms < 0:
            raise ConfigError(f"measure config: min_sample_ms must be >= 0, got {self.min_sample_ms}")
        for name in ("warmup_min_runs", "min_samples", "blocks"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"measure config: {name} must be a positive integer, got {value!r}")
        if self.max_seconds <= 0 or self.max_seconds < self.min_seconds:
            raise ConfigError(f"measure config: max_seconds ({self.max_seconds}) must be positive and at least "
                              f"min_seconds ({self.min_seconds})")
        if not 0.5 <= self.confidence < 1.0:
            raise ConfigError(f"measure config: confidence must be in [0.5, 1), got {self.confidence}")
        if self.cov_warn <= 0:
            raise ConfigError(f"measure config: cov_warn must be positive, got {self.cov_warn}")

    @classmethod
    def quick(cls, **changes: Any) -> "MeasureConfig":
        """A sub-second budget (tests, smoke runs); `changes` override fields, e.g. quick(min_samples=200)."""
        base = cls(warmup_min_s=0.02, warmup_min_runs=3, min_samples=16, min_seconds=0.1, max_seconds=10.0,
                   is_quick=True, blocks=1)
        return dataclasses.replace(base, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MeasureConfig":
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"measure config: unknown key '{sorted(unknown)[0]}'")
        return cls(**data)


@dataclass(frozen=True)
class Measurement:
    """Raw samples, their summary, and everything needed to judge whether another number is comparable."""

    samples_ms: tuple[float, ...]
    summary: dict[str, Any]
    config: MeasureConfig
    lock: LockRecord
    warnings: tuple[str, ...] = ()
    model: dict[str, Any] | None = None  # {"path", "sha256", "inputs": [{name, shape, dtype}]}
    target: str | None = None
    runtime: dict[str, Any] = field(default_factory=dict)
    fingerprint: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    structure: dict[str, Any] = field(default_factory=dict)  # a comparison's blocks: order, inner loop k, samples

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "schema_version": SCHEMA_VERSION,
            "model": self.model,
            "target": self.target,
            "runtime": self.runtime,
            "config": self.config.to_dict(),
            "samples_ms": list(self.samples_ms),
            "summary": self.summary,
            "fingerprint": self.fingerprint,
            "lock": self.lock.to_dict(),
            "warnings": list(self.warnings),
            "created": self.created,
            **({"structure": self.structure} if self.structure else {}),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Measurement":
        """Read a measurement back (a bench --json output or a baseline file); schema and version are checked."""
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            raise UserInputError(f"not a {SCHEMA} document", "give the JSON written by `deploy bench --json`")
        if data.get("schema_version") != SCHEMA_VERSION:
            raise UserInputError(f"{SCHEMA} schema_version {data.get('schema_version')!r} is not supported",
                                 f"this deploy reads version {SCHEMA_VERSION}; re-create the file")
        try:
            return cls(
                samples_ms=tuple(float(x) for x in data["samples_ms"]),
                summary=dict(data["summary"]),
                config=MeasureConfig.from_dict(data["config"]),
                lock=LockRecord.from_dict(data.get("lock") or {}),
                warnings=tuple(data.get("warnings") or ()),
                model=data.get("model"),
                target=data.get("target"),
                runtime=dict(data.get("runtime") or {}),
                fingerprint=dict(data.get("fingerprint") or {}),
                created=str(data.get("created", "")),
                structure=dict(data.get("structure") or {}),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise UserInputError(f"{SCHEMA} document is incomplete or malformed",
                                 f"{type(exc).__name__}: {exc}") from None


def sample_timer(run_once: Callable[[], object]) -> Callable[[], float]:
    """A function returning one sample in ms: host perf_counter_ns around the call, or the device time it reports."""
    if getattr(run_once, "returns_ms", False):
        return lambda: float(run_once())  # type: ignore[arg-type]

    def timed() -> float:
        start = time.perf_counter_ns()
        run_once()
        return (time.perf_counter_ns() - start) / 1e6

    return timed


@contextmanager
def gc_paused() -> Iterator[None]:
    """Like timeit: a collection of the harness's garbage is not the model's latency."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


class RateLimited:
    """Rate-limited progress reports, so the callback never sits between every pair of samples."""

    def __init__(self, fn: ProgressFn | None):
        self.fn, self.last = fn, 0.0

    def __call__(self, phase: str, fraction: float, force: bool = False) -> None:
        now = time.perf_counter()
        if self.fn is not None and (force or now - self.last >= _PROGRESS_EVERY_S):
            self.last = now
            self.fn(phase, min(max(fraction, 0.0), 1.0))


def timed_rounds(timers: Sequence[Callable[[], float]], config: MeasureConfig, deadline: float,
                 progress: RateLimited, warmup: bool) -> list[list[float]]:
    """Run rounds of every timer (order reversed every other round) until the phase's stop rule holds."""
    samples: list[list[float]] = [[] for _ in timers]
    start = time.perf_counter()
    need_n = config.warmup_min_runs if warmup else config.min_samples
    need_s = config.warmup_min_s if warmup else config.min_seconds
    phase = "warmup" if warmup else "sampling"
    order = list(range(len(timers)))
    round_no = 0
    while True:
        stop.check()  # a Ctrl-C swallowed in a session's finalizer still stops the measurement here
        for i in (order if round_no % 2 == 0 else order[::-1]):
            samples[i].append(timers[i]())
        round_no += 1
        now = time.perf_counter()
        done = min(round_no / need_n, (now - start) / need_s if need_s > 0 else 1.0)
        if done >= 1.0 or now >= deadline:
            progress(phase, 1.0, force=True)
            return samples
        progress(phase, max(done, (now - start) / max(deadline - start, 1e-9)))


def _run(timers: Sequence[Callable[[], float]], config: MeasureConfig,
         progress: ProgressFn | None) -> tuple[list[list[float]], LockRecord]:
    report = RateLimited(progress)
    with gc_paused(), measurement_lock(config.lock_timeout_s) as lock:
        begin = time.perf_counter()
        timed_rounds(timers, config, begin + config.max_seconds / 2, report, warmup=True)
        samples = timed_rounds(timers, config, begin + config.max_seconds, report, warmup=False)
    return samples, lock


def measurement_from(samples: list[float], config: MeasureConfig, lock: LockRecord, announce: bool = True
                     ) -> Measurement:
    """A Measurement from raw samples (here or from a remote device): summary, warnings, lock record. `announce`
    False: the warnings are kept in it but not logged (a sequential measurement's earlier looks)."""
    summary = summarize(samples, config.confidence)
    warnings = []
    if summary["cov"] > config.cov_warn:
        warnings.append(f"noisy measurement: CoV {summary['cov']:.1%} is above {config.cov_warn:.0%}; close other "
                        "programs or raise --min-seconds before trusting small differences")
    if summary["n"] < config.min_samples:
        warnings.append(f"only {summary['n']} samples (wanted {config.min_samples}) within max_seconds="
                        f"{config.max_seconds:g}")
    if config.is_quick:
        warnings.append("quick mode: a sub-second measurement, fine for a smoke test, not for decisions")
    for text in warnings if announce else ():
        log.warning(text)
    return Measurement(tuple(samples), summary, config, lock, tuple(warnings),
                       created=datetime.now(timezone.utc).isoformat(timespec="seconds"))


def measure(run_once: Callable[[], object], config: MeasureConfig = MeasureConfig(),
            progress: ProgressFn | None = None) -> Measurement:
    """Time `run_once` (one inference) under the host lock: warm-up, then samples until the config's stop rule."""
    samples, lock = _run([sample_timer(run_once)], config, progress)
    return measurement_from(samples[0], config, lock)
