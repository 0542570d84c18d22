"""Plain ONNX export: named inputs, dynamic batch, outputs that match torch."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import torch

from deploy.core.model.onnx_export import OnnxExportConfig, export_onnx
from deploy.core.spec import InputSpec


def test_cnn_export_with_dynamic_batch(tmp_path, digits_model):
    path = export_onnx(digits_model, [InputSpec("image", ("batch", 1, 32, 32))], tmp_path / "m.onnx")
    model = onnx.load(str(path))
    assert [i.name for i in model.graph.input] == ["image"]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(5, 1, 32, 32)
    got = session.run(None, {"image": x.numpy()})[0]
    np.testing.assert_allclose(got, digits_model(x).detach().numpy(), rtol=1e-4, atol=1e-4)


def test_encoder_export_with_dynamic_sequence(tmp_path):
    from deploy.examples.tiny_bert import tiny_bert

    model = tiny_bert()
    specs = [InputSpec("input_ids", ("batch", "sequence"), "int64"),
             InputSpec("attention_mask", ("batch", "sequence"), "int64")]
    path = export_onnx(model, specs, tmp_path / "bert.onnx", OnnxExportConfig(output_names=("last_hidden_state",)))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ids = torch.randint(5, 100, (2, 12))
    mask = torch.ones_like(ids)
    got = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
    np.testing.assert_allclose(got, model(ids, mask).detach().numpy(), rtol=1e-3, atol=1e-4)


def test_failed_export_leaves_no_file(tmp_path):
    class Broken(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError("cannot trace this")

    import pytest
    from deploy.core.errors import DeployError

    with pytest.raises(DeployError, match="ONNX export failed"):
        export_onnx(Broken(), [InputSpec("x", (1, 2))], tmp_path / "broken.onnx")
    assert list(tmp_path.iterdir()) == []


def test_export_failing_before_any_file_is_named_says_so(tmp_path):
    """A failure before the temporary file exists (here in eval()) is reported as the export's error, not hidden
    behind a NameError from the clean-up."""
    class NoEval(torch.nn.Module):
        def eval(self):
            raise RuntimeError("eval is broken")

    import pytest
    from deploy.core.errors import DeployError

    with pytest.raises(DeployError, match="eval is broken"):
        export_onnx(NoEval(), [InputSpec("x", (1, 2))], tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []
