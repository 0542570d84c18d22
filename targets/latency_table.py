"""The latency lookup table the allocator prices options with, including options that do not exist yet (a conv at
40% of its channels, a linear at int8 or at rank 64).

Keyed by (runtime, op, shape, precision, threads): one JSON file per runtime, thread count and environment under
the cache folder, one entry per op key. Entries are single-op microbenchmarks (nn-Meter style): the one-op module is
exported to ONNX (and quantized with QDQ for int8, so the real int8 kernel runs), timed with the real runtime and
the measurement loop at a small budget, less the runtime's per-inference cost measured on an empty model. Missing
keys are measured lazily, or interpolated from measured shapes of the same op group (`latency_interp`).

A model's table sum misses what single ops cannot see (fusion across ops, memory traffic between them, the ops
the table does not hold); `Correction` is the closed loop: the ratio of the model's measured end-to-end latency
to its table sum, applied to the sums of its variants.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from deploy.errors import UserInputError
from deploy.targets.latency_ops import OpKey
from deploy.targets.measure import MeasureConfig

SCHEMA = "deploy.latency_table"
SCHEMA_VERSION = 1
CACHE_KIND = "latency_tables"
_MIN_FRACTION = 0.05  # an entry never drops below 5% of its raw time when the per-inference cost is taken off
# (ONNX path, feeds, precision, measure config) -> Measurement: how one exported op is timed
Timer = Callable[[Path, dict, str, MeasureConfig], Any]


@dataclass(frozen=True)
class TableConfig:
    """Which runtime and thread count the table is for, and the budget of each microbenchmark."""

    runtime: str = "onnxruntime"
    threads: int = 1
    measure: MeasureConfig = MeasureConfig.quick(min_samples=40, min_seconds=0.25)

    def __post_init__(self) -> None:
        from deploy.targets.runner import canonical_runtime

        object.__setattr__(self, "runtime", canonical_runtime(self.runtime))
        if self.threads < 1:
            raise UserInputError("latency table: threads must be >= 1")


@dataclass(frozen=True)
class Entry:
    """One measured op: `ms` is its time with the per-inference cost taken off; `raw_ms` the p50 as timed."""

    key: OpKey
    ms: float
    raw_ms: float
    cov: float
    samples: int
    created: str

    def to_dict(self) -> dict[str, Any]:
        return {"ms": self.ms, "raw_ms": self.raw_ms, "cov": self.cov, "samples": self.samples,
                "created": self.created}


@dataclass
class TableStats:
    """What the table did since it was opened: entries measured, exact hits, interpolated estimates."""

    measured: int = 0
    hits: int = 0
    interpolated: int = 0


@dataclass(frozen=True)
class Correction:
    """Closed loop: measured end-to-end / table sum of one model, applied to table sums of its variants."""

    table_ms: float
    measured_ms: float

    @property
    def ratio(self) -> float:
        return self.measured_ms / self.table_ms if self.table_ms > 0 else 1.0

    def apply(self, table_ms: float) -> float:
        return table_ms * self.ratio


class LatencyTable:
    """A lazily filled, disk-cached op latency table for one runtime, thread count and device."""

    def __init__(self, config: TableConfig = TableConfig(), timer: Timer | None = None, device_key: str | None = None):
        """`timer` times on another device (e.g. over SSH) and then needs a `device_key` naming that device.
        By default: this machine's runner and measurement loop, keyed by this machine's fingerprint."""
        from deploy.targets import latency_cache

        self.config = config
        self._timer = timer or self._local_timer
        env = device_key or latency_cache.env_key(config.threads)
        self.key = f"{config.runtime}-t{config.threads}-{env}"
        self.stats = TableStats()
        self._doc = latency_cache.read_json(CACHE_KIND, self.key) or {}
        if self._doc.get("schema") != SCHEMA or self._doc.get("schema_version") != SCHEMA_VERSION:
            self._doc = {}
        self._entries: dict[str, Entry] = {}
        for text, data in (self._doc.get("entries") or {}).items():
            key = OpKey.from_text(text)
            self._entries[text] = Entry(key, data["ms"], data["raw_ms"], data["cov"], data["samples"], data["created"])

    @property
    def path(self) -> Path:
        from deploy.targets import latency_cache

        return latency_cache.cache_path(CACHE_KIND, self.key)

    @property
    def entries(self) -> dict[str, Entry]:
        return dict(self._entries)

    def lookup(self, key: OpKey, measure: bool = True) -> float:
        """ms of `key`: the stored entry, else (measure=True) a new microbenchmark, else an interpolation."""
        entry = self._entries.get(key.text)
        if entry is not None:
            self.stats.hits += 1
            return entry.ms
        if measure:
            return self.build([key])[0].ms
        return self.estimate(key)

    def estimate(self, key: OpKey) -> float:
        """Interpolate from measured keys of the same op group (no measuring)."""
        from deploy.targets.latency_interp import interpolate

        points = [(e.key.macs, e.ms) for e in self._entries.values() if e.key.group == key.group]
        if not points:
            raise UserInputError(f"the latency table has no measured '{key.group}' op to estimate {key.text} from",
                                 "measure it (lookup with measure=True) or run `deploy profiles calibrate`")
        self.stats.interpolated += 1
        return interpolate(points, key.macs)

    def price(self, keys: Iterable[OpKey], measure: bool = False) -> float:
        """Sum of the table's times for `keys` (measuring missing ones only when asked)."""
        return sum(self.lookup(k, measure=measure) for k in keys)

    def build(self, keys: Sequence[OpKey]) -> list[Entry]:
        """Make sure every key has an entry, measuring the missing ones; saves once at the end."""
        unique = list(dict.fromkeys(keys))
        missing = [k for k in unique if k.text not in self._entries]
        self.stats.hits += len(unique) - len(missing)
        if missing:
            session = self._session_ms()
            for key in missing:
                self._entries[key.text] = self._measure(key, session)
                self.stats.measured += 1
            self._save()
        return [self._entries[k.text] for k in keys]

    def correction(self, keys: Iterable[OpKey], measured_ms: float, measure: bool = True) -> Correction:
        """The closed loop for one model: its measured end-to-end latency against its table sum."""
        return Correction(self.price(keys, measure=measure), measured_ms)

    def _session_ms(self) -> float:
        if "session_ms" not in self._doc:
            from deploy.targets.latency_ops import probe_module

            module, specs = probe_module()
            self._doc["session_ms"] = self._time(module, specs, "fp32")[0]
        return float(self._doc["session_ms"])

    def _measure(self, key: OpKey, session_ms: float) -> Entry:
        from deploy.targets.latency_ops import single_op

        module, specs = single_op(key)
        raw, cov, n = self._time(module, specs, key.precision)
        ms = max(raw - session_ms, raw * _MIN_FRACTION)
        return Entry(key, ms, raw, cov, n, datetime.now(timezone.utc).isoformat(timespec="seconds"))

    def _time(self, module: Any, specs: Sequence[Any], precision: str) -> tuple[float, float, int]:
        """(p50 ms, CoV, samples) of one exported (and, for int8, quantized) module."""
        from deploy.targets.latency_export import export_static, feeds_for, quantize_qdq

        with tempfile.TemporaryDirectory(prefix="deploy-op-") as tmp:
            path = export_static(module, specs, Path(tmp) / "op.onnx")
            if precision == "int8":
                path = quantize_qdq(path, specs, Path(tmp) / "op_int8.onnx")
            result = self._timer(path, feeds_for(specs), precision, self.config.measure)
        return float(result.summary["p50"]), float(result.summary["cov"]), int(result.summary["n"])

    def _local_timer(self, path: Path, feeds: dict, precision: str, config: MeasureConfig) -> Any:
        from deploy.targets.measure import measure
        from deploy.targets.runner import get_runner

        hint = "bf16" if precision == "bf16" else None  # only OpenVINO takes a precision hint; int8 is in the file
        return measure(get_runner(self.config.runtime, self.config.threads, hint).prepare(path, feeds), config)

    def _save(self) -> None:
        from deploy.targets import latency_cache

        self._doc.update(schema=SCHEMA, schema_version=SCHEMA_VERSION, runtime=self.config.runtime,
                         threads=self.config.threads,
                         entries={text: e.to_dict() for text, e in sorted(self._entries.items())})
        latency_cache.write_json(CACHE_KIND, self.key, self._doc)
