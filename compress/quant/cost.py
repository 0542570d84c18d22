"""What a precision choice costs in latency, including the Q/DQ at int8/float boundaries.

A price table holds, per layer and kernel class (int8, int4-g32, ...), the change of the layer's own compute time
against float, and per tensor the time of one Q plus one DQ on it. A plan's latency is then
    base + sum(kernel deltas of non-float layers) + the Q and DQ ops that do not fuse away,
where a Q/DQ fuses away when both sides of the tensor are int8 (QLinearConv -> QLinearConv): int8 islands between
float ops pay both ends. The allocator needs additive costs, so it prices each option as an island (both ends
paid); its re-planning at marginal prices and the final check use the non-additive estimate.

Cost models are pluggable (`CostModel.price`): `MeasuredCost` times the real runtime (every layer of one shape
switched at once, interleaved A/B with the float model; Q/DQ pairs timed as micro-graphs), `ProxyCost` is a
roofline from the profile's peak numbers, labelled as such; a latency lookup table can plug in the same way.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence

from deploy.export.qdq.graph import LayerGraph
from deploy.export.qdq.plan import QuantPlan
from deploy.export.qdq.option import QuantOption
from deploy.core.spec import InputSpec
from deploy.targets.target import Target


@dataclass
class PriceTable:
    base_ms: float
    kernel: dict[str, dict[str, float]]  # layer -> kernel class -> compute delta vs float (ms, < 0 is faster)
    boundary: dict[str, float]  # tensor -> ms of one Q + one DQ on it
    source: str  # "measured:onnxruntime", "proxy:roofline", ...
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"base_ms": self.base_ms, "kernel": self.kernel, "boundary": self.boundary, "source": self.source,
                "notes": self.notes}


@dataclass
class PricingInput:
    """What a cost model may look at: the exported float model (static shapes), the layer graph, the calibrated
    plan (for building real Q/DQ variants), each layer's options, the inputs, the target and the thread count."""

    float_model: Any  # onnx.ModelProto
    graph: LayerGraph
    plan: QuantPlan
    spaces: dict[str, tuple[QuantOption, ...]]
    inputs: list[InputSpec]
    target: Target


class CostModel(Protocol):
    name: str

    def price(self, data: PricingInput) -> PriceTable: ...


# --- the latency of a plan, with boundaries -------------------------------------------------------------------------

class Boundaries:
    """Per tensor, the facts that decide whether its Q and DQ fuse away (graph lookups precomputed: the search
    evaluates thousands of plans)."""

    def __init__(self, graph: LayerGraph, output_q: dict[str, bool], fuse_adds: bool = False):
        self.graph = graph
        self.output_q = output_q  # layer -> its int8 form carries an output Q (ONNX Runtime convs)
        self.fuse_adds = fuse_adds  # the policy quantizes Adds between int8 tensors (ONNX Runtime's QLinearAdd)
        self.node_layer = graph.layer_of_node()
        self.adds = [(n, graph.node_io[n][0], graph.add_output(n)) for n, op in graph.node_ops.items()
                     if fuse_adds and op == "Add" and len(graph.node_io[n][0]) == 2]
        self.readers = {t: graph.readers(t) for ln in graph.nodes.values() for t in (ln.input, ln.post)}
        for _, _, out in self.adds:
            self.readers[out] = graph.readers(out)

    def cost(self, options: dict[str, QuantOption], table: PriceTable) -> float:
        g = self.graph
        quant_in = {n for n, o in options.items() if o.quantizes_activations and n in g.nodes}
        int8_out = {g.nodes[n].post: n for n in quant_in if self.output_q.get(n) and options[n].precision == "int8"}
        inputs = {g.nodes[n].input for n in quant_in}

        def int8_reader(node: str, tensor: str) -> bool:
            layer = self.node_layer.get(node)
            return layer in quant_in and g.nodes[layer].input == tensor

        adds = {name for name, ins, out in self.adds if all(i in int8_out for i in ins) and self.readers[out]
                and all(int8_reader(r, out) for r in self.readers[out])}
        add_outputs = {out for name, _, out in self.adds if name in adds}
        total = 0.0
        for tensor in inputs | set(int8_out):
            half = table.boundary.get(tensor, 0.0) / 2.0
            if tensor not in int8_out:
                total += 0.0 if tensor in add_outputs else half  # a standalone Q, unless a QLinearAdd makes it
                continue
            fused = all(int8_reader(r, tensor) or r in adds for r in self.readers[tensor])
            total += 0.0 if fused else half  # a standalone DQ for the float readers
        return total

    def island(self, layer: str, option: QuantOption, table: PriceTable) -> float:
        """Boundary cost of `layer` alone in `option`, all neighbours float (what the additive allocator charges)."""
        if not option.quantizes_activations or layer not in self.graph.nodes:
            return 0.0
        ln = self.graph.nodes[layer]
        cost = table.boundary.get(ln.input, 0.0) / 2.0
        if self.output_q.get(layer) and option.precision == "int8":
            cost += table.boundary.get(ln.post, 0.0) / 2.0
        return cost


