"""Low-rank factorization (PELA): a Linear becomes two thin Linears, a Conv2d k x k becomes (k x 1, 1 x k) or a
(k x k -> rank, 1 x 1) pair, from a truncated SVD.

Activation-aware SVD whitens by the input covariance measured on calibration data, so the truncation minimises
the error of the layer's OUTPUT on real inputs, not of its weights: plain SVD of pretrained weights loses much more.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Literal

import torch
from torch import nn

from deploy.core.errors import ConfigError

ConvMode = Literal["spatial", "channel"]


@dataclass(frozen=True)
class FactorizeConfig:
    activation_aware: bool = True
    conv_mode: ConvMode = "channel"
    damping: float = 1e-4  # relative ridge added to the input covariance before the Cholesky factor

    def __post_init__(self) -> None:
        if self.conv_mode not in ("spatial", "channel"):
            raise ValueError(f"conv_mode must be 'spatial' or 'channel', got {self.conv_mode!r}")
        if not 0.0 <= self.damping < 1.0:
            raise ValueError(f"damping must be in [0, 1), got {self.damping}")


class LowRankLinear(nn.Sequential):
    """Two thin Linears, named so the report and the ONNX graph show what happened."""

    def __init__(self, first: nn.Linear, second: nn.Linear):
        super().__init__()
        self.down = first
        self.up = second

    @property
    def rank(self) -> int:
        return self.down.out_features


class LowRankConv2d(nn.Sequential):
    def __init__(self, first: nn.Conv2d, second: nn.Conv2d):
        super().__init__()
        self.down = first
        self.up = second

    @property
    def rank(self) -> int:
        return self.down.out_channels


def max_useful_rank(layer: nn.Module, mode: ConvMode = "channel") -> int:
    """Largest rank that still saves parameters (and MACs); 0 when factorization cannot save anything."""
    if isinstance(layer, nn.Linear):
        n_in, n_out = layer.in_features, layer.out_features
        return max(0, math.ceil(n_in * n_out / (n_in + n_out)) - 1)
    if isinstance(layer, nn.Conv2d):
        kh, kw = layer.kernel_size
        n_in, n_out = layer.in_channels, layer.out_channels
        full = n_out * n_in * kh * kw
        per_rank = n_in * kh + n_out * kw if mode == "spatial" else n_in * kh * kw + n_out
        return max(0, math.ceil(full / per_rank) - 1)
    return 0


def factorizable(layer: nn.Module, mode: ConvMode = "channel") -> bool:
    if isinstance(layer, nn.Linear):
        return max_useful_rank(layer) >= 1
    if isinstance(layer, nn.Conv2d):
        plain = layer.groups == 1 and layer.dilation == (1, 1) and layer.padding_mode == "zeros" \
            and not isinstance(layer.padding, str)
        if mode == "spatial" and min(layer.kernel_size) == 1:
            return False
        return plain and max_useful_rank(layer, mode) >= 1
    return False


def round_rank(rank: int, multiple: int, limit: int) -> int:
    """Round to the device's multiple, at least one multiple, at most `limit`."""
    rounded = max(multiple, int(round(rank / multiple)) * multiple)
    return max(1, min(rounded, limit))


def input_covariance(inputs: Iterable[torch.Tensor], layer: nn.Module) -> torch.Tensor:
    """E[x x^T] of the layer's input rows (Linear) or unfolded patches (Conv2d), in float64."""
    total, count = None, 0
    for x in inputs:
        rows = _rows(x, layer).double()
        gram = rows.T @ rows
        total = gram if total is None else total + gram
        count += rows.shape[0]
    if total is None or count == 0:
        raise ConfigError("activation-aware SVD needs calibration inputs for the layer")
    return total / count


