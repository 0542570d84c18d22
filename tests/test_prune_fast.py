"""Fused-qkv attention is not offered as channel units; the prefix replay is exact; curves measured at fewer
counts interpolate exactly through the measured ones; the probe's samples follow its work budget."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from deploy.compress.prune.api import PruneConfig, build_problem, plan_dp
from deploy.compress.prune.edit import Masker
from deploy.compress.prune.problem import MIN_PROBE_SAMPLES, probe_samples
from deploy.compress.prune.trace import CallTrace, PrefixReuse, unit_plans
from deploy.compress.prune.units import UnitConfig, axis_length, find_units
from deploy.profiles import load_builtin

ANY_CPU = dataclasses.replace(load_builtin("cpu-avx2"), channel_multiple=1)  # no rounding of kept channels
from deploy.compress.prune.sensitivity import (OutputProbe, ProbeData, distortion_curves, interpolate, measured_counts,
                                         ranking, removal_for)
from deploy.examples.tiny_bert import example_inputs, tiny_bert
from deploy.core.spec import InputSpec


class FusedAttention(nn.Module):
    """One qkv projection (3x the width), reshaped into heads: its rows are q, k and v of every head."""

    def __init__(self, dim: int, heads: int, attribute: str):
        super().__init__()
        setattr(self, attribute, heads)
        self.count, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, self.count, self.head_dim).permute(2, 0, 3, 1, 4)
        attn = torch.softmax(qkv[0] @ qkv[1].transpose(-2, -1) * self.head_dim ** -0.5, dim=-1)
        return self.proj((attn @ qkv[2]).transpose(1, 2).reshape(b, t, d))


class TinyViT(nn.Module):
    def __init__(self, attribute: str, dim: int = 16, heads: int = 2):
        super().__init__()
        self.embed = nn.Linear(8, dim)
        self.norm1, self.attn = nn.LayerNorm(dim), FusedAttention(dim, heads, attribute)
        self.norm2, self.fc1, self.act, self.fc2 = nn.LayerNorm(dim), nn.Linear(dim, 4 * dim), nn.GELU(), \
            nn.Linear(4 * dim, dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        x = x + self.attn(self.norm1(x))
        x = x + self.fc2(self.act(self.fc1(self.norm2(x))))
        return self.head(x.mean(1))


VIT_INPUTS = [InputSpec("tokens", ("batch", 5, 8))]


@pytest.mark.parametrize("attribute", ["heads", "n_groups"])  # a known head-count name, and one we cannot know
def test_fused_qkv_attention_is_not_offered_and_the_rest_prunes(attribute):
    torch.manual_seed(0)
    model = TinyViT(attribute).eval()
    x = (torch.randn(4, 5, 8),)
    units = find_units(model, x, UnitConfig())
    assert [u.root for u in units] == ["fc1"]  # the FFN; never a qkv/proj "channel" group
    for unit in units:
        for slice_ in unit.slices:
            assert axis_length(model.get_submodule(slice_.module), slice_.axis) == unit.size * slice_.width
    samples = [(torch.randn(1, 5, 8),) for _ in range(8)]
    problem = build_problem(model, VIT_INPUTS, samples, ANY_CPU, PruneConfig(samples=8, grid_step=0.25, grid_max=0.75))
    plan = plan_dp(problem, 0.8 * problem.costs.base)
    pruned = problem.build(plan)
    assert problem.cost.of_module(pruned) == problem.cost.of_plan(plan) <= 0.8 * problem.costs.base
    with Masker(model, units, problem.refit).applied(problem.removal(plan)):
        masked = model(*x)
    assert torch.allclose(pruned(*x), masked, atol=1e-5)


def _probe(model, batches, names, units):
    data = ProbeData(batches, names)
    trace = CallTrace.record(model, tuple(t[:1] for t in batches[0]))
    reuse = PrefixReuse(model, trace, unit_plans(model, trace, units), data.batches)
    return OutputProbe(model, data), reuse


@pytest.mark.parametrize("which", ["cnn", "bert"])
def test_replaying_the_untouched_prefix_gives_exactly_the_full_forward(which, digits_model):
    if which == "cnn":
        model, names = digits_model, ("image",)
        gen = torch.Generator().manual_seed(0)
        batches = [(torch.randn(3, 1, 32, 32, generator=gen),), (torch.randn(2, 1, 32, 32, generator=gen),)]
    else:
        model, names = tiny_bert(seed=0, vocab_size=1000), ("input_ids", "attention_mask")
        ids, mask = example_inputs(batch=3, seq_len=12, seed=1)
        mask[1, 8:] = 0
        batches = [(ids, mask)]
    units = find_units(model, batches[0], UnitConfig(channel_multiple=4))
    probe, reuse = _probe(model, batches, names, units)
    reuse.record()
    assert reuse.enabled and max(reuse.saved_fraction(u.name) for u in units) > 0.3
    masker = Masker(model, units)
    for unit in units:
        count = unit.options[len(unit.options) // 2]
        with masker.applied({unit.name: ranking(model, unit)[:count]}):
            full = probe.distortion()
            replayed = probe.distortion(reuse=reuse, unit=unit.name)
        assert replayed == full and full > 0, unit.name
    assert probe.distortion(reuse=reuse, unit=units[-1].name) == 0.0  # nothing masked: the reference again


def test_measured_counts_are_geometric_and_interpolation_passes_through_them():
    options = tuple(range(0, 58, 3))
    counts = measured_counts(options, 5)
    assert counts[0] == 0 and counts[1] == 3 and counts[-1] == 57 and len(counts) == 6
    gaps = [b - a for a, b in zip(counts[1:], counts[2:])]
    assert gaps == sorted(gaps)  # finer at small removals
    assert measured_counts(options, 0) == options and measured_counts((0, 1, 2), 7) == (0, 1, 2)
    values = interpolate(options, {0: 0.0, **{c: float(c * c) for c in counts[1:]}})
    assert all(values[options.index(c)] == c * c for c in counts)
    i = options.index(counts[2]) + 1  # between two measured counts: on the straight line
    left, right = counts[2], next(c for c in counts if c > options[i])
    t = (options[i] - left) / (right - left)
    assert values[i] == pytest.approx(left ** 2 + t * (right ** 2 - left ** 2))


def test_probe_samples_follow_the_work_budget_and_key_the_cache(digits_model, tmp_path):
    x = (torch.randn(1, 1, 32, 32),)
    units = find_units(digits_model, x, UnitConfig(channel_multiple=4))
    trace = CallTrace.record(digits_model, x)
    plans = unit_plans(digits_model, trace, units)
    config = PruneConfig(samples=64)
    assert probe_samples(trace, plans, units, config) == 64  # a small model: every sample
    assert probe_samples(trace, plans, units, dataclasses.replace(config, probe_macs=1.0)) == MIN_PROBE_SAMPLES
    assert probe_samples(trace, plans, units, dataclasses.replace(config, probe_macs=0)) == 64
    assert probe_samples(trace, plans, units, dataclasses.replace(config, samples=1, probe_macs=1.0)) == 1
    middle = probe_samples(trace, plans, units, dataclasses.replace(config, probe_macs=trace.work * 400))
    assert MIN_PROBE_SAMPLES < middle < 64
    data = ProbeData([(torch.randn(4, 1, 32, 32),)], ("image",))
    few = distortion_curves(OutputProbe(digits_model, data), units, cache_dir=tmp_path, points=2)
    every = distortion_curves(OutputProbe(digits_model, data), units, cache_dir=tmp_path)
    assert few.key != every.key and not every.cached
    again = distortion_curves(OutputProbe(digits_model, data), units, cache_dir=tmp_path, points=2)
    assert again.cached and {n: c.measured for n, c in again.curves.items()} == \
        {n: c.measured for n, c in few.curves.items()}
    for name, curve in few.curves.items():
        for n in curve.measured:
            assert curve.at(n) == pytest.approx(every.curves[name].at(n), rel=1e-6)


def test_new_config_fields_are_validated():
    with pytest.raises(ValueError, match="curve_points"):
        PruneConfig(curve_points=1)
    with pytest.raises(ValueError, match="probe_macs"):
        PruneConfig(probe_macs=-1)
    assert removal_for({"u": torch.tensor([2, 0, 1])}, {"u": 2})["u"].tolist() == [2, 0]
