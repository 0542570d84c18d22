"""Planning and applying pruning: budgets hold, channels respect the multiple, the result exports and runs in
ONNX Runtime, counted costs are honest, additivity is checked, and the pass runs in a pipeline."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import tomli_w
import tomllib
import torch

from deploy.core.analysis import analyze
from deploy.compress.prune.api import (PruneConfig, additivity_sweep, build_problem, execute, plan_dp, plan_uniform,
                                   prune_model, replay)
from deploy.compress.prune.cost import CountedCost
from deploy.core.errors import BudgetInfeasibleError, ConfigError
from deploy.examples.tiny_bert import example_inputs, tiny_bert
from deploy.core.model.load import from_module
from deploy.core.passes import Context, State, config_from_dict, config_to_dict, make_pass, run_pipeline
from deploy.core.spec import InputSpec
from deploy.profiles import load_builtin
from deploy.targets.target import for_profile

CNN_INPUTS = [InputSpec("image", ("batch", 1, 32, 32))]
BERT_INPUTS = [InputSpec("input_ids", ("batch", 12), "int64"), InputSpec("attention_mask", ("batch", 12), "int64")]
AVX2 = load_builtin("cpu-avx2")  # channel multiple 8


@pytest.fixture(scope="module")
def digits():
    from deploy.examples.digits_cnn import load_digits_split

    _, _, x, y = load_digits_split()
    return [(x[i:i + 1],) for i in range(48)], y[:48]


@pytest.fixture(scope="module")
def cnn_problem(digits_model, digits):
    config = PruneConfig(budget_kind="params", samples=32, batch_size=32, grid_step=0.125, grid_max=0.875)
    return build_problem(digits_model, CNN_INPUTS, digits[0], AVX2, config)


@pytest.fixture(scope="module")
def bert():
    return tiny_bert(seed=0, vocab_size=1000)


@pytest.fixture(scope="module")
def bert_samples():
    ids, mask = example_inputs(batch=8, seq_len=12, seed=3)
    mask[::3, 9:] = 0
    return [(ids[i:i + 1], mask[i:i + 1]) for i in range(8)]


def _ort_outputs(module, inputs, sample, tmp_path):
    import onnxruntime as ort

    from deploy.core.model.onnx_export import export_onnx

    path = export_onnx(module, inputs, tmp_path / "pruned.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {spec.name: t.numpy() for spec, t in zip(inputs, sample)})[0]


def test_config_is_validated():
    with pytest.raises(ValueError, match="at most 1"):
        PruneConfig(budget=1.5)
    with pytest.raises(ValueError, match="dense kernels"):
        PruneConfig(mode="unstructured", budget_kind="latency")
    with pytest.raises(ValueError, match="dp_steps"):
        PruneConfig(dp_steps=10)
    assert PruneConfig().grid[-1] == 0.9 and len(PruneConfig().grid) == 19


@pytest.mark.parametrize("kind", ["params", "macs"])
def test_dp_plan_respects_the_exact_budget_and_the_channel_multiple(cnn_problem, kind):
    problem = cnn_problem if kind == "params" else dataclasses.replace(
        cnn_problem, cost=CountedCost("macs", cnn_problem.module, CNN_INPUTS, cnn_problem.units))
    if kind == "macs":
        from deploy.compress.prune.cost import OptionCosts

        problem.costs = OptionCosts.measure(problem.cost, problem.units)
    budget = 0.5 * problem.costs.base
    plan = plan_dp(problem, budget)
    pruned = problem.build(plan)
    assert problem.cost.of_module(pruned) <= budget
    assert problem.cost.of_module(pruned) == problem.cost.of_plan(plan)  # the analytic count is the real count
    for name, layer in pruned.named_modules():
        original = problem.module.get_submodule(name)
        if isinstance(layer, torch.nn.Conv2d) and layer.out_channels != original.out_channels:
            assert layer.out_channels % 8 == 0 and layer.out_channels > 0
    uniform = plan_uniform(problem, budget)
    assert problem.curves.predicted(plan) <= problem.curves.predicted(uniform)


def test_the_problem_keeps_widths_to_the_profiles_prune_multiple(digits_model, digits):
    """A profile whose int8 kernels block channels more coarsely than its fp32 lanes (AMX: 64) sets the widths a
    pruned layer may keep; the DP plan keeps to them."""
    coarse = dataclasses.replace(AVX2, prune_multiple=16)
    config = PruneConfig(budget_kind="params", samples=8, batch_size=8, grid_step=0.125, grid_max=0.875)
    problem = build_problem(digits_model, CNN_INPUTS, digits[0][:8], coarse, config)
    assert (problem.channel_multiple, coarse.channel_multiple) == (16, 8)
    for unit in problem.units:
        assert all((unit.size - n) % 16 == 0 for n in unit.options if n), (unit.name, unit.size, unit.options)
    assert any(unit.options[1:] for unit in problem.units)  # something is still prunable
    sizes = {unit.name: unit.size for unit in problem.units}
    plan = plan_dp(problem, 0.6 * problem.costs.base)
    assert plan and all((sizes[name] - k) % 16 == 0 for name, k in plan.items() if k)


def test_pruned_cnn_exports_and_runs_in_onnxruntime(cnn_problem, digits, tmp_path):
    pruned, report = execute(cnn_problem, "dp", 0.6 * cnn_problem.costs.base, digits[0][32:], digits[1][32:])
    assert report.cost <= report.budget and report.removed
    assert report.measured_distortion == pytest.approx(cnn_problem.masked_distortion(report.removed), rel=1e-4)
    assert "accuracy" in report.held_out
    sample = digits[0][0]
    got = _ort_outputs(pruned, CNN_INPUTS, sample, tmp_path)
    np.testing.assert_allclose(got, pruned(*sample).detach().numpy(), rtol=1e-4, atol=1e-4)


def test_global_and_uniform_baselines_respect_the_budget(cnn_problem):
    budget = 0.7 * cnn_problem.costs.base
    for method in ("uniform", "global"):
        _, report = execute(cnn_problem, method, budget)
        assert report.cost <= budget, method
        assert report.measured_distortion > 0


def test_graded_uniform_plans_follow_the_ratio_where_nearest_rounding_jumps(cnn_problem):
    """The planner's uniform allocation: between two legal options the units go deeper one at a time, so the cost
    falls in small steps with the ratio instead of all units jumping at once."""
    from deploy.compress.prune.baselines import graded_uniform_plan, uniform_plan

    ratios = [i / 200 for i in range(0, 176)]
    cost = cnn_problem.costs.predicted
    graded = [graded_uniform_plan(cnn_problem, r) for r in ratios]
    nearest = [uniform_plan(cnn_problem, r) for r in ratios]
    options = {u.name: u.options for u in cnn_problem.units}
    assert all(n in options[name] for plan in graded for name, n in plan.items())
    distinct = lambda plans: len({tuple(sorted(p.items())) for p in plans})  # noqa: E731
    assert distinct(graded) > distinct(nearest)
    jumps = lambda plans: max(abs(cost(a) - cost(b)) for a, b in zip(plans, plans[1:]))  # noqa: E731
    assert jumps(graded) < 0.75 * jumps(nearest)
    costs = [cost(p) for p in graded]
    step = max(abs(a - b) for deltas in cnn_problem.costs.deltas.values() for a, b in zip(deltas, deltas[1:]))
    assert all(b <= a + step for a, b in zip(costs, costs[1:]))  # falls with the ratio, within one unit's step
    assert costs[0] == cnn_problem.costs.base and costs[-1] < 0.5 * costs[0]


def test_additivity_spearman_is_positive_on_the_cnn(cnn_problem):
    check = additivity_sweep(cnn_problem, count=10)
    assert len(check["plans"]) == 10
    assert check["spearman"] is not None and check["spearman"] > 0.5


def test_a_measured_cost_plugs_in_and_its_plans_fit(cnn_problem):
    """Any `measure_ms(onnx_path)` is a cost; here the exported file's size stands in for a latency."""
    import os

    from deploy.compress.prune.cost import MeasuredLatency, OptionCosts

    measured = []
    cost = MeasuredLatency(cnn_problem.build, CNN_INPUTS, lambda path: measured.append(path) or os.path.getsize(path))
    units = [u for u in cnn_problem.units if u.root in ("layer1.conv1", "layer2.conv1")]
    problem = dataclasses.replace(cnn_problem, units=units, cost=cost)
    problem.costs = OptionCosts.measure(cost, units)
    budget = 0.95 * problem.costs.base
    plan = plan_dp(problem, budget)
    assert plan and cost.of_plan(plan) <= budget
    calls = len(measured)
    assert cost.of_plan(dict(plan)) == cost.of_plan(plan) and len(measured) == calls  # memoised


