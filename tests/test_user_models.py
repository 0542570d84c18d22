"""Models shaped as users bring them rather than as the examples are: a recurrent model in which pruning finds
nothing to remove, and nn.TransformerEncoder, whose eval-mode fast path has no ONNX form and reads its Linears'
weights itself (past any wrapper that simulates their quantization)."""
from __future__ import annotations

import json

import numpy as np
import torch
from torch import nn

from deploy.core.spec import InputSpec


class GruHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.gru, self.out = nn.GRU(4, 16, batch_first=True), nn.Linear(16, 3)

    def forward(self, x):
        return self.out(self.gru(x)[0][:, -1])


def gru_head() -> nn.Module:
    """`--arch test_user_models:gru_head`."""
    return GruHead()


class TinyEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(8, 32)
        layer = nn.TransformerEncoderLayer(32, 2, 64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x)).mean(1))


ENCODER_INPUT = [InputSpec("x", ("batch", 6, 8))]


def _encoder() -> nn.Module:
    torch.manual_seed(0)
    module = TinyEncoder().eval()
    for i, layer in enumerate(module.encoder.layers):  # distinct layers, as a trained model's are
        for p in layer.parameters():
            p.data += 0.05 * (i + 1) * torch.randn_like(p)
    return module


def test_a_model_with_nothing_to_prune_is_planned_on_its_precisions(tmp_path):
    from deploy.compiler.job import CompressRequest, compress

    path = tmp_path / "gru.pt"
    torch.manual_seed(0)
    torch.save(gru_head().state_dict(), path)
    request = CompressRequest(model=str(path), arch="test_user_models:gru_head", input_shapes=("x:batchx10x4",),
                              calib="random", precisions=("fp32",), measure_seconds=0.2, threads=1,
                              out=str(tmp_path / "out"))
    report = compress(request)
    assert any(w.startswith("pruning found nothing to remove") for w in report["warnings"])
    written = json.loads((tmp_path / "out" / "report.json").read_text())
    assert written["result"]["precision"] == "fp32" and not written["decisions"]["prune"]["removed"]


def test_only_the_users_model_warns_that_pruning_found_nothing_to_remove():
    """A depth mix (some blocks dropped) whose blocks left have nothing to prune is one candidate among others: its
    family is None without a second warning, which would read as if the user's model had nothing to prune."""
    from types import SimpleNamespace

    from deploy.compiler.candidates import pruning_family
    from deploy.targets.target import resolve

    setup = SimpleNamespace(loaded=SimpleNamespace(structural=True, module=gru_head().eval(),
                                                   inputs=[InputSpec("x", ("batch", 10, 4))]),
                            calibration=SimpleNamespace(calibration=[]), target=resolve("cpu-avx2"), warnings=[])
    assert pruning_family(setup, warn=False) is None and setup.warnings == []
    assert pruning_family(setup) is None and len(setup.warnings) == 1


def test_a_transformer_encoder_exports_in_eval_mode(tmp_path):
    import onnxruntime as ort

    from deploy.core.model.onnx_export import export_onnx

    module = _encoder()
    path = export_onnx(module, ENCODER_INPUT, tmp_path / "encoder.onnx")
    x = torch.randn(3, 6, 8)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, module(x).numpy(), atol=1e-4)
    assert torch.backends.mha.get_fastpath_enabled()  # the switch is only off while exporting


def test_a_transformer_encoders_linears_run_through_their_simulation():
    """Wrapped for int8, linear1/linear2 change the encoder's output (the fused fast path would have run them in
    float); the attention's own projections stay float (nn.MultiheadAttention reads out_proj's weight itself)."""
    from deploy.compress.quant.prepare import CalibrationConfig, prepare
    from deploy.compress.quant.sim import set_options
    from deploy.core.data import from_tensors
    from deploy.profiles import load_builtin

    module = _encoder()
    calibration = from_tensors([(torch.randn(1, 6, 8),) for _ in range(16)])
    prep = prepare(module, ENCODER_INPUT, calibration, load_builtin("cpu-avx512-vnni"),
                   config=CalibrationConfig(batches=2))
    assert not [n for n in prep.spaces if "self_attn" in n]
    assert {f"encoder.layers.{i}.linear{j}" for i in (0, 1) for j in (1, 2)} <= set(prep.spaces)
    x = torch.randn(4, 6, 8)
    with torch.no_grad():
        floating = prep.qmodel(x)
        set_options(prep.qmodel, {n: next(o for o in opts if o.precision == "int8")
                                  for n, opts in prep.spaces.items() if "linear" in n})
        simulated = prep.qmodel(x)
        assert not torch.allclose(floating, simulated)
        assert torch.allclose(floating, module(x), atol=1e-5)
