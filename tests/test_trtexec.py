"""The trtexec command printed for a TensorRT target with no GPU at hand (export.trtexec)."""
from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from deploy.core.spec import InputSpec
from deploy.export.trtexec import as_shell, hand_off, has_qdq, trtexec_command

TEXT = [InputSpec("input_ids", ("batch", "sequence"), "int64"), InputSpec("attention_mask", ("batch", "sequence"),
                                                                          "int64")]


def _model(path, qdq: bool):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    if qdq:
        inits = [helper.make_tensor("s", TensorProto.FLOAT, [], [0.1]), helper.make_tensor("z", TensorProto.INT8, [], [0])]
        nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
                 helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])]
    else:
        inits, nodes = [], [helper.make_node("Relu", ["x"], ["y"])]
    onnx.save(helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits)), str(path))
    return path


def test_dynamic_inputs_get_min_opt_max_shapes_and_a_float_plan_its_precision(tmp_path):
    path = _model(tmp_path / "model.onnx", qdq=False)
    argv = trtexec_command(path, TEXT, {"fp32", "fp16"}, sizes={"sequence": 128}, max_sizes={"batch": 8})
    assert argv[:3] == ["trtexec", "--onnx=model.onnx", "--saveEngine=model.plan"]
    assert "--minShapes=input_ids:1x1,attention_mask:1x1" in argv
    assert "--optShapes=input_ids:1x128,attention_mask:1x128" in argv
    assert "--maxShapes=input_ids:8x128,attention_mask:8x128" in argv
    assert "--fp16" in argv and "--stronglyTyped" not in argv


def test_a_qdq_model_is_strongly_typed_and_static_inputs_need_no_shapes(tmp_path):
    path = _model(tmp_path / "model.onnx", qdq=True)
    assert has_qdq(path)
    argv = trtexec_command(path, [InputSpec("x", (1, 4))], {"int8", "fp16"})
    assert argv[-1] == "--stronglyTyped" and "--fp16" not in argv
    assert not any(a.startswith("--minShapes") for a in argv)
    assert as_shell(argv) == "trtexec --onnx=model.onnx --saveEngine=model.plan --stronglyTyped"


def test_the_hand_off_names_the_command_and_the_ssh_check(tmp_path):
    path = _model(tmp_path / "model.onnx", qdq=False)
    lines = hand_off(path, TEXT, {"fp32"}, "jetson-orin-nano", sizes={"sequence": 64})
    assert "trtexec --onnx=model.onnx --saveEngine=model.plan --minShapes=" in lines[0]
    assert lines[1].startswith(f"to measure it from here: deploy bench {path} --target jetson-orin-nano")
    assert "--input-shape input_ids:1x64" in lines[1] and "--runner ssh://" in lines[1]


def test_reduced_floats_are_in_the_default_precisions_and_fp32_opts_out():
    """fp16 (and bf16) are offered where the profile runs them unless --precision leaves them out; an unknown
    precision is refused."""
    from types import SimpleNamespace

    import pytest

    from deploy.compiler.quant_settings import quant_config
    from deploy.compiler.job import CompressRequest
    from deploy.core.errors import UserInputError
    from deploy.profiles import load_builtin

    setup = SimpleNamespace(target=SimpleNamespace(profile=load_builtin("jetson-orin-nano")))
    default = quant_config(CompressRequest(), setup).space.float_precisions
    explicit = quant_config(CompressRequest(precisions=("fp32", "int8")), setup).space.float_precisions
    assert "fp16" in default and explicit == ("fp32",)
    with pytest.raises(UserInputError, match="unknown precision 'int9'"):
        CompressRequest(precisions=("fp32", "int9"))
