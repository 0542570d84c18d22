"""Activation calibration: per-tensor ranges by min-max, percentile or MSE search, the method chosen per tensor by
the error it causes in the layer(s) reading that tensor; and SmoothQuant factors for transformer linears.

Statistics are collected per ONNX tensor (one tensor read by several layers gets one range), from forward hooks on
the BatchNorm-folded float model. Only a bounded sample of each tensor is kept (for percentiles and the MSE search)
plus the first `probe_samples` inputs (for the layer-output error), so memory stays small on real models.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from deploy.export.qdq.graph import LayerGraph
from deploy.export.qdq.plan import ActParams, act_params_from_range
from deploy.compress.quant.sim import dequantized_weight, fake_quant_act
from deploy.export.qdq.option import QuantOption

METHODS = ("minmax", "mean_minmax", "percentile", "mse")
SAMPLE_CAP = 1 << 16
MSE_GRID = tuple(0.30 + 0.05 * i for i in range(15))  # fractions of the min-max range tried by the MSE search
PROBE_WEIGHTS = QuantOption("int8", 8, 8, "per-channel", 0, True, False)  # consumers' weights while choosing


@dataclass
class TensorStats:
    lo: float = float("inf")
    hi: float = float("-inf")
    samples: list[torch.Tensor] = field(default_factory=list)
    probe: torch.Tensor | None = None
    channel_lo: torch.Tensor | None = None  # per last-dim channel minimum and maximum (SmoothQuant)
    channel_hi: torch.Tensor | None = None
    sample_lo: list[float] = field(default_factory=list)  # each sample's minimum and maximum (mean_minmax)
    sample_hi: list[float] = field(default_factory=list)

    def sample(self) -> torch.Tensor:
        return torch.cat(self.samples) if self.samples else torch.zeros(1)

    @property
    def channel_absmax(self) -> torch.Tensor | None:
        if self.channel_lo is None or self.channel_hi is None:
            return None
        return torch.maximum(self.channel_lo.abs(), self.channel_hi.abs())


@dataclass(frozen=True)
class TensorSource:
    """Where a tensor shows up in torch: a layer's input, or a layer's output (through a following ReLU)."""

    tensor: str
    layer: str
    side: str  # in | out
    relu: bool = False


def tensor_sources(layers: Sequence[str], graph: LayerGraph | None, outputs_for: Sequence[str]) -> list[TensorSource]:
    """One source per distinct tensor: every layer's input, and the (post-ReLU) output of layers in `outputs_for`."""
    seen: dict[str, TensorSource] = {}
    for name in layers:
        tensor = graph.nodes[name].input if graph and name in graph.nodes else f"{name}:in"
        seen.setdefault(tensor, TensorSource(tensor, name, "in"))
    for name in outputs_for:
        ln = graph.nodes.get(name) if graph else None
        tensor = ln.post if ln else f"{name}:out"
        seen.setdefault(tensor, TensorSource(tensor, name, "out", bool(ln and ln.relu_after)))
    return list(seen.values())


