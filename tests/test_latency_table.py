"""The op latency lookup table: lazily measured single-op entries (fp32 and real int8), cached on disk,
interpolated monotonically between shapes, keys read off a torch model, and `deploy profiles calibrate`."""
from __future__ import annotations

import json
import random

import pytest

from deploy.pipeline import InputSpec
from deploy.targets.latency_interp import interpolate, monotone
from deploy.targets.latency_keys import model_keys, price_model
from deploy.targets.latency_ops import OpKey, conv_key, linear_key, lowrank_keys
from deploy.targets.latency_table import Correction, LatencyTable, TableConfig
from deploy.targets.measure import MeasureConfig

TINY = TableConfig(threads=1, measure=MeasureConfig.quick(min_samples=15, min_seconds=0.03))
KEYS = [conv_key(8, 8, 8), conv_key(32, 32, 8), linear_key(4, 32, 32), conv_key(8, 8, 8, precision="int8")]


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DEPLOY_CACHE_DIR", str(tmp_path))
    return tmp_path


def test_second_build_hits_the_cache(cache):
    table = LatencyTable(TINY)
    entries = table.build(KEYS)
    assert table.stats.measured == len(KEYS) and all(e.ms > 0 and e.raw_ms >= e.ms for e in entries)
    assert table.path.exists() and table.path.parent.parent == cache
    again = LatencyTable(TINY)
    assert again.build(KEYS) == entries
    assert again.stats.measured == 0 and again.stats.hits == len(KEYS)
    assert again.lookup(KEYS[0]) == entries[0].ms  # exact hit, no measuring
    stored = json.loads(again.path.read_text())
    assert stored["runtime"] == "onnxruntime" and stored["threads"] == 1 and "session_ms" in stored


def test_interpolation_is_monotone_between_measured_shapes(cache):
    table = LatencyTable(TINY)
    table.build([conv_key(c, c, 8) for c in (8, 32)])
    estimates = [table.estimate(conv_key(c, c, 8)) for c in range(8, 33, 2)]
    assert all(b >= a for a, b in zip(estimates, estimates[1:]))
    assert table.stats.interpolated == len(estimates)
    with pytest.raises(Exception):
        table.estimate(OpKey("matmul", (1, 8, 8, 8)))  # no measured matmul to interpolate from


def test_interpolation_pools_noisy_points():
    rng = random.Random(0)
    points = [(m, m * 1e-6 * rng.uniform(0.6, 1.4)) for m in (1e4, 2e4, 4e4, 8e4, 1.6e5, 3.2e5)]
    grid = [1e4 * 1.1 ** i for i in range(40)]
    values = [interpolate(points, m) for m in grid]
    assert all(b >= a for a, b in zip(values, values[1:]))
    assert monotone([3, 1, 2, 5]) == [2, 2, 2, 5]
    assert interpolate([(100, 1.0)], 200) == pytest.approx(2.0)  # above the grid: proportional to MACs


def test_keys_of_a_model_and_options_that_do_not_exist_yet():
    from deploy.examples.digits_cnn import digits_cnn
    from deploy.examples.tiny_bert import tiny_bert

    keys = model_keys(digits_cnn(), [InputSpec("image", (1, 1, 32, 32))])
    assert sum(k.op == "conv" for _, k in keys) == 9 and sum(k.op == "linear" for _, k in keys) == 1
    stem = dict(keys)["stem.0"]
    pruned = stem.with_dims(cout=int(stem.dims["cout"] * 0.4))
    assert pruned.macs < stem.macs and pruned.group == stem.group
    bert = model_keys(tiny_bert(vocab_size=500), [InputSpec("input_ids", (1, 16), "int64"),
                                                  InputSpec("attention_mask", (1, 16), "int64")], precision="int8")
    assert sum(k.op == "matmul" for _, k in bert) == 4  # scores and context, 2 layers
    assert all(k.precision == "int8" for _, k in bert)
    first, second = lowrank_keys(linear_key(16, 256, 256), 64)
    assert first.macs + second.macs == linear_key(16, 256, 256).macs // 2


def test_closed_loop_correction(cache):
    table = LatencyTable(TINY)
    table.build(KEYS[:3])
    keys = [("a", KEYS[0]), ("b", KEYS[2])]
    raw = price_model(table, keys)
    loop = Correction(raw.table_ms, measured_ms=raw.table_ms * 1.5)
    corrected = price_model(table, keys, loop)
    assert loop.ratio == pytest.approx(1.5) and corrected.ms == pytest.approx(1.5 * raw.table_ms)


def test_closed_loop_from_a_built_model(cache):
    from torch import nn

    from deploy.targets.latency_keys import measured_correction

    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)).eval()
    table = LatencyTable(TINY)
    loop = measured_correction(table, model, [InputSpec("x", (1, 8, 8, 8))], measured_ms=1.0)
    assert table.stats.measured == 1  # both convs share one key
    assert loop.ratio == pytest.approx(1.0 / loop.table_ms) and loop.table_ms == pytest.approx(2 * table.lookup(
        conv_key(8, 8, 8)))


def test_keys_are_validated():
    from deploy.errors import UserInputError

    with pytest.raises(UserInputError):
        OpKey("conv", (8, 8, 8))
    with pytest.raises(UserInputError):
        conv_key(8, 12, 8, groups=8)
    assert OpKey.from_text(KEYS[3].text) == KEYS[3]


def _cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """The console entry point in-process (exit code, stdout, stderr): what a user sees, without a new interpreter."""
    import sys

    from deploy.cli import main

    monkeypatch.setattr(sys, "argv", ["deploy", *args])
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def test_calibrate_help_and_quick_local_run(cache, monkeypatch, capsys):
    code, out, _ = _cli(monkeypatch, capsys, "profiles", "calibrate", "--help")
    assert code == 0 and "--runner" in out and "--quick" in out
    code, out, err = _cli(monkeypatch, capsys, "profiles", "calibrate", "cpu", "--quick", "--threads", "1", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["entries"] == 8 and result["measured"] == 8 and result["precisions"] == ["fp32", "int8"]
    assert "int4" in result["skipped"] and result["model"] == {}
    code, out, _ = _cli(monkeypatch, capsys, "profiles", "calibrate", "cpu", "--quick", "--threads", "1", "--json")
    assert json.loads(out)["measured"] == 0 and json.loads(out)["cached"] == 8


def test_calibrate_refuses_in_one_line(monkeypatch, capsys):
    code, _, err = _cli(monkeypatch, capsys, "profiles", "calibrate", "jetson", "--quick")
    assert code == 2 and "not measurable here" in err and len(err.strip().splitlines()) == 1
    code, _, err = _cli(monkeypatch, capsys, "profiles", "calibrate", "cpu", "--quick", "--runner", "http://device")
    assert code == 2 and "ssh://" in err
