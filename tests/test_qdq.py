"""Per-runtime Q/DQ export, verified from what the runtime really runs: ONNX Runtime's optimised graph, OpenVINO's
runtime model; the TensorRT policy's graph structure checked statically."""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from deploy.compress.quant.prepare import CalibrationConfig, prepare
from deploy.compress.quant.sim import set_mode, set_options
from deploy.compress.quant.space import option_by_label
from deploy.core.data import from_tensors
from deploy.core.errors import ConfigError
from deploy.export.qdq.writer import export_quantized
from deploy.export.qdq.verify import layer_precisions, mismatches, op_counts, ort_optimized
from deploy.core.metrics import first_tensor
from deploy.core.spec import InputSpec
from deploy.profiles import load_builtin, resolve_target

CPU = load_builtin("cpu-avx512-vnni")
SPEC = [InputSpec("image", ("batch", 1, 32, 32))]
KEEP_FLOAT = "layer2.conv2"


@pytest.fixture(scope="module")
def digits_calibration():
    from deploy.examples.digits_cnn import load_digits_split

    _, _, x, y = load_digits_split()
    return from_tensors([(s[None],) for s in x[:96]], labels=y[:96].tolist())


@pytest.fixture(scope="module")
def ort_prep(digits_model, digits_calibration):
    return prepare(digits_model, SPEC, digits_calibration, CPU, config=CalibrationConfig(batches=1))


def _mixed(prep, int8: str = "w8a8-pc-sa"):
    """Every conv int8 but one, fc float."""
    options = {n: (opts[0] if n in (KEEP_FLOAT, "fc") else option_by_label(opts, int8))
               for n, opts in prep.spaces.items()}
    return prep.plan.with_options(options)


def test_ort_export_fuses_int8_convs_and_keeps_the_float_one_float(digits_model, ort_prep, tmp_path):
    prep = ort_prep
    plan = _mixed(prep)
    export_quantized(plan, digits_model, SPEC, tmp_path / "q.onnx")
    counts = op_counts(ort_optimized(tmp_path / "q.onnx"))
    assert counts.get("QLinearConv", 0) == plan.count("int8")
    actual = layer_precisions(tmp_path / "q.onnx", plan)
    assert actual[KEEP_FLOAT].precision == "fp32" and actual["fc"].precision == "fp32"
    assert all(actual[n].op_type == "QLinearConv" for n, lp in plan.layers.items() if lp.option.precision == "int8")
    assert mismatches(plan, actual) == []
    # the check bites: claim the float layer is int8 and it is reported
    lying = plan.with_options({KEEP_FLOAT: option_by_label(prep.spaces[KEEP_FLOAT], "w8a8-pc-sa")})
    assert any(KEEP_FLOAT in m for m in mismatches(lying, actual))


def test_per_tensor_int8_fuses_too(digits_model, ort_prep, tmp_path):
    prep = ort_prep
    plan = _mixed(prep, "w8a8-pt-sa")
    export_quantized(plan, digits_model, SPEC, tmp_path / "pt.onnx")
    assert mismatches(plan, layer_precisions(tmp_path / "pt.onnx", plan)) == []


def test_openvino_runs_the_int8_layers_in_int8(digits_model, digits_calibration, tmp_path):
    profile = dataclasses.replace(CPU, runtime="openvino", qdq_policy="openvino")
    prep = prepare(digits_model, SPEC, digits_calibration, profile, config=CalibrationConfig(batches=1))
    plan = _mixed(prep)
    result = export_quantized(plan, digits_model, SPEC, tmp_path / "ov.onnx")
    assert result.openvino_xml is not None and result.openvino_xml.exists()
    assert result.openvino_xml.with_suffix(".bin").exists()
    actual = layer_precisions(tmp_path / "ov.onnx", plan, "openvino")
    assert {actual[n].precision for n, lp in plan.layers.items() if lp.option.precision == "int8"} == {"int8"}
    assert actual[KEEP_FLOAT].precision in ("fp32", "bf16")
    assert mismatches(plan, actual) == []


@pytest.fixture(scope="module")
def tiny_bert_setup():
    from deploy.examples.tiny_bert import example_inputs, tiny_bert

    model = tiny_bert()
    calib = from_tensors([example_inputs(seed=i) for i in range(24)])
    spec = [InputSpec("input_ids", ("batch", 16), "int64"), InputSpec("attention_mask", ("batch", 16), "int64")]
    return model, calib, spec


