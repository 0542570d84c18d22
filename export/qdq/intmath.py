"""The integer side of quantization: weights rounded to int8 / int4 (per tensor, channel or group, symmetric or
not) and int32 biases, exactly as the exported Q/DQ model stores them. The simulation (compress.quant.sim) uses
the same functions, so the simulated and the deployed weights agree bit for bit."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from deploy.export.qdq.option import QuantOption

FP8_MAX = 448.0  # float8 e4m3fn


def _float_dtype(precision: str) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]


@dataclass(frozen=True)
class IntWeight:
    """Integer weights and their affine parameters, broadcastable against the weight tensor."""

    q: torch.Tensor  # integer values stored in int32 (int8 / int4 ranges)
    scale: torch.Tensor
    zero_point: torch.Tensor
    qmin: int
    qmax: int

    def dequantize(self) -> torch.Tensor:
        return (self.q - self.zero_point).float() * self.scale


def _grouped(w: torch.Tensor, option: QuantOption) -> tuple[torch.Tensor, tuple[int, ...], int]:
    """Reshape weights into rows over which one scale applies: [rows, elements]; and how to undo it."""
    if option.granularity == "per-tensor":
        return w.reshape(1, -1), tuple(w.shape), 0
    if option.granularity == "per-channel":
        return w.reshape(w.shape[0], -1), tuple(w.shape), 0
    flat = w.reshape(w.shape[0], -1)  # per-group: blocks along the reduction (input) dimension, zero-padded
    size = option.group_size
    pad = (-flat.shape[1]) % size
    if pad:
        flat = F.pad(flat, (0, pad))
    return flat.reshape(-1, size), tuple(w.shape), pad


def _ungroup(rows: torch.Tensor, shape: tuple[int, ...], pad: int) -> torch.Tensor:
    flat = rows.reshape(shape[0], -1)
    if pad:
        flat = flat[:, : flat.shape[1] - pad]
    return flat.reshape(shape)


def quantize_weight(w: torch.Tensor, option: QuantOption) -> IntWeight:
    """Integer weights for an int8/int4 option. Scales are per row of `_grouped` (per tensor, channel or group)."""
    rows, shape, pad = _grouped(w.detach().float(), option)
    bits = option.weight_bits
    if option.precision == "int4":
        scale, zp, qmin, qmax = _int4_params(rows, option.weight_symmetric)
    elif option.weight_symmetric:
        qmax = (1 << (bits - 1)) - 1
        qmin = -qmax - 1
        scale = rows.abs().amax(1, keepdim=True) / qmax
        zp = torch.zeros_like(scale)
    else:
        qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        lo = rows.amin(1, keepdim=True).clamp(max=0)
        hi = rows.amax(1, keepdim=True).clamp(min=0)
        scale = (hi - lo) / (qmax - qmin)
        zp = torch.clamp(torch.round(qmin - lo / _safe(scale)), qmin, qmax)
    q = torch.clamp(torch.round(rows / _safe(scale)) + zp, qmin, qmax)
    q = _ungroup(q, shape, pad).to(torch.int32)
    if option.granularity == "per-group":
        view = (shape[0], -1)
        return IntWeight(q, scale.reshape(view), zp.reshape(view), qmin, qmax)
    view = (-1,) + (1,) * (len(shape) - 1)
    return IntWeight(q, scale.reshape(view), zp.reshape(view), qmin, qmax)


def _int4_params(rows: torch.Tensor, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """MatMulNBits RTN: symmetric scale = (the signed value of largest magnitude) / -8, zero point 8 in uint4;
    asymmetric over [min(0, lo), max(0, hi)] / 15. Expressed here in signed [-8, 7] / unsigned [0, 15]."""
    if symmetric:
        idx = rows.abs().argmax(1, keepdim=True)
        scale = rows.gather(1, idx) / -8.0
        return scale, torch.zeros_like(scale), -8, 7
    lo = rows.amin(1, keepdim=True).clamp(max=0)
    hi = rows.amax(1, keepdim=True).clamp(min=0)
    scale = (hi - lo) / 15.0
    zp = torch.clamp(torch.round(-lo / _safe(scale)), 0, 15)
    return scale, zp, 0, 15


def _safe(scale: torch.Tensor) -> torch.Tensor:
    return torch.where(scale == 0, torch.ones_like(scale), scale)


def dequantized_weight(w: torch.Tensor, option: QuantOption) -> torch.Tensor:
    """The weight the deployed model multiplies by, as float (no gradient path)."""
    if option.precision in ("int8", "int4"):
        iw = quantize_weight(w, option)
        if option.granularity == "per-group":
            rows, shape, pad = _grouped(iw.q.float(), option)
            return _ungroup((rows - iw.zero_point.reshape(-1, 1)) * iw.scale.reshape(-1, 1), shape, pad)
        return iw.dequantize()
    if option.precision == "fp8":
        scale = w.detach().abs().amax().clamp(min=1e-12) / FP8_MAX
        return (w.detach() / scale).to(torch.float8_e4m3fn).float() * scale
    if option.precision in ("fp16", "bf16"):
        return w.detach().to(_float_dtype(option.precision)).float()
    return w.detach()


def weight_step(w: torch.Tensor, option: QuantOption) -> torch.Tensor:
    """One quantization step per weight element (broadcast), for noise injection."""
    if option.precision in ("int8", "int4"):
        iw = quantize_weight(w, option)
        if option.granularity == "per-group":
            rows, shape, pad = _grouped(torch.ones_like(w), option)
            return _ungroup(rows * iw.scale.reshape(-1, 1).abs(), shape, pad)
        return iw.scale.abs().expand_as(w)
    return torch.zeros_like(w)


def _bias_scale(bias: torch.Tensor, act_scale: float, iw: IntWeight) -> torch.Tensor:
    scale = (act_scale * iw.scale.reshape(-1)).detach()
    return scale.expand(bias.numel()).clone() if scale.numel() == 1 else scale


def quantized_bias(bias: torch.Tensor, act_scale: float, iw: IntWeight) -> torch.Tensor:
    """int32 bias with scale act_scale * weight_scale per channel (what QLinearConv adds), dequantized."""
    scale = _bias_scale(bias, act_scale, iw)
    return torch.round(bias.detach() / _safe(scale)) * scale


def int32_bias(bias: torch.Tensor, act_scale: float, iw: IntWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """The same bias as export writes it: int32 values and their per-channel scale."""
    scale = _bias_scale(bias, act_scale, iw)
    return torch.round(bias.detach() / _safe(scale)).to(torch.int32), scale
