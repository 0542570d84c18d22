"""The small interface every runtime speaks, so the measurement loop never names one.

A runner is built from one frozen `RunnerConfig`; `prepare(model, feeds)` does all the slow work (session or
engine build, binding inputs) and returns a zero-argument function that runs ONE inference, which the loop times.
`describe()` says what actually ran (runtime, version, threads, precision), read back from the runtime where it
can be. Runners register themselves in `RUNNERS` with `@register_runner` where they are defined; the runtimes
themselves are imported lazily inside `prepare`.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Protocol, runtime_checkable

import numpy as np

from deploy.core.errors import UserInputError, nearest
from deploy.profiles import Profile

RUNNERS: dict[str, type] = {}
RUNNER_ALIASES = {"ort": "onnxruntime", "ov": "openvino", "trt": "tensorrt", "pytorch": "torch"}
_BUILTIN_MODULES = ("ort", "openvino", "pytorch", "tensorrt")
PRECISION_ALIASES = {"f32": "f32", "fp32": "f32", "float32": "f32", "bf16": "bf16", "bfloat16": "bf16",
                     "f16": "f16", "fp16": "f16", "float16": "f16", "int8": "int8", "fp8": "fp8"}


@dataclass(frozen=True)
class RunnerConfig:
    """How to run: thread count, an optional precision request (f32, bf16, ...), and the target profile."""

    threads: int = 1
    precision: str | None = None
    profile: Profile | None = None  # TensorRT reads its precision list

    def __post_init__(self) -> None:
        if not isinstance(self.threads, int) or isinstance(self.threads, bool) or self.threads < 1:
            raise UserInputError(f"threads must be a positive integer, got {self.threads!r}")
        if self.precision is not None:
            object.__setattr__(self, "precision", normalize_precision(self.precision))


def normalize_precision(name: str) -> str:
    """Accept the spellings people use (fp32, f32, float32) and return one canonical name."""
    key = name.strip().lower()
    if key not in PRECISION_ALIASES:
        close = nearest(key, PRECISION_ALIASES)
        hint = f"did you mean '{close}'?" if close else "use f32 or bf16"
        raise UserInputError(f"unknown precision '{name}'", hint)
    return PRECISION_ALIASES[key]


@runtime_checkable
class Runner(Protocol):
    """One runtime. `prepare` returns a function running one inference; `describe` says how it ran."""

    name: str
    config: RunnerConfig

    def describe(self) -> dict[str, Any]: ...

    def prepare(self, model: Any, feeds: dict[str, np.ndarray]) -> Callable[[], object]: ...


class DeviceTimed:
    """Marks a run-once function that times itself on the device (CUDA events) and returns milliseconds.

    The loop then records the returned value instead of host wall time, which would include launch jitter.
    """

    returns_ms = True

    def __init__(self, fn: Callable[[], float]):
        self._fn = fn

    def __call__(self) -> float:
        return self._fn()


def register_runner(name: str) -> Callable[[type], type]:
    """Register a runner class under its canonical runtime name."""

    def decorate(cls: type) -> type:
        if name in RUNNERS:
            raise ValueError(f"runner {name!r} is registered twice")
        cls.name = name
        RUNNERS[name] = cls
        return cls

    return decorate


def canonical_runtime(name: str) -> str:
    """'ort' -> 'onnxruntime'; an unknown name lists the known ones."""
    _load_builtin()
    key = name.strip().lower()
    key = RUNNER_ALIASES.get(key, key)
    if key not in RUNNERS:
        known = sorted(RUNNERS) + sorted(RUNNER_ALIASES)
        close = nearest(key, known)
        hint = f"did you mean '{close}'?" if close else ""
        raise UserInputError(f"unknown runtime '{name}'",
                             f"{hint + ' ' if hint else ''}known runtimes: {', '.join(sorted(RUNNERS))}")
    return key


def get_runner(name: str, threads: int, precision: str | None = None, profile: Profile | None = None) -> Runner:
    """A runner for `name` (or an alias such as 'ort'), configured for `threads` and `precision`."""
    cls = RUNNERS[canonical_runtime(name)]
    return cls(RunnerConfig(threads=threads, precision=precision, profile=profile))


def _load_builtin() -> None:
    """Import the built-in runner modules (light: each imports its runtime only when preparing)."""
    for module in _BUILTIN_MODULES:
        importlib.import_module(f"deploy.targets.runners.{module}")
