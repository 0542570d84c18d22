"""Mixed-precision quantization: the elastic space, simulation against ONNX Runtime, calibration, sensitivity,
the allocator under a latency budget, the API that applies its plan, and the pass config round trip."""
from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import tomli_w
import tomllib
import torch
from torch import nn

from deploy.compress.quant.calib import TensorStats, candidate_params, choose_params
from deploy.compress.quant.cost import Boundaries, PriceTable
from deploy.export.qdq.graph import LayerGraph, LayerNode
from deploy.export.qdq.plan import QuantPlan
from deploy.compress.quant.prepare import CalibrationConfig, prepare
from deploy.compress.quant.search import SearchSpace, allocator_plan
from deploy.compress.quant.sensitivity import option_distortions, run
from deploy.compress.quant.sim import quantize_weight, set_mode, set_options
from deploy.compress.quant.space import LayerShape, QuantOption, layer_space, option_by_label
from deploy.compress.quant.api import QuantizeConfig, build_problem, quantize_model, solve_budget
from deploy.core.data import from_tensors
from deploy.core.errors import BudgetInfeasibleError, ConfigError
from deploy.core.passes import config_from_dict, config_to_dict, make_pass
from deploy.core.spec import InputSpec
from deploy.profiles import load_builtin, resolve_target
from deploy.targets.target import for_profile

CPU = load_builtin("cpu-avx512-vnni")
SPEC = [InputSpec("image", ("batch", 1, 32, 32))]


@pytest.fixture(scope="module")
def digits_calibration():
    from deploy.examples.digits_cnn import load_digits_split

    _, _, x, y = load_digits_split()
    return from_tensors([(s[None],) for s in x[:160]], labels=y[:160].tolist())


@pytest.fixture(scope="module")
def digits_prepared(digits_model, digits_calibration):
    return prepare(digits_model, SPEC, digits_calibration, CPU, config=CalibrationConfig(batches=2))


# --- the elastic space ----------------------------------------------------------------------------------------------

def test_space_is_restricted_by_each_runtime():
    conv, linear = LayerShape("c", "conv", 144, 16), LayerShape("l", "linear", 384, 384)
    ort_conv = [o.label for o in layer_space(conv, CPU)]
    assert ort_conv == ["fp32", "w8a8-pc-sa", "w8a8-pt-sa"]  # U8S8 only; no int4 conv on ORT CPU
    ort_linear = [o.label for o in layer_space(linear, CPU)]
    assert {"w4-g32-s", "w4-g32-a", "w4-g128-s", "w4-g128-a"} <= set(ort_linear)
    h100 = [o.label for o in layer_space(linear, load_builtin("nvidia-h100"))]
    assert {"fp16", "bf16", "fp8", "w8a8-pc-ss"} <= set(h100)
    assert not any(lbl.startswith("w8a8-pt") or lbl.endswith("sa") for lbl in h100)  # symmetric, per-channel
    orin = [o.label for o in layer_space(linear, load_builtin("jetson-orin-nano"))]
    assert "fp8" not in orin  # Orin has no fp8
    ov = dataclasses.replace(CPU, runtime="openvino", qdq_policy="openvino")
    with_bf16 = [o.label for o in layer_space(linear, ov, cpu_flags={"avx512_bf16"})]
    assert with_bf16[0] == "bf16" and not any(lbl.startswith("w4") for lbl in with_bf16)
    assert layer_space(linear, ov, cpu_flags=set())[0].label == "fp32"