def test_int4_linear_becomes_matmulnbits_and_matches_the_simulation(tiny_bert_setup, tmp_path):
    import onnxruntime as ort

    from deploy.compress.quant.sim import set_mode, set_options

    model, calib, spec = tiny_bert_setup
    prep = prepare(model, spec, calib, CPU, config=CalibrationConfig(batches=1, batch_size=16, smoothquant=True))
    names = list(prep.spaces)
    options = {n: prep.spaces[n][0] for n in names}
    options[names[0]] = option_by_label(prep.spaces[names[0]], "w4-g32-a")  # query: int4 weight-only
    options[names[4]] = option_by_label(prep.spaces[names[4]], "w4-g32-s")  # FFN up: int4 symmetric
    options[names[1]] = option_by_label(prep.spaces[names[1]], "w8a8-pc-sa")  # key: int8
    plan = prep.plan.with_options(options)
    path = tmp_path / "bert.onnx"
    export_quantized(plan, model, spec, path)
    counts = op_counts(ort_optimized(path))
    assert counts.get("MatMulNBits") == 2
    actual = layer_precisions(path, plan)
    assert actual[names[0]].op_type == "MatMulNBits" and actual[names[1]].precision == "int8"
    assert mismatches(plan, actual) == []
    # LayerNorm, Softmax, GELU and the residual Adds stay float: no DequantizeLinear feeds them (an int8 Linear's
    # own bias Add reads its int32 bias through a DequantizeLinear, as ONNX Runtime's fusion wants)
    graph = onnx.load(str(path)).graph
    dq_out = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output if not o.endswith(".bias_dq")}
    for node in graph.node:
        if node.op_type in ("LayerNormalization", "Softmax", "Erf", "Add"):
            assert not dq_out & set(node.input), node.name
    set_options(prep.qmodel, options)
    set_mode(prep.qmodel, "quant")
    x = [torch.cat([s[i] for s in calib.held_out]) for i in range(2)]
    with torch.no_grad():
        simulated = prep.qmodel(*x).numpy()
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"input_ids": x[0].numpy(), "attention_mask": x[1].numpy()})[0]
    assert np.abs(got - simulated).max() < 1e-3


