"""Per-layer latency of one model on this machine: which torch module costs how much, measured by the runtime's own
per-node profiler (ONNX Runtime profiling, OpenVINO performance counters) and mapped back to modules.

The table also carries the end-to-end p50 of the same model (timed without the profiler) so a reader sees how much of
the real latency the per-node times explain. Profiling and end-to-end blocks alternate over a few rounds and each
number keeps its quietest round, so a neighbour's burst on a shared host does not land in the table. Tables are
cached by model hash, settings and environment.
"""
from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import torch

from deploy.core.errors import UserInputError
from deploy.core.spec import InputSpec
from deploy.targets.latency.nodes import NodeRecord
from deploy.targets.measure.loop import MeasureConfig

SCHEMA = "deploy.layer_table"
SCHEMA_VERSION = 1
CACHE_KIND = "layer_tables"
UNMAPPED = "(unmapped)"


@dataclass(frozen=True)
class LayerTableConfig:
    """Runtime and thread count to profile with, how many profiled runs (per-node medians are taken over them),
    and the budget of the separate end-to-end measurement."""

    runtime: str = "onnxruntime"
    threads: int = 1
    precision: str | None = None  # OpenVINO inference precision hint (f32 / bf16); ORT runs as exported
    runs: int = 50  # profiled runs per round
    warmup_runs: int = 10
    rounds: int = 3  # profile + end-to-end blocks, alternated; each node and the end-to-end keep their quietest
    measure: MeasureConfig = MeasureConfig(min_samples=50, min_seconds=0.5)  # one end-to-end block
    clock: str = "wall"  # or "cpu": process CPU time per inference (threads=1), see measure.clock
    use_cache: bool = True

    def __post_init__(self) -> None:
        from deploy.targets.runners.registry import canonical_runtime

        runtime = canonical_runtime(self.runtime)
        if runtime not in ("onnxruntime", "openvino"):
            raise UserInputError(f"per-layer tables come from onnxruntime or openvino profiling, not {runtime}")
        object.__setattr__(self, "runtime", runtime)
        if self.runs < 1 or self.warmup_runs < 0 or self.threads < 1 or self.rounds < 1:
            raise UserInputError("layer table: runs, rounds and threads must be >= 1, warmup_runs >= 0")
        from deploy.targets.measure.clock import check_clock

        check_clock(self.clock, self.threads)


@dataclass(frozen=True)
class LayerRow:
    """One torch module: its median time (sum over its nodes' medians), share of the node total, what ran."""

    module: str
    ms: float
    share: float
    nodes: int
    op_types: tuple[str, ...]
    precisions: tuple[str, ...]


@dataclass(frozen=True)
class LayerTable:
    model_sha256: str
    runtime: str
    threads: int
    precision: str | None
    runs: int
    e2e_p50_ms: float  # lowest p50 over the rounds, on `clock`
    nodes: tuple[NodeRecord, ...]
    layers: tuple[LayerRow, ...]
    fingerprint: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    e2e_rounds_ms: tuple[float, ...] = ()  # p50 of each end-to-end block; e2e_p50_ms is the lowest
    clock: str = "wall"

    @property
    def node_sum_ms(self) -> float:
        return sum(n.ms for n in self.nodes)

    @property
    def mapped_fraction(self) -> float:
        return sum(n.module is not None for n in self.nodes) / max(len(self.nodes), 1)

    @property
    def coverage(self) -> float:
        """Per-node sum / end-to-end p50: near 1 when the profiler explains the whole latency."""
        return self.node_sum_ms / self.e2e_p50_ms if self.e2e_p50_ms > 0 else float("nan")

    def heaviest(self, count: int = 1) -> list[LayerRow]:
        return sorted((r for r in self.layers if r.module != UNMAPPED), key=lambda r: -r.ms)[:count]

    def row(self, module: str) -> LayerRow | None:
        return next((r for r in self.layers if r.module == module), None)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.update(schema=SCHEMA, schema_version=SCHEMA_VERSION, node_sum_ms=self.node_sum_ms,
                    mapped_fraction=self.mapped_fraction, coverage=self.coverage)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LayerTable":
        if data.get("schema") != SCHEMA or data.get("schema_version") != SCHEMA_VERSION:
            raise UserInputError(f"not a {SCHEMA} v{SCHEMA_VERSION} document")
        return cls(
            model_sha256=data["model_sha256"], runtime=data["runtime"], threads=int(data["threads"]),
            precision=data.get("precision"), runs=int(data["runs"]), e2e_p50_ms=float(data["e2e_p50_ms"]),
            nodes=tuple(NodeRecord.from_dict(n) for n in data["nodes"]),
            layers=tuple(LayerRow(r["module"], r["ms"], r["share"], r["nodes"], tuple(r["op_types"]),
                                  tuple(r["precisions"])) for r in data["layers"]),
            fingerprint=dict(data.get("fingerprint") or {}), created=str(data.get("created", "")),
            e2e_rounds_ms=tuple(data.get("e2e_rounds_ms", ())), clock=data.get("clock", "wall"))


