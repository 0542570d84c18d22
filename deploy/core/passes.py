"""The pass pipeline: a pass is a frozen, typed config plus `run(state, ctx) -> state`.

Passes register themselves in `PASSES` with `@register_pass`, where they are defined. The runner never names a
pass: it reads what a pass declares as data (needs calibration, which caches it invalidates) and wraps every pass
in the instruments (timing, dumps) of the context.
"""
from __future__ import annotations

import dataclasses
import time
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Protocol, runtime_checkable

import torch

from deploy.core.errors import ConfigError, DataError, nearest
from deploy.core.spec import InputSpec
from deploy.profiles import Profile
from deploy.core.data import CalibrationSet


class TargetLike(Protocol):
    """What a pass may ask of the target it compiles for (deploy.targets.target.Target is one; the pass core sits
    below the targets layer, so it names the shape, not the class)."""

    profile: Profile
    runtime: str
    threads: int
    float_precision: str
    measured: bool

    @property
    def name(self) -> str: ...

    @property
    def qdq_policy(self) -> str: ...


@dataclass
class Record:
    """One decision or measurement, kept for the report."""

    source: str  # the pass (or instrument) that wrote it
    kind: str  # e.g. "decision", "measurement", "timing", "warning"
    data: dict[str, Any]


@dataclass
class State:
    """What flows through the pipeline: the model being compiled and everything learned about it."""

    module: torch.nn.Module
    inputs: list[InputSpec]
    target: TargetLike
    original: torch.nn.Module | None = None  # the model before any pass: the teacher recovery distils from
    records: list[Record] = field(default_factory=list)
    artifacts: dict[str, Path] = field(default_factory=dict)  # files the passes wrote (export: model.onnx, ...)
    attached: dict[str, Any] = field(default_factory=dict)  # what a pass hands the next (quantize: the Q/DQ plan)

    def record(self, source: str, kind: str, **data: Any) -> None:
        self.records.append(Record(source, kind, data))

    def example_inputs(self, sizes: dict[str, int] | None = None) -> tuple[torch.Tensor, ...]:
        gen = torch.Generator().manual_seed(0)
        return tuple(spec.example(sizes, gen) for spec in self.inputs)


class Instrument(Protocol):
    """Wraps every pass: timing, dumps, skipping. Never code inside a pass."""

    def before(self, pass_: "Pass", state: State, ctx: "Context") -> None: ...

    def after(self, pass_: "Pass", state: State, ctx: "Context") -> None: ...


@dataclass
class Context:
    """What a pass may use but does not own: calibration data, caches, instruments, a seed.

    Statistics gathered by calibrating passes live in `stats`, keyed by pass name, not in configs.
    """

    calibration: CalibrationSet | None = None
    cache_dir: Path | None = None
    out_dir: Path | None = None  # where an export pass writes
    prebuilt: dict[str, Any] = field(default_factory=dict)  # what the plan search built, keyed "<pass>:<weights>"
    instruments: list[Instrument] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    seed: int = 0

    def invalidate(self, names: Iterable[str]) -> None:
        for name in names:
            self.stats.pop(name, None)


@runtime_checkable
class Pass(Protocol):
    """A transformation of the state. Subclasses declare their needs as class data."""

    name: ClassVar[str]
    version: ClassVar[int]
    config_class: ClassVar[type]
    needs_calibration: ClassVar[bool]
    invalidates: ClassVar[tuple[str, ...]]
    config: Any

    def run(self, state: State, ctx: Context) -> State: ...


PASSES: dict[str, type] = {}

# The modules that define the built-in passes, imported on first use of the registry (explicit, no discovery).
BUILTIN_PASS_MODULES = ("deploy.compress.prune.api", "deploy.compress.lowrank.api", "deploy.compress.recover",
                        "deploy.compress.quant.api", "deploy.export.export_pass")


def load_builtin_passes() -> dict[str, type]:
    import importlib

    for name in BUILTIN_PASS_MODULES:
        importlib.import_module(name)
    return PASSES