def collect(model: nn.Module, sources: Sequence[TensorSource], batches: Sequence[tuple[torch.Tensor, ...]],
            smooth: dict[str, torch.Tensor] | None = None, probe_samples: int = 16) -> dict[str, TensorStats]:
    """Run the float model over `batches`, recording each source tensor's range, a sample and a probe batch.

    `smooth` (tensor -> s) divides a tensor by its SmoothQuant factors before recording, as the quantized model will.
    """
    stats = {s.tensor: TensorStats() for s in sources}
    per_batch = max(1, SAMPLE_CAP // max(len(batches), 1))
    gen = torch.Generator().manual_seed(0)
    handles = []

    def record(src: TensorSource, value: torch.Tensor) -> None:
        value = value.detach().float()
        if src.relu:
            value = torch.relu(value)
        if smooth and src.tensor in smooth:
            value = value / smooth[src.tensor]
        st = stats[src.tensor]
        st.lo, st.hi = min(st.lo, value.min().item()), max(st.hi, value.max().item())
        per_sample = value.reshape(value.shape[0], -1)
        st.sample_lo.extend(per_sample.amin(1).tolist())
        st.sample_hi.extend(per_sample.amax(1).tolist())
        flat = value.reshape(-1)
        idx = torch.randint(flat.numel(), (min(per_batch, flat.numel()),), generator=gen)
        st.samples.append(flat[idx])
        if st.probe is None:
            st.probe = value[:probe_samples].clone()
        if value.dim() >= 2:
            rows = value.reshape(-1, value.shape[-1])
            lo, hi = rows.amin(0), rows.amax(0)
            st.channel_lo = lo if st.channel_lo is None else torch.minimum(st.channel_lo, lo)
            st.channel_hi = hi if st.channel_hi is None else torch.maximum(st.channel_hi, hi)

    for src in sources:
        mod = model.get_submodule(src.layer)
        if src.side == "in":
            handles.append(mod.register_forward_pre_hook(lambda m, args, src=src: record(src, args[0])))
        else:
            handles.append(mod.register_forward_hook(lambda m, args, out, src=src: record(src, out)))
    try:
        with torch.no_grad():
            for batch in batches:
                model(*batch)
    finally:
        for h in handles:
            h.remove()
    return stats


def candidate_params(st: TensorStats, symmetric: bool, methods: Sequence[str] = METHODS,
                     percentile: float = 99.99) -> dict[str, ActParams]:
    """Activation parameters each calibration method proposes for one tensor."""
    out: dict[str, ActParams] = {}
    if "minmax" in methods:
        out["minmax"] = act_params_from_range(st.lo, st.hi, symmetric, "minmax")
    values = st.sample()
    if "mean_minmax" in methods and st.sample_lo:
        # the mean of each sample's extremes: one rare sample no longer sets the range for all (NNCF's
        # activation range for transformers is of this kind)
        lo, hi = sum(st.sample_lo) / len(st.sample_lo), sum(st.sample_hi) / len(st.sample_hi)
        out["mean_minmax"] = act_params_from_range(min(lo, 0.0), max(hi, 0.0), symmetric, "mean_minmax")
    if "percentile" in methods and values.numel() > 1:
        q = torch.tensor([1.0 - percentile / 100.0, percentile / 100.0])
        lo, hi = torch.quantile(values[: 1 << 24], q).tolist()
        if symmetric:
            bound = torch.quantile(values.abs(), percentile / 100.0).item()
            lo, hi = -bound, bound
        out["percentile"] = act_params_from_range(min(lo, 0.0) if st.lo < 0 else 0.0, hi, symmetric, "percentile")
    if "mse" in methods and values.numel() > 1:
        out["mse"] = mse_clipped(values, st.lo, st.hi, symmetric)
    return out


def mse_clipped(values: torch.Tensor, lo: float, hi: float, symmetric: bool) -> ActParams:
    """The range [lo, hi] shrunk by the MSE_GRID fraction that quantizes `values` with the least squared error."""
    return min((act_params_from_range(lo * frac, hi * frac, symmetric, "mse") for frac in MSE_GRID),
               key=lambda p: torch.mean((fake_quant_act(values, p) - values) ** 2).item())


def _layer_output(layer: nn.Module, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, nn.Linear):
        return torch.nn.functional.linear(x, w, layer.bias)
    return torch.nn.functional.conv2d(x, w, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups)


def choose_params(model: nn.Module, tensor: str, consumers: Sequence[str], st: TensorStats,
                  candidates: dict[str, ActParams], smooth: torch.Tensor | None = None
                  ) -> tuple[ActParams, dict[str, float]]:
    """The candidate with the least output error of the consuming layers (int8 weights), or of the tensor itself
    when no layer reads it (a conv output that only feeds float ops)."""
    errors: dict[str, float] = {}
    x = st.probe
    with torch.no_grad():
        for method, params in candidates.items():
            xq = fake_quant_act(x, params)
            if not consumers:
                errors[method] = torch.mean((xq - x) ** 2).item()
                continue
            err = 0.0
            for name in consumers:
                layer = model.get_submodule(name)
                w = layer.weight
                if smooth is not None:
                    w = w * (smooth if isinstance(layer, nn.Linear) else smooth.reshape(1, -1, 1, 1))
                ref = _layer_output(layer, x, w)
                err += torch.mean((_layer_output(layer, xq, dequantized_weight(w, PROBE_WEIGHTS)) - ref) ** 2).item()
            errors[method] = err
    best = min(errors, key=lambda m: (errors[m], list(candidates).index(m)))
    return candidates[best], errors


def smooth_factors(model: nn.Module, st: TensorStats, consumers: Sequence[str], alpha: float) -> torch.Tensor | None:
    """SmoothQuant: s_j = max|X_j|^alpha / max|W_j|^(1-alpha), shared by the linears reading one tensor."""
    layers = [model.get_submodule(n) for n in consumers]
    if not layers or not all(isinstance(m, nn.Linear) for m in layers) or st.channel_absmax is None:
        return None
    if st.channel_absmax.numel() != layers[0].in_features:
        return None
    wmax = torch.stack([m.weight.detach().abs().amax(0) for m in layers]).amax(0)
    s = st.channel_absmax.clamp(min=1e-5) ** alpha / wmax.clamp(min=1e-5) ** (1.0 - alpha)
    return s.clamp(min=1e-5)


def search_smoothing(model: nn.Module, st: TensorStats, consumers: Sequence[str], alphas: Sequence[float],
                     symmetric: bool) -> tuple[torch.Tensor | None, float, dict[str, float]]:
    """Per tensor: no smoothing, or SmoothQuant at one of `alphas`, whichever leaves the consuming linears' outputs
    closest to float with int8 weights and an int8 activation range (min-max or clipped, the better of the two).
    One alpha for the whole model under-smooths the tensors with outlier channels (a transformer's FFN input)
    and over-smooths the rest; a per-tensor choice on the layer-output error costs a few probe evaluations.
    Returns the factors (None: leave the tensor alone), the alpha (0: none) and each alpha's error."""
    layers = [model.get_submodule(n) for n in consumers]
    if (not layers or not all(isinstance(m, nn.Linear) for m in layers) or st.probe is None
            or st.channel_lo is None or st.channel_lo.numel() != layers[0].in_features):
        return None, 0.0, {}
    x = st.probe
    errors: dict[str, float] = {}
    best: tuple[float, float, torch.Tensor | None] = (float("inf"), 0.0, None)
    with torch.no_grad():
        refs = [torch.nn.functional.linear(x, m.weight, m.bias) for m in layers]
        for alpha in (0.0, *alphas):
            s = smooth_factors(model, st, consumers, alpha) if alpha > 0 else None
            xs = x if s is None else x / s
            lo = st.lo if s is None else (st.channel_lo / s).min().item()
            hi = st.hi if s is None else (st.channel_hi / s).max().item()
            err = min(_consumers_error(layers, refs, xs, params, s) for params in _ranges(xs, lo, hi, symmetric))
            errors[f"{alpha:g}"] = err
            if err < best[0]:
                best = (err, alpha, s)
    return best[2], best[1], errors


def _ranges(x: torch.Tensor, lo: float, hi: float, symmetric: bool) -> list[ActParams]:
    """The min-max range and the clipped range with the least error on `x` itself."""
    return [act_params_from_range(lo, hi, symmetric, "minmax"), mse_clipped(x, lo, hi, symmetric)]


def _consumers_error(layers: Sequence[nn.Linear], refs: Sequence[torch.Tensor], xs: torch.Tensor,
                     params: ActParams, s: torch.Tensor | None) -> float:
    xq = fake_quant_act(xs, params)
    err = 0.0
    for layer, ref in zip(layers, refs):
        w = layer.weight if s is None else layer.weight * s
        out = torch.nn.functional.linear(xq, dequantized_weight(w, PROBE_WEIGHTS), layer.bias)
        err += torch.mean((out - ref) ** 2).item() / max(torch.mean(ref ** 2).item(), 1e-12)
    return err
