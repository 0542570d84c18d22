"""GPTQ weight rounding (Frantar et al., 2022): each int8 layer's weights rounded one input column at a time, the
rounding error of each column spread over the columns not yet rounded through the inverse of the layer's input
Hessian (H = E[x x^T] on calibration data), so that the layer's output, not each weight, stays close to float.

Rounding to nearest minimizes each weight's error alone; on all-MiniLM-L6-v2's int8 plan the output error is what
the pooled embedding feels. The scales stay those of round-to-nearest (per channel or per tensor, symmetric: the
largest magnitude over qmax, 127 or 63 for 7-bit weights): each row's largest weight keeps its +-qmax, so that the
exported model, which recomputes the scales from the weights, finds the same scales and the same integers (checked
per layer; a layer where it would not is left to round-to-nearest). The result is a float weight per layer and
option that lies on the integer grid; the simulation, the bias correction and the export all use it in place of
the float weight.
Columns go in order of decreasing Hessian diagonal ("act order"); 1% of the mean diagonal damps H.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from deploy.export.qdq.intmath import quantize_weight
from deploy.export.qdq.option import QuantOption

DAMP = 0.01  # of the mean Hessian diagonal, added to it
BLOCK = 128  # columns per lazy batch update
MAX_COLUMNS = 4608  # a layer with more input columns (in_channels x kernel area) keeps round-to-nearest
ROWS_PER_BATCH = 4096  # input rows per calibration batch the Hessian takes (a conv's positions are many)


def eligible(layer: nn.Module, option: QuantOption) -> bool:
    """int8 with symmetric per-channel or per-tensor weight scales, on a Linear or an ungrouped Conv2d."""
    if option.precision != "int8" or not option.weight_symmetric:
        return False
    if option.granularity not in ("per-channel", "per-tensor"):
        return False
    if isinstance(layer, nn.Conv2d) and layer.groups != 1:
        return False
    return isinstance(layer, (nn.Linear, nn.Conv2d)) and layer.weight[0].numel() <= MAX_COLUMNS


def _columns(layer: nn.Module, x: torch.Tensor, rows: int) -> torch.Tensor:
    """At most about `rows` evenly spaced rows of what one output sees: [positions, in_features (x kernel)]. A
    convolution is unfolded one sample at a time (all of a 224x224 batch's patches at once would take gigabytes)."""
    if isinstance(layer, nn.Linear):
        return _spaced(x.reshape(-1, x.shape[-1]), rows)
    per_sample = max(1, rows // x.shape[0])
    parts = []
    for sample in x.split(1):
        cols = F.unfold(sample, layer.kernel_size, layer.dilation, layer.padding, layer.stride)  # [1, C*k*k, L]
        parts.append(_spaced(cols[0].T, per_sample))
    return torch.cat(parts)


def _spaced(cols: torch.Tensor, rows: int) -> torch.Tensor:
    """`rows` evenly spaced rows of `cols` (the same ones on every run), or all of them."""
    if cols.shape[0] <= rows:
        return cols
    return cols[torch.linspace(0, cols.shape[0] - 1, rows).long()]


def input_hessians(folded: nn.Module, names: Sequence[str], batches: Sequence[tuple[torch.Tensor, ...]],
                   smooth: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """E[x x^T] of each named layer's input on `batches` (float model; divided by the layer's SmoothQuant factors,
    as the quantized layer sees it), summed in float64 over float32 batch products (twice as fast as float64
    products on CPU; on all-MiniLM-L6-v2 the Hessians were most of GPTQ's time)."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook_for(name: str, layer: nn.Module):
        s = smooth.get(name)

        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            x = args[0].detach().float()
            if s is not None:
                x = x / (s if isinstance(layer, nn.Linear) else s.reshape(1, -1, 1, 1))
            cols = _columns(layer, x, ROWS_PER_BATCH)
            sums[name] = sums.get(name, 0) + (cols.T @ cols).double()  # float32 products, float64 sums
            counts[name] = counts.get(name, 0) + cols.shape[0]
        return hook

    handles = [folded.get_submodule(n).register_forward_hook(hook_for(n, folded.get_submodule(n))) for n in names]
    try:
        with torch.no_grad():
            for batch in batches:
                folded(*batch)
    finally:
        for handle in handles:
            handle.remove()
    return {n: sums[n] / max(1, counts[n]) for n in sums}


def gptq_rows(rows: torch.Tensor, hessian: torch.Tensor, scale: torch.Tensor, pinned: torch.Tensor,
              qmax: int = 127) -> torch.Tensor:
    """Integers for `rows` ([out, columns], float64) with per-row `scale` ([out, 1]) by GPTQ; `pinned` ([out])
    is each row's column that keeps its round-to-nearest integer (the row's largest magnitude)."""
    columns = rows.shape[1]
    h = hessian.clone()
    dead = torch.diagonal(h) <= 0
    h[dead, dead] = 1.0
    order = torch.argsort(torch.diagonal(h), descending=True)
    inverse = torch.argsort(order)
    w = rows[:, order].clone()
    h = h[order][:, order]
    h += DAMP * torch.diagonal(h).mean() * torch.eye(columns, dtype=h.dtype)
    upper = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    pin_at = inverse[pinned]  # each row's pinned column, in the permuted order
    pin_q = torch.round(rows.gather(1, pinned[:, None]) / scale).squeeze(1)
    q = torch.zeros_like(w)
    for start in range(0, columns, BLOCK):
        end = min(start + BLOCK, columns)
        block, errors = w[:, start:end].clone(), torch.zeros_like(w[:, start:end])
        u = upper[start:end, start:end]
        for i in range(end - start):
            col = block[:, i]
            qi = torch.clamp(torch.round(col / scale[:, 0]), -qmax, qmax)
            here = pin_at == start + i
            qi = torch.where(here, pin_q, qi)
            q[:, start + i] = qi
            err = (col - qi * scale[:, 0]) / u[i, i]
            block[:, i:] -= err[:, None] * u[i, i:][None, :]
            errors[:, i] = err
        w[:, end:] -= errors @ upper[start:end, end:]
    return q[:, inverse]


def rounded_weight(weight: torch.Tensor, smooth: torch.Tensor | None, hessian: torch.Tensor,
                   option: QuantOption) -> torch.Tensor | None:
    """The float weight (the layer's own domain, before SmoothQuant scaling) whose round-to-nearest integers are
    GPTQ's, or None where the round trip through the exporter's scales would not give them back."""
    s = None if smooth is None else (smooth if weight.dim() == 2 else smooth.reshape(1, -1, 1, 1))
    smoothed = weight.detach().float() if s is None else weight.detach().float() * s
    plain = quantize_weight(smoothed, option)
    rows = smoothed.reshape(smoothed.shape[0], -1).double()
    pinned = rows.abs().argmax(1)  # each row's largest weight keeps its integer (the scale's +-qmax among them)
    scale = plain.scale.reshape(-1, 1).double().expand(rows.shape[0], 1).contiguous()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row stays zero
    q = gptq_rows(rows, hessian, scale, pinned, qmax=plain.qmax)
    out = (q * scale).float().reshape(smoothed.shape)
    back = out if s is None else out / s
    check = quantize_weight(back if s is None else back * s, option)
    if not torch.equal(check.q.reshape(q.shape).double(), q):
        return None
    return back



def rounded_weights(folded: nn.Module, plan: Any, spaces: dict[str, tuple[QuantOption, ...]],
                    batches: Sequence[tuple[torch.Tensor, ...]]) -> dict[str, dict[str, torch.Tensor]]:
    """GPTQ's weight for every eligible low-precision option of every layer of `plan` (a QuantPlan calibrated on
    `folded`, whose SmoothQuant factors the Hessians follow), from one pass over `batches`."""
    todo = {name: [o for o in spaces.get(name, ()) if eligible(folded.get_submodule(name), o)]
            for name in plan.layers}
    todo = {name: options for name, options in todo.items() if options}
    smooth = {name: torch.tensor(plan.layers[name].smooth, dtype=torch.float32)
              for name in todo if plan.layers[name].smooth}
    hessians = input_hessians(folded, list(todo), batches, smooth)
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name, options in todo.items():
        hessian = hessians.pop(name, None)
        if hessian is None:  # the forward pass never calls it
            continue
        weight = folded.get_submodule(name).weight
        for option in options:
            rounded = rounded_weight(weight, smooth.get(name), hessian, option)
            if rounded is not None:
                out.setdefault(name, {})[option.label] = rounded
    return out


def install_rounded(qmodel: nn.Module, rounded: dict[str, dict[str, torch.Tensor]]) -> None:
    """Give each QuantLayer its GPTQ weights (empty: every layer rounds its own weight to nearest)."""
    from deploy.compress.quant.sim import quant_layers

    for name, layer in quant_layers(qmodel).items():
        layer.rounded = dict(rounded.get(name, {}))


def fingerprint(rounded: dict[str, dict[str, torch.Tensor]]) -> dict[str, dict[str, str]]:
    """A short digest of each rounded weight (what a cache key needs to tell two roundings apart)."""
    import hashlib

    return {name: {label: hashlib.sha256(w.detach().contiguous().numpy().tobytes()).hexdigest()[:16]
                   for label, w in per.items()} for name, per in rounded.items()}
