"""Interpolating a latency between measured shapes: piecewise-linear in log(MACs) -> log(ms), over points made
monotone first (more work never costs less; a noisy measurement that says so is pooled with its neighbour).

Beyond the measured range: proportional to MACs above it (work-bound), flat below it (latency floors at the
per-op cost), so an estimate outside the grid errs towards the physically plausible side.
"""
from __future__ import annotations

import math
from typing import Sequence


def monotone(values: Sequence[float]) -> list[float]:
    """Pool-adjacent-violators: the closest non-decreasing sequence (least squares, equal weights)."""
    blocks: list[list[float]] = []  # [sum, count]
    for v in values:
        blocks.append([v, 1.0])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            s, c = blocks.pop()
            blocks[-1][0] += s
            blocks[-1][1] += c
    out: list[float] = []
    for s, c in blocks:
        out.extend([s / c] * int(c))
    return out


def interpolate(points: Sequence[tuple[float, float]], macs: float) -> float:
    """ms at `macs` from measured (macs, ms) points of one op group."""
    if not points:
        raise ValueError("no measured points to interpolate from")
    merged: dict[float, list[float]] = {}
    for x, y in points:
        merged.setdefault(math.log(max(x, 1.0)), []).append(math.log(max(y, 1e-6)))
    xs = sorted(merged)
    ys = monotone([sum(merged[x]) / len(merged[x]) for x in xs])
    q = math.log(max(macs, 1.0))
    if q >= xs[-1]:
        return math.exp(ys[-1] + (q - xs[-1]))
    if q <= xs[0]:
        return math.exp(ys[0])
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if x0 <= q <= x1:
            t = (q - x0) / (x1 - x0)
            return math.exp(y0 + t * (y1 - y0))
    return math.exp(ys[-1])  # unreachable: q lies within [xs[0], xs[-1]]
