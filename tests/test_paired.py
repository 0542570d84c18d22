"""The block design of a two-model comparison (targets.measure.paired) and the gate's reading of it."""
from __future__ import annotations

import math

import numpy as np
import pytest

from deploy.targets.measure.loop import MeasureConfig
from deploy.targets.measure.paired import combine, inner_loop, measure_blocks
from deploy.targets.measure.stats import Comparison
from deploy.targets.regress.decide import INCONCLUSIVE, PASS, REGRESSION, GateConfig, decide


def _noisy(rng: np.random.Generator, median: float, n: int = 200, cov: float = 0.02) -> list[float]:
    return list(median * np.exp(rng.normal(0.0, cov, n)))


def test_inner_loop_makes_a_sample_cover_the_minimum():
    assert inner_loop([0.1] * 5, [0.3] * 5, 1.0) == 10  # the faster model sets k
    assert inner_loop([2.0] * 5, [3.0] * 5, 1.0) == 1
    assert inner_loop([0.1] * 5, [0.1] * 5, 0.0) == 1


def test_a_session_bias_widens_the_interval_instead_of_faking_a_difference():
    """A/A blocks, each with a persistent bias of up to 13% and a tight within-block spread: one pooled
    comparison would call that a difference; the blocks' interval must hold 1.0."""
    rng = np.random.default_rng(1)
    biases = [1.13, 0.97, 1.0, 0.92, 1.08, 1.02, 0.95, 1.05]
    blocks = [(_noisy(rng, 1.0), _noisy(rng, bias)) for bias in biases]
    c = combine(blocks)
    assert c.method == "blocks" and len(c.block_ratios) == 8
    assert c.ci_low < 1.0 < c.ci_high
    assert c.between_block_sd == pytest.approx(float(np.std(np.log(c.block_ratios), ddof=1)))
    pooled_a = [x for a, _ in blocks for x in a]
    pooled_b = [x for _, b in blocks for x in b]
    from deploy.targets.measure.stats import compare

    pooled = compare(pooled_a, pooled_b)
    assert (pooled.ci_high - pooled.ci_low) < (c.ci_high - c.ci_low)  # the pooled interval is the overconfident one


def test_a_consistent_slowdown_is_found_with_its_size_despite_a_bad_block():
    """Twelve blocks of a 20% slowdown, one of which drew a bad schedule (B looked 30% faster): still a regression,
    of the right size."""
    rng = np.random.default_rng(2)
    biases = (1.01, 0.99, 1.0, 1.02, 0.98, 1.0, 1.01, 0.99, 0.55, 1.0, 1.02, 0.98)
    blocks = [(_noisy(rng, 1.0), _noisy(rng, 1.2 * bias)) for bias in biases]
    c = combine(blocks)
    assert c.excludes_one and c.ci_low > 1.1 and c.p_value < 0.01
    assert c.ratio == pytest.approx(math.exp(np.median(np.log(c.block_ratios))))
    assert decide(blocks[0][0], blocks[0][1], GateConfig(), c).outcome == REGRESSION


def test_the_interval_is_never_narrower_than_the_blocks_own_precision():
    """Blocks that agree by chance must not claim more precision than each block's samples give."""
    rng = np.random.default_rng(3)
    blocks = [(_noisy(rng, 1.0, 30, 0.2), _noisy(rng, 1.0, 30, 0.2)) for _ in range(3)]
    tight = combine([(a, list(np.asarray(b) * (np.median(a) / np.median(b)))) for a, b in blocks])
    assert tight.between_block_sd == pytest.approx(0.0, abs=1e-9)
    assert tight.ci_high / tight.ci_low > 1.02


def test_disagreeing_blocks_make_the_gate_inconclusive_not_a_regression():
    c = Comparison(ratio=1.02, ci_low=0.9, ci_high=1.16, confidence=0.95, p_value=0.5, median_a=1.0, median_b=1.02,
                   n_a=100, n_b=100, method="blocks", block_ratios=(1.13, 0.92, 1.02), between_block_sd=0.1)
    old, new = [1.0] * 50 + [1.01] * 50, [1.02] * 50 + [1.03] * 50
    verdict = decide(old, new, GateConfig(), c)
    assert verdict.outcome == INCONCLUSIVE and "blocks disagree" in verdict.reasons[0]
    agreeing = Comparison(ratio=1.01, ci_low=0.99, ci_high=1.03, confidence=0.95, p_value=0.3, median_a=1.0,
                          median_b=1.01, n_a=100, n_b=100, method="blocks", block_ratios=(1.0, 1.02, 1.01))
    assert decide(old, new, GateConfig(), agreeing).outcome == PASS
    assert Comparison.from_dict(c.to_dict()) == c


