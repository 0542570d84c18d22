"""Low-rank factorisation of a BERT-style encoder: ranks on the device multiple, and the result exports to ONNX."""
from __future__ import annotations

import numpy as np
import torch

from deploy.compress.lowrank.api import LowRankConfig, lowrank_model
from deploy.core.data import from_tensors
from deploy.examples.tiny_bert import tiny_bert
from deploy.core.model.onnx_export import OnnxExportConfig, export_onnx
from deploy.core.spec import InputSpec

SEQ = 16


def test_lowrank_tiny_bert_exports_and_matches_onnxruntime(tmp_path):
    import onnxruntime as ort

    torch.manual_seed(0)
    model = tiny_bert()
    gen = torch.Generator().manual_seed(0)
    samples = [(torch.randint(5, 100, (1, SEQ), generator=gen), torch.ones(1, SEQ, dtype=torch.int64))
               for _ in range(24)]
    calibration = from_tensors(samples)
    new, report = lowrank_model(model, calibration, 8, LowRankConfig(budget=0.5, recover=False))

    assert report["ranks"], "a 50% budget must factorise something"
    assert all(rank % 8 == 0 for rank in report["ranks"].values()), report["ranks"]
    assert report["cost_after"] <= 0.5 * report["cost_before"] + 1e-6
    assert "recovery" not in report

    ids, mask = samples[0]
    with torch.no_grad():
        expected = new(ids, mask)
    assert expected.shape == (1, SEQ, 64) and torch.isfinite(expected).all()

    specs = [InputSpec("input_ids", ("batch", SEQ), "int64"), InputSpec("attention_mask", ("batch", SEQ), "int64")]
    path = export_onnx(new, specs, tmp_path / "lowrank_bert.onnx", OnnxExportConfig(output_names=("last_hidden_state",)))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()][0] == "last_hidden_state"
    got = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-4, atol=1e-4)
