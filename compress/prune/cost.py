"""What a pruned model costs: parameters, MACs or measured latency, behind one small protocol.

The allocator needs an additive cost per (unit, option); a cost model only has to price a whole model. We take
c_l(n) = cost(only unit l loses n elements) - cost(base), the same "one unit alone" construction as the
distortion curves, and then check every chosen plan against its EXACT cost (`of_plan`), because costs are not
exactly additive (a conv between two pruned groups loses rows AND columns). A latency lookup table or predictor
plugs in as another class with the same two methods.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Protocol, Sequence

import torch
from torch import nn

from deploy.compress.prune.units import WEIGHTED, PruneUnit
from deploy.core.spec import InputSpec
from deploy.targets.target import Target

Plan = Mapping[str, int]  # unit name -> elements removed


class CostModel(Protocol):
    """Prices a model: lower is cheaper. `of_plan` prices the base model with a plan applied."""

    name: str  # params | macs | latency
    unit: str  # printed after numbers

    def of_plan(self, removed: Plan) -> float: ...

    def of_module(self, module: nn.Module) -> float: ...


@dataclass(frozen=True)
class OptionCosts:
    """Base cost and, per unit, the cost change of each option (removal count) with that unit alone pruned."""

    base: float
    options: dict[str, tuple[int, ...]]
    deltas: dict[str, tuple[float, ...]]

    @classmethod
    def measure(cls, cost: CostModel, units: Sequence[PruneUnit]) -> "OptionCosts":
        base = cost.of_plan({})
        deltas = {u.name: tuple(0.0 if n == 0 else cost.of_plan({u.name: n}) - base for n in u.options)
                  for u in units}
        return cls(base, {u.name: tuple(u.options) for u in units}, deltas)

    def delta(self, name: str, count: int) -> float:
        return self.deltas[name][self.options[name].index(int(count))]

    def predicted(self, removed: Plan) -> float:
        """The additive estimate of a plan's cost (the exact one is `CostModel.of_plan`)."""
        return self.base + sum(self.delta(name, n) for name, n in removed.items())


# --- parameters and MACs, counted analytically ----------------------------------------------------------------------

class CountedCost:
    """Parameters or MACs under a plan, counted exactly from one analysis of the base model.

    A weight keeps (kept outputs / outputs) x (kept inputs / inputs) of its size and MACs; norms and biases scale
    with kept outputs; attention score MACs scale with kept heads. Unstructured and 2:4 plans count non-zero
    weights (what sparse kernels could skip, not what dense kernels run). `of_module` counts a real model
    (deploy.core.analysis for MACs), which the tests check the analytic count against.
    """

    def __init__(self, kind: Literal["params", "macs"], module: nn.Module, inputs: Sequence[InputSpec],
                 units: Sequence[PruneUnit]):
        from deploy.core.analysis import analyze
        from deploy.core.model.load import from_module

        self.name, self.unit = kind, (" params" if kind == "params" else " MACs")
        self.inputs = list(inputs)
        self.units = {u.name: u for u in units}
        self.sparse = any(u.kind in ("sparse", "2:4") for u in units)
        self.param_sizes = [(n.rsplit(".", 1)[0] if "." in n else "", n.rsplit(".", 1)[-1], p.numel())
                            for n, p in module.named_parameters()]
        self.weighted = {n for n, m in module.named_modules() if isinstance(m, WEIGHTED)}
        summary = analyze(from_module(module, self.inputs))
        self.layer_macs = {layer.name: layer.macs for layer in summary.layers}
        self.attention_macs = _attention_score_macs(module, self.inputs, [u for u in units if u.kind == "heads"])
        self.other_functional = summary.functional_macs - sum(self.attention_macs.values())

    def _fractions(self, removed: Plan) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
        out: dict[str, float] = {}
        inp: dict[str, float] = {}
        dense: dict[str, float] = {}
        for name, count in removed.items():
            unit = self.units[name]
            kept = (unit.size - int(count)) / unit.size
            for slice_ in unit.slices:
                target = {"out": out, "in": inp, "weights": dense}[slice_.axis]
                target[slice_.module] = target.get(slice_.module, 1.0) * kept
        return out, inp, dense

    def of_plan(self, removed: Plan) -> float:
        out, inp, dense = self._fractions(removed)
        if self.name == "params":
            total = 0.0
            for layer, pname, size in self.param_sizes:
                factor = out.get(layer, 1.0)
                if pname == "weight" and layer in self.weighted:
                    factor *= inp.get(layer, 1.0) * dense.get(layer, 1.0)
                total += size * factor
            return float(round(total))
        total = self.other_functional
        for layer, macs in self.layer_macs.items():
            total += macs * out.get(layer, 1.0) * inp.get(layer, 1.0) * dense.get(layer, 1.0)
        for unit_name, macs in self.attention_macs.items():
            unit = self.units[unit_name]
            total += macs * (unit.size - int(removed.get(unit_name, 0))) / unit.size
        return float(round(total))

    def of_module(self, module: nn.Module) -> float:
        if self.name == "params":
            total = sum(p.numel() for p in module.parameters())
            if self.sparse:
                total -= sum(int((m.weight == 0).sum()) for m in module.modules() if isinstance(m, WEIGHTED))
            return float(total)
        from deploy.core.analysis import analyze
        from deploy.core.model.load import from_module

        summary = analyze(from_module(module, self.inputs))
        if not self.sparse:
            return float(summary.total_macs)
        density = {n: float((m.weight != 0).float().mean()) for n, m in module.named_modules()
                   if isinstance(m, WEIGHTED)}
        return float(round(sum(layer.macs * density.get(layer.name, 1.0) for layer in summary.layers)
                           + summary.functional_macs))


def _attention_score_macs(module: nn.Module, inputs: Sequence[InputSpec],
                          head_units: Sequence[PruneUnit]) -> dict[str, float]:
    """q.k^T and attention x v MACs of each attention module (2 x batch x seq^2 x all-head size), at the shapes
    deploy.core.analysis uses, so that they can scale with the heads kept."""
    if not head_units:
        return {}
    seen: dict[str, float] = {}
    hooks = []
    for unit in head_units:
        attn = module.get_submodule(unit.root)

        def hook(mod: nn.Module, args: tuple, kwargs: dict, out: object, name: str = unit.name) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            batch, seq = hidden.shape[0], hidden.shape[1]
            seen[name] = float(2 * batch * seq * seq * mod.query.out_features)

        hooks.append(attn.register_forward_hook(hook, with_kwargs=True))
    gen = torch.Generator().manual_seed(0)
    try:
        with torch.no_grad():
            module(*(spec.example(None, gen) for spec in inputs))
    finally:
        for h in hooks:
            h.remove()
    return seen


# --- latency, measured ----------------------------------------------------------------------------------------------

class MeasuredLatency:
    """Median latency (ms) of the exported model, measured by `measure_ms(onnx_path)`; plans are built with
    `build(plan)` (physical removal) and memoised, since a measurement takes seconds."""

    name, unit = "latency", " ms"

    def __init__(self, build: Callable[[Plan], nn.Module], inputs: Sequence[InputSpec],
                 measure_ms: Callable[[Path], float]):
        self.build = build
        self.inputs = list(inputs)
        self.measure_ms = measure_ms
        self.memo: dict[tuple[tuple[str, int], ...], float] = {}

    def of_plan(self, removed: Plan) -> float:
        key = tuple(sorted((n, int(c)) for n, c in removed.items() if int(c) > 0))
        if key not in self.memo:
            self.memo[key] = self.of_module(self.build(dict(key)))
        return self.memo[key]

    def of_module(self, module: nn.Module) -> float:
        from deploy.core.model.onnx_export import OnnxExportConfig, export_onnx

        with tempfile.TemporaryDirectory(prefix="deploy-prune-") as tmp:
            path = export_onnx(module, self.inputs, Path(tmp) / "variant.onnx", OnnxExportConfig(dynamic=False))
            return float(self.measure_ms(path))


def median_ms(target: Target, inputs: Sequence[InputSpec], config: Any = None) -> Callable[[Path], float]:
    """A `measure_ms` on this machine: the target's runtime through its runner and the measurement loop (host
    lock, warm-up, enough samples and seconds); returns the median. The default config is short (0.5 s), as a
    cost table measures many variants; pass a MeasureConfig for decisions."""
    def measure_path(path: Path) -> float:
        from deploy.targets.measure.feeds import make_feeds
        from deploy.targets.measure.loop import MeasureConfig, measure

        settings = config or MeasureConfig(warmup_min_s=0.1, warmup_min_runs=5, min_samples=40, min_seconds=0.5,
                                           max_seconds=20.0)
        run_once = target.runner().prepare(path, make_feeds(list(inputs)))
        return float(measure(run_once, settings).summary["p50"])

    return measure_path