def boundaries_for(graph: LayerGraph, plan: QuantPlan) -> Boundaries:
    """The boundary rules of the plan's Q/DQ policy."""
    from deploy.export.qdq.policy import policy_for
    from deploy.compress.quant.sim import sim_flags

    policy = policy_for(plan.policy)
    flags = sim_flags(plan, policy, graph)
    return Boundaries(graph, {n: f.output_q for n, f in flags.items()}, policy.quantize_adds)


def plan_latency(options: dict[str, QuantOption], table: PriceTable, bounds: Boundaries) -> float:
    """Estimated latency (ms) of a plan: base + kernel deltas + unfused Q/DQ."""
    kernel = sum(table.kernel.get(n, {}).get(o.kernel_class, 0.0) for n, o in options.items() if not o.is_float)
    return table.base_ms + kernel + bounds.cost(options, table)


def option_cost(layer: str, option: QuantOption, table: PriceTable, bounds: Boundaries) -> float:
    """The additive price of one option: its kernel delta plus both ends of its island."""
    if option.is_float:
        return 0.0
    return table.kernel.get(layer, {}).get(option.kernel_class, 0.0) + bounds.island(layer, option, table)


# --- shapes and signatures ----------------------------------------------------------------------------------------

def tensor_shapes(model: Any) -> dict[str, tuple[int, ...]]:
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        dims = vi.type.tensor_type.shape.dim
        shapes[vi.name] = tuple(int(d.dim_value) if d.dim_value > 0 else 1 for d in dims)
    for init in model.graph.initializer:
        shapes[init.name] = tuple(int(d) for d in init.dims)
    return shapes


def signature_groups(graph: LayerGraph, shapes: dict[str, tuple[int, ...]]) -> dict[tuple, list[str]]:
    """Layers that run the same kernel on the same shapes: priced once, by switching all of them together."""
    groups: dict[tuple, list[str]] = {}
    for ln in graph.nodes.values():
        key = (ln.op_type, shapes.get(ln.weight), shapes.get(ln.input), shapes.get(ln.output))
        groups.setdefault(key, []).append(ln.layer)
    return groups


def _macs(graph: LayerGraph, layer: str, shapes: dict[str, tuple[int, ...]]) -> tuple[int, int, int, int]:
    """(MACs, input elements, output elements, weight elements) of one layer at batch 1."""
    ln = graph.nodes[layer]
    w, x = shapes.get(ln.weight, ()), shapes.get(ln.input, ())
    out, inp, weights = _numel(shapes.get(ln.output, ())), _numel(x), _numel(w)
    reduction = _numel(w[1:]) if ln.op_type == "Conv" else (x[-1] if x else 1)  # Linear: K is the input's last dim
    return out * reduction, inp, out, weights


# --- the roofline proxy --------------------------------------------------------------------------------------------

_BYTES = {"fp32": 4.0, "fp16": 2.0, "bf16": 2.0, "fp8": 1.0, "int8": 1.0, "int4": 0.5}