def _rows(x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    if isinstance(layer, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    patches = nn.functional.unfold(x, layer.kernel_size, padding=layer.padding, stride=layer.stride)
    return patches.transpose(1, 2).reshape(-1, patches.shape[1])  # (N * L, C*kh*kw)


def _whitened_svd(weight: torch.Tensor, cov: torch.Tensor | None, damping: float
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of W S where S S^T = cov (S = I for plain SVD); returns U, sigma, V^T S^{-1}."""
    w = weight.double()
    if cov is None:
        u, s, vt = torch.linalg.svd(w, full_matrices=False)
        return u, s, vt
    ridge = damping * cov.diagonal().mean().clamp(min=1e-12)
    chol = torch.linalg.cholesky(cov + ridge * torch.eye(cov.shape[0], dtype=cov.dtype))
    u, s, vt = torch.linalg.svd(w @ chol, full_matrices=False)
    vt = torch.linalg.solve_triangular(chol, vt, upper=False, left=False)  # vt @ chol^{-1}
    return u, s, vt


def factorize_linear(layer: nn.Linear, rank: int, cov: torch.Tensor | None = None,
                     config: FactorizeConfig = FactorizeConfig()) -> LowRankLinear:
    u, s, vt = _whitened_svd(layer.weight.detach(), cov if config.activation_aware else None, config.damping)
    rank = min(rank, s.numel())
    root = s[:rank].sqrt()
    first = nn.Linear(layer.in_features, rank, bias=False)
    second = nn.Linear(rank, layer.out_features, bias=layer.bias is not None)
    dtype = layer.weight.dtype
    with torch.no_grad():
        first.weight.copy_((root[:, None] * vt[:rank]).to(dtype))
        second.weight.copy_((u[:, :rank] * root[None, :]).to(dtype))
        if layer.bias is not None:
            second.bias.copy_(layer.bias.detach())
    return LowRankLinear(first, second)


def factorize_conv(layer: nn.Conv2d, rank: int, cov: torch.Tensor | None = None,
                   config: FactorizeConfig = FactorizeConfig()) -> LowRankConv2d:
    """'channel': k x k conv to `rank` channels then a 1 x 1 conv (activation-aware capable);
    'spatial': a k x 1 conv then a 1 x k conv (plain SVD of the (in*kh) x (out*kw) reshaping)."""
    if not factorizable(layer, config.conv_mode):
        raise ConfigError(f"conv {tuple(layer.weight.shape)} cannot be factorized in {config.conv_mode} mode")
    w = layer.weight.detach()
    n_out, n_in, kh, kw = w.shape
    if config.conv_mode == "channel":
        u, s, vt = _whitened_svd(w.reshape(n_out, -1), cov if config.activation_aware else None, config.damping)
        rank = min(rank, s.numel())
        root = s[:rank].sqrt()
        first = nn.Conv2d(n_in, rank, (kh, kw), layer.stride, layer.padding, bias=False)
        second = nn.Conv2d(rank, n_out, 1, bias=layer.bias is not None)
        first_w = (root[:, None] * vt[:rank]).reshape(rank, n_in, kh, kw)
        second_w = (u[:, :rank] * root[None, :]).reshape(n_out, rank, 1, 1)
    else:
        matrix = w.permute(1, 2, 0, 3).reshape(n_in * kh, n_out * kw).double()
        u, s, vt = torch.linalg.svd(matrix, full_matrices=False)
        rank = min(rank, s.numel())
        root = s[:rank].sqrt()
        ph, pw = layer.padding
        sh, sw = layer.stride
        first = nn.Conv2d(n_in, rank, (kh, 1), (sh, 1), (ph, 0), bias=False)
        second = nn.Conv2d(rank, n_out, (1, kw), (1, sw), (0, pw), bias=layer.bias is not None)
        first_w = (u[:, :rank] * root[None, :]).reshape(n_in, kh, rank).permute(2, 0, 1).unsqueeze(-1)
        second_w = (root[:, None] * vt[:rank]).reshape(rank, n_out, kw).permute(1, 0, 2).unsqueeze(2)
    with torch.no_grad():
        first.weight.copy_(first_w.to(w.dtype))
        second.weight.copy_(second_w.to(w.dtype))
        if layer.bias is not None:
            second.bias.copy_(layer.bias.detach())
    return LowRankConv2d(first, second)


def factorize(layer: nn.Module, rank: int, cov: torch.Tensor | None = None,
              config: FactorizeConfig = FactorizeConfig()) -> nn.Module:
    if isinstance(layer, nn.Linear):
        return factorize_linear(layer, rank, cov, config)
    if isinstance(layer, nn.Conv2d):
        return factorize_conv(layer, rank, cov, config)
    raise ConfigError(f"cannot factorize a {type(layer).__name__}", "only Linear and Conv2d layers")


def layer_cost(layer: nn.Module, rank: int | None, mode: ConvMode = "channel") -> int:
    """Parameters of the layer at `rank` (None: unfactorized), which is also its MACs per output position."""
    if isinstance(layer, nn.Linear):
        n_in, n_out = layer.in_features, layer.out_features
        return n_in * n_out if rank is None else rank * (n_in + n_out)
    kh, kw = layer.kernel_size
    n_in, n_out = layer.in_channels, layer.out_channels
    if rank is None:
        return n_out * n_in * kh * kw
    return rank * (n_in * kh + n_out * kw) if mode == "spatial" else rank * (n_in * kh * kw + n_out)


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)
