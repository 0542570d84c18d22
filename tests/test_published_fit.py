"""Predictions for devices not at hand: a profile fitted on published latencies gets that fit's efficiency, band and
label; one without keeps x/÷ 3 and "not yet verified against hardware"; and the rule (>= 6 points from >= 3
architecture families) decides whether a fit is stored at all."""
from __future__ import annotations

import dataclasses
import math
import sys
import tomllib
from pathlib import Path

import pytest

from deploy.core.errors import ProfileError
from deploy.profiles import builtin_profiles, load_builtin, parse_profile
from deploy.profiles.schema import PublishedFit
from deploy.targets.latency.model import DEFAULT_EFFICIENCY, UNVERIFIED, UNVERIFIED_BAND, predict_nodes
from deploy.targets.latency.nodes import NodeRecord
from deploy.targets.latency.published import (MIN_FAMILIES, MIN_POINTS, PricedPoint, fit_efficiency, fit_published,
                                              leave_one_model_out, qualifies, roofline_terms)

ROOT = Path(__file__).resolve().parents[1]
# a compute-heavy conv, a memory-bound add and a tiny matmul: all three roofline terms matter
NODES = (NodeRecord("conv", "Conv", "conv", "fp32", macs=2_000_000_000, bytes=4_000_000, channels=(256, 256)),
         NodeRecord("add", "Add", "add", "fp32", macs=0, bytes=80_000_000),
         NodeRecord("fc", "Gemm", "fc", "fp32", macs=1_000_000, bytes=4_000_000, channels=(1000, 1000)))


def _h100(fit: PublishedFit | None):
    return dataclasses.replace(load_builtin("nvidia-h100"), published_fit=fit)


def test_profile_with_a_fit_uses_its_efficiency_band_and_label():
    fit = PublishedFit(efficiency=0.25, band=0.4, points=7, architectures=3, source="benchmarks/x.toml")
    profile = _h100(fit)
    pred = predict_nodes(NODES, profile, 1, precision_map="fp16")
    bound, overhead = roofline_terms(NODES, profile, 1, "fp16")
    assert pred.ms == pytest.approx(bound / 0.25 + overhead)
    assert pred.high_ms / pred.ms == pytest.approx(math.exp(0.4))
    assert pred.ms / pred.low_ms == pytest.approx(math.exp(0.4))
    assert not pred.verified
    assert pred.label.startswith("fitted on 7 published latencies (3 architectures)")
    assert "x/÷ 1.49" in pred.label and "leave-one-model-out" in pred.label and UNVERIFIED not in pred.label


def test_profile_without_a_fit_keeps_the_unverified_default():
    profile = _h100(None)
    pred = predict_nodes(NODES, profile, 1, precision_map="fp16")
    bound, overhead = roofline_terms(NODES, profile, 1, "fp16")
    assert pred.ms == pytest.approx(bound / DEFAULT_EFFICIENCY + overhead)
    assert pred.high_ms / pred.low_ms == pytest.approx(math.exp(2 * UNVERIFIED_BAND))  # x/÷ 3
    assert not pred.verified and pred.label.startswith(UNVERIFIED) and "x/÷ 3" in pred.label


def _points(families: list[str], efficiency: float = 0.3) -> list[PricedPoint]:
    """Points whose published latency the roofline explains exactly at `efficiency`."""
    out = []
    for i, family in enumerate(families):
        bound, overhead = 1.0 + i, 0.05 * (i + 1)
        out.append(PricedPoint(f"model{i}", family, bound, overhead, bound / efficiency + overhead))
    return out


def test_the_rule_needs_six_points_from_three_families():
    assert (MIN_POINTS, MIN_FAMILIES) == (6, 3)
    assert fit_published(_points(["cnn", "cnn", "bert", "bert", "vit"])) is None  # 5 points
    assert fit_published(_points(["cnn"] * 3 + ["bert"] * 3)) is None  # 2 families
    assert not qualifies([])
    fit = fit_published(_points(["cnn", "cnn", "bert", "bert", "vit", "vit"]), "src.toml")
    assert fit is not None and (fit.points, fit.architectures, fit.source) == (6, 3, "src.toml")
    assert fit.efficiency == pytest.approx(0.3, rel=1e-3) and fit.band == pytest.approx(0.0, abs=1e-3)


def test_leave_one_model_out_refits_without_every_point_of_the_model():
    points = _points(["cnn", "cnn", "bert", "bert", "vit", "vit"])
    odd = dataclasses.replace(points[0], published_ms=points[0].published_ms * 2)  # one publication 2x slower
    points = [odd] + points[1:] + [dataclasses.replace(odd, published_ms=odd.published_ms * 1.5)]  # same model again
    errors = leave_one_model_out(points)
    rest_eff = fit_efficiency(points[1:-1])
    assert rest_eff == pytest.approx(0.3, rel=1e-3)
    assert errors[0] == pytest.approx(odd.log_error(rest_eff)) and errors[0] < -0.5
    assert errors[-1] == pytest.approx(points[-1].log_error(rest_eff))
    fit = fit_published(points)
    assert fit is not None and fit.band >= abs(errors[0]) * 0.9  # the band covers the odd model


def test_efficiency_stays_a_share_of_peak():
    # the per-op overhead alone exceeds the published latencies: no efficiency fits, it stops at 100% of peak
    slow = [PricedPoint(f"m{i}", "f", 0.1, 1.0, 0.5) for i in range(6)]
    assert fit_efficiency(slow) == 1.0
    fast = [PricedPoint(f"m{i}", "f", 1.0, 0.0, 1000.0) for i in range(6)]
    assert fit_efficiency(fast) == 0.01


def test_profile_schema_reads_and_validates_the_fit_table():
    data = tomllib.loads((ROOT / "profiles" / "nvidia-h100.toml").read_text())
    data = {k: v for k, v in data.items() if k != "published_fit"}
    table = {"efficiency": 0.31, "band": 0.42, "points": 7, "architectures": 3, "source": "b.toml"}
    assert parse_profile({**data, "published_fit": table}, "t").published_fit == PublishedFit(0.31, 0.42, 7, 3, "b.toml")
    assert parse_profile(data, "t").published_fit is None
    with pytest.raises(ProfileError, match="published_fit.efficiency"):
        parse_profile({**data, "published_fit": {**table, "efficiency": 1.5}}, "t")
    with pytest.raises(ProfileError, match="published_fit.bnad"):
        parse_profile({**data, "published_fit": {**table, "bnad": 0.1}}, "t")
    with pytest.raises(ProfileError, match="published_fit.points"):
        parse_profile({**data, "published_fit": {k: v for k, v in table.items() if k != "points"}}, "t")


def test_written_fit_tables_parse_and_every_stored_fit_passed_the_rule():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from reference_fit import fit_table

    text = (ROOT / "profiles" / "rpi5.toml").read_text().split("[published_fit]")[0]
    fit = {"efficiency": 0.4471, "band": 0.3, "points": 8, "architectures": 3, "source": "s.toml"}
    parsed = parse_profile(tomllib.loads(text + "\n" + fit_table(fit)), "t")
    assert parsed.published_fit == PublishedFit(0.4471, 0.3, 8, 3, "s.toml")
    for profile in builtin_profiles():
        if profile.published_fit is not None:
            assert profile.measure == "predicted"
            assert profile.published_fit.points >= MIN_POINTS and profile.published_fit.architectures >= MIN_FAMILIES