def test_tensorrt_policy_graph_structure(digits_model, digits_calibration, tmp_path):
    prep = prepare(digits_model, SPEC, digits_calibration, load_builtin("nvidia-a100"),
                   config=CalibrationConfig(batches=1))
    options = {n: option_by_label(opts, "w8a8-pc-ss") for n, opts in prep.spaces.items()}
    plan = prep.plan.with_options(options)
    export_quantized(plan, digits_model, SPEC, tmp_path / "trt.onnx")
    model = onnx.load(str(tmp_path / "trt.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            zp = inits[node.input[2]]
            assert zp.dtype == np.int8 and not zp.any(), node.name  # symmetric int8 everywhere
        if node.op_type == "Conv":
            data, weight = producers[node.input[0]], producers[node.input[1]]
            assert data.op_type == weight.op_type == "DequantizeLinear"  # Q/DQ on the op's inputs
            axis = {a.name: a.i for a in weight.attribute}.get("axis")
            assert axis == 0 and inits[weight.input[1]].shape == (inits[weight.input[0]].shape[0],)
            assert len(node.input) < 3 or node.input[2] not in producers  # float bias: TensorRT takes it so
        if node.op_type == "Add":  # residual: the conv output and the OTHER input, quantized
            kinds = [producers[i].op_type for i in node.input if i in producers]
            assert "Conv" in kinds and "DequantizeLinear" in kinds, node.name
    conv_outputs = {o for n in model.graph.node if n.op_type == "Conv" for o in n.output}
    readers = {}
    for n in model.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    for q in (n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] in conv_outputs):
        dq = readers[q.output[0]]  # no output Q on convs, except a downsample conv feeding a residual Add
        assert [r.op_type for d in dq for r in readers[d.output[0]]] == ["Add"], q.name


def test_tensorrt_policy_fp8_and_blocked_int4(digits_model, digits_calibration, tmp_path):
    prep = prepare(digits_model, SPEC, digits_calibration, load_builtin("nvidia-h100"),
                   config=CalibrationConfig(batches=1))
    options = {n: option_by_label(opts, "fp8") for n, opts in prep.spaces.items()}
    options["fc"] = option_by_label(prep.spaces["fc"], "w4-g32-s")
    options["stem.0"] = option_by_label(prep.spaces["stem.0"], "fp16")
    result = export_quantized(prep.plan.with_options(options), digits_model, SPEC, tmp_path / "h100.onnx")
    assert result.float_layers_precision == {"stem.0": "fp16"}  # left float in the file, for the builder flag
    model = onnx.load(str(tmp_path / "h100.onnx"))
    onnx.checker.check_model(model, full_check=True)
    inits = {i.name: i for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    fc = next(n for n in model.graph.node if n.op_type == "MatMul")
    dq = producers[fc.input[1]]
    assert dq.op_type == "DequantizeLinear" and inits[dq.input[0]].data_type == onnx.TensorProto.INT4
    assert {a.name: a.i for a in dq.attribute}.get("block_size") == 32
    fp8 = [i for i in inits.values() if i.data_type == onnx.TensorProto.FLOAT8E4M3FN]
    assert len(fp8) >= 8  # the fp8 convs' weight and activation zero points


def test_a_plan_is_exported_only_for_its_policy(digits_model, ort_prep, tmp_path):
    prep = ort_prep
    with pytest.raises(ConfigError):
        export_quantized(_mixed(prep), digits_model, SPEC, tmp_path / "x.onnx", "tensorrt")


def test_openvino_profile_quantizes_to_a_budget_end_to_end(digits_model, digits_calibration, tmp_path):
    """The Python API on the OpenVINO CPU profile: priced on OpenVINO, the allocator's plan for a budget fits it,
    and a plan with every layer int8, exported as IR, runs each of them in I8/U8 in OpenVINO's runtime model.
    The budget is the all-int8 plan's own estimate (feasible by construction): on a CPU whose bf16 kernels are
    fast, this small CNN's int8 prices above float and no budget below float's would be feasible."""
    from deploy.compress.quant.api import QuantizeConfig, build_problem, solve_budget
    profile = resolve_target("cpu-openvino").profile  # this CPU's, measured at one thread (a bare profile)
    config = QuantizeConfig.fast(price_seconds=0.05, cache=False)
    problem = build_problem(digits_model, SPEC, digits_calibration, profile, config)
    sp = problem.space
    int8 = {n: next(o.label for o in opts if o.precision == "int8") for n, opts in sp.spaces.items()}
    budget_ms = sp.latency(int8)
    quantized, report = solve_budget(problem, digits_calibration, dataclasses.replace(config, budget_ms=budget_ms))
    assert report["cost_model"] == "measured:openvino" and report["allocation"]["estimated_ms"] <= budget_ms
    assert quantized.plan.policy == "openvino"
    plan = problem.prep.plan.with_options(sp.options(int8))
    result = export_quantized(plan, digits_model, SPEC, tmp_path / "ov.onnx")
    assert result.openvino_xml is not None and result.openvino_xml.exists()
    actual = layer_precisions(result.onnx, plan, "openvino")
    assert {actual[n].precision for n in int8} == {"int8"}
    assert mismatches(plan, actual) == []
    model = onnx.load(str(result.onnx))  # as NNCF: both inputs of a residual Add quantized (the skip, and the
    producers = {o: n for n in model.graph.node for o in n.output}  # conv's output, signed), so the Add fuses into
    adds = [n for n in model.graph.node if n.op_type == "Add" and len(n.input) == 2]  # the int8 conv
    residual = [n for n in adds if all(i in producers for i in n.input)]
    assert residual and all(producers[i].op_type == "DequantizeLinear" for n in residual for i in n.input)
    qs = [producers[producers[i].input[0]] for n in residual for i in n.input]  # the Q behind each DQ
    own = [q for q in qs if q.input[0] in producers and producers[q.input[0]].op_type == "Conv"]
    zero_points = {i.name: i.data_type for i in model.graph.initializer}
    assert own and all(zero_points[q.input[2]] == onnx.TensorProto.INT8 for q in own)  # a conv's output: int8
    import openvino as ov

    # the image (negative values too) enters the stem conv as int8 with zero point 0, not as uint8 with a zero
    # point OpenVINO's convolution pays for; the global pool reads a Q/DQ of its own input, so it runs in int8
    stem = next(n for n in model.graph.node if n.op_type == "Conv")
    stem_q = producers[producers[stem.input[0]].input[0]]
    assert zero_points[stem_q.input[2]] == onnx.TensorProto.INT8 and stem_q.input[0] == SPEC[0].name
    pool = next(n for n in model.graph.node if n.op_type == "GlobalAveragePool")
    assert producers[pool.input[0]].op_type == "DequantizeLinear"
    runtime = ov.Core().compile_model(str(result.openvino_xml), "CPU").get_runtime_model()
    precisions = {op.get_friendly_name(): op.get_rt_info()["runtimePrecision"].astype(str)
                  for op in runtime.get_ordered_ops()}
    stem_conv = precisions.get(stem.name, precisions.get(f"{stem.name}/WithoutBiases"))  # the bias split off
    assert precisions[pool.name] in ("u8", "i8") and stem_conv == "i8"
    flatten = next(n for n in model.graph.node if n.op_type == "Flatten")  # the pool's output stays uint8 into fc
    assert producers[flatten.input[0]].op_type == "DequantizeLinear" and precisions[flatten.name] in ("u8", "i8")


def test_openvino_policy_runs_attention_matmuls_in_int8(tmp_path):
    """On a transformer the openvino policy also quantizes the attention MatMuls' inputs (Q, K, V outputs and the
    softmax probabilities), as NNCF's transformer preset does: OpenVINO then runs attention in int8 too."""
    import openvino as ov

    from deploy.examples.tiny_bert import example_inputs, tiny_bert

    model = tiny_bert(vocab_size=1000)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # distinct, trained-like biases (the exporter shares identical initializers)
        for layer in model.modules():
            if isinstance(layer, torch.nn.Linear):
                layer.bias.normal_(0.0, 0.05, generator=gen)
    ids, mask = example_inputs(batch=24, seq_len=32)
    calib = from_tensors([(ids[i:i + 1], mask[i:i + 1]) for i in range(24)])
    spec = [InputSpec("input_ids", ("batch", 32), "int64"), InputSpec("attention_mask", ("batch", 32), "int64")]
    profile = resolve_target("cpu-openvino").profile  # this CPU's: without VNNI its int8 weights keep 7 bits
    prep = prepare(model, spec, calib, profile, config=CalibrationConfig(batches=1, batch_size=8))
    attention = prep.graph.attention_feeders()
    assert {n.rsplit(".", 1)[-1] for n in attention} == {"query", "key", "value"}
    assert all(prep.plan.layers[n].act_out is not None and prep.plan.layers[n].act_out.signed for n in attention)
    label = f"w{profile.int8_weight_bits}a8-pc-sa"
    plan = prep.plan.with_options({n: option_by_label(o, label) for n, o in prep.spaces.items()})
    result = export_quantized(plan, model, spec, tmp_path / "bert.onnx")
    ops = [n.op_type for n in onnx.load(str(tmp_path / "bert.onnx")).graph.node]
    assert ops.count("QuantizeLinear") > sum(lp.option.precision == "int8" for lp in plan.layers.values())
    compiled = ov.Core().compile_model(str(result.openvino_xml), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    kinds = [(str(op.get_rt_info()["layerType"].astype(str)), str(op.get_rt_info()["runtimePrecision"].astype(str)))
             for op in compiled.get_runtime_model().get_ordered_ops()]
    attention_ops = [k for k in kinds if k[0] in ("Subgraph", "MatMul") and k[1] in ("i8", "u8")]
    assert attention_ops, kinds
    assert mismatches(plan, layer_precisions(result.onnx, plan, "openvino")) == []
    # the simulation quantizes the Q/K/V outputs as the exported graph does, so it tracks OpenVINO's output
    set_options(prep.qmodel, {n: lp.option for n, lp in plan.layers.items()})
    set_mode(prep.qmodel, "quant")
    with torch.no_grad():
        ref = first_tensor(model(ids[:1], mask[:1]))
        sim = first_tensor(prep.qmodel(ids[:1], mask[:1]))
    got = torch.from_numpy(np.asarray(compiled({"input_ids": ids[:1].numpy(), "attention_mask": mask[:1].numpy()})[0]))
    assert torch.mean((got - sim) ** 2) < 0.25 * torch.mean((got - ref) ** 2) + 1e-6


def test_a_cpu_without_vnni_keeps_int8_weights_in_seven_bits(digits_model, digits_calibration, tmp_path):
    """cpu-avx2-openvino's int8 options have 7-bit weights: every exported weight integer is in [-63, 63], so no
    u8 x s8 pair can saturate the 16-bit sums of vpmaddubsw (OpenVINO's int8 kernels on a CPU without VNNI)."""
    profile = load_builtin("cpu-avx2-openvino")
    prep = prepare(digits_model, SPEC, digits_calibration, profile, config=CalibrationConfig(batches=1))
    int8 = {n: next(o for o in opts if o.precision == "int8") for n, opts in prep.spaces.items()}
    assert int8 and {o.label for o in int8.values()} <= {"w7a8-pc-sa", "w7a8-pt-sa"}
    result = export_quantized(prep.plan.with_options(int8), digits_model, SPEC, tmp_path / "avx2.onnx")
    weights = [numpy_helper.to_array(t) for t in onnx.load(str(result.onnx)).graph.initializer
               if t.data_type == onnx.TensorProto.INT8 and len(t.dims) >= 2]
    assert len(weights) == len(int8)
    assert max(int(np.abs(w).max()) for w in weights) == 63


def test_openvino_calibrates_a_global_pools_input_and_the_plan_file_keeps_it(digits_model, digits_calibration,
                                                                               ort_prep):
    """The openvino policy quantizes the input of the global pool before the classifier (as NNCF does): its range
    is calibrated at the pool module's input, kept in the plan's `tensors` and in the plan file. A pool computed
    inside another module's forward has no module to record its input at: it stays float, with a note."""
    import json

    from torch import nn

    from deploy.export.qdq.plan import QuantPlan

    profile = resolve_target("cpu-openvino").profile
    prep = prepare(digits_model, SPEC, digits_calibration, profile, config=CalibrationConfig(batches=1))
    (tensor, layer), = prep.graph.pooled_layers().values()
    assert layer == "fc" and set(prep.plan.tensors) == {tensor} and ort_prep.plan.tensors == {}
    seen = []
    hook = prep.folded.pool.register_forward_pre_hook(lambda m, args: seen.append(args[0].amax().item()))
    with torch.no_grad():  # the batches calibration reads
        for batch in digits_calibration.leading("statistics", CalibrationConfig().batch_size, 1):
            prep.folded(*batch)
    hook.remove()
    params = prep.plan.tensors[tensor]  # a ReLU'd sum: uint8 from 0, up to at most what calibration saw
    assert not params.signed and params.zero_point == 0 and 0 < params.scale * 255 <= max(seen) * 1.001
    assert QuantPlan.from_dict(json.loads(json.dumps(prep.plan.to_dict()))).tensors == prep.plan.tensors

    class FunctionalPool(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.fc = nn.Conv2d(1, 8, 3, padding=1), nn.Linear(8, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(torch.relu(self.conv(x)), 1), 1))

    prep = prepare(FunctionalPool().eval(), SPEC, digits_calibration, profile, config=CalibrationConfig(batches=1))
    assert prep.plan.tensors == {} and any("global pool" in note for note in prep.plan.notes)


def test_openvino_moves_the_classifiers_input_qdq_and_smoothing_onto_the_pool_output(digits_model,
                                                                                       digits_calibration, tmp_path):
    """As NNCF places it: the int8 classifier's input Q/DQ (and its SmoothQuant Mul, factors on the channel axis)
    sit on the global pool's output, before the Flatten, so OpenVINO hands the pool's uint8 output straight to the
    FullyConnected. The file still computes the same function: its labels agree with the float model's."""
    import onnxruntime as ort

    profile = resolve_target("cpu-openvino").profile
    prep = prepare(digits_model, SPEC, digits_calibration, profile, config=CalibrationConfig(batches=1))
    int8 = {n: next(o for o in opts if o.precision == "int8") for n, opts in prep.spaces.items()}
    plan = prep.plan.with_options(int8)
    width = digits_model.fc.in_features
    factors = tuple(float(v) for v in torch.linspace(0.5, 2.0, width))
    plan.layers["fc"] = dataclasses.replace(plan.layers["fc"], smooth=factors)
    result = export_quantized(plan, digits_model, SPEC, tmp_path / "ov.onnx")
    model = onnx.load(str(result.onnx))
    producers = {o: n for n in model.graph.node for o in n.output}
    fc = next(n for n in model.graph.node if n.op_type in ("Gemm", "MatMul") and "fc" in n.name)
    chain = [producers[fc.input[0]]]
    while chain[-1].op_type != "GlobalAveragePool":
        chain.append(producers[chain[-1].input[0]])
    assert [n.op_type for n in chain] == ["Flatten", "DequantizeLinear", "QuantizeLinear", "Mul", "GlobalAveragePool"]
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    assert inits[chain[3].input[1]].shape == (width, 1, 1)
    x = torch.cat([s[0] for s in digits_calibration.calibration[:64]])
    with torch.no_grad():
        want = digits_model(x).argmax(1).numpy()
    session = ort.InferenceSession(str(result.onnx), providers=["CPUExecutionProvider"])
    got = np.concatenate([session.run(None, {"image": x[i:i + 1].numpy()})[0] for i in range(len(x))]).argmax(1)
    assert (got == want).mean() >= 0.95
