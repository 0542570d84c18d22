"""GPTQ weight rounding: on correlated inputs it leaves a smaller output error than rounding to nearest, its weights
lie on the grid of the same scales (so the exporter, which recomputes scales from the weights, writes GPTQ's
integers), with or without SmoothQuant factors; and the exported Q/DQ model computes what the simulation does."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deploy.compress.quant.gptq import eligible, input_hessians, rounded_weight
from deploy.export.qdq.intmath import dequantized_weight, quantize_weight
from deploy.export.qdq.option import QuantOption

PER_CHANNEL = QuantOption("int8", 8, 8, "per-channel", 0, True, False)
PER_TENSOR = QuantOption("int8", 8, 8, "per-tensor", 0, True, False)


def _correlated(samples: int, width: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    mix = torch.randn(width, width, generator=gen) / width ** 0.5
    x = torch.randn(samples, width, generator=gen) @ mix + 0.3 * torch.randn(samples, width, generator=gen)
    x[:, :4] *= 8.0  # a few outlier channels, as transformer activations have
    return x


@pytest.mark.parametrize("option", [PER_CHANNEL, PER_TENSOR], ids=lambda o: o.label)
@pytest.mark.parametrize("smoothed", [False, True])
def test_gptq_beats_rounding_to_nearest_on_the_same_grid(option, smoothed):
    torch.manual_seed(0)
    layer = nn.Linear(96, 64)
    x = _correlated(2048, 96)
    smooth = torch.rand(96, generator=torch.Generator().manual_seed(1)) + 0.5 if smoothed else None
    hessian = input_hessians(nn.Sequential(layer), ["0"], [(x,)], {"0": smooth} if smoothed else {})["0"]
    rounded = rounded_weight(layer.weight, smooth, hessian, option)
    assert rounded is not None and eligible(layer, option)
    s = torch.ones(96) if smooth is None else smooth
    reference = x @ layer.weight.detach().T

    def error(weight: torch.Tensor) -> float:
        return float(((x / s) @ dequantized_weight(weight * s, option).T - reference).pow(2).mean())

    assert error(rounded) < 0.7 * error(layer.weight.detach())
    plain, ours = quantize_weight(layer.weight.detach() * s, option), quantize_weight(rounded * s, option)
    assert torch.allclose(ours.scale, plain.scale, rtol=1e-6)  # the exporter finds the same scales
    assert torch.equal(dequantized_weight(rounded * s, option), ours.dequantize())


def test_convolutions_are_rounded_over_their_kernel_columns():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, padding=1)
    x = torch.randn(16, 8, 10, 10)
    x = x + 0.8 * x.roll(1, dims=1)  # channels correlated
    hessian = input_hessians(nn.Sequential(conv), ["0"], [(x,)], {})["0"]
    assert hessian.shape == (8 * 9, 8 * 9)
    rounded = rounded_weight(conv.weight, None, hessian, PER_CHANNEL)
    reference = conv(x).detach()

    def error(weight: torch.Tensor) -> float:
        return float((F.conv2d(x, dequantized_weight(weight, PER_CHANNEL), conv.bias.detach(), padding=1) - reference)
                     .pow(2).mean())

    assert error(rounded) < error(conv.weight.detach())


def test_only_symmetric_int8_on_plain_layers_is_eligible():
    assert not eligible(nn.Linear(4, 4), QuantOption("int8", 8, 8, "per-channel", 0, False, False))
    assert not eligible(nn.Linear(64, 4), QuantOption("int4", 4, 0, "per-group", 32, True, False))
    assert not eligible(nn.Conv2d(4, 4, 3, groups=4), PER_CHANNEL)
    assert eligible(nn.Conv2d(4, 4, 3), PER_CHANNEL)


def test_the_exported_model_holds_gptq_integers_and_computes_what_the_simulation_does(tmp_path):
    """prepare() with GPTQ on: every int8 option of a tiny BERT's Linears gets a rounded weight; the Q/DQ ONNX of
    an all-int8 plan stores exactly its integers (not those of the float weight), the simulation (bias
    correction measured on the rounded weights) matches ONNX Runtime, and the output is closer to float than
    rounding to nearest, on samples the Hessians never saw."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    from deploy.compress.quant.prepare import CalibrationConfig, prepare
    from deploy.compress.quant.sim import set_mode, set_options
    from deploy.core.data import from_tensors
    from deploy.core.spec import InputSpec
    from deploy.examples.tiny_bert import example_inputs, tiny_bert
    from deploy.export.qdq.writer import export_quantized
    from deploy.profiles import resolve_target

    model = tiny_bert()
    calib = from_tensors([example_inputs(seed=i) for i in range(48)])
    spec = [InputSpec("input_ids", ("batch", 16), "int64"), InputSpec("attention_mask", ("batch", 16), "int64")]
    x = [torch.cat([s[i] for s in calib.held_out]) for i in range(2)]
    with torch.no_grad():
        reference = model(*x)
    errors = {}
    for gptq in (False, True):
        config = CalibrationConfig(batches=2, batch_size=16, smoothquant=True, gptq=gptq)
        prep = prepare(model, spec, calib, resolve_target("cpu").profile, config=config)  # this CPU's int8 bits
        options = {n: next(o for o in opts if o.precision == "int8" and o.granularity == "per-channel")
                   for n, opts in prep.spaces.items()}
        plan = prep.plan.with_options(options)
        assert bool(plan.rounded) == gptq and all(plan.rounded_weight(n) is not None for n in options if gptq)
        path = tmp_path / f"bert-{gptq}.onnx"
        export_quantized(plan, model, spec, path)
        stored = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}
        if gptq:
            for name in options:
                s = torch.tensor(plan.layers[name].smooth) if plan.layers[name].smooth else torch.ones(1)
                expected = quantize_weight(plan.rounded_weight(name) * s, options[name]).q.numpy()
                got = stored[f"{name}.weight_q"]
                assert np.array_equal(got, expected) or np.array_equal(got.T, expected), name  # MatMul: [in, out]
        set_options(prep.qmodel, options)
        set_mode(prep.qmodel, "quant")
        with torch.no_grad():
            simulated = prep.qmodel(*x)
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        exported = session.run(None, {"input_ids": x[0].numpy(), "attention_mask": x[1].numpy()})[0]
        assert np.abs(exported - simulated.numpy()).max() < 1e-3
        errors[gptq] = float((torch.from_numpy(exported) - reference).pow(2).mean())
    assert errors[True] < errors[False], errors