class ProxyCost:
    """Roofline per layer from the profile (peak ops per precision, memory bandwidth, per-op overhead).
    NOT a measurement: it ranks options sensibly on devices we cannot time; its table says so."""

    name = "proxy:roofline"

    def price(self, data: PricingInput) -> PriceTable:
        prof = data.target.profile
        scale = float(data.target.threads) if prof.kind == "cpu" else 1.0  # CPU peaks are per core
        shapes = tensor_shapes(data.float_model)
        fp = data.plan.float_precision

        def seconds(macs: int, moved: float, precision: str) -> float:
            peak = prof.peak_tops.get(precision, prof.peak_tops.get("fp32", 1.0)) * scale * 1e12
            return max(2.0 * macs / peak, moved / (prof.memory_bandwidth_gbs * scale * 1e9))

        kernel: dict[str, dict[str, float]] = {}
        base = 0.0
        for layer, options in data.spaces.items():
            if layer not in data.graph.nodes:
                continue
            macs, inp, out, weights = _macs(data.graph, layer, shapes)
            float_s = seconds(macs, (inp + out + weights) * _BYTES[fp], fp)
            base += float_s
            kernel[layer] = {}
            for opt in options:
                if opt.is_float:
                    continue
                compute = "int8" if opt.precision == "int4" else opt.precision  # int4 is weight-only
                act = _BYTES[fp] if opt.precision == "int4" else _BYTES.get(opt.precision, 1.0)
                moved = (inp + out) * act + weights * _BYTES[opt.precision]
                kernel[layer][opt.kernel_class] = (seconds(macs, moved, compute if opt.precision != "int4" else fp)
                                                   - float_s) * 1e3
        overhead = prof.op_overhead_us * 1e-3
        boundary = {t: 2 * overhead + 2 * 5.0 * _numel(s) / (prof.memory_bandwidth_gbs * scale * 1e9) * 1e3
                    for t, s in shapes.items() if t not in {i.name for i in data.float_model.graph.initializer}}
        return PriceTable(base * 1e3, kernel, boundary, self.name,
                          ["roofline proxy from the profile's peaks: not measured"])


def _numel(shape: Sequence[int]) -> int:
    import math

    return math.prod(shape) if shape else 1


# --- measured on the real runtime ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class MeasuredCost:
    """Prices options by timing the real runtime: the float model against a variant with every layer of one
    signature switched to one kernel class (interleaved A/B, medians), minus the variant's Q/DQ boundaries,
    divided by the group size; Q/DQ boundaries timed as Q->DQ micro-graphs against an Identity graph."""

    min_seconds: float = 0.4
    min_samples: int = 40
    name: str = "measured"

    def _config(self) -> Any:
        from deploy.targets.measure.loop import MeasureConfig

        return MeasureConfig(warmup_min_s=0.05, warmup_min_runs=5, min_samples=self.min_samples,
                             min_seconds=self.min_seconds, max_seconds=max(10.0, 4 * self.min_seconds), blocks=1)

    def price(self, data: PricingInput) -> PriceTable:
        from deploy.targets.measure.feeds import make_feeds

        runtime = data.target.runtime
        if runtime not in ("onnxruntime", "openvino"):
            raise ValueError(f"cannot measure {runtime} on this machine; use ProxyCost")
        feeds = make_feeds([InputSpec(s.name, s.concrete_shape(), s.dtype) for s in data.inputs])
        shapes = tensor_shapes(data.float_model)
        bounds = boundaries_for(data.graph, data.plan)
        with tempfile.TemporaryDirectory(prefix="deploy-qprice-") as tmp:
            timer = _Timer(data.target, feeds, self._config(), Path(tmp))
            base_path = timer.save(data.float_model, "base")
            base_run = timer.prepare(base_path)
            base_ms = timer.alone(base_run)
            boundary = self._boundaries(timer, data, shapes)
            table = PriceTable(base_ms, {n: {} for n in data.spaces}, boundary, f"measured:{runtime}")
            for key, layers in signature_groups(data.graph, shapes).items():
                layers = [n for n in layers if n in data.spaces]
                for kclass, option in _kernel_classes(data.spaces, layers).items():
                    options = {n: option for n in layers}
                    delta = timer.delta(base_run, timer.save(_variant(data, options), f"v{len(timer.saved)}"))
                    per_layer = (delta - bounds.cost(options, table)) / len(layers)
                    for n in layers:
                        table.kernel[n][kclass] = per_layer
        return table

    def _boundaries(self, timer: "_Timer", data: PricingInput, shapes: dict[str, tuple[int, ...]]) -> dict[str, float]:
        """One Q + one DQ per distinct activation tensor shape that a plan may quantize."""
        from deploy.export.qdq.policy import policy_for

        signed = policy_for(data.plan.policy).act_signed
        tensors = set()
        for name, ln in data.graph.nodes.items():
            tensors.update({ln.input, ln.post})
        by_shape: dict[tuple[int, ...], float] = {}
        out = {}
        for tensor in sorted(tensors):
            shape = shapes.get(tensor)
            if not shape:
                continue
            if shape not in by_shape:
                by_shape[shape] = max(0.0, timer.qdq_cost(shape, signed))
            out[tensor] = by_shape[shape]
        return out