def _device_timed(ms: float, rng: np.random.Generator):
    """A run that reports its own time (as a GPU runner does): the loop's logic without the host's noise."""
    from deploy.targets.runners.registry import DeviceTimed

    return DeviceTimed(lambda: ms * float(np.exp(rng.normal(0.0, 0.02))))


def test_measure_blocks_prepares_fresh_runs_alternates_order_and_records_the_structure():
    made = {"a": 0, "b": 0}
    rng = np.random.default_rng(4)

    def prepare(side: str, ms: float):
        def make():
            made[side] += 1
            return _device_timed(ms, rng)
        return make

    config = MeasureConfig(warmup_min_s=0.01, warmup_min_runs=3, min_samples=24, min_seconds=0.15, max_seconds=5.0,
                           blocks=3, min_sample_ms=1.0)
    a, b, c = measure_blocks(prepare("a", 0.2), prepare("b", 0.4), config)
    assert made == {"a": 3, "b": 3}  # one fresh run per side per block
    blocks = a.structure["blocks"]
    assert [blk["first"] for blk in blocks] == ["a", "b", "a"]
    assert all(4 <= blk["inner_loop"] <= 6 for blk in blocks)  # 0.2 ms per inference: k = 5 for a 1 ms sample
    assert sum(blk["n"] for blk in blocks) == a.summary["n"] == len(a.samples_ms)
    # the interval sits on the true ratio 2 (to 1%): a 95% interval misses the exact value one run in twenty, and the
    # samples drawn here depend on the wall clock (how many fit in min_seconds), so no seed fixes that run
    assert c.method == "blocks" and len(c.block_ratios) == 3 and c.ci_low < 2.0 * 1.01 and c.ci_high > 2.0 * 0.99
    assert 1.9 < c.ratio < 2.1 and c.excludes_one
    data = a.to_dict()
    assert data["structure"]["design"] == "blocks" and len(data["samples_ms"]) == a.summary["n"]


def test_a_sequential_comparison_adds_rounds_of_blocks_only_while_undecided():
    """With a question (`decided`), blocks come in rounds of `config.blocks`: a settled first look stops there, an
    unsettled one goes on up to LOOKS rounds, and every look's interval is made at the Bonferroni-raised
    confidence, which a look sees as it decides."""
    from deploy.targets.measure.paired import LOOKS

    rng = np.random.default_rng(7)
    config = MeasureConfig(warmup_min_s=0.01, warmup_min_runs=3, min_samples=12, min_seconds=0.06, max_seconds=5.0,
                           blocks=2, min_sample_ms=0.5)
    seen: list[tuple[int, float]] = []

    def never(b, comparison) -> bool:
        seen.append((len(comparison.block_ratios), comparison.confidence))
        return False

    a, b, c = measure_blocks(lambda: _device_timed(0.2, rng), lambda: _device_timed(0.3, rng), config, decided=never)
    assert [n for n, _ in seen] == [2 * (look + 1) for look in range(LOOKS)]  # a round of 2 blocks per look
    assert len(c.block_ratios) == len(b.structure["blocks"]) == 2 * LOOKS
    assert all(conf == pytest.approx(1 - 0.05 / LOOKS) for _, conf in seen) and c.confidence == seen[-1][1]
    assert b.config.confidence == c.confidence  # the p50's interval (median_interval) is made at the same level
    _, _, once = measure_blocks(lambda: _device_timed(0.2, rng), lambda: _device_timed(0.3, rng), config,
                                decided=lambda b, comparison: True)
    assert len(once.block_ratios) == 2
    _, _, plain = measure_blocks(lambda: _device_timed(0.2, rng), lambda: _device_timed(0.3, rng), config)
    assert len(plain.block_ratios) == 2 and plain.confidence == 0.95  # no question: one look at the asked level


