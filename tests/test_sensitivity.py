"""Legal units, masking == physical removal, importance patterns, distortion curves and their disk cache."""
from __future__ import annotations

import pytest
import torch

from deploy.compress.prune.edit import Masker, remove_physically
from deploy.compress.prune.units import PruneUnit, UnitConfig, find_units, legal_removals, output_layer
from deploy.compress.prune.sensitivity import OutputProbe, ProbeData, distortion_curves, ranking, removal_for
from deploy.examples.tiny_bert import example_inputs, tiny_bert

CNN_X = (torch.randn(4, 1, 32, 32, generator=torch.Generator().manual_seed(0)),)


@pytest.fixture(scope="module")
def bert():
    return tiny_bert(seed=0, vocab_size=1000)  # example_inputs draws ids below 1000


@pytest.fixture(scope="module")
def bert_x():
    ids, mask = example_inputs(batch=3, seq_len=12, seed=1)
    mask[1, 8:] = 0  # one padded sample: padded positions must not count
    return ids, mask


@pytest.fixture(scope="module")
def bert_units(bert, bert_x):
    return find_units(bert, bert_x, UnitConfig(channel_multiple=16))


def test_legal_removals_round_kept_channels_to_the_multiple_and_never_to_zero():
    grid = tuple(i / 20 for i in range(19))
    for size, multiple in [(64, 16), (40, 8), (24, 16), (12, 16), (128, 1)]:
        options = legal_removals(size, 1, multiple, grid)
        assert options[0] == 0
        for removed in options[1:]:
            kept = size - removed
            assert kept >= 1 and kept % multiple == 0
    assert legal_removals(12, 1, 16, grid) == (0,)  # narrower than one multiple: stays whole
    assert legal_removals(4, 16, 16, grid) == (0, 1, 2, 3)  # 4 heads of 16 channels: any head count but zero


def test_cnn_units_couple_residual_channels_and_spare_the_output_layer(digits_model):
    units = find_units(digits_model, CNN_X, UnitConfig(channel_multiple=8))
    assert output_layer(digits_model, CNN_X) == "fc"
    assert all(not (s.module == "fc" and s.axis == "out") for u in units for s in u.slices)
    stage1 = next(u for u in units if u.root == "stem.0")  # stem + both residual branches of layer1
    touched = {(s.module, s.axis) for s in stage1.slices}
    assert {("stem.0", "out"), ("layer1.conv2", "out"), ("layer1.bn2", "out"), ("layer2.conv1", "in")} <= touched
    assert all(u.kind == "channels" and all((u.size - n) % 8 == 0 for n in u.options) for u in units)


def _mid_plan(units):
    return {u.name: u.options[len(u.options) // 2] for u in units}


@pytest.mark.parametrize("which", ["cnn", "bert"])
def test_masking_equals_physical_removal(which, digits_model, bert, bert_x, bert_units):
    model, x = (digits_model, CNN_X) if which == "cnn" else (bert, bert_x)
    units = find_units(model, x, UnitConfig(channel_multiple=4)) if which == "cnn" else bert_units
    if which == "bert":
        assert {u.kind for u in units} == {"channels", "heads"}  # FFN neurons and heads; no hidden size
    removal = removal_for({u.name: ranking(model, u) for u in units}, _mid_plan(units))
    before = model(*x)
    with Masker(model, units).applied(removal):
        masked = model(*x)
    assert torch.equal(model(*x), before)  # masks are undone
    pruned = remove_physically(model, x, units, removal)
    smaller = sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    assert smaller and torch.allclose(pruned(*x), masked, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(masked, before, atol=1e-3)


def test_head_surgery_is_exact_at_ratio_zero_and_runs_with_heads_removed(bert, bert_x, bert_units):
    units = [u for u in bert_units if u.kind == "heads"]
    same = remove_physically(bert, bert_x, units, {})
    assert torch.equal(same(*bert_x), bert(*bert_x))
    pruned = remove_physically(bert, bert_x, units, {u.name: torch.tensor([0, 2]) for u in units})
    attn = pruned.get_submodule(units[0].root)
    assert attn.num_attention_heads == 2 and attn.all_head_size == 32 and attn.query.out_features == 32
    assert pruned(*bert_x).shape == bert(*bert_x).shape


def test_unstructured_levels_and_two_four_pattern_are_exact(digits_model):
    units = find_units(digits_model, CNN_X, UnitConfig(mode="unstructured"))
    unit = next(u for u in units if u.root == "layer2.conv1")
    count = unit.options[7]
    pruned = remove_physically(digits_model, CNN_X, units, removal_for({unit.name: ranking(digits_model, unit)},
                                                                      {unit.name: count}))
    weight = pruned.get_submodule(unit.root).weight
    assert int((weight == 0).sum()) == count
    assert weight.abs()[weight != 0].min() >= digits_model.get_submodule(unit.root).weight.abs()[weight == 0].max()
    with pytest.raises(ValueError, match="2:4"):
        UnitConfig(mode="2:4")
    units = find_units(digits_model, CNN_X, UnitConfig(mode="2:4", sparse_2_4=True))
    assert "2:4:stem.0" not in {u.name for u in units}  # one input channel: no groups of four
    plan = {u.name: u.size // 2 for u in units}
    pruned = remove_physically(digits_model, CNN_X, units,
                               removal_for({u.name: ranking(digits_model, u) for u in units}, plan))
    for unit in units:
        weight = pruned.get_submodule(unit.root).weight
        groups = weight.movedim(1, -1).reshape(-1, 4)
        assert bool(((groups == 0).sum(1) == 2).all()), unit.name


def test_curves_are_cached_on_disk_by_model_data_and_units(tmp_path, bert, bert_x):
    units = find_units(bert, bert_x, UnitConfig(channel_multiple=16, grid=(0.0, 0.25, 0.5)))
    data = ProbeData(list(zip(*[t.split(1) for t in bert_x])), ("input_ids", "attention_mask"))
    data = ProbeData.from_samples(data.batches, data.input_names, 3, 2)
    first = distortion_curves(OutputProbe(bert, data), units, cache_dir=tmp_path)
    assert not first.cached and all(c.distortion[0] == 0.0 for c in first.curves.values())
    assert all(max(c.distortion) > 0 for c in first.curves.values())
    second = distortion_curves(OutputProbe(bert, data), units, cache_dir=tmp_path)
    assert second.cached and second.key == first.key
    assert {n: c.distortion for n, c in second.curves.items()} == {n: c.distortion for n, c in first.curves.items()}
    other = ProbeData([(bert_x[0][:1], bert_x[1][:1])], data.input_names)
    assert distortion_curves(OutputProbe(bert, other), units, cache_dir=tmp_path).key != first.key


def test_unit_rejects_options_that_remove_everything():
    with pytest.raises(ValueError):
        PruneUnit("u", "channels", "m", 8, (), (0, 8))
