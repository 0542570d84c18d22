"""Prepare and calibrate: fold BatchNorm, read the layer graph from the exported float model, list each layer's
elastic space, calibrate every activation tensor once, and wrap the layers for simulation.

The result is a calibrated plan with every layer still float: the search only changes options, never ranges, so a
candidate costs one forward pass to evaluate.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from deploy.compress.quant.calib import (METHODS, TensorSource, TensorStats, candidate_params, choose_params, collect,
                                         search_smoothing, smooth_factors, tensor_sources)
from deploy.compress.quant.fold import fold_batchnorm, layer_shapes, wrap
from deploy.export.qdq.graph import LayerGraph, layer_graph
from deploy.export.qdq.plan import ActParams, LayerPlan, QuantPlan
from deploy.compress.quant.space import LayerShape, QuantOption, SpaceConfig, layer_space
from deploy.core.spec import InputSpec
from deploy.core.data import CalibrationSet
from deploy.profiles import Profile
from deploy.targets.target import Target, as_target


@dataclass(frozen=True)
class CalibrationConfig:
    methods: tuple[str, ...] = ("minmax", "percentile", "mse")
    percentile: float = 99.99
    smoothquant: bool = False  # SmoothQuant factors for linears that share an input (transformers)
    smooth_alpha: float = 0.5
    # Non-empty: each smoothable tensor picks no smoothing or one of these alphas by its readers' output error
    # (calib.search_smoothing); empty: every tensor is smoothed at `smooth_alpha`.
    smooth_alphas: tuple[float, ...] = ()
    bias_samples: int = 0  # samples the bias correction measures on; 0: every calibration sample
    batches: int = 4
    batch_size: int = 32
    probe_samples: int = 16
    bias_correction: bool = True  # subtract each low-precision option's mean output shift from the bias
    gptq: bool = False  # round int8 weights by GPTQ (compress.quant.gptq) instead of to nearest

    def __post_init__(self) -> None:
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise ValueError(f"calibration methods must be drawn from {', '.join(METHODS)}; got {bad}")
        if not 90.0 < self.percentile < 100.0:
            raise ValueError(f"percentile must be in (90, 100), got {self.percentile}")
        if not 0.0 < self.smooth_alpha < 1.0:
            raise ValueError(f"smooth_alpha must be in (0, 1), got {self.smooth_alpha}")
        if any(not 0.0 < a < 1.0 for a in self.smooth_alphas):
            raise ValueError(f"smooth_alphas must each be in (0, 1), got {self.smooth_alphas}")
        if self.bias_samples < 0:
            raise ValueError(f"bias_samples must be >= 0, got {self.bias_samples}")
        if self.batches < 1 or self.batch_size < 1 or self.probe_samples < 1:
            raise ValueError("batches, batch_size and probe_samples must be >= 1")


@dataclass
class Prepared:
    folded: nn.Module  # BatchNorm folded, float
    qmodel: nn.Module  # folded with QuantLayers (all float until options are set)
    shapes: list[LayerShape]
    graph: LayerGraph | None
    spaces: dict[str, tuple[QuantOption, ...]]
    plan: QuantPlan  # calibrated, every layer at its float option
    flags: dict[str, Any]  # per layer SimFlags: what of the Q/DQ policy the simulation reproduces
    float_onnx: Any = None  # the exported float onnx.ModelProto (static shapes), for pricing variants
    calibration: dict[str, Any] = field(default_factory=dict)  # per tensor: chosen method and each method's error
    notes: list[str] = field(default_factory=list)


def export_graph(folded: nn.Module, inputs: Sequence[InputSpec], layers: Sequence[str]) -> tuple[LayerGraph, Any]:
    """The layer graph of the exported float model (and the onnx.ModelProto, for pricing variants)."""
    import onnx

    from deploy.core.model.onnx_export import OnnxExportConfig, export_onnx

    with tempfile.TemporaryDirectory(prefix="deploy-quant-") as tmp:
        specs = [InputSpec(s.name, s.concrete_shape(), s.dtype) for s in inputs]
        path = export_onnx(folded, specs, Path(tmp) / "float.onnx", OnnxExportConfig(dynamic=False))
        model = onnx.load(str(path))
    return layer_graph(model, layers), model


def calibrate_tensors(folded: nn.Module, graph: LayerGraph | None, layers: Sequence[LayerShape],
                      batches: Sequence[tuple[torch.Tensor, ...]], symmetric: bool, config: CalibrationConfig,
                      attention: Sequence[str] = (), residual: Sequence[str] = (), pooled: dict[str, str] | None = None,
                      signed_conv_inputs: bool = False
                      ) -> tuple[dict[str, ActParams], dict[str, torch.Tensor], dict[str, Any]]:
    """Params per tensor (layer inputs, conv outputs, and the outputs of the `attention` layers, which feed an
    activation x activation MatMul: symmetric int8 there, as OpenVINO's int8 attention takes it; so are the
    `residual` convs' outputs, summed into a residual Add; the `pooled` tensors, a global pool's input, recorded at
    that pool module's input), SmoothQuant factors per input tensor, and the report. `signed_conv_inputs`: a
    tensor read only by convs that has negative values is symmetric int8 (OpenVINO's int8 convolution pays for a
    uint8 zero point other than 0)."""
    names = [s.name for s in layers]
    convs = [s.name for s in layers if s.kind == "conv"]
    sources = tensor_sources(names, graph, convs + [n for n in attention if n not in convs])
    known = {src.tensor for src in sources}
    sources += [TensorSource(t, module, "in") for t, module in (pooled or {}).items() if t not in known]
    signed_outputs = {graph.nodes[n].post for n in [*attention, *residual] if graph and n in graph.nodes}
    readers: dict[str, list[str]] = {}
    for src in sources:
        readers.setdefault(src.tensor, [])
    for name in names:
        tensor = graph.nodes[name].input if graph and name in graph.nodes else f"{name}:in"
        readers[tensor].append(name)
    stats = collect(folded, sources, batches, probe_samples=config.probe_samples)
    smooth: dict[str, torch.Tensor] = {}
    alphas: dict[str, Any] = {}
    if config.smoothquant:
        for tensor, consumers in readers.items():
            if not consumers:
                continue
            if config.smooth_alphas:
                s, alpha, errors = search_smoothing(folded, stats[tensor], consumers, config.smooth_alphas,
                                                    symmetric)
                if errors:
                    alphas[tensor] = {"alpha": alpha, "errors": errors}
            else:
                s = smooth_factors(folded, stats[tensor], consumers, config.smooth_alpha)
            if s is not None:
                smooth[tensor] = s
        if smooth:
            stats = collect(folded, sources, batches, smooth=smooth, probe_samples=config.probe_samples)
    params, report = {}, {}
    for tensor, st in stats.items():
        sym = (symmetric or (tensor in signed_outputs and not readers[tensor])
               or (signed_conv_inputs and st.lo < 0 and bool(readers[tensor]) and set(readers[tensor]) <= set(convs)))
        params[tensor], errors = _choose(folded, tensor, readers[tensor], st, sym, config, smooth.get(tensor))
        report[tensor] = {"method": params[tensor].method, "errors": errors, "range": [st.lo, st.hi],
                          "readers": readers[tensor], "smoothed": tensor in smooth}
        if tensor in alphas:
            report[tensor]["smooth_alpha"] = alphas[tensor]
    return params, smooth, report


def pool_modules(folded: nn.Module, graph: LayerGraph | None, policy: Any, layers: set[str],
                 notes: list[str]) -> dict[str, str]:
    """The global pools (before a quantizable layer) whose input the policy quantizes, as tensor -> the pool
    module whose input it is (calibration records it there). A pool computed inside another module's forward has
    no module to record its input at: it stays float, with a note."""
    from deploy.export.qdq.graph import scope_of
    from deploy.export.qdq.policy import pooled_layers

    modules = dict(folded.named_modules())
    out: dict[str, str] = {}
    for node, (tensor, layer) in pooled_layers(graph, policy).items():
        if layer not in layers:
            continue
        module = scope_of(node, set(modules))
        if module and isinstance(modules[module], POOL_MODULES):
            out[tensor] = module
        else:
            notes.append(f"{node}: a global pool outside an nn.AdaptiveAvgPool module, its input left float")
    return out


POOL_MODULES = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)


def _choose(folded: nn.Module, tensor: str, readers: list[str], st: TensorStats, symmetric: bool,
            config: CalibrationConfig, smooth: torch.Tensor | None) -> tuple[ActParams, dict[str, float]]:
    candidates = candidate_params(st, symmetric, config.methods, config.percentile)
    return choose_params(folded, tensor, readers, st, candidates, smooth)


def _first_samples(batches: list[tuple[torch.Tensor, ...]], n: int) -> list[tuple[torch.Tensor, ...]]:
    """The batches holding the first `n` samples (0: all): a mean shift per channel settles long before a
    range does, and every option of every layer costs a pass over them."""
    if n <= 0:
        return batches
    out, seen = [], 0
    for batch in batches:
        if seen >= n:
            break
        out.append(batch)
        seen += batch[0].shape[0]
    return out


def prepare(module: nn.Module, inputs: Sequence[InputSpec], calibration: CalibrationSet, target: Target | Profile,
            space: SpaceConfig = SpaceConfig(), config: CalibrationConfig = CalibrationConfig(),
            skip: tuple[str, ...] = ()) -> Prepared:
    """Everything the search needs, computed once."""
    target = as_target(target)
    from deploy.export.qdq.policy import attention_layers, policy_for, residual_layers
    from deploy.compress.quant.sim import sim_flags

    folded, notes = fold_batchnorm(module)
    shapes = layer_shapes(folded, skip)
    if not shapes:
        raise ValueError("the model has no Conv2d or Linear layer to quantize")
    try:
        graph, float_onnx = export_graph(folded, inputs, [s.name for s in shapes])
    except Exception as exc:  # noqa: BLE001 - calibration still works per layer without the graph
        graph, float_onnx = None, None
        notes.append(f"no ONNX graph ({' '.join(str(exc).split())[:120]}): tensors calibrated per layer")
    if graph is not None:
        unused = [s.name for s in shapes if s.name not in graph.nodes]
        if unused:  # e.g. a pooler the exported forward never calls
            notes.append(f"not in the exported graph, left alone: {', '.join(unused)}")
            shapes = [s for s in shapes if s.name in graph.nodes]
    policy = policy_for(target.qdq_policy)
    batches = calibration.leading("statistics", config.batch_size, config.batches)  # validation too: `CalibrationSet`
    attention = [n for n in attention_layers(graph, policy) if any(s.name == n and s.kind == "linear" for s in shapes)]
    residual = [n for n in residual_layers(graph, policy) if any(s.name == n for s in shapes)]
    pooled = pool_modules(folded, graph, policy, {s.name for s in shapes}, notes)
    params, smooth, report = calibrate_tensors(folded, graph, shapes, batches, policy.act_signed, config, attention,
                                               residual, pooled, policy.signed_conv_inputs)
    spaces = {s.name: layer_space(s, target.profile, space) for s in shapes}
    layers = {}
    for s in shapes:
        ln = graph.nodes.get(s.name) if graph else None
        tin = ln.input if ln else f"{s.name}:in"
        tout = ln.post if ln else f"{s.name}:out"
        sm = smooth.get(tin)
        layers[s.name] = LayerPlan(s.name, s.kind, spaces[s.name][0], params.get(tin), params.get(tout),
                                   tuple(float(v) for v in sm) if sm is not None else (), bool(ln and ln.relu_after))
    plan = QuantPlan(target.qdq_policy, layers, target.float_precision, list(notes),
                     tensors={t: params[t] for t in pooled if t in params})
    flags = sim_flags(plan, policy, graph)
    if config.gptq:
        from deploy.compress.quant.gptq import rounded_weights

        plan = replace(plan, rounded=rounded_weights(folded, plan, spaces, batches))
    qmodel = wrap(folded, plan, flags)
    if plan.rounded:
        from deploy.compress.quant.gptq import install_rounded

        install_rounded(qmodel, plan.rounded)
    if config.bias_correction:
        from deploy.compress.quant.bias import install_shifts, measure_shifts

        shifts = measure_shifts(qmodel, spaces, _first_samples(batches, config.bias_samples))
        install_shifts(qmodel, shifts)
        plan = replace(plan, shifts=shifts)
        qmodel.quant_plan = plan
    return Prepared(folded, qmodel, shapes, graph, spaces, plan, flags, float_onnx, report, notes)