def register_pass(name: str, config: type, version: int = 1, needs_calibration: bool = False,
                  invalidates: tuple[str, ...] = ()) -> Callable[[type], type]:
    """Register a pass class under `name`, binding it to its frozen dataclass config."""
    if not (dataclasses.is_dataclass(config) and config.__dataclass_params__.frozen):  # type: ignore[attr-defined]
        raise TypeError(f"config of pass {name!r} must be a frozen dataclass")

    def decorate(cls: type) -> type:
        if name in PASSES:
            raise ValueError(f"pass {name!r} is registered twice")
        cls.name = name
        cls.version = version
        cls.config_class = config
        cls.needs_calibration = needs_calibration
        cls.invalidates = tuple(invalidates)
        PASSES[name] = cls
        return cls

    return decorate


def make_pass(name: str, config: Any = None) -> Any:
    """Instantiate a registered pass; an unknown name lists the known ones."""
    if name not in PASSES:
        load_builtin_passes()
    if name not in PASSES:
        close = nearest(name, PASSES)
        hint = f"did you mean '{close}'?" if close else f"known passes: {', '.join(sorted(PASSES)) or 'none'}"
        raise ConfigError(f"unknown pass '{name}'", hint)
    cls = PASSES[name]
    if config is None:
        config = cls.config_class()
    if not isinstance(config, cls.config_class):
        raise ConfigError(f"pass '{name}' takes a {cls.config_class.__name__}, got {type(config).__name__}")
    return cls(config)


# --- config round trip: {type, version, data}; unknown keys rejected --------------------------------------------

def config_to_dict(pass_: Any) -> dict[str, Any]:
    return {"type": pass_.name, "version": pass_.version, "data": _to_plain(pass_.config)}


def config_from_dict(entry: dict[str, Any]) -> Any:
    """Rebuild a pass from `{type, version, data}`; any unknown key (at any level) is an error."""
    extra = set(entry) - {"type", "version", "data"}
    if extra:
        raise ConfigError(f"unknown key '{sorted(extra)[0]}' in a pass entry", "an entry has type, version, data")
    if "type" not in entry:
        raise ConfigError("a pass entry has no 'type'", f"known passes: {', '.join(sorted(PASSES))}")
    name = entry["type"]
    if name not in PASSES:
        make_pass(name)  # loads the built-in passes; raises with the known names if still unknown
    cls = PASSES[name]
    version = entry.get("version", cls.version)
    if version != cls.version:
        raise ConfigError(f"pass '{name}' config has version {version}, this deploy reads version {cls.version}",
                          "re-create the config with this version")
    config = _from_plain(cls.config_class, entry.get("data", {}), f"pass '{name}'")
    return cls(config)


def _to_plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _to_plain(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    return value


def _from_plain(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a table, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            close = nearest(key, names)
            hint = f"did you mean '{close}'?" if close else f"known keys: {', '.join(sorted(names))}"
            raise ConfigError(f"{where}: unknown key '{key}'", hint)
    kwargs = {key: _coerce(hints[key], value, f"{where}.{key}") for key, value in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return _from_plain(hint, value, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: {value!r} does not fit {hint}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        return tuple(_coerce(inner, v, where) for v in value)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        return [_coerce(inner, v, where) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        inner = args[1] if len(args) == 2 else Any
        return {k: _coerce(inner, v, where) for k, v in value.items()}
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is Path and isinstance(value, str):
        return Path(value)
    if isinstance(hint, type) and not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: expected {getattr(hint, '__name__', hint)}, got {value!r}")
    return value


# --- runner -------------------------------------------------------------------------------------------------------

@dataclass
class PassTiming:
    """Records each pass's wall time as a report record (an instrument, not code in the passes)."""

    started: dict[str, float] = field(default_factory=dict)

    def before(self, pass_: Any, state: State, ctx: Context) -> None:
        self.started[pass_.name] = time.perf_counter()

    def after(self, pass_: Any, state: State, ctx: Context) -> None:
        seconds = time.perf_counter() - self.started.pop(pass_.name)
        state.record(pass_.name, "timing", seconds=round(seconds, 4))


def run_pipeline(passes: list[Any], state: State, ctx: Context) -> State:
    """Run the passes in order, checking declared needs and wrapping each in the context's instruments."""
    for pass_ in passes:
        if pass_.needs_calibration and ctx.calibration is None:
            raise DataError(f"pass '{pass_.name}' needs calibration data", "pass --calib DATA")
        for inst in ctx.instruments:
            inst.before(pass_, state, ctx)
        state = pass_.run(state, ctx)
        ctx.invalidate(pass_.invalidates)
        for inst in reversed(ctx.instruments):
            inst.after(pass_, state, ctx)
    return state
