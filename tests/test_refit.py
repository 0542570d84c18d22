"""The least-squares refit of layers reading pruned channels: it never fits its calibration data worse than plain
removal, masking equals physical removal with it, padded positions do not count, and the pruned model gets
closer to the unpruned one."""
from __future__ import annotations

import torch

from deploy.compress.prune.edit import Masker, remove_physically
from deploy.compress.prune.refit import InputMoments, consumer_channels, readers
from deploy.compress.prune.sensitivity import OutputProbe, ProbeData, ranking
from deploy.compress.prune.units import UnitConfig, find_units
from deploy.examples.tiny_bert import example_inputs, tiny_bert

NAMES = ("input_ids", "attention_mask")


def _setup(seed: int = 0):
    model = tiny_bert(seed=seed, vocab_size=1000).eval()
    samples = []
    for i in range(12):
        ids, mask = example_inputs(batch=1, seq_len=16, seed=100 + i)
        mask[0, 10 + i % 5:] = 0
        samples.append((ids, mask))
    units = find_units(model, samples[0], UnitConfig(channel_multiple=8))
    removal = {u.name: ranking(model, u)[: u.options[len(u.options) // 2]] for u in units}
    return model, samples, units, removal


def _layer_inputs(model, layer, samples):
    seen = []
    handle = model.get_submodule(layer).register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.no_grad():
        for sample in samples:
            model(*sample)
    handle.remove()
    return [(x, s[1]) for x, s in zip(seen, samples)]


def test_refit_fits_each_reader_at_least_as_well_as_plain_removal():
    model, samples, units, removal = _setup()
    moments = InputMoments.collect(model, readers(model, units), samples, NAMES)
    gone = consumer_channels(model, units, removal)
    assert {n.split(".")[-2] for n in gone} == {"output"}  # FFN second linears and attention output projections
    for name, removed in gone.items():
        layer = model.get_submodule(name)
        weight, bias = moments.refit(layer, name, removed)
        assert torch.all(weight[:, removed] == 0)
        plain = layer.weight.detach().clone()
        plain[:, removed] = 0
        errors = {"plain": 0.0, "refit": 0.0}
        for x, mask in _layer_inputs(model, name, samples):
            real = x[mask > 0]
            want = layer(real)
            errors["plain"] += ((real @ plain.T + layer.bias - want) ** 2).sum().item()
            errors["refit"] += ((real @ weight.T + bias - want) ** 2).sum().item()
        assert errors["refit"] < errors["plain"], name


def test_masking_with_refit_equals_the_physically_pruned_refit_model_and_is_closer_to_the_original():
    model, samples, units, removal = _setup()
    moments = InputMoments.collect(model, readers(model, units), samples, NAMES)
    pruned = remove_physically(model, samples[0], units, removal, moments)
    plain = remove_physically(model, samples[0], units, removal)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    probe = OutputProbe(model, ProbeData([tuple(torch.cat(t) for t in zip(*samples))], NAMES))
    with Masker(model, units, moments).applied(removal):
        masked = [model(*s) for s in samples]
        refit_distortion = probe.distortion()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # every value put back
    with torch.no_grad():
        for sample, got in zip(samples, masked):
            torch.testing.assert_close(pruned(*sample), got, atol=1e-5, rtol=1e-4)
    with Masker(model, units).applied(removal):
        plain_distortion = probe.distortion()
    assert refit_distortion < plain_distortion
    assert not torch.equal(plain(*samples[0]), pruned(*samples[0]))


def test_padded_positions_do_not_count_in_the_moments():
    model, samples, units, _ = _setup()
    other = []
    for ids, mask in samples:
        ids = ids.clone()
        ids[mask == 0] = 7  # different tokens where nobody attends
        other.append((ids, mask))
    layers = readers(model, units)
    a = InputMoments.collect(model, layers, samples, NAMES)
    b = InputMoments.collect(model, layers, other, NAMES)
    assert a.key() == b.key()
    c = InputMoments.collect(model, layers, samples[:6], NAMES)
    assert c.key() != a.key()


def test_the_prune_pass_uses_lent_moments_and_builds_the_same_model(monkeypatch):
    """A plan search lends its moments (same weights, same samples): the pass collects none and gets the model it
    gets when it collects them itself."""
    import copy

    from deploy.compress.prune.api import PruneConfig, PrunePass, apply_removed, moments_key
    from deploy.core.data import CalibrationSet
    from deploy.core.passes import Context, State
    from deploy.core.spec import InputSpec

    model, samples, units, removal = _setup()
    inputs = [InputSpec("input_ids", (1, 16), "int64"), InputSpec("attention_mask", (1, 16), "int64")]
    removed = {u.name: len(removal[u.name]) for u in units}
    own = apply_removed(copy.deepcopy(model), inputs, "structured", removed, samples=samples)
    lent = InputMoments.collect(model, readers(model, units), samples, NAMES)
    calls = []
    monkeypatch.setattr(InputMoments, "collect", classmethod(lambda cls, *a, **k: calls.append(a)))
    ctx = Context(calibration=CalibrationSet(samples, [], None, "t", "t"), prebuilt={moments_key(model): lent})
    state = State(copy.deepcopy(model), inputs, None)
    state = PrunePass(PruneConfig(removed=removed)).run(state, ctx)
    assert not calls
    with torch.no_grad():
        for sample in samples:
            torch.testing.assert_close(state.module(*sample), own(*sample), atol=1e-6, rtol=1e-5)


def test_moments_collected_in_batches_equal_the_float64_moments_of_each_sample():
    """The moments are collected in batches of equal shapes (a sample of another length starts a new batch), each
    batch's product in float32: they equal the float64 sum over samples of each one's unpadded positions."""
    from deploy.core.data import concatenated

    model, samples, units, _ = _setup()
    longer = [tuple(torch.cat([t, t], 1) for t in sample) for sample in samples[:3]]
    mixed = samples[:5] + longer + samples[5:]
    layers = readers(model, units)
    batched = InputMoments.collect(model, layers, mixed, NAMES)
    assert set(batched.moments) == set(layers)
    for name in layers:
        want = 0
        for x, mask in _layer_inputs(model, name, mixed):
            rows = x.double().reshape(-1, x.shape[-1])[mask.reshape(-1) > 0]
            rows = torch.cat([rows, torch.ones(rows.shape[0], 1, dtype=rows.dtype)], 1)
            want = want + rows.T @ rows
        torch.testing.assert_close(batched.moments[name], want, rtol=1e-5, atol=1e-5)
    assert [t[0].shape[0] for t in concatenated(mixed, 4)] == [4, 1, 3, 4, 3]