@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_simulation_is_matmulnbits_round_to_nearest(symmetric):
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits

    rng = np.random.default_rng(0)
    k, n, block = 64, 8, 32
    b = rng.standard_normal((k, n)).astype(np.float32)  # MatMul's B = W^T
    packed = np.zeros((n, k // block, block // 2), np.uint8)
    zp = np.zeros((n, (k // block + 1) // 2), np.uint8)
    scales = np.zeros((n, k // block), np.float32)
    quantize_matmul_4bits(packed, b, scales, zp, block, n, k, symmetric)
    q = np.stack([packed & 0xF, packed >> 4], -1).reshape(n, k // block, block).astype(np.float32)
    z = (np.stack([zp & 0xF, zp >> 4], -1).reshape(n, -1)[:, : k // block].astype(np.float32) if not symmetric
         else np.full((n, k // block), 8.0))
    ort_w = ((q - z[..., None]) * scales[..., None]).reshape(n, k)
    option = QuantOption("int4", 4, 32, "per-group", block, symmetric)
    iw = quantize_weight(torch.from_numpy(b.T.copy()), option)
    ours = ((iw.q.float().reshape(n, -1, block) - iw.zero_point[..., None]) * iw.scale[..., None]).reshape(n, k)
    np.testing.assert_allclose(ours.numpy(), ort_w, atol=1e-6)


# --- simulation vs the runtime ----------------------------------------------------------------------------------------

def test_fake_quant_matches_onnxruntime_int8_for_one_layer(tmp_path):
    import onnxruntime as ort

    from deploy.export.qdq.writer import export_quantized

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()).eval()
    spec = [InputSpec("x", ("batch", 3, 12, 12))]
    calib = from_tensors([(torch.randn(1, 3, 12, 12),) for _ in range(40)])
    local = resolve_target("cpu").profile  # timed here: without VNNI its int8 weights keep 7 bits (no saturation)
    prep = prepare(model, spec, calib, local, config=CalibrationConfig(batches=2, batch_size=16))
    option = option_by_label(prep.spaces["0"], f"w{local.int8_weight_bits}a8-pc-sa")
    plan = prep.plan.with_options({"0": option})
    set_options(prep.qmodel, {"0": option})
    set_mode(prep.qmodel, "quant")
    x = torch.cat([s[0] for s in calib.held_out])
    with torch.no_grad():
        simulated, exact = prep.qmodel(x), prep.folded(x)
    export_quantized(plan, model, spec, tmp_path / "one.onnx")
    got = ort.InferenceSession(str(tmp_path / "one.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"x": x.numpy()})[0]
    step = plan.layers["0"].act_out.scale
    assert np.abs(got - simulated.numpy()).max() <= 1.01 * step  # at most one output rounding step apart
    assert np.abs(got - simulated.numpy()).mean() < 0.05 * np.abs(got - exact.numpy()).mean() + 1e-4


# --- calibration ---------------------------------------------------------------------------------------------------

def test_calibration_picks_the_method_with_the_least_layer_error():
    torch.manual_seed(0)
    layer = nn.Linear(32, 16).eval()
    with torch.no_grad():
        layer.weight[:, 3] = 0.0  # the layer ignores input channel 3 ...
    x = torch.randn(512, 32)
    x[0, 3] = 60.0  # ... where one outlier stretches the min-max range: clipping it costs this layer nothing
    st = TensorStats(x.min().item(), x.max().item(), [x.reshape(-1)], x)
    candidates = candidate_params(st, symmetric=False)
    assert set(candidates) == {"minmax", "percentile", "mse"}
    model = nn.Sequential(layer)
    chosen, errors = choose_params(model, "t", ["0"], st, candidates)
    assert chosen.method == min(errors, key=errors.get)
    assert chosen.method != "minmax" and errors["minmax"] > 2 * errors[chosen.method]


def test_mean_minmax_is_the_mean_of_each_samples_extremes():
    from deploy.compress.quant.calib import TensorSource, collect

    x = torch.rand(40, 8) * 2.0 - 1.0  # each sample within [-1, 1] ...
    x[7, 2] = 50.0  # ... but one sample reaches 50: min-max spends the range on it, the mean of extremes does not
    model = nn.Sequential(nn.Linear(8, 4)).eval()
    st = collect(model, [TensorSource("x", "0", "in")], [(x[:20],), (x[20:],)])["x"]
    assert len(st.sample_hi) == 40
    got = candidate_params(st, symmetric=False, methods=("minmax", "mean_minmax"))
    expected_hi = x.amax(1).mean().item()
    expected_lo = x.amin(1).mean().item()
    assert got["mean_minmax"].scale == pytest.approx((expected_hi - expected_lo) / 255.0, rel=1e-5)
    assert got["minmax"].scale > 10 * got["mean_minmax"].scale


def test_smoothing_is_chosen_per_tensor_by_the_readers_error():
    """An outlier input channel that the layer uses (a transformer's FFN input): clipping it is wrong, a min-max
    range wastes int8 on it, SmoothQuant moves it into the per-channel weights. The search takes the alpha (or
    none) whose readers err least."""
    from deploy.compress.quant.calib import TensorSource, collect, search_smoothing

    class TwoReaders(nn.Module):  # two linears, each reading the input
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(64, 32), nn.Linear(64, 32)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.a(x) + self.b(x)

    torch.manual_seed(0)
    model = TwoReaders().eval()
    x = torch.randn(256, 64)
    x[:, 5] *= 80.0
    stats = collect(model, [TensorSource("x", "a", "in")], [(x,)], probe_samples=64)["x"]
    s, alpha, errors = search_smoothing(model, stats, ["a"], (0.5, 0.85), symmetric=False)
    assert set(errors) == {"0", "0.5", "0.85"} and alpha > 0 and s is not None
    assert errors[f"{alpha:g}"] < errors["0"] / 4
    assert alpha == min((float(k) for k in errors), key=lambda k: errors[f"{k:g}"])


def test_calibrated_ranges_are_per_tensor_and_shared(digits_prepared):
    prep = digits_prepared
    plan = prep.plan
    a, b = plan.layers["layer2.conv1"], plan.layers["layer2.downsample.0"]
    assert a.act_in == b.act_in  # one tensor, one Q/DQ pair
    assert plan.layers["layer1.conv1"].act_out == plan.layers["layer1.conv2"].act_in  # output Q = next input Q
    assert plan.layers["stem.0"].relu_after and plan.layers["stem.0"].act_out.zero_point == 0
    assert {r["method"] for r in prep.calibration.values()} <= {"minmax", "percentile", "mse"}


def test_activation_ranges_are_calibrated_on_the_validation_samples_too():
    """Ranges are statistics: every sample not held out counts (`CalibrationSet`'s "statistics" split)."""
    from deploy.core.data import CalibrationSet

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4)).eval()
    spec = [InputSpec("x", ("batch", 8))]
    small = [(torch.rand(1, 8),) for _ in range(24)]  # in [0, 1)
    large = [(torch.full((1, 8), 6.0),) for _ in range(8)]  # only in validation
    data = CalibrationSet(small, [], None, "test", "x", validation=large)
    prep = prepare(model, spec, data, CPU, config=CalibrationConfig(methods=("minmax",), batches=2, batch_size=16))
    act = prep.plan.layers["0"].act_in
    assert act.scale * 255 >= 6.0 * 0.99  # the validation samples' 6.0 is inside the u8 range
    only_calibration = prepare(model, spec, CalibrationSet(small, [], None, "test", "y"), CPU,
                               config=CalibrationConfig(methods=("minmax",), batches=2, batch_size=16))
    assert only_calibration.plan.layers["0"].act_in.scale * 255 < 1.01


# --- sensitivity ---------------------------------------------------------------------------------------------------

def test_sensitivity_ranks_4bit_worse_than_8bit(digits_prepared, digits_calibration):
    prep = digits_prepared
    batches = digits_calibration.batches("calibration", 32)[:2]
    reference = run(prep.folded, batches)
    sens = option_distortions(prep.qmodel, prep.spaces, batches, reference, "noise", draws=2)
    for name, d in sens.items():
        assert d["fp32"] == 0.0 and d["w8a8-pc-sa"] > 0
        assert d["w8a8-pt-sa"] >= 0.5 * d["w8a8-pc-sa"]
        if "w4-g32-s" in d:
            assert d["w4-g32-s"] > 5 * d["w8a8-pc-sa"]
    hard = option_distortions(prep.qmodel, {"fc": prep.spaces["fc"]}, batches, reference, "quant")
    assert hard["fc"]["w4-g32-a"] > hard["fc"]["w8a8-pc-sa"]


# --- the allocator (synthetic, exact numbers) ---------------------------------------------------------

def _synthetic_space(n_layers: int = 6, boundary: float = 0.4) -> SearchSpace:
    """A chain of convs: int8 saves 1 ms each; each Q/DQ boundary costs `boundary` ms; layer i is i+1 times as
    sensitive."""
    fp, i8 = QuantOption("fp32"), QuantOption("int8", 8, 8, "per-channel", 0, True, False)
    nodes = {}
    for i in range(n_layers):
        nodes[f"l{i}"] = LayerNode(f"l{i}", f"n{i}", "Conv", f"t{i}", f"w{i}", "", f"t{i + 1}", f"t{i + 1}", False)
    consumers = {f"t{i}": [f"n{i}"] for i in range(n_layers)}
    graph = LayerGraph(nodes, consumers, {f"t{n_layers}"}, {f"n{i}": "Conv" for i in range(n_layers)})
    table = PriceTable(10.0, {f"l{i}": {"int8": -1.0} for i in range(n_layers)},
                       {f"t{i}": boundary for i in range(n_layers + 1)}, "synthetic")
    bounds = Boundaries(graph, {f"l{i}": True for i in range(n_layers)})
    sens = {f"l{i}": {"fp32": 0.0, i8.label: 0.01 * (i + 1)} for i in range(n_layers)}
    return SearchSpace({f"l{i}": (fp, i8) for i in range(n_layers)}, sens, table, bounds)


def test_boundaries_fuse_between_int8_neighbours():
    sp = _synthetic_space()
    all_int8 = {n: "w8a8-pc-sa" for n in sp.spaces}
    assert sp.latency(sp.float_labels()) == pytest.approx(10.0)
    assert sp.latency(all_int8) == pytest.approx(10.0 - 6 + 0.2 + 0.2)  # one Q in, one DQ out
    island = {**sp.float_labels(), "l2": "w8a8-pc-sa"}
    assert sp.latency(island) == pytest.approx(10.0 - 1 + 0.4)


@pytest.mark.parametrize("budget", [9.7, 8.0, 6.5, 4.5])
def test_allocator_respects_the_latency_budget(budget):
    sp = _synthetic_space()
    labels, _, how = allocator_plan(sp, budget)
    assert sp.latency(labels) <= budget + 1e-9
    assert how.startswith("dp")
    if budget >= 9.7:  # one island fits: the least sensitive layer goes int8
        assert [n for n, lbl in labels.items() if lbl != "fp32"] == ["l0"]


def test_allocator_finds_int8_chains_when_islands_do_not_pay():
    sp = _synthetic_space(boundary=2.4)  # one int8 layer alone is slower than float; a chain of them is faster
    labels, _, how = allocator_plan(sp, 8.0)
    assert sp.latency(labels) <= 8.0 and how != "dp-island-prices"


def test_allocator_says_how_far_an_infeasible_budget_is():
    with pytest.raises(BudgetInfeasibleError) as info:
        allocator_plan(_synthetic_space(), 3.0)
    assert info.value.least_achievable == pytest.approx(4.4)


# --- the end-to-end API and the pass config ------------------------------------------------------------------------

def test_quantize_model_end_to_end_on_the_digits_cnn(digits_model, digits_calibration):
    config = QuantizeConfig(budget=0.85, cost="proxy", calibration=CalibrationConfig(batches=1),
                            sensitivity_batches=1, noise_draws=1)
    quantized, report = quantize_model(digits_model, SPEC, digits_calibration, CPU, config)
    assert report["cost_model"] == "proxy:roofline" and report["allocation"]["estimated_ms"] <= \
        report["budget_ms"] + 1e-9
    assert report["chosen"]["origin"] == "allocator" and report["chosen"]["latency_ms"] <= report["budget_ms"] + 1e-9
    assert math.isfinite(report["additivity"]["simulated"]) and report["additivity"]["simulated"] > 0
    assert quantized.module.quant_plan is quantized.plan and quantized.plan.count("int8") >= 1
    json.dumps(report)  # the report is plain data
    x = torch.cat([s[0] for s in digits_calibration.held_out])
    with torch.no_grad():
        agree = (quantized.module(x).argmax(1) == digits_model(x).argmax(1)).float().mean().item()
    assert agree > 0.9


def test_solve_budget_applies_the_allocators_plan_for_each_budget(digits_model, digits_calibration):
    """One problem, several budgets: each solve applies exactly the allocator's plan for that budget (the ort-cpu
    policy ties no layers) and re-points the one fake-quantized model."""
    config = QuantizeConfig(cost="proxy", calibration=CalibrationConfig(batches=1), sensitivity_batches=1,
                            noise_draws=1, cache=False)
    problem = build_problem(digits_model, SPEC, digits_calibration, CPU, config)
    sp, modules = problem.space, []
    for budget in (0.95, 0.8):
        quantized, report = solve_budget(problem, digits_calibration, dataclasses.replace(config, budget=budget))
        labels, _, how = allocator_plan(sp, report["budget_ms"])
        assert report["budget_ms"] == pytest.approx(budget * sp.latency(sp.float_labels()))
        assert report["chosen"]["labels"] == labels and report["allocation"]["how"] == how
        assert report["allocation"]["estimated_ms"] == pytest.approx(sp.latency(labels))
        assert sp.latency(labels) <= report["budget_ms"] + 1e-9
        assert quantized.plan.labels() == labels and quantized.module.quant_plan is quantized.plan
        modules.append(quantized.module)
    assert modules[0] is modules[1]


def test_the_quantize_pass_runs_in_a_pipeline(digits_model, digits_calibration):
    from deploy.core.passes import Context, State, run_pipeline

    config = QuantizeConfig(budget=0.9, cost="proxy", calibration=CalibrationConfig(batches=1), noise_draws=1)
    state = State(digits_model, SPEC, for_profile(CPU))
    state = run_pipeline([make_pass("quantize", config)], state, Context(calibration=digits_calibration))
    plan = state.attached["quant_plan"]  # what the export pass writes as Q/DQ
    assert plan.count("int8") >= 1 and not hasattr(state.module, "quant_plan")  # the module: the float one
    record = state.records[-1]
    assert record.source == "quantize" and record.data["chosen"]["origin"] == "allocator"
    assert {n for n, lbl in record.data["chosen"]["labels"].items() if lbl != "fp32"} <= \
        {n for n, lp in plan.layers.items() if lp.option.precision == "int8"}
    json.dumps(state.records[-1].data)


def test_the_quantize_pass_applies_labels_without_a_search(digits_model, digits_calibration):
    """With `labels` the pass calibrates and applies that plan as it is (what a deploy.toml replay runs); a layer
    the model does not have is refused."""
    from deploy.core.errors import ConfigError
    from deploy.core.passes import Context, State, run_pipeline

    labels = {"layer1.conv1": "w8a8-pc-sa", "fc": "w8a8-pc-sa"}
    config = QuantizeConfig(calibration=CalibrationConfig(batches=1), labels=labels)
    state = run_pipeline([make_pass("quantize", config)], State(digits_model, SPEC, for_profile(CPU)),
                         Context(calibration=digits_calibration))
    plan = state.attached["quant_plan"]
    assert {n for n, lp in plan.layers.items() if lp.option.precision == "int8"} == set(labels)
    with pytest.raises(ConfigError, match="encoder.layer.0.attention.self.query"):
        bad = QuantizeConfig(calibration=CalibrationConfig(batches=1), labels={"encoder.layer.0.attention.self.query": "fp32"})
        run_pipeline([make_pass("quantize", bad)], State(digits_model, SPEC, for_profile(CPU)),
                     Context(calibration=digits_calibration))


def test_quantize_config_round_trips_and_validates():
    pass_ = make_pass("quantize", QuantizeConfig(budget=0.6, skip=("fc",)))
    entry = config_to_dict(pass_)
    assert config_from_dict(json.loads(json.dumps(entry))).config == pass_.config
    assert config_from_dict(tomllib.loads(tomli_w.dumps(entry))).config == pass_.config
    with pytest.raises(ConfigError):
        config_from_dict({**entry, "data": {**entry["data"], "budget": 0.0}})
    with pytest.raises(ConfigError):
        config_from_dict({**entry, "data": {**entry["data"], "bugdet": 0.5}})
    # the NSGA-II search's fields are gone: a deploy.toml written before (version 1, which always carried them)
    # is refused by its version, and the fields are refused in a current entry
    old = {**entry, "version": 1, "data": {**entry["data"], "search": {"trials": 60}, "measure_finalists": True}}
    with pytest.raises(ConfigError, match="version 1"):
        config_from_dict(old)
    with pytest.raises(ConfigError, match="measure_finalists"):
        config_from_dict({**entry, "data": {**entry["data"], "measure_finalists": False}})
    with pytest.raises(ValueError):
        CalibrationConfig(methods=("entropy",))


def test_plan_round_trips_through_json(digits_prepared):
    plan = digits_prepared.plan.with_options({"fc": option_by_label(digits_prepared.spaces["fc"], "w4-g32-a")})
    again = QuantPlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again.labels() == plan.labels() and again.layers["layer1.conv1"] == plan.layers["layer1.conv1"]


def test_quantization_modules_import_no_runtime():
    code = ("import sys, deploy.compress.quant.api, deploy.compress.quant.cost, deploy.compress.quant.search, "
            "deploy.export.qdq.writer, deploy.export.qdq.insert, deploy.export.qdq.int4, "
            "deploy.export.qdq.verify, deploy.export.openvino; "
            "print([m for m in ('onnxruntime', 'openvino', 'optuna', 'tensorrt') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_fast_preset_and_the_sensitivity_cache(digits_model, digits_calibration, tmp_path, monkeypatch):
    fast = QuantizeConfig.fast(budget=0.6, cost="proxy")
    assert fast.budget == 0.6 and fast.sensitivity_samples == 4 and fast.noise_draws == 1
    assert fast.price_seconds < QuantizeConfig().price_seconds
    monkeypatch.setenv("DEPLOY_CACHE_DIR", str(tmp_path))
    first = build_problem(digits_model, SPEC, digits_calibration, CPU, fast)
    files = list((tmp_path / "sensitivity").glob("quant-*.json"))
    assert len(files) == 1
    second = build_problem(digits_model, SPEC, digits_calibration, CPU, fast)
    assert second.space.sensitivity == first.space.sensitivity
    assert len(list((tmp_path / "sensitivity").glob("quant-*.json"))) == 1
    other = build_problem(digits_model, SPEC, digits_calibration, CPU, dataclasses.replace(fast, noise_draws=2))
    assert len(list((tmp_path / "sensitivity").glob("quant-*.json"))) == 2  # another probe, another entry
    assert other.space.sensitivity != first.space.sensitivity


def test_bias_correction_removes_the_mean_shift_and_export_carries_it(digits_model, digits_calibration, tmp_path):
    """Per-tensor int8 weights shift each output channel's mean; the correction measured on calibration batches
    takes a large part of that shift out of held-out outputs, and the exported ONNX Runtime model computes the
    same as the simulation. The shift is the layer's own (before its output Q: on a conv followed by ReLU that Q
    clamps at zero, and a correction measured through it once shifted every such layer's bias by the ReLU's
    effect, which broke int8 on the digits CNN)."""
    import onnxruntime as ort

    from deploy.compress.quant.sim import quant_layers
    from deploy.export.qdq.writer import export_quantized

    batches = digits_calibration.batches("held_out", 16)[:2]
    shifts_seen = {}
    for corrected in (False, True):
        prep = prepare(digits_model, SPEC, digits_calibration, CPU,
                       config=CalibrationConfig(batches=2, bias_correction=corrected))
        name = "layer2.conv1"
        options = {name: option_by_label(prep.spaces[name], "w8a8-pt-sa")}
        set_options(prep.qmodel, options)
        set_mode(prep.qmodel, "quant")
        layer = quant_layers(prep.qmodel)[name]
        assert layer.output_q  # the case that matters: a conv whose output Q acts as its ReLU
        layer.output_q = False
        outs = {}
        hook = layer.register_forward_hook(lambda m, a, o: outs.setdefault("q", []).append(o))
        with torch.no_grad():
            for b in batches:
                prep.qmodel(*b)
        hook.remove()
        set_mode(prep.qmodel, "off")
        hook = layer.register_forward_hook(lambda m, a, o: outs.setdefault("f", []).append(o))
        with torch.no_grad():
            for b in batches:
                prep.qmodel(*b)
        hook.remove()
        diff = torch.cat(outs["q"]) - torch.cat(outs["f"])
        shifts_seen[corrected] = diff.mean(dim=(0, 2, 3)).abs().mean().item()
        layer.output_q = True
        if corrected:
            assert prep.plan.shifts[name]["w8a8-pt-sa"] and "fp32" not in prep.plan.shifts[name]
            plan = prep.plan.with_options(options)
            assert len(plan.bias_shift(name)) == 32 and QuantPlan.from_dict(plan.to_dict()).bias_shift(name)
            path = export_quantized(plan, digits_model, SPEC, tmp_path / "bc.onnx").onnx
            set_mode(prep.qmodel, "quant")
            x = batches[0][0]
            with torch.no_grad():
                sim = prep.qmodel(x).numpy()
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
            np.testing.assert_allclose(got, sim, atol=2e-2 * np.abs(sim).max())
    assert shifts_seen[True] < 0.7 * shifts_seen[False]