def test_infeasible_budget_names_the_least_achievable_cost(cnn_problem):
    with pytest.raises(BudgetInfeasibleError, match="least achievable") as info:
        plan_dp(cnn_problem, 0.01 * cnn_problem.costs.base)
    assert info.value.least_achievable > 0.01 * cnn_problem.costs.base


def test_bert_prunes_heads_and_neurons_counts_macs_honestly_and_runs_in_onnxruntime(bert, bert_samples, tmp_path):
    config = PruneConfig(budget=0.6, samples=8, batch_size=8, grid_step=0.25, grid_max=0.75)
    pruned, report = prune_model(bert, BERT_INPUTS, bert_samples, load_builtin("cpu-avx512-vnni"), config)
    assert report.cost <= report.budget
    kinds = {row["kind"] for row in report.units}
    assert kinds == {"channels", "heads"}
    assert report.cost == analyze(from_module(pruned, BERT_INPUTS)).total_macs
    for row in report.units:
        assert row["kept"] >= 1
    assert report.refit
    with pytest.raises(ConfigError, match="refit on calibration data"):
        replay(bert, BERT_INPUTS, report.to_dict())
    replayed = replay(bert, BERT_INPUTS, report.to_dict(), bert_samples)
    assert torch.equal(replayed(*bert_samples[0]), pruned(*bert_samples[0]))
    got = _ort_outputs(pruned, BERT_INPUTS, bert_samples[0], tmp_path)
    np.testing.assert_allclose(got, pruned(*bert_samples[0]).detach().numpy(), rtol=1e-3, atol=1e-4)


