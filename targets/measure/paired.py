"""Two models compared the way a decision needs it: in independent blocks, the interval from the spread between them.

One interleaved run gives a tight interval that describes the noise inside that run only. A bias that lasts the
whole run (where the OS placed each session's worker thread, a neighbour sharing one session's core) is invisible
to it: two sessions of the same file differed by 13% on a loaded 2-core machine with a CI of +-0.5%. So:

- the comparison runs in `config.blocks` blocks; each block prepares its runs afresh (`prepare_a()`: new sessions,
  so thread placement is drawn again), alternates which model goes first, then times rounds A B, B A, ...;
- a sample is the mean of an inner loop of k inferences, k set in the block's warm-up so that a sample covers at
  least `config.min_sample_ms` (a 0.1 ms model is not timed at the scheduler's resolution); k is recorded;
- each block gives a ratio of medians; the ratio is their median, its interval the order-statistic interval of that
  median and its p-value the sign test over the blocks (never narrower than the blocks' own bootstrap
  intervals say): a block that drew a bad schedule on a loaded machine moves none of them much;
- every raw sample, the block structure and each block's ratio stay in the JSON;
- where the caller gives a question (`decided`: is the budget met or missed?), the comparison is sequential: up to
  LOOKS rounds of `config.blocks` blocks, another round only while the interval straddles the answer. Every look's
  intervals are made at confidence 1 - (1 - `config.confidence`) / LOOKS (Bonferroni), so the whole design errs no
  more often than one look at `config.confidence`. Six blocks' interval is their whole range: all-MiniLM-L6-v2's
  pure int8 plan at 0.974x its budget (NNCF int8's p50) reached 1.014x over 6 blocks, and compress pruned it away
  for a model at cosine 0.964 instead of 0.9985.

`deploy bench --compare`, `deploy regress --baseline-model` and every closed-loop decision in `deploy compress`
measure through `measure_blocks`; with one block it is the plain interleaved comparison (tests, smoke runs).
"""
from __future__ import annotations

import math
import time
from dataclasses import replace
from typing import Any, Callable, Sequence

import numpy as np

from deploy.targets.measure.lock import measurement_lock
from deploy.targets.measure.loop import (MeasureConfig, Measurement, ProgressFn, RateLimited, gc_paused, log,
                                         measurement_from, sample_timer, timed_rounds)
from deploy.targets.measure.stats import Comparison, compare, median_ci, ratio_ci

Run = Callable[[], object]
Prepare = Callable[[], Run]  # a fresh run_once (new session) per call; returning the same one reuses it
MAX_INNER_LOOP = 10_000
LOOKS = 3  # a sequential comparison's most rounds of blocks
Decided = Callable[[Measurement, Comparison], bool]  # B's measurement and B against A: is the question settled?


def inner_loop(a_ms: Sequence[float], b_ms: Sequence[float], min_sample_ms: float) -> int:
    """k such that k inferences of the faster model take at least `min_sample_ms`."""
    fastest = min(float(np.median(a_ms)), float(np.median(b_ms)))
    if min_sample_ms <= 0 or fastest <= 0:
        return 1
    return int(min(MAX_INNER_LOOP, max(1, math.ceil(min_sample_ms / fastest))))


def looped(timer: Callable[[], float], k: int) -> Callable[[], float]:
    """One sample = the mean of k timed inferences."""
    if k == 1:
        return timer
    return lambda: sum(timer() for _ in range(k)) / k


def _looped_run(run_once: Run, k: int) -> Callable[[], float]:
    """k inferences timed as one (one clock read per sample, not per inference), unless the run times itself."""
    if k == 1 or getattr(run_once, "returns_ms", False):
        return looped(sample_timer(run_once), k)

    def timed() -> float:
        start = time.perf_counter_ns()
        for _ in range(k):
            run_once()
        return (time.perf_counter_ns() - start) / 1e6 / k

    return timed


def _block(prepare_a: Prepare, prepare_b: Prepare, index: int, config: MeasureConfig, deadline: float,
           report: RateLimited) -> dict:
    """One block: fresh runs, warm-up (which also sets k), then interleaved samples in this block's share."""
    b_first = index % 2 == 1
    if b_first:
        run_b = prepare_b()
        run_a = prepare_a()
    else:
        run_a = prepare_a()
        run_b = prepare_b()
    runs = [run_b, run_a] if b_first else [run_a, run_b]
    share = replace(config, min_samples=max(8, math.ceil(config.min_samples / config.blocks)),
                    min_seconds=config.min_seconds / config.blocks,
                    warmup_min_s=config.warmup_min_s / config.blocks)
    start = time.perf_counter()
    own_end = min(deadline, start + config.max_seconds / config.blocks)
    warm = timed_rounds([sample_timer(r) for r in runs], share, (start + own_end) / 2, report, warmup=True)
    k = inner_loop(warm[0], warm[1], config.min_sample_ms)
    first, second = timed_rounds([_looped_run(r, k) for r in runs], share, own_end, report, warmup=False)
    a, b = (second, first) if b_first else (first, second)
    return {"first": "b" if b_first else "a", "inner_loop": k, "a_ms": a, "b_ms": b}