def _kernel_classes(spaces: dict[str, tuple[QuantOption, ...]], layers: list[str]) -> dict[str, QuantOption]:
    """Kernel classes every layer of the group offers, each with one representative option."""
    common: dict[str, QuantOption] | None = None
    for name in layers:
        here = {}
        for opt in spaces[name]:
            if not opt.is_float:
                here.setdefault(opt.kernel_class, opt)
        common = here if common is None else {k: v for k, v in common.items() if k in here}
    return common or {}


def _variant(data: PricingInput, options: dict[str, QuantOption]) -> Any:
    from deploy.export.qdq.policy import policy_for
    from deploy.export.qdq.writer import build_qdq_model

    model, _ = build_qdq_model(data.float_model, data.graph, data.plan.with_options(options),
                               policy_for(data.plan.policy))
    return model


class _Timer:
    """Saves models, prepares them on one runtime, and times them (alone, or A/B against the float model)."""

    def __init__(self, target: Target, feeds: dict[str, Any], config: Any, folder: Path):
        self.runner = target.runner()
        self.feeds, self.config, self.folder = feeds, config, folder
        self.saved: list[Path] = []

    def save(self, model: Any, stem: str) -> Path:
        import onnx

        path = self.folder / f"{stem}.onnx"
        onnx.save(model, str(path))
        self.saved.append(path)
        return path

    def prepare(self, path: Path, feeds: dict[str, Any] | None = None) -> Any:
        return self.runner.prepare(path, feeds or self.feeds)

    def alone(self, run_once: Any) -> float:
        from deploy.targets.measure.loop import measure

        return float(measure(run_once, self.config).summary["p50"])

    def delta(self, base_run: Any, path: Path) -> float:
        from deploy.targets.measure.paired import measure_blocks, reuse

        _, _, cmp = measure_blocks(reuse(base_run), reuse(self.prepare(path)), self.config)
        return float(cmp.median_b - cmp.median_a)

    def qdq_cost(self, shape: tuple[int, ...], signed: bool) -> float:
        """ms of Q then DQ on a float tensor of `shape`, over an Identity graph of the same input."""
        import numpy as np

        feeds = {"x": np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
        ident = self.prepare(self.save(_micro_graph(shape, None), f"id{len(self.saved)}"), feeds)
        qdq = self.prepare(self.save(_micro_graph(shape, signed), f"qdq{len(self.saved)}"), feeds)
        from deploy.targets.measure.paired import measure_blocks, reuse

        _, _, cmp = measure_blocks(reuse(ident), reuse(qdq), self.config)
        return float(cmp.median_b - cmp.median_a)


def _micro_graph(shape: tuple[int, ...], signed: bool | None) -> Any:
    """x -> Q -> DQ -> y (or x -> Identity -> y when `signed` is None)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape))
    if signed is None:
        nodes, inits = [helper.make_node("Identity", ["x"], ["y"])], []
    else:
        zp_type = TensorProto.INT8 if signed else TensorProto.UINT8
        inits = [numpy_helper.from_array(np.array(0.05, dtype=np.float32), "s"),
                 helper.make_tensor("z", zp_type, [], [0 if signed else 128])]
        nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
                 helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])]
    model = helper.make_model(helper.make_graph(nodes, "qdq", [x], [y], inits),
                              opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    return model