def test_unstructured_and_two_four_modes_hit_their_sparsity(digits_model, digits):
    config = PruneConfig(mode="unstructured", budget_kind="params", budget=0.5, samples=16, batch_size=16,
                         grid_step=0.2, grid_max=0.8)
    pruned, report = prune_model(digits_model, CNN_INPUTS, digits[0], AVX2, config)
    zeros = sum(int((m.weight == 0).sum()) for m in pruned.modules() if isinstance(m, (torch.nn.Conv2d,
                                                                                          torch.nn.Linear)))
    assert zeros == sum(report.removed.values()) and report.cost <= report.budget
    with pytest.raises(ConfigError, match="2:4"):
        prune_model(digits_model, CNN_INPUTS, digits[0], AVX2, dataclasses.replace(config, mode="2:4"))
    config = dataclasses.replace(config, mode="2:4", budget=0.8)
    pruned, report = prune_model(digits_model, CNN_INPUTS, digits[0], load_builtin("nvidia-a100"), config)
    assert report.cost <= report.budget and report.removed
    for name in report.removed:
        weight = pruned.get_submodule(name.split(":", 2)[-1]).weight
        assert bool(((weight.movedim(1, -1).reshape(-1, 4) == 0).sum(1) == 2).all())


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.trace, for a graph-only model
def test_prune_pass_round_trips_and_runs_in_a_pipeline(digits_model, digits, tmp_path):
    from deploy.core.data import from_tensors

    config = PruneConfig(budget_kind="params", budget=0.7, samples=16, batch_size=16, grid_step=0.25,
                         grid_max=0.75)
    pass_ = make_pass("prune", config)
    assert config_from_dict(config_to_dict(pass_)).config == config
    assert config_from_dict(tomllib.loads(tomli_w.dumps(config_to_dict(pass_)))).config == config
    state = State(digits_model, CNN_INPUTS, for_profile(AVX2))
    ctx = Context(calibration=from_tensors(digits[0], digits[1].tolist()), cache_dir=tmp_path)
    state = run_pipeline([pass_], state, ctx)
    decision = next(r for r in state.records if r.kind == "decision")
    assert decision.data["cost"] <= decision.data["budget"] and state.module is not digits_model
    assert (tmp_path / "sensitivity").is_dir()
    with pytest.raises(ConfigError, match="Python module"):
        traced = torch.jit.trace(digits_model, digits[0][0])
        run_pipeline([pass_], State(traced, CNN_INPUTS, for_profile(AVX2)), ctx)
    with pytest.raises(ConfigError, match="latency budget"):
        prune_model(digits_model, CNN_INPUTS, digits[0], load_builtin("jetson-orin-nano"),
                    dataclasses.replace(config, budget_kind="latency"))
