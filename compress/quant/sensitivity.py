"""Per-layer, per-option output distortion (QuantNAS): perturb ONE layer as the option would and measure the mean
squared change of the model output on calibration batches.

The default probe injects uniform noise of one quantization step into the layer's weights and input activation
(and its output, where the policy quantizes it), averaged over a few seeded draws: QuantNAS found this a steadier
sensitivity signal than one hard rounding. `mode="quant"` measures the real fake-quantized layer instead; both are
available so the additivity of the chosen plan can be checked against a real simulation.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from deploy.compress.quant.sim import Mode, quant_layers, set_mode
from deploy.export.qdq.option import QuantOption
from deploy.core.metrics import first_tensor



def run(model: nn.Module, batches: Sequence[tuple[torch.Tensor, ...]]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [first_tensor(model(*b)).detach().float() for b in batches]


def output_mse(model: nn.Module, batches: Sequence[tuple[torch.Tensor, ...]],
               reference: Sequence[torch.Tensor]) -> float:
    outs = run(model, batches)
    total = sum(torch.sum((o - r) ** 2).item() for o, r in zip(outs, reference))
    return total / max(sum(r.numel() for r in reference), 1)


def option_distortions(qmodel: nn.Module, spaces: dict[str, tuple[QuantOption, ...]],
                       batches: Sequence[tuple[torch.Tensor, ...]], reference: Sequence[torch.Tensor],
                       mode: Mode = "noise", draws: int = 2) -> dict[str, dict[str, float]]:
    """d[layer][label]: output MSE with only that layer perturbed as `label` would (fp32 costs 0 by definition)."""
    layers = quant_layers(qmodel)
    saved = {n: (m.plan, m.mode) for n, m in layers.items()}
    result: dict[str, dict[str, float]] = {}
    try:
        set_mode(qmodel, "off")
        for name, options in spaces.items():
            layer = layers[name]
            result[name] = {}
            for opt in options:
                if opt.precision == "fp32":
                    result[name][opt.label] = 0.0
                    continue
                layer.set_option(opt)
                repeats = draws if mode == "noise" and not opt.is_float else 1
                values = []
                for draw in range(repeats):
                    layer.mode = mode
                    layer.generator = torch.Generator().manual_seed(1000 * draw + 17)
                    values.append(output_mse(qmodel, batches, reference))
                result[name][opt.label] = float(sum(values) / len(values))
                layer.mode = "off"
    finally:
        for n, m in layers.items():
            m.plan, m.mode = saved[n]
            m.generator = None
    return result


def plan_distortion(qmodel: nn.Module, options: dict[str, QuantOption], batches: Sequence[tuple[torch.Tensor, ...]],
                    reference: Sequence[torch.Tensor]) -> float:
    """Output MSE of the whole model fake-quantized as `options` say (the real simulation, not noise)."""
    layers = quant_layers(qmodel)
    saved = {n: (m.plan, m.mode) for n, m in layers.items()}
    try:
        set_mode(qmodel, "quant")
        for name, opt in options.items():
            layers[name].set_option(opt)
        return output_mse(qmodel, batches, reference)
    finally:
        for n, m in layers.items():
            m.plan, m.mode = saved[n]
