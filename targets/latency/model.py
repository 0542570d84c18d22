"""Predicted latency for a device profile, with an error band on every number.

Per executed node: the roofline bound max(2 * MACs / peak ops at its precision, bytes / bandwidth) plus the
profile's per-op overhead. Where this device was measured (its layer tables fitted into a `Calibration`, see
`latency.fit`), per-op-kind correction factors and an end-to-end step turn that into a prediction whose band comes
from held-out residuals. Where it never was (Jetson, A100, H100, Raspberry Pi 5), the bound is divided by a default
efficiency and the band is wide and labelled "not yet verified against hardware", unless the profile carries a fit on
published latencies of the device (`latency.published`): then its efficiency and its leave-one-model-out band apply,
still unverified here.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from deploy.core.spec import InputSpec
from deploy.profiles import Profile
from deploy.targets.latency.fit import Calibration
from deploy.targets.latency.nodes import NodeRecord

UNVERIFIED = "not yet verified against hardware"
DEFAULT_EFFICIENCY = 0.5  # share of peak a well-tuned runtime reaches on typical layers, absent any measurement
UNVERIFIED_BAND = math.log(3.0)  # x/÷ 3
CACHE_KIND = "latency_models"


@dataclass(frozen=True)
class LayerPrediction:
    module: str
    ms: float
    roofline_ms: float
    bound: str  # compute | memory | overhead
    nodes: int
    precision: str


@dataclass(frozen=True)
class Prediction:
    """ms with its band [low_ms, high_ms]; `verified` when the band comes from measurements of this device."""

    ms: float
    low_ms: float
    high_ms: float
    verified: bool
    label: str
    profile: str
    threads: int
    per_layer: tuple[LayerPrediction, ...]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def predict_latency(model: Any, inputs: Sequence[InputSpec] | None = None, profile: Profile | str = "cpu",
                    precision_map: str | Mapping[str, str] | None = None, threads: int | None = None,
                    calibration: Calibration | None = None) -> Prediction:
    """Predict the latency of `model` on `profile`.

    `model`: a torch module (with `inputs`), an ONNX file, the NodeRecords of a graph or a layer table, or a
    `deploy.core.analysis.ModelSummary` (coarse: its layers' MACs and weights only). `precision_map`: one precision for
    every layer or {module: precision} ('*' for the rest). `calibration`: a fitted model of this device; by default
    the one `deploy profiles calibrate` saved for it, if any."""
    prof = _profile(profile)
    threads = threads or _default_threads(prof)
    local = _calibrated_here(prof)
    if calibration is None and local:
        calibration = load_calibration(prof, threads)
    nodes, built_int8 = _nodes(model, inputs, precision_map, calibrated=calibration is not None)
    return predict_nodes(nodes, prof, threads, calibration, None if built_int8 else precision_map)


def predict_nodes(nodes: Sequence[NodeRecord], profile: Profile, threads: int,
                  calibration: Calibration | None = None,
                  precision_map: str | Mapping[str, str] | None = None) -> Prediction:
    """The prediction from executed nodes; `precision_map` re-prices nodes at other precisions (roofline only)."""
    from deploy.targets.latency.graph import precision_for
    from deploy.targets.latency.roofline import roofline

    fit = profile.published_fit if calibration is None else None
    efficiency = fit.efficiency if fit is not None else DEFAULT_EFFICIENCY
    priced = []
    for node in nodes:
        prec = precision_for(node.module, precision_map, node.precision) if precision_map is not None else None
        roof = roofline(node, profile, threads, prec)
        if calibration is not None:
            ms = calibration.node_ms(node, profile, prec)
        else:
            ms = max(roof.compute_ms, roof.memory_ms) / efficiency + roof.overhead_ms
        priced.append((node, roof, ms, prec or node.precision))
    node_total = sum(p[2] for p in priced)
    if calibration is not None:
        total = calibration.total_ms([p[2] for p in priced])
        band, verified = calibration.band_for(nodes), True
        label = (f"calibrated on this machine ({calibration.n_models} models); band {_pct(band)}: 90% of "
                 f"leave-one-model-out errors")
    elif fit is not None:
        from deploy.targets.latency.published import fit_label

        total, band, verified, label = node_total, fit.band, False, fit_label(fit)
    else:
        total, band, verified = node_total, UNVERIFIED_BAND, False
        label = f"{UNVERIFIED}: roofline at {DEFAULT_EFFICIENCY:.0%} of peak, band x/÷ {math.exp(band):.0f}"
    scale = total / node_total if node_total > 0 else 1.0
    return Prediction(total, total / math.exp(band), total * math.exp(band), verified, label, profile.name, threads,
                      _per_layer(priced, scale))


def _per_layer(priced: Sequence[tuple[NodeRecord, Any, float, str]], scale: float) -> tuple[LayerPrediction, ...]:
    groups: dict[str, list[tuple[NodeRecord, Any, float, str]]] = {}
    for item in priced:
        groups.setdefault(item[0].module if item[0].module is not None else "(unmapped)", []).append(item)
    rows = []
    for module, items in groups.items():
        compute = sum(i[1].compute_ms for i in items)
        memory = sum(i[1].memory_ms for i in items)
        overhead = sum(i[1].overhead_ms for i in items)
        bound = max((("compute", compute), ("memory", memory), ("overhead", overhead)), key=lambda kv: kv[1])[0]
        precs = sorted({i[3] for i in items})
        rows.append(LayerPrediction(module, sum(i[2] for i in items) * scale, sum(i[1].ms for i in items), bound,
                                    len(items), "+".join(precs)))
    return tuple(sorted(rows, key=lambda r: -r.ms))


def _pct(band: float) -> str:
    return f"-{1 - math.exp(-band):.0%}/+{math.exp(band) - 1:.0%}"


def _nodes(model: Any, inputs: Sequence[InputSpec] | None, precision_map: str | Mapping[str, str] | None,
           calibrated: bool) -> tuple[tuple[NodeRecord, ...], bool]:
    """(executed nodes of `model`, whether int8 layers were really quantized). Calibrated (this CPU): the exact
    kernels, int8 layers quantized; else the portable graph, re-priced at the requested precisions."""
    from deploy.core.analysis import ModelSummary

    if isinstance(model, ModelSummary):
        return summary_nodes(model), False
    if isinstance(model, (tuple, list)) and all(isinstance(n, NodeRecord) for n in model):
        return tuple(model), False
    if hasattr(model, "nodes") and all(isinstance(n, NodeRecord) for n in getattr(model, "nodes")):
        return tuple(model.nodes), False
    from deploy.targets.latency.graph import graph_nodes

    if not calibrated:
        return graph_nodes(model, inputs, level="extended"), False
    return graph_nodes(model, inputs, level="all", int8_modules=_int8_modules(precision_map)), True


def _int8_modules(precision_map: str | Mapping[str, str] | None) -> list[str]:
    if precision_map is None:
        return []
    if isinstance(precision_map, str):
        return ["*"] if precision_map == "int8" else []
    return ["*" if name == "*" else name for name, prec in precision_map.items() if prec == "int8"]


_SUMMARY_OPS = {"Conv2d": "Conv", "Conv1d": "Conv", "Linear": "Gemm", "LayerNorm": "LayerNormalization",
                "Embedding": "Gather", "BatchNorm": "BatchNormalization", "GroupNorm": "GroupNormalization"}


def summary_nodes(summary: Any) -> tuple[NodeRecord, ...]:
    """Coarse nodes from a layer summary: MACs and weight bytes per layer (activations are not in a summary,
    so memory-bound layers are under-priced); BatchNorm is left out, as runtimes fold it into its conv."""
    nodes = []
    for layer in summary.layers:
        if layer.type == "BatchNorm":
            continue
        shape = list(layer.weight_shape)
        channels = tuple(shape[:2]) if layer.type.startswith("Conv") and len(shape) >= 2 else (
            (shape[0], shape[1]) if layer.type == "Linear" and len(shape) == 2 else ())
        nodes.append(NodeRecord(layer.name, _SUMMARY_OPS.get(layer.type, layer.type), layer.name, "fp32",
                                int(layer.macs), int(layer.params) * 4, channels=channels))
    if summary.functional_macs:
        nodes.append(NodeRecord("(functional)", "MatMul", "", "fp32", int(summary.functional_macs), 0))
    return tuple(nodes)


def _profile(profile: Profile | str) -> Profile:
    if isinstance(profile, Profile):
        return profile
    from deploy.profiles import resolve_target

    return resolve_target(profile).profile


def _default_threads(profile: Profile) -> int:
    if profile.kind != "cpu":
        return 1
    from deploy.targets.target import default_threads

    return default_threads(profile)


def _calibrated_here(profile: Profile) -> bool:
    """Only a profile this machine can measure can have a calibration that applies to it."""
    return profile.runs_locally()


def calibration_key(profile: Profile, threads: int) -> str:
    from deploy.targets.latency import cache as latency_cache

    return f"{profile.name}-{profile.runtime}-t{threads}-{latency_cache.env_key(threads)}"


def load_calibration(profile: Profile, threads: int) -> Calibration | None:
    """The calibration saved for this profile, thread count and machine, if any."""
    from deploy.targets.latency import cache as latency_cache

    data = latency_cache.read_json(CACHE_KIND, calibration_key(profile, threads))
    if data is None:
        return None
    try:
        return Calibration.from_dict(data)
    except Exception:  # an old or broken file is no calibration
        return None


def save_calibration(calibration: Calibration, profile: Profile) -> Path:
    from deploy.targets.latency import cache as latency_cache

    return latency_cache.write_json(CACHE_KIND, calibration_key(profile, calibration.threads), calibration.to_dict())

