"""`import deploy` (and the CLI module) must not load the heavy runtimes: they are imported lazily."""
from __future__ import annotations

import subprocess
import sys

HEAVY = ("onnxruntime", "openvino", "tensorrt", "transformers", "torch_pruning", "optuna", "matplotlib")


def test_import_deploy_loads_no_runtime():
    code = ("import sys, deploy, deploy.cli, deploy.core.passes, deploy.core.model.load, deploy.core.data, deploy.core.metrics, "
            "deploy.core.analysis, deploy.core.atomic_io, deploy.export, deploy.targets, deploy.compress, deploy.profiles; "
            f"print([m for m in {HEAVY!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_timing_an_onnx_file_imports_no_torch(tmp_path):
    """`deploy bench` and `regress` on an ONNX file need ONNX Runtime, not torch (1.5 s of every start-up)."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    path = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(graph), str(path))
    code = ("import sys; from deploy.targets.model_files import load_onnx; import deploy.targets.bench, "
            f"deploy.cli.bench_cmd; print(load_onnx({str(path)!r}).inputs[0].name, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["x", "False"]
