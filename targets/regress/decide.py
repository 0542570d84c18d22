"""The regression gate's decision: old samples vs new samples -> pass, regression or inconclusive. Pure, no I/O.

The rule (documented in docs/ci-gate.md), with r = median(new) / median(old) and p the Mann-Whitney U p-value:

1. either side has fewer than `min_samples` samples, or (against a baseline file, or in one interleaved run) a
   noise level above `max_cov` -> inconclusive (refuse); a comparison in blocks is judged by its interval instead,
   which widens with the noise, and rule 4 refuses what it cannot resolve;
2. r > 1 + threshold:  p < alpha and the ratio's CI excludes 1 -> regression; otherwise -> inconclusive;
3. r < 1 / (1 + threshold) (the same factor, the other way): p < alpha and the CI excludes 1 -> pass, reported as
   an improvement; otherwise a plain pass (an unconfirmed speed-up is no reason to fail a build);
4. the ratio's CI reaches past (1 + threshold)^2, a slowdown of twice the threshold (the blocks of an interleaved
   run disagree, or there are too few samples) -> inconclusive: the data cannot rule out a clear regression;
5. anything else -> pass (a significant change inside the threshold is noted, not failed).

An interleaved run (--baseline-model) is measured in independent blocks (measure.paired): its ratio, CI and p-value
come from the blocks (their median, its order-statistic interval, a sign test), so a bias that lasts one
session shows as spread.

The threshold applies to the point estimate, not to the CI's lower end: asking for the whole CI above 1 + threshold
would need several times more samples to catch a slowdown just past the threshold. The tests guard against noise.

Noise is the robust CoV, 1.4826 * MAD / median (what std / mean would be for a normal distribution with the same
body). The decision rests on medians and ranks, which one preempted 50 ms sample does not move, but std / mean does
(on a shared runner a single stall can push it past 1000%); so the refusal looks at the body's spread, like the test.
The plain CoV is still reported in each side's summary.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np

from deploy.core.errors import EXIT_FAILURE, EXIT_INCONCLUSIVE, EXIT_OK, UserInputError

PASS, REGRESSION, INCONCLUSIVE = "pass", "regression", "inconclusive"
EXIT_CODES = {PASS: EXIT_OK, REGRESSION: EXIT_FAILURE, INCONCLUSIVE: EXIT_INCONCLUSIVE}
RERUN_HINT = ("rerun on a quieter machine (no other jobs, fixed CPU frequency), or sample longer "
              "(--min-seconds / --min-samples)")


@dataclass(frozen=True)
class GateConfig:
    """When a slowdown counts: its size (`threshold`), its significance (`alpha`), and when to refuse to judge."""

    threshold: float = 0.05
    alpha: float = 0.01
    max_cov: float = 0.10
    min_samples: int = 20
    confidence: float = 0.95

    def __post_init__(self) -> None:
        checks = (
            (0.0 < self.threshold < 10.0, f"--threshold must be a fraction above 0 (0.05 = 5%), got {self.threshold}"),
            (0.0 < self.alpha < 1.0, f"--alpha must be between 0 and 1, got {self.alpha}"),
            (self.max_cov > 0.0, f"--max-cov must be positive, got {self.max_cov}"),
            (isinstance(self.min_samples, int) and self.min_samples >= 3,
             f"--min-samples must be an integer of at least 3, got {self.min_samples}"),
            (0.5 <= self.confidence < 1.0, f"confidence must be in [0.5, 1), got {self.confidence}"),
        )
        for ok, message in checks:
            if not ok:
                raise UserInputError(message)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Verdict:
    """What the gate decided and why: outcome, exit code, the comparison numbers, and one reason per line."""

    outcome: str
    improvement: bool
    ratio: float | None
    ci: tuple[float, float] | None
    p_value: float | None
    noise_old: float  # robust CoV, see the module docstring
    noise_new: float
    n_old: int
    n_new: int
    median_old: float
    median_new: float
    reasons: tuple[str, ...] = field(default_factory=tuple)
    hint: str | None = None

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.outcome]

    @property
    def change_pct(self) -> float | None:
        """Percent change of the median, new against old (+ is slower)."""
        return None if self.ratio is None else (self.ratio - 1.0) * 100.0

    def headline(self) -> str:
        """One line a CI log shows first."""
        change = "" if self.ratio is None else f": median {self.change_pct:+.1f}% (x{self.ratio:.3f})"
        label = "pass (improvement)" if self.improvement else self.outcome
        return f"{label.upper()}{change}"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["ci"] = list(self.ci) if self.ci else None
        data["reasons"] = list(self.reasons)
        data["exit_code"] = self.exit_code
        data["change_pct"] = self.change_pct
        return data


def robust_cov(samples: Sequence[float]) -> float:
    """1.4826 * MAD / median: a CoV that a few stalls cannot inflate (equals std / mean for normal data)."""
    x = np.asarray(samples, dtype=np.float64).ravel()
    if x.size < 2:
        return math.inf
    median = float(np.median(x))
    return 1.4826 * float(np.median(np.abs(x - median))) / median if median > 0 else math.inf


def block_noise(samples: np.ndarray, blocks: Sequence[int] | None) -> float:
    """Robust CoV; over the blocks of a comparison, the median of each block's own (a block's sessions may run a few
    percent apart from another's: that is the design's between-block spread, judged by the CI, not noise)."""
    if not blocks or len(blocks) < 2 or sum(blocks) != samples.size:
        return robust_cov(samples)
    edges = np.cumsum([0, *blocks])
    return float(np.median([robust_cov(samples[a:b]) for a, b in zip(edges[:-1], edges[1:])]))


def _refusal(old: np.ndarray, new: np.ndarray, config: GateConfig, noise: tuple[float, float] | None) -> list[str]:
    """Why the samples cannot be judged at all (empty list: they can). `noise` None: not judged here (a comparison
    in blocks, whose interval already widens with the noise, and rule 4 refuses what it cannot resolve)."""
    reasons = []
    for side, x in (("baseline", old), ("new", new)):
        if x.size < config.min_samples:
            reasons.append(f"too few samples: {side} has {x.size}, the gate needs at least {config.min_samples}")
    for side, x, level in (() if noise is None else (("baseline", old, noise[0]), ("new", new, noise[1]))):
        if x.size >= 2 and level > config.max_cov:
            reasons.append(f"too noisy: {side} robust CoV {level:.1%} is above --max-cov {config.max_cov:.0%}")
    return reasons


def decide(old_ms: Sequence[float], new_ms: Sequence[float], config: GateConfig = GateConfig(),
           comparison: Any = None, blocks: Sequence[int] | None = None) -> Verdict:
    """Judge new latency samples against old ones by the rule in this module's docstring. `comparison`: a
    stats.Comparison of these same samples (new against old) already made, e.g. by measure.paired, so the
    bootstrap (linear in the sample count) is not run twice; `blocks`: the samples per block of such a comparison
    (noise is then judged within blocks)."""
    from deploy.targets.measure.stats import compare

    old = np.asarray(old_ms, dtype=np.float64).ravel()
    new = np.asarray(new_ms, dtype=np.float64).ravel()
    if old.size == 0 or new.size == 0 or not (np.all(np.isfinite(old)) and np.all(np.isfinite(new))):
        raise UserInputError("the gate needs finite latency samples on both sides",
                             "re-create the baseline with --update")
    noise = (block_noise(old, blocks), block_noise(new, blocks))
    base = dict(noise_old=noise[0], noise_new=noise[1], n_old=int(old.size), n_new=int(new.size),
                median_old=float(np.median(old)), median_new=float(np.median(new)))
    in_blocks = comparison is not None and getattr(comparison, "method", "pooled") == "blocks"
    refusal = _refusal(old, new, config, None if in_blocks else noise)
    if refusal:
        return Verdict(INCONCLUSIVE, False, None, None, None, reasons=tuple(refusal), hint=RERUN_HINT, **base)
    same = comparison is not None and comparison.confidence == config.confidence and \
        (comparison.n_a, comparison.n_b) == (old.size, new.size)
    cmp = comparison if same else compare(old, new, config.confidence)
    outcome, improvement, reasons = _judge(cmp, config)
    hint = RERUN_HINT if outcome == INCONCLUSIVE else None
    return Verdict(outcome, improvement, cmp.ratio, (cmp.ci_low, cmp.ci_high), cmp.p_value,
                   reasons=tuple(reasons), hint=hint, **base)


def _judge(cmp: Any, config: GateConfig) -> tuple[str, bool, list[str]]:
    """Steps 2-5 of the rule, on numbers that passed the noise and sample-count checks."""
    ratio, p = cmp.ratio, cmp.p_value
    significant = p < config.alpha and cmp.excludes_one
    slow_limit, fast_limit = 1.0 + config.threshold, 1.0 / (1.0 + config.threshold)
    test = "sign test over blocks" if getattr(cmp, "method", "pooled") == "blocks" else "Mann-Whitney"
    evidence = (f"{test} p = {p:.2g} (alpha {config.alpha:g}), ratio CI {cmp.ci_low:.3f}-{cmp.ci_high:.3f} "
                f"{'excludes' if cmp.excludes_one else 'includes'} 1")
    if ratio > slow_limit:
        if significant:
            return REGRESSION, False, [f"slower by {ratio - 1:.1%} > threshold {config.threshold:.0%}; {evidence}"]
        return INCONCLUSIVE, False, [f"slower by {ratio - 1:.1%} > threshold {config.threshold:.0%}, "
                                     f"but not significant: {evidence}"]
    if cmp.ci_high > slow_limit ** 2:
        blocks = ", ".join(f"{r:.3f}" for r in getattr(cmp, "block_ratios", ()))
        return INCONCLUSIVE, False, [f"the measurement cannot rule out a slowdown of {slow_limit ** 2 - 1:.0%}: "
                                     f"{'the blocks disagree (' + blocks + '); ' if blocks else ''}{evidence}"]
    if ratio < fast_limit:
        if significant:
            return PASS, True, [f"faster by {1 - ratio:.1%} (beyond the threshold); {evidence}"]
        return PASS, False, [f"maybe faster by {1 - ratio:.1%}, not significant: {evidence}"]
    note = "a significant change, but" if significant else "no significant change;"
    return PASS, False, [f"{note} within the threshold ({ratio - 1:+.1%}, limit +{config.threshold:.0%}); {evidence}"]