def layer_table(model: torch.nn.Module | str | Path, inputs: Sequence[InputSpec] | None = None,
                config: LayerTableConfig = LayerTableConfig()) -> LayerTable:
    """The per-layer table of a torch module (exported here with static shapes) or of an ONNX file exported with
    the TorchScript exporter. `inputs` must be concrete for a module; for a file they default to its own."""
    from deploy.targets.latency.export import as_onnx

    with tempfile.TemporaryDirectory(prefix="deploy-layers-") as tmp:
        path, specs, module_names = as_onnx(model, inputs, Path(tmp))
        return layer_table_of_file(path, specs, config, module_names)


def layer_table_of_file(path: Path, specs: Sequence[InputSpec], config: LayerTableConfig,
                        module_names: set[str] | None = None) -> LayerTable:
    """Profile, map, and time end to end one ONNX file (cached)."""
    from deploy.core.model.files import file_sha256
    from deploy.targets.latency import cache as latency_cache

    sha = file_sha256(path)
    settings = {"runtime": config.runtime, "threads": config.threads, "precision": config.precision,
                "runs": config.runs, "rounds": config.rounds, "clock": config.clock}
    key = latency_cache.short_hash({"sha": sha, **settings, "modules": sorted(module_names or ()),
                                    "env": latency_cache.env_key(config.threads)})
    if config.use_cache:
        cached = latency_cache.read_json(CACHE_KIND, key)
        if cached is not None:
            try:
                return LayerTable.from_dict(cached)
            except (UserInputError, KeyError, TypeError, ValueError):
                pass  # an old or broken entry is a miss
    table = _measure_table(path, specs, config, module_names, sha)
    if config.use_cache:
        latency_cache.write_json(CACHE_KIND, key, table.to_dict())
    return table


def _measure_table(path: Path, specs: Sequence[InputSpec], config: LayerTableConfig,
                   module_names: set[str] | None, sha: str) -> LayerTable:
    import onnx

    from deploy.targets.measure.fingerprint import fingerprint
    from deploy.targets.measure.clock import timed
    from deploy.targets.latency.export import feeds_for
    from deploy.targets.latency.names import NameResolver
    from deploy.targets.latency.profile import quietest, to_records
    from deploy.targets.measure.loop import measure
    from deploy.targets.runners.registry import get_runner

    feeds = feeds_for(specs)
    runner = get_runner(config.runtime, config.threads, config.precision)
    run_once = timed(runner.prepare(path, feeds), config.clock)
    rounds, p50s = [], []
    for _ in range(config.rounds):
        rounds.append(_profile(path, feeds, config))
        p50s.append(float(measure(run_once, config.measure).summary["p50"]))
    resolver = NameResolver(onnx.load(str(path), load_external_data=False).graph, module_names)
    nodes = to_records(quietest(rounds), resolver)
    return LayerTable(sha, config.runtime, config.threads, config.precision, config.runs * config.rounds,
                      min(p50s), nodes, aggregate(nodes), fingerprint(config.threads),
                      datetime.now(timezone.utc).isoformat(timespec="seconds"), tuple(p50s), config.clock)


def _profile(path: Path, feeds: dict[str, Any], config: LayerTableConfig) -> Any:
    if config.runtime == "openvino":
        from deploy.targets.latency.ov_profile import profile_openvino

        return profile_openvino(path, feeds, config.threads, config.runs, config.warmup_runs, config.precision or "f32")
    from deploy.targets.latency.ort_profile import profile_ort

    return profile_ort(path, feeds, config.threads, config.runs, config.warmup_runs)


def aggregate(nodes: Sequence[NodeRecord]) -> tuple[LayerRow, ...]:
    """Node medians summed per module, heaviest first; unmapped nodes in one row of their own."""
    groups: dict[str, list[NodeRecord]] = {}
    for n in nodes:
        groups.setdefault(UNMAPPED if n.module is None else n.module, []).append(n)
    total = sum(n.ms for n in nodes) or 1.0
    rows = [LayerRow(module, sum(n.ms for n in group), sum(n.ms for n in group) / total, len(group),
                     tuple(sorted({n.op_type for n in group})), tuple(sorted({n.precision for n in group})))
            for module, group in groups.items()]
    return tuple(sorted(rows, key=lambda r: -r.ms))
