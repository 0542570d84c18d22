"""Latency statistics: the ONE place that turns raw samples into numbers (bench, --compare and the regression gate).

Latency distributions are skewed and heavy-tailed, so we lean on the median and on distribution-free methods:
an order-statistic confidence interval for the median, a bootstrap interval for a ratio of medians, and the
Mann-Whitney U test for "are these two samples different at all". Pure functions, no I/O.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np

BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0


def _as_array(samples: Sequence[float], what: str = "samples") -> np.ndarray:
    arr = np.asarray(samples, dtype=np.float64).ravel()
    if arr.size == 0:
        raise ValueError(f"{what}: no samples")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{what}: samples must be finite numbers")
    return arr


def median_ci(samples: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """Distribution-free CI of the median from order statistics: (low, high, achieved confidence).

    The number of samples below the true median is Binomial(n, 1/2); the interval [x_(l), x_(n+1-l)] covers the
    median with probability P(l <= B <= n-l). We take the largest l whose coverage is still >= `confidence`; for
    tiny n no such l exists and we return [min, max] with the (lower) confidence it really has.
    """
    from scipy.stats import binom

    x = np.sort(_as_array(samples))
    n = x.size
    alpha = 1.0 - confidence
    j = int(binom.ppf(alpha / 2.0, n, 0.5))  # smallest j with cdf(j) >= alpha/2
    if j >= 0 and binom.cdf(j, n, 0.5) > alpha / 2.0:
        j -= 1
    lo_rank = max(j + 1, 1)  # 1-based rank of the lower bound
    hi_rank = n + 1 - lo_rank
    achieved = float(binom.cdf(hi_rank - 1, n, 0.5) - binom.cdf(lo_rank - 1, n, 0.5))
    return float(x[lo_rank - 1]), float(x[hi_rank - 1]), achieved


def summarize(samples_ms: Sequence[float], confidence: float = 0.95) -> dict[str, Any]:
    """Percentiles, spread and a median CI of latency samples in milliseconds."""
    x = _as_array(samples_ms, "summarize")
    mean = float(x.mean())
    std = float(x.std(ddof=1)) if x.size > 1 else 0.0
    p50, p90, p95, p99 = (float(v) for v in np.percentile(x, [50, 90, 95, 99]))
    lo, hi, achieved = median_ci(x, confidence)
    return {
        "n": int(x.size),
        "p50": p50,
        "p90": p90,
        "p95": p95,
        "p99": p99,
        "mean": mean,
        "std": std,
        "cov": std / mean if mean > 0 else math.inf,
        "min": float(x.min()),
        "max": float(x.max()),
        "median_ci": [lo, hi],
        "median_ci_confidence": achieved,
        "throughput_per_s": 1000.0 / mean if mean > 0 else math.inf,
    }


def _bootstrap_medians(x: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """Medians of `resamples` bootstrap resamples of x, drawn exactly without building the resamples: in a resample
    of n values drawn from sorted x, the number at or below x_(j) is Binomial(n, j/n), so the median is x_(j) with
    probability P(count_j >= m) - P(count_(j-1) >= m), m = ceil(n/2) (the lower median for even n). O(n) to build
    that distribution, O(log n) per draw: the CI of a ratio costs milliseconds instead of seconds."""
    from scipy.stats import binom

    xs = np.sort(x)
    n = xs.size
    m = (n + 1) // 2
    cdf = binom.sf(m - 1, n, np.arange(1, n + 1) / n)  # P(median <= x_(j)), j = 1..n
    cdf[-1] = 1.0
    return xs[np.minimum(np.searchsorted(cdf, rng.random(resamples), side="right"), n - 1)]


def ratio_ci(a_ms: Sequence[float], b_ms: Sequence[float], confidence: float = 0.95,
             resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> tuple[float, float, float]:
    """Ratio of medians b/a with a percentile-bootstrap CI: (ratio, low, high). Fixed seed: same data, same CI."""
    a = _as_array(a_ms, "ratio_ci a")
    b = _as_array(b_ms, "ratio_ci b")
    med_a = float(np.median(a))
    if med_a <= 0:
        raise ValueError("ratio_ci: the median of a must be positive")
    rng = np.random.default_rng(seed)
    boot_a = _bootstrap_medians(a, resamples, rng)
    boot_b = _bootstrap_medians(b, resamples, rng)
    ratios = boot_b / boot_a
    tail = (1.0 - confidence) / 2.0 * 100.0
    lo, hi = np.percentile(ratios, [tail, 100.0 - tail])
    return float(np.median(b_ms)) / med_a, float(lo), float(hi)


def mann_whitney(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided Mann-Whitney U p-value: small means the two latency distributions differ."""
    from scipy.stats import mannwhitneyu

    x, y = _as_array(a, "mann_whitney a"), _as_array(b, "mann_whitney b")
    if np.all(x == x[0]) and np.all(y == x[0]):
        return 1.0  # identical constant samples: scipy would divide by zero
    return float(mannwhitneyu(x, y, alternative="two-sided").pvalue)


@dataclass(frozen=True)
class Comparison:
    """B against A: ratio of medians b/a (> 1 means B is slower) with its CI and the Mann-Whitney p-value."""

    ratio: float
    ci_low: float
    ci_high: float
    confidence: float
    p_value: float
    median_a: float
    median_b: float
    n_a: int
    n_b: int
    method: str = "pooled"  # "pooled": one interleaved run; "blocks": independent blocks (measure.paired)
    block_ratios: tuple[float, ...] = ()
    between_block_sd: float | None = None  # of the blocks' log-ratios

    @property
    def excludes_one(self) -> bool:
        """True when the CI says the two medians differ."""
        return self.ci_low > 1.0 or self.ci_high < 1.0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["block_ratios"] = list(self.block_ratios)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Comparison":
        optional = {"method", "block_ratios", "between_block_sd"}
        values = {k: data[k] for k in cls.__dataclass_fields__ if k not in optional or k in data}
        if "block_ratios" in values:
            values["block_ratios"] = tuple(values["block_ratios"])
        return cls(**values)


def compare(a_ms: Sequence[float], b_ms: Sequence[float], confidence: float = 0.95) -> Comparison:
    """Everything bench --compare and the regression gate need to judge B against A."""
    ratio, lo, hi = ratio_ci(a_ms, b_ms, confidence)
    return Comparison(
        ratio=ratio, ci_low=lo, ci_high=hi, confidence=confidence, p_value=mann_whitney(a_ms, b_ms),
        median_a=float(np.median(a_ms)), median_b=float(np.median(b_ms)), n_a=len(a_ms), n_b=len(b_ms),
    )