def test_a_sequential_measurement_logs_its_warnings_once_not_per_look(caplog):
    """Every look summarises the blocks so far; only the finished measurement's warnings reach the log."""
    import logging

    from deploy.targets.measure.paired import LOOKS

    rng = np.random.default_rng(3)
    config = MeasureConfig(warmup_min_s=0.01, warmup_min_runs=3, min_samples=12, min_seconds=0.06, max_seconds=5.0,
                           blocks=2, min_sample_ms=0.5, cov_warn=0.001)  # any jitter is "noisy" here
    looks = []

    def never(b, comparison) -> bool:
        looks.append(len(comparison.block_ratios))
        return False

    with caplog.at_level(logging.WARNING, logger="deploy.targets.measure.loop"):
        a, b, c = measure_blocks(lambda: _device_timed(0.2, rng), lambda: _device_timed(0.3, rng), config,
                                 decided=never)
    assert len(looks) == LOOKS and len(c.block_ratios) == 2 * LOOKS
    noisy = [r.getMessage() for r in caplog.records if r.getMessage().startswith("noisy measurement")]
    assert noisy and len(noisy) == len(set(noisy)) <= 2  # each text once (one per side at most), not once per look
    assert set(noisy) == {w for w in a.warnings + b.warnings if w.startswith("noisy measurement")}


def test_the_final_measurement_goes_on_only_while_its_verdict_is_uncertain():
    """`settles` asks of a look what the verdict will: the speed-up's interval against the asked speed-up, the
    p50's interval against a latency budget; nothing for a budget that is not a latency."""
    from deploy.compiler.verdict import settles
    from deploy.targets.measure.loop import measurement_from
    from deploy.targets.measure.lock import LockRecord

    ratio = lambda low, high: Comparison(ratio=(low + high) / 2, ci_low=low, ci_high=high, confidence=0.95,  # noqa: E731
                                         p_value=0.01, median_a=1.0, median_b=(low + high) / 2, n_a=10, n_b=10)
    speedup = settles({"kind": "speedup", "value": 2.0, "target_ms": 0.5})
    assert speedup(None, ratio(0.40, 0.48))  # speed-up 2.08-2.5: met
    assert speedup(None, ratio(0.55, 0.60))  # 1.67-1.82: missed
    assert not speedup(None, ratio(0.45, 0.52))  # 1.92-2.22 straddles 2: another round
    rng = np.random.default_rng(8)
    b = measurement_from(_noisy(rng, 1.0, 200, 0.01), MeasureConfig(), LockRecord.from_dict({}))
    assert settles({"kind": "latency_ms", "value": 1.2, "target_ms": 1.2})(b, None)
    assert not settles({"kind": "latency_ms", "value": 1.0, "target_ms": 1.0})(b, None)
    assert settles({"kind": "size_mb", "value": 3.0, "target_ms": None}) is None


def test_noise_is_judged_within_blocks_not_across_their_sessions():
    """Two blocks whose sessions run 30% apart: pooled, that looks like a noisy measurement; within each block the
    samples are tight, and the gate judges them."""
    rng = np.random.default_rng(5)
    a = np.array(_noisy(rng, 1.0, 100, 0.01) + _noisy(rng, 1.3, 100, 0.01))
    from deploy.targets.regress.decide import block_noise, robust_cov

    assert robust_cov(a) > 0.1 and block_noise(a, [100, 100]) < 0.02
    c = combine([(list(a[:100]), list(a[:100])), (list(a[100:]), list(a[100:]))])
    verdict = decide(a, a, GateConfig(), c, [100, 100])
    assert verdict.outcome == PASS and verdict.noise_old < 0.02  # the noise reported is the blocks' own
    assert decide(a, a, GateConfig()).outcome == INCONCLUSIVE  # the same samples pooled: too noisy to judge


def test_the_p50_interval_over_blocks_is_a_t_interval_around_the_p50():
    """Six blocks whose medians spread by a few percent: the verdict's interval holds the p50, is wider than the
    pooled order-statistic interval, and narrower than the blocks' whole range."""
    from deploy.targets.measure.loop import measurement_from
    from deploy.targets.measure.lock import LockRecord
    from deploy.targets.measure.paired import median_interval

    rng = np.random.default_rng(6)
    levels = [1.0, 1.03, 0.98, 1.06, 0.99, 1.01]
    samples = [x for level in levels for x in _noisy(rng, level, 50, 0.01)]
    m = measurement_from(samples, MeasureConfig(), LockRecord.from_dict({}))
    m = type(m)(**{**m.__dict__, "structure": {"blocks": [{"n": 50} for _ in levels]}})
    low, high = median_interval(m)
    pooled = m.summary["median_ci"]
    assert low < m.summary["p50"] < high and low <= pooled[0] and high >= pooled[1]
    assert low > min(levels) * 0.97 and high < max(levels)