def measure_blocks(prepare_a: Prepare, prepare_b: Prepare, config: MeasureConfig = MeasureConfig(),
                   progress: ProgressFn | None = None, decided: Decided | None = None
                   ) -> tuple[Measurement, Measurement, Comparison]:
    """Time A and B in `config.blocks` independent blocks (see the module docstring); compare B against A. With
    `decided`, sequentially: another round of blocks while `decided` says the interval does not settle it, up to
    LOOKS rounds, every interval at the confidence that keeps the design's error at `config.confidence`."""
    looks = LOOKS if decided is not None else 1
    config = replace(config, confidence=1.0 - (1.0 - config.confidence) / looks)
    report = RateLimited(progress)
    blocks: list[dict] = []
    with gc_paused(), measurement_lock(config.lock_timeout_s) as lock:
        for _ in range(looks):
            begin = time.perf_counter()
            for index in range(config.blocks):
                blocks.append(_block(prepare_a, prepare_b, len(blocks), config, begin + config.max_seconds, report))
                report("sampling", (index + 1) / config.blocks, force=True)
            ma, mb, comparison = _summaries(blocks, config, lock)
            if decided is None or decided(mb, comparison):
                break
    for text in dict.fromkeys(ma.warnings + mb.warnings):  # the finished measurement's, once (not every look's)
        log.warning(text)
    return ma, mb, comparison


def _summaries(blocks: list[dict], config: MeasureConfig, lock: Any) -> tuple[Measurement, Measurement, Comparison]:
    a = [x for blk in blocks for x in blk["a_ms"]]
    b = [x for blk in blocks for x in blk["b_ms"]]
    structure = {"design": "blocks", "blocks": [{"first": blk["first"], "inner_loop": blk["inner_loop"],
                                                 "n": len(blk["a_ms"])} for blk in blocks]}
    ma = replace(measurement_from(a, config, lock, announce=False), structure=structure)
    mb = replace(measurement_from(b, config, lock, announce=False), structure=structure)
    return ma, mb, combine([(blk["a_ms"], blk["b_ms"]) for blk in blocks], config.confidence)


def combine(blocks: Sequence[tuple[Sequence[float], Sequence[float]]], confidence: float = 0.95) -> Comparison:
    """B against A from independent blocks: the median of the blocks' ratios of medians, its distribution-free
    interval (order statistics of the blocks' log-ratios), widened to the blocks' own bootstrap precision where that
    is wider, and the sign test's p-value (how many blocks put B above A; the dual of that interval). Medians and
    signs, because on a loaded
    machine a block now and then lands on a bad schedule (a ratio of 0.7 or 1.5 among blocks within +-3%): one such
    block must neither fake a difference nor hide one."""
    from scipy.stats import binomtest

    if len(blocks) == 1:
        return compare(blocks[0][0], blocks[0][1], confidence)
    per_block = [ratio_ci(a, b, confidence) for a, b in blocks]
    logs = np.log([r for r, _, _ in per_block])
    n = len(logs)
    centre = float(np.median(logs))
    low, high, _ = median_ci(logs, confidence)
    z = _z(confidence)
    # the blocks' own precision: a typical block's standard error, as the median of n blocks has it (sqrt(pi/2)/sqrt(n))
    typical = float(np.median([(math.log(hi) - math.log(lo)) / (2 * z) for _, lo, hi in per_block]))
    within = z * typical * math.sqrt(math.pi / 2 / n)
    low, high = min(low, centre - within), max(high, centre + within)
    signs = logs[logs != 0]
    p = float(binomtest(int((signs > 0).sum()), int(signs.size), 0.5).pvalue) if signs.size else 1.0
    a_all = np.concatenate([np.asarray(a, dtype=float) for a, _ in blocks])
    b_all = np.concatenate([np.asarray(b, dtype=float) for _, b in blocks])
    return Comparison(ratio=math.exp(centre), ci_low=math.exp(low), ci_high=math.exp(high), confidence=confidence,
                      p_value=p, median_a=float(np.median(a_all)), median_b=float(np.median(b_all)),
                      n_a=int(a_all.size), n_b=int(b_all.size), method="blocks",
                      block_ratios=tuple(float(r) for r, _, _ in per_block), between_block_sd=float(logs.std(ddof=1)))


def _z(confidence: float) -> float:
    from scipy.stats import norm

    return float(norm.ppf(0.5 + confidence / 2))


def reuse(run_once: Run) -> Prepare:
    """A Prepare that hands out the same prepared run every block (no new session): for callers whose sessions are
    costly to build and whose decision tolerates the run's own placement (see the module docstring)."""
    return lambda: run_once


def median_interval(measurement: Measurement, confidence: float | None = None) -> tuple[float, float]:
    """The interval of one side's p50 over the blocks of a comparison (Student t on the blocks' log-medians, never
    narrower than the pooled samples' order-statistic interval): what a budget verdict on a measured p50 rests on.
    Not the order-statistic interval of the blocks' medians: over the 6 blocks of compress's final measurement that
    is their whole range, and one block that drew a slow session would make most verdicts "uncertain".
    `confidence`: by default the measurement's own (a sequential comparison's is raised, see the module docstring)."""
    from scipy.stats import t as student_t

    confidence = measurement.config.confidence if confidence is None else confidence
    pooled = tuple(measurement.summary["median_ci"])
    blocks = (measurement.structure or {}).get("blocks") or []
    if len(blocks) < 2:
        return float(pooled[0]), float(pooled[1])
    medians, at = [], 0
    for blk in blocks:
        medians.append(float(np.median(measurement.samples_ms[at:at + blk["n"]])))
        at += blk["n"]
    logs = np.log(medians)
    half = float(student_t.ppf(0.5 + confidence / 2, len(logs) - 1)) * float(logs.std(ddof=1)) / math.sqrt(len(logs))
    centre = float(measurement.summary["p50"])
    return min(centre * math.exp(-half), float(pooled[0])), max(centre * math.exp(half), float(pooled[1]))
