"""Fit the latency model of one device from its per-layer tables: per-op-kind correction factors on top of the
roofline, then one end-to-end step, and an error band from leave-one-model-out residuals.

Per node of kind k (op | variant | precision, falling back to its family's kinds, then to one factor over all
nodes): measured = exp(a_k + c_k . z) * roofline ** b_k + d_k, where roofline includes the profile's per-op
overhead and z says how narrow the op's channels are (latency_roofline.narrowness). Weighted least
squares in log space (scipy), with b_k pulled towards 1 and c towards 0 (ridge) so a kind seen over a narrow range
does not extrapolate wildly. Then per model, end-to-end = scale * (sum of nodes - per_node * nodes) + session:
this absorbs the per-run cost outside nodes and what the profiler adds to every node it times. The band is the
90th percentile of |log(measured / predicted)| over models each predicted by a fit that did not see them, per
model precision (int8 models are harder to predict than fp32 ones) where there are enough of them.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np

from deploy.core.errors import UserInputError
from deploy.profiles import Profile
from deploy.targets.latency.nodes import NodeRecord, op_class
from deploy.targets.latency.roofline import narrowness, roofline

SCHEMA = "deploy.latency_calibration"
SCHEMA_VERSION = 1
_MIN_MS = 5e-4


@dataclass(frozen=True)
class FitConfig:
    ridge: float = 2.0  # strength of the pull of b towards 1 and of c1, c2 towards 0
    min_nodes: int = 4  # fewer nodes of a kind than this: use the coarser kind
    band_quantile: float = 0.9
    min_band: float = 0.05  # never claim better than +-5%: the measurement itself is not better on a shared host
    default_band: float = 0.30  # with fewer than 3 models there is nothing to cross-validate

    def __post_init__(self) -> None:
        if self.ridge < 0 or self.min_nodes < 2 or not 0.5 <= self.band_quantile < 1:
            raise UserInputError("fit config: ridge >= 0, min_nodes >= 2, band_quantile in [0.5, 1)")


@dataclass(frozen=True)
class Factor:
    """ms = exp(a + c . z) * roofline_ms ** b + d, fitted on n nodes: a correction factor on the bound, an
    exponent near 1, penalties for narrow channels (z: latency.roofline.narrowness), a fixed cost per call (ms)."""

    a: float
    b: float
    n: int
    c: tuple[float, ...] = (0.0, 0.0, 0.0)
    d: float = 0.0

    def apply(self, roof_ms: float, z: Sequence[float] = (0.0, 0.0, 0.0)) -> float:
        log_ms = self.a + self.b * math.log(max(roof_ms, 1e-9)) + sum(c * v for c, v in zip(self.c, z))
        return math.exp(min(log_ms, 60.0)) + self.d


@dataclass(frozen=True)
class TrainingModel:
    """One fitting example: its executed nodes (with median times) and its end-to-end p50."""

    name: str
    nodes: tuple[NodeRecord, ...]
    e2e_ms: float


@dataclass(frozen=True)
class Calibration:
    """A fitted latency model of one device (profile, runtime, threads, environment)."""

    profile: str
    runtime: str
    threads: int
    env: str
    factors: dict[str, Factor]
    default: Factor
    scale: float
    per_node_ms: float  # the profiler's own cost per timed node, taken off again end to end
    session_ms: float
    band: float  # half-width of the error band, in log space: [ms / e^band, ms * e^band]
    n_models: int
    residuals: tuple[float, ...] = ()  # leave-one-model-out log(measured / predicted)
    models: tuple[str, ...] = field(default=())
    bands: dict[str, float] = field(default_factory=dict)  # per model precision (fp32 | int8), where >= 3 models

    def band_for(self, nodes: Sequence[NodeRecord]) -> float:
        """The band of models like this one (by precision), else the overall band."""
        return self.bands.get(model_precision(nodes), self.band)

    def node_ms(self, node: NodeRecord, profile: Profile, precision: str | None = None) -> float:
        """The corrected time of one node (before the end-to-end step)."""
        return _node_ms(node, self.factors, self.default, profile, self.threads, precision)

    def total_ms(self, node_ms: Sequence[float]) -> float:
        """End to end from the corrected node times."""
        inner = float(sum(node_ms)) - self.per_node_ms * len(node_ms)
        return max(self.scale * inner + self.session_ms, 0.05 * float(sum(node_ms)))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(schema=SCHEMA, schema_version=SCHEMA_VERSION)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Calibration":
        if data.get("schema") != SCHEMA or data.get("schema_version") != SCHEMA_VERSION:
            raise UserInputError(f"not a {SCHEMA} v{SCHEMA_VERSION} document")
        return cls(profile=data["profile"], runtime=data["runtime"], threads=int(data["threads"]), env=data["env"],
                   factors={k: _factor(v) for k, v in data["factors"].items()}, default=_factor(data["default"]),
                   scale=float(data["scale"]), per_node_ms=float(data["per_node_ms"]),
                   session_ms=float(data["session_ms"]), band=float(data["band"]), n_models=int(data["n_models"]),
                   residuals=tuple(data.get("residuals", ())), models=tuple(data.get("models", ())),
                   bands={k: float(v) for k, v in (data.get("bands") or {}).items()})


def model_precision(nodes: Sequence[NodeRecord]) -> str:
    """int8 when any conv or matmul runs in int8, else the precision of the heaviest such node (fp32 if none)."""
    compute = [n for n in nodes if op_class(n.op_type) in ("Conv", "MatMul")]
    if any(n.precision == "int8" for n in compute):
        return "int8"
    return max(compute, key=lambda n: n.macs).precision if compute else "fp32"


def _factor(data: dict[str, Any]) -> Factor:
    return Factor(**{**data, "c": tuple(data.get("c", ()))})


def kind_keys(node: NodeRecord, precision: str | None = None) -> list[str]:
    """Most specific first: op|variant|precision (a plain FusedConv is not a blocked NCHWc Conv), then
    family|variant|precision, then family|precision."""
    prec = precision or node.precision
    family = op_class(node.op_type)
    keys = [f"{node.op_type}|{node.variant}|{prec}"] if node.op_type != family else []
    keys += [f"{family}|{node.variant}|{prec}"] if node.variant else []
    return keys + [f"{family}|{prec}"]


def fit_calibration(models: Sequence[TrainingModel], profile: Profile, threads: int, runtime: str, env: str,
                    config: FitConfig = FitConfig()) -> Calibration:
    """Fit on all models; the band comes from refits that leave each model out in turn."""
    if not models:
        raise UserInputError("fitting a latency model needs at least one measured model")
    factors, default = _fit_factors(models, profile, threads, config)
    scale, per_node, session = _fit_total(models, factors, default, profile, threads)
    residuals = _leave_one_out(models, profile, threads, config) if len(models) >= 3 else []
    band = _band(residuals, config)
    by_precision: dict[str, list[float]] = {}
    for model, residual in zip(models, residuals):
        by_precision.setdefault(model_precision(model.nodes), []).append(residual)
    bands = {prec: _band(values, config) for prec, values in by_precision.items() if len(values) >= 3}
    return Calibration(profile.name, runtime, threads, env, factors, default, scale, per_node, session, band,
                       len(models), tuple(residuals), tuple(m.name for m in models), bands)


def _band(residuals: Sequence[float], config: FitConfig) -> float:
    if len(residuals) < 3:
        return config.default_band
    return max(config.min_band, float(np.quantile(np.abs(residuals), config.band_quantile)))


def _node_ms(node: NodeRecord, factors: dict[str, Factor], default: Factor, profile: Profile, threads: int,
             precision: str | None = None) -> float:
    factor = next((factors[k] for k in kind_keys(node, precision) if k in factors), default)
    return factor.apply(roofline(node, profile, threads, precision).ms, narrowness(node, profile))


def _fit_factors(models: Sequence[TrainingModel], profile: Profile, threads: int,
                 config: FitConfig) -> tuple[dict[str, Factor], Factor]:
    groups: dict[str, list[tuple[float, ...]]] = {}
    everything: list[tuple[float, ...]] = []
    for model in models:
        total = sum(n.ms for n in model.nodes) or 1.0
        for node in model.nodes:
            x = math.log(max(roofline(node, profile, threads).ms, 1e-9))
            y = math.log(max(node.ms, _MIN_MS))
            w = math.sqrt(max(node.ms, _MIN_MS) / total)
            point = (x, *narrowness(node, profile), y, w)
            everything.append(point)
            for key in kind_keys(node):
                groups.setdefault(key, []).append(point)
    default = _fit_kind(everything, config.ridge)
    factors = {k: _fit_kind(v, config.ridge) for k, v in groups.items() if len(v) >= config.min_nodes}
    return factors, default


def _fit_kind(points: Sequence[tuple[float, ...]], ridge: float) -> Factor:
    """Weighted least squares in log space of y = log(exp(a + b x + c . z) + d) (scipy)."""
    from scipy.optimize import least_squares

    data = np.array(points, dtype=float)
    x, z, y, w = data[:, 0], data[:, 1:-2], data[:, -2], data[:, -1]
    sw = np.sqrt(w / w.sum() * len(w))
    pull = math.sqrt(ridge)
    nz = z.shape[1]

    def residuals(p: np.ndarray) -> np.ndarray:
        model = np.log(np.exp(np.clip(p[0] + p[1] * x + z @ p[2:2 + nz], -60, 60)) + p[-1])
        return np.concatenate([sw * (model - y), pull * np.append(p[1] - 1.0, p[2:2 + nz])])

    start = np.concatenate([[float(np.median(y - x)), 1.0], np.zeros(nz), [0.0]])
    bounds = ([-50.0, 0.5] + [-1.0] * nz + [0.0], [50.0, 1.5] + [4.0] * nz + [float(np.exp(y.min()))])
    fit = least_squares(residuals, start, bounds=bounds)
    p = [float(v) for v in fit.x]
    return Factor(p[0], p[1], len(points), tuple(p[2:2 + nz]), p[-1])


def _fit_total(models: Sequence[TrainingModel], factors: dict[str, Factor], default: Factor, profile: Profile,
               threads: int) -> tuple[float, float, float]:
    """end-to-end = scale * (sum - per_node * nodes) + session, least squares on log(measured / predicted).

    per_node is what the profiler adds to every node it times (it reports whole microseconds, and a 0.2 us
    reshape reads as 1-2 us), so a model of many tiny nodes is not over-predicted."""
    from scipy.optimize import least_squares

    sums = np.array([sum(_node_ms(n, factors, default, profile, threads) for n in m.nodes) for m in models])
    counts = np.array([len(m.nodes) for m in models], dtype=float)
    measured = np.array([m.e2e_ms for m in models])
    if len(models) < 3:
        return float(np.median(measured / sums)), 0.0, 0.0

    def residuals(p: np.ndarray) -> np.ndarray:
        return np.log(np.maximum(p[0] * (sums - p[1] * counts) + p[2], 1e-6)) - np.log(measured)

    upper_per_node = max(float(np.min(sums / counts)) * 0.9, 1e-6)
    fit = least_squares(residuals, np.array([1.0, 0.0, 0.0]),
                        bounds=([0.2, 0.0, 0.0], [5.0, upper_per_node, max(float(measured.min()), 1e-3)]))
    return float(fit.x[0]), float(fit.x[1]), float(fit.x[2])


def _leave_one_out(models: Sequence[TrainingModel], profile: Profile, threads: int,
                   config: FitConfig) -> list[float]:
    out = []
    for i, held in enumerate(models):
        rest = [m for j, m in enumerate(models) if j != i]
        factors, default = _fit_factors(rest, profile, threads, config)
        scale, per_node, session = _fit_total(rest, factors, default, profile, threads)
        node_sum = sum(_node_ms(n, factors, default, profile, threads) for n in held.nodes)
        predicted = max(scale * (node_sum - per_node * len(held.nodes)) + session, 0.05 * node_sum)
        out.append(math.log(held.e2e_ms / predicted))
    return out
