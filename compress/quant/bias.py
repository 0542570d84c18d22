"""Bias correction: the systematic part of a layer's quantization error, removed through its bias.

Rounding weights and activations shifts each output channel's mean a little; through LayerNorm, softmax and mean
pooling such shifts add up (NNCF applies the same "fast bias correction" after its int8 calibration). For every
low-precision option of every layer, the shift is measured with the layer's float input: one pass of the float
model over the calibration batches, each layer quantized on the side. The simulation subtracts it from the bias
(QuantLayer.shifts) and export writes the corrected bias (QuantPlan.shifts), so both compute the same thing.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from deploy.compress.quant.sim import QuantLayer, quant_layers, set_mode
from deploy.export.qdq.option import QuantOption

Shifts = dict[str, dict[str, tuple[float, ...]]]


def _channel_mean(diff: torch.Tensor, layer: nn.Module) -> tuple[torch.Tensor, int]:
    """Sum over every dimension but the output channel (Linear: the last, Conv2d: the second), and the count."""
    if isinstance(layer, nn.Linear):
        flat = diff.reshape(-1, diff.shape[-1])
    else:
        flat = diff.transpose(0, 1).reshape(diff.shape[1], -1).t()
    return flat.sum(0), flat.shape[0]


def measure_shifts(qmodel: nn.Module, spaces: dict[str, tuple[QuantOption, ...]],
                   batches: Sequence[tuple[torch.Tensor, ...]]) -> Shifts:
    """Per layer and low-precision option label: the mean output shift per channel that quantizing only that
    layer causes (quantized minus float), with float inputs."""
    layers = quant_layers(qmodel)
    sums: dict[str, dict[str, torch.Tensor]] = {n: {} for n in layers}
    counts: dict[str, int] = {n: 0 for n in layers}

    def hook_for(name: str, ql: QuantLayer):
        options = [o for o in spaces.get(name, ()) if o.precision in ("int8", "int4", "fp8")]

        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            # The shift is the layer's own rounding error, measured before its output quantization: a Q on the
            # output of a conv followed by ReLU clamps at zero (it IS the ReLU), so with it the difference would
            # be relu(y) - y, not a rounding shift.
            saved_option, saved_mode, saved_output_q = ql.plan.option, ql.mode, ql.output_q
            ql.mode, ql.output_q = "quant", False
            try:
                for opt in options:
                    ql.set_option(opt)
                    total, n = _channel_mean(ql.forward(args[0]) - out, ql.layer)
                    sums[name][opt.label] = sums[name].get(opt.label, 0) + total.double()
                counts[name] += _channel_mean(out, ql.layer)[1]
            finally:
                ql.set_option(saved_option)
                ql.mode, ql.output_q = saved_mode, saved_output_q
        return hook

    saved = {n: (ql.mode, dict(ql.shifts)) for n, ql in layers.items()}
    handles = [ql.register_forward_hook(hook_for(n, ql)) for n, ql in layers.items()]
    try:
        for ql in layers.values():
            ql.shifts = {}
        set_mode(qmodel, "off")
        with torch.no_grad():
            for batch in batches:
                qmodel(*batch)
    finally:
        for handle in handles:
            handle.remove()
        for n, ql in layers.items():
            ql.mode, ql.shifts = saved[n][0], saved[n][1]
    return {n: {label: tuple(float(v) for v in (total / max(1, counts[n])).tolist())
                for label, total in per.items()} for n, per in sums.items() if per}


def install_shifts(qmodel: nn.Module, shifts: Shifts) -> None:
    """Give each QuantLayer its corrections (the simulation then subtracts them from the bias)."""
    for name, ql in quant_layers(qmodel).items():
        ql.shifts = {label: torch.tensor(values, dtype=torch.float32) for label, values in shifts.get(name, {}).items()}
