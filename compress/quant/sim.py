"""Fake quantization in torch: what the exported Q/DQ model computes, simulated in float.

The weight quantizers here are also what export uses to write the integer weights, so the simulation and the
deployed model agree bit for bit on weights; activations use the calibrated per-tensor parameters from the plan.
int4 follows ONNX Runtime's MatMulNBits round-to-nearest exactly (checked by a test). Rounding is half-to-even,
like ONNX QuantizeLinear. Gradients pass straight through (STE), so recovery training can run through it.

`mode="noise"` is QuantNAS's sensitivity probe: instead of rounding, add uniform noise of one quantization step to
the weights and activations, which measures a layer's sensitivity without the accidents of one rounding.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from deploy.export.qdq.intmath import (FP8_MAX, _float_dtype, dequantized_weight, quantize_weight,
                                       quantized_bias, weight_step)
from deploy.export.qdq.option import QuantOption
from deploy.export.qdq.plan import ActParams, LayerPlan, QuantPlan
from deploy.export.qdq.policy import QdqPolicy

Mode = Literal["quant", "noise", "off"]


def fake_quant_act(x: torch.Tensor, params: ActParams) -> torch.Tensor:
    """Quantize-dequantize with straight-through gradients."""
    q = torch.clamp(torch.round(x / params.scale) + params.zero_point, params.qmin, params.qmax)
    return x + ((q - params.zero_point) * params.scale - x).detach()


def fake_fp8_act(x: torch.Tensor, params: ActParams) -> torch.Tensor:
    """fp8 e4m3 with a per-tensor scale taken from the symmetric int8 range (same bound)."""
    scale = params.scale * 127.0 / FP8_MAX
    y = (x / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float() * scale
    return x + (y - x).detach()


def _ste(w: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return w + (target - w).detach()


def _noise_like(x: torch.Tensor, step: torch.Tensor | float, gen: torch.Generator | None) -> torch.Tensor:
    u = torch.rand(x.shape, generator=gen, dtype=x.dtype) - 0.5
    return x + u * step


@dataclass(frozen=True)
class SimFlags:
    """Policy facts the simulation must follow: a Q on the int8 output (ONNX Runtime convs), an int32 bias."""

    output_q: bool = False
    int_bias: bool = False


def _no_fused_path(module: nn.Module, args: tuple) -> None:
    """A forward pre-hook that does nothing: PyTorch's fused transformer fast path (nn.TransformerEncoderLayer in
    eval mode) reads its Linears' float weights itself and is skipped for a module holding a hooked submodule, so
    a wrapped Linear inside one runs through its simulation."""


class QuantLayer(nn.Module):
    """A Conv2d or Linear that quantizes its input activation, its weights and (when the policy puts a Q on the
    output, as ONNX Runtime's QLinearConv needs) its output, following its LayerPlan. `weight` and `bias` are the
    wrapped layer's, for parents that read them (nn.TransformerEncoderLayer does)."""

    def __init__(self, layer: nn.Module, plan: LayerPlan, flags: SimFlags = SimFlags()):
        super().__init__()
        if not isinstance(layer, (nn.Conv2d, nn.Linear)):
            raise TypeError(f"QuantLayer wraps Conv2d or Linear, got {type(layer).__name__}")
        self.layer = layer
        self.register_forward_pre_hook(_no_fused_path)
        self.plan = plan
        self.output_q = flags.output_q
        self.int_bias = flags.int_bias
        self.mode: Mode = "quant"
        self.generator: torch.Generator | None = None
        smooth = torch.tensor(plan.smooth, dtype=torch.float32) if plan.smooth else torch.ones(0)
        self.register_buffer("smooth", smooth, persistent=False)
        self.shifts: dict[str, torch.Tensor] = {}  # bias correction per option label (bias)
        self.rounded: dict[str, torch.Tensor] = {}  # GPTQ's weight per option label (compress.quant.gptq)

    @property
    def weight(self) -> torch.Tensor:
        return self.layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.layer.bias

    def set_option(self, option: QuantOption) -> None:
        self.plan = replace(self.plan, option=option)

    def _smoothed(self, x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.smooth.numel():
            return x, w
        s = self.smooth
        if isinstance(self.layer, nn.Linear):
            return x / s, w * s
        return x / s.reshape(1, -1, 1, 1), w * s.reshape(1, -1, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        opt = self.plan.option
        weight = self.rounded.get(opt.label) if self.mode == "quant" else None
        x, w = self._smoothed(x, self.layer.weight if weight is None else weight)
        bias = self.layer.bias
        if self.mode == "off" or opt.precision == "fp32":
            return self._layer_op(x, w, bias)
        if opt.precision in ("fp16", "bf16"):
            dt = _float_dtype(opt.precision)
            return self._layer_op(x.to(dt).float(), w.to(dt).float(), bias).to(dt).float()
        act = self.plan.act_in if opt.quantizes_activations else None
        if self.mode == "noise":
            return self._noisy(x, w, bias, act)
        if act is not None:
            x = fake_fp8_act(x, act) if opt.precision == "fp8" else fake_quant_act(x, act)
        shift = self.shifts.get(opt.label)
        if shift is not None:
            bias = -shift if bias is None else bias - shift
        if bias is not None and act is not None and opt.precision == "int8" and self._int_bias(x):
            bias = _ste(bias, quantized_bias(bias, act.scale, quantize_weight(w, opt)))
        w = _ste(w, dequantized_weight(w, opt))
        y = self._layer_op(x, w, bias)
        if self.output_q and act is not None and self.plan.act_out is not None:
            y = fake_quant_act(y, self.plan.act_out)
        return y

    def _int_bias(self, x: torch.Tensor) -> bool:
        """Export writes an int32 bias (scale = input scale x weight scale) where the policy asks for one: the
        Conv's or Gemm's bias input, or the Add after a Linear's MatMul."""
        return self.int_bias

    def _noisy(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None,
               act: ActParams | None) -> torch.Tensor:
        opt = self.plan.option
        if opt.precision == "fp8":
            return self._layer_op(fake_fp8_act(x, act) if act else x, dequantized_weight(w, opt), bias)
        if act is not None:
            x = _noise_like(x, act.scale, self.generator)
        w = _noise_like(w, weight_step(w, opt), self.generator)
        y = self._layer_op(x, w, bias)
        if self.output_q and act is not None and self.plan.act_out is not None:
            y = _noise_like(y, self.plan.act_out.scale, self.generator)
        return y

    def _layer_op(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The wrapped layer's operation (not `_apply`, which is nn.Module's: .to() and .float() call it)."""
        layer = self.layer
        if isinstance(layer, nn.Linear):
            return F.linear(x, w, bias)
        return F.conv2d(x, w, bias, layer.stride, layer.padding, layer.dilation, layer.groups)


def quant_layers(module: nn.Module) -> dict[str, QuantLayer]:
    return {n: m for n, m in module.named_modules() if isinstance(m, QuantLayer)}


def set_mode(module: nn.Module, mode: Mode, seed: int | None = None) -> None:
    """Switch every QuantLayer to quant / noise / off; noise draws come from one seeded generator."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    for layer in quant_layers(module).values():
        layer.mode = mode
        layer.generator = gen


def set_options(module: nn.Module, options: dict[str, QuantOption]) -> None:
    """Give the named QuantLayers new options (the search's candidates) without copying the model."""
    layers = quant_layers(module)
    for name, option in options.items():
        layers[name].set_option(option)


def sim_flags(plan: QuantPlan, policy: QdqPolicy, graph: Any = None) -> dict[str, Any]:
    """What of the policy the simulation must reproduce per layer: an output Q, an int32 bias."""
    from deploy.export.qdq.policy import attention_layers, residual_layers

    op = {"conv": "Conv", "linear": "MatMul"}
    extra = {**attention_layers(graph, policy), **residual_layers(graph, policy)}  # their outputs quantized too
    return {n: SimFlags(op[lp.kind] in policy.output_q_ops or n in extra, policy.int_bias)
            for n, lp in plan.layers.items()}
