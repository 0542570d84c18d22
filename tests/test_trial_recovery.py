"""Structures are compared after a short recovery where the plan will be recovered: before recovery heavy pruning
sits at chance whatever recovery makes of it, so the structure that scores higher before recovery is not the one
to keep. The wiring (depth mixes, the alternation, the final pick within the budget) on a fake planner; the trial
itself on the digits CNN."""
from __future__ import annotations

import dataclasses

import pytest

from deploy.compiler.candidate import Candidate
from deploy.compiler.plan import FILL, SAFE
from test_plan_search import FakePlanner


class FakeTrials:
    """After recovery, a dropped block is worth more than pruning before recovery says: (fidelity, SQNR)."""

    def __init__(self, recovered: dict[tuple[str, ...], float]):
        self.recovered = recovered
        self.asked: list[Candidate] = []
        self.compared: list[Candidate] = []

    def begin(self) -> None:
        """(Nothing to forget: each trial is final here.)"""

    def settle(self, planner, a: Candidate, b: Candidate, another: bool = False) -> None:
        """(Each trial is final here: no second round.)"""

    def promise(self, planner, cand: Candidate) -> tuple[float, float]:
        self.asked.append(cand)
        value = self.recovered.get(cand.blocks, 1.0 - 0.2 * cand.level)
        return round(value, 4), 0.0


class MixingPlanner(FakePlanner):
    """Two droppable blocks; a mix is this planner again with its candidates tagged by the blocks dropped. Before
    recovery every block dropped costs more than the pruning it saves (FakePlanner's fidelity minus 0.3 per block)."""

    def __init__(self, blocks: tuple[str, ...] = (), parent: "MixingPlanner | None" = None, allocation: str = "dp"):
        super().__init__()
        self.blocks, self.quantizes, self.parent, self.allocation = blocks, False, parent, allocation
        if parent is not None:
            self.candidates, self.trials, self.clock = parent.candidates, parent.trials, parent.clock

    def drop_order(self):
        return [("b0", 0.0), ("b1", 0.0)]

    def mix(self, blocks, allocation="dp"):
        return self if not blocks and allocation == "dp" else MixingPlanner(tuple(blocks), self, allocation)

    def evaluate(self, level, labels, origin, fidelity=False):
        cand = super().evaluate(level, labels, origin)
        cand.blocks, cand.allocation = self.blocks, self.allocation
        return cand

    def with_fidelity(self, cand):
        if cand.fidelity is None:
            super().with_fidelity(cand)
            cand.fidelity -= 0.3 * len(cand.blocks)
        return cand


def _mixes(monkeypatch, trials):
    import deploy.compiler.plan as ps

    planner = MixingPlanner()
    planner.trials = trials
    width = planner.evaluate(0.8, None, "width pruning")  # 3.6 ms, 0.6 before recovery

    def levels(mix, budget, window, dense):  # each block dropped spares 0.3 of pruning level
        return mix.evaluate(max(0.0, 0.8 - 0.3 * len(mix.blocks)), None, "mix level")

    monkeypatch.setattr(ps, "_levels_for_latency", levels)
    budget = 4.0
    mixed = ps._depth_mixes(planner, budget, (FILL * budget, SAFE * budget), None)
    return planner, width, ps.most_promising(planner, [width] + ([mixed] if mixed else []))


def test_depth_mixes_are_compared_after_recovery(monkeypatch):
    planner, width, chosen = _mixes(monkeypatch, FakeTrials({("b0",): 0.9, ("b0", "b1"): 0.95}))
    assert chosen.blocks == ("b0", "b1")  # the most faithful after recovery, not before it
    assert planner.with_fidelity(chosen).fidelity < planner.with_fidelity(width).fidelity  # (before recovery)


@pytest.mark.parametrize("uniform_wins", [True, False])
def test_the_best_depth_mix_is_weighed_with_its_width_pruning_allocated_uniformly(monkeypatch, uniform_wins):
    class ByAllocation(FakeTrials):
        def promise(self, planner_, cand):
            self.asked.append(cand)
            value = super().promise(planner_, cand)[0]
            return value + (0.02 if (cand.allocation == "uniform") == uniform_wins else 0.0), 0.0

    trials = ByAllocation({("b0",): 0.9, ("b0", "b1"): 0.8})
    planner, width, chosen = _mixes(monkeypatch, trials)
    assert chosen.blocks == ("b0",) and chosen.level > 0  # the best mix still needs width pruning
    assert (chosen.allocation == "uniform") == uniform_wins
    tried = [c for c in trials.asked if c.allocation == "uniform"]
    assert tried and {c.blocks for c in tried} == {("b0",)}  # only the best mix is tried uniformly


def test_without_recovery_fidelity_before_it_decides(monkeypatch):
    planner, width, chosen = _mixes(monkeypatch, None)
    assert chosen is width  # before recovery, and so without it, width pruning is the more faithful


@pytest.mark.parametrize("deeper_wins", [True, False])
def test_the_alternation_compares_its_two_plans_after_recovery(monkeypatch, deeper_wins):
    import deploy.compiler.plan as ps

    planner = FakePlanner(prune_cost=0.5, int8_cost=0.01)  # before recovery the shallower plan always wins
    pruned = planner.evaluate(0.3, {"a": "int8", "b": "int8"}, "level")
    most = planner.evaluate(1.0, {"a": "int8", "b": "int8"}, "most")
    monkeypatch.setattr(ps, "_precision_at",
                        lambda p, cand, w: p.evaluate(cand.level, {"a": "int8", "b": "fp32"}, "filled"))

    class Recovered(FakeTrials):
        def promise(self, planner_, cand):
            return (0.99 if (cand.level > 0.3) == deeper_wins else 0.9), 0.0

    planner.trials = Recovered({})
    chosen = ps._alternate(planner, pruned, pruned, most, pruned.labels, (FILL * 7.5, SAFE * 7.5))
    assert (chosen.level > pruned.level) == deeper_wins


def test_the_final_pick_stays_within_the_structure_chosen():
    """Within the budget only the chosen structure's precision variants compete with it, ranked after its trial;
    a less pruned structure that scores higher before recovery was already weighed against it."""
    from deploy.compiler.plan import most_faithful

    planner = FakePlanner(prune_cost=0.5, int8_cost=0.05)
    shallower = planner.evaluate(0.3, None, "pruning level")  # 0.85 before recovery
    chosen = planner.evaluate(0.5, {"a": "int8", "b": "int8"}, "filled")  # 0.65
    variant = planner.evaluate(0.5, {"a": "int8", "b": "fp32"}, "filled again")  # 0.70
    for cand in (shallower, chosen, variant):
        cand.removed = {"units": int(10 * cand.level)}  # pruned: each will be recovered

    class ByPrecision(FakeTrials):
        def promise(self, planner_, cand):
            self.asked.append(cand)
            return round(planner_.with_fidelity(cand).fidelity + 0.2, 4), 0.0

    planner.trials = ByPrecision({})
    assert most_faithful(planner, chosen, limit=100.0) is variant
    assert shallower not in planner.trials.asked and shallower.fidelity is None  # not compared: not scored
    planner.trials = None  # no recovery: every candidate in the budget competes on its own fidelity
    assert most_faithful(planner, chosen, limit=100.0) is shallower


def test_a_trial_recovers_each_structure_once(tmp_path, monkeypatch):
    """The trial distils the structure, exports it with the candidate's precisions calibrated on the recovered
    weights and scores it on the validation split; a precision variant of the same structure reuses the recovered
    model (one distillation, one calibration)."""
    import deploy.compress.distill as distill_module
    import deploy.compress.families as families
    from deploy.compiler.candidates import Planner
    from deploy.compiler.job import CompressRequest, _setup
    from deploy.compiler.trial_recovery import Trials, needs_recovery

    request = CompressRequest(example=True, target="cpu", recover_steps=40, recover_minutes=0.5, threads=1,
                              out=str(tmp_path / "out"))
    setup = _setup(request, tmp_path / "work")
    planner = Planner(request, setup)
    planner.trials = trials = Trials(request, setup)
    calls = {"distill": 0, "calibrated": 0}
    for name, module in (("distill", distill_module), ("calibrated", families)):
        original = getattr(module, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)
    spaces = planner.mix(("layer1",)).calibrated(0.0).spaces
    int8 = {n: next(o for o in opts if not o.is_float).label for n, opts in spaces.items()}
    calls["calibrated"] = 0
    floats = Candidate("fp32", 0.0, {}, 1.0, None, 1.0, None, blocks=("layer1",))
    quantized = Candidate("int8", 0.0, {}, 1.0, None, 1.0, int8, blocks=("layer1",))
    dense = Candidate("fp32", 0.0, {}, 1.0, None, 1.0, None)
    assert needs_recovery(floats) and not needs_recovery(dense)
    for cand in (floats, quantized):
        fidelity, _ = trials.promise(planner, cand)
        assert round(cand.trial["fidelity"], 4) == fidelity and 0.0 <= fidelity <= 1.0
        assert cand.trial["float_after"] >= cand.trial["float_before"]  # the best weights seen are kept
        assert cand.trial["steps"] == 6  # 15% of the 40 recovery steps asked
    assert calls == {"distill": 1, "calibrated": 1}
    dense.fidelity = 0.5
    assert trials.promise(planner, dense)[0] == 0.5 and dense.trial is None  # nothing to recover: its own score


def test_two_allocations_that_remove_the_same_units_share_one_trial(tmp_path, monkeypatch):
    """A trial is keyed by what recovery acts on (blocks dropped, units removed, ranks), not by the allocation and
    level that removed the units: the DP's and the uniform allocation's deepest plans are one model, distilled
    once and compared as one structure."""
    import deploy.compress.distill as distill_module
    from deploy.compiler.candidates import Planner
    from deploy.compiler.job import CompressRequest, _setup
    from deploy.compiler.trial_recovery import Trials, structure

    request = CompressRequest(example=True, target="cpu", recover_steps=40, recover_minutes=0.5, threads=1,
                              out=str(tmp_path / "out"))
    setup = _setup(request, tmp_path / "work")
    planner = Planner(request, setup)
    planner.trials = trials = Trials(request, setup)
    runs: list[int] = []
    original = distill_module.distill
    monkeypatch.setattr(distill_module, "distill", lambda *a, **k: runs.append(1) or original(*a, **k))
    uniform = planner.mix((), "uniform")
    dp = Candidate("fp32", 1.0, planner.removed(1.0), 1.0, None, 1.0, None)
    flat = Candidate("fp32", 1.0, {**uniform.removed(1.0), "nothing": 0}, 1.0, None, 1.0, None,
                     allocation="uniform")
    shallower = Candidate("fp32", 0.5, uniform.removed(0.5), 1.0, None, 1.0, None, allocation="uniform")
    assert structure(dp) == structure(flat) != structure(shallower)
    assert trials.promise(planner, dp) == trials.promise(planner, flat)
    assert len(runs) == 1 and trials.rounds(flat) == trials.rounds(dp) == 1


def test_the_two_structures_at_the_top_get_another_round_where_close_before_the_choice(tmp_path, monkeypatch):
    """Structures are compared on their first rounds as the search meets them; at the end the best and the
    runner-up recover for another round from where they stopped (its own steps, the earlier round's score kept for
    the report) where they came out close, and the third does not; trials that are far apart, or have had ROUNDS
    rounds, are compared as they are; a structure met after that catches up to the rounds of the one it meets."""
    import deploy.compiler.trial_recovery as trial_recovery
    from deploy.compiler.candidates import Planner
    from deploy.compiler.job import CompressRequest, _setup

    request = CompressRequest(example=True, target="cpu", recover_steps=40, recover_minutes=0.5, threads=1,
                              out=str(tmp_path / "out"))
    setup = _setup(request, tmp_path / "work")
    planner = Planner(request, setup)
    planner.trials = trials = trial_recovery.Trials(request, setup)
    a = Candidate("fp32", 0.0, {}, 1.0, None, 1.0, None, blocks=(planner.drop_order()[0][0],))
    b, c, d = (Candidate("fp32", level, planner.removed(level), 1.0, None, 1.0, None) for level in (0.5, 0.7, 0.3))
    monkeypatch.setattr(trial_recovery, "CLOSE", 1e9)  # every two trials are close
    trial_recovery.more_promising(planner, a, b)
    trial_recovery.more_promising(planner, c, a)
    assert [x.trial["round"] for x in (a, b, c)] == [1, 1, 1] and a.trial["steps"] == 6  # no round 2 on the way
    first = {id(x): x.trial["fidelity"] for x in (a, b, c)}
    top = sorted((a, b, c), key=lambda x: trial_recovery.promise(planner, x), reverse=True)
    answer = trial_recovery.most_promising(planner, [a, b, c])
    assert [x.trial["round"] for x in top] == [2, 2, 1]  # the best and the runner-up only
    assert [x.trial["earlier"] for x in top[:2]] == [[first[id(x)]] for x in top[:2]] and a.trial["steps"] == 6
    assert answer is max(top[:2], key=lambda x: trial_recovery.promise(planner, x))
    assert trial_recovery.most_promising(planner, [a, b, c]) is answer  # ROUNDS reached: compared as they are
    assert all(len(x.trial.get("earlier", [])) <= 1 for x in (a, b, c))
    trials.begin()  # another budget's search: what was compared before is not its runner-up
    monkeypatch.setattr(trial_recovery, "CLOSE", 0.0)  # no two trials are close
    trial_recovery.more_promising(planner, d, top[0])  # met against a two-round structure: caught up
    assert d.trial["round"] == 2 and "earlier" not in d.trial  # (its first round was never scored)
    trial_recovery.most_promising(planner, [d])
    assert trials.compared == [d, top[0]] and top[0].trial["round"] == 2 and d.trial["round"] == 2


def test_trials_bound_by_minutes_time_their_steps_once(tmp_path, monkeypatch):
    """The first trial that its minutes stop times its training steps; every later trial and round runs as many
    steps per round without timing them again."""
    import deploy.compiler.trial_recovery as trial_recovery
    import deploy.compress.distill as distill_module
    import deploy.compress.families as families
    from deploy.compiler.candidates import Planner
    from deploy.compiler.job import CompressRequest, _setup

    request = CompressRequest(example=True, target="cpu", recover_minutes=0.1, threads=1, out=str(tmp_path / "out"))
    setup = _setup(request, tmp_path / "work")
    planner = Planner(request, setup)
    planner.trials = trials = trial_recovery.Trials(request, setup)
    timed: list[float] = []
    original = distill_module._steps_allowed
    monkeypatch.setattr(distill_module, "_steps_allowed", lambda t, s: timed.append(s) or original(t, s))
    asked: list[int | None] = []  # each run's steps (None: as many as its minutes allow)
    run = families.recover
    monkeypatch.setattr(families, "recover", lambda *args: asked.append(args[-1].steps) or run(*args))
    a = Candidate("fp32", 0.0, {}, 1.0, None, 1.0, None, blocks=(planner.drop_order()[0][0],))
    b = Candidate("fp32", 0.5, planner.removed(0.5), 1.0, None, 1.0, None)
    for cand in (a, b):
        trials.promise(planner, cand)
    trials._another_round(planner, a)
    trials.promise(planner, a)
    assert len(timed) == 1 and trials.steps is not None and trials.steps > 1  # the first trial alone was timed
    assert a.trial["round"] == 2 and asked == [None, trials.steps, trials.steps]  # the rest: the first's steps
    assert b.trial["steps"] <= trials.steps  # (or fewer, stopped early)


@pytest.mark.parametrize("uniform_wins", [True, False])
def test_the_uniform_allocation_is_kept_where_it_recovers_further(monkeypatch, uniform_wins):
    """The DP's cuts follow each unit's distortion measured alone before recovery; one ratio for every unit is
    weighed beside it (its own level for the budget, then the precision fill) and kept only where its trial is
    better."""
    import deploy.compiler.plan as ps

    class Allocating(MixingPlanner):
        def __init__(self, allocation="dp", parent=None):
            super().__init__((), parent)
            self.allocation = allocation

        def mix(self, blocks, allocation="dp"):
            assert not blocks
            return self if allocation == "dp" else Allocating(allocation, self)

        def owner(self, cand):
            return self.mix(cand.blocks, cand.allocation)

        def evaluate(self, level, labels, origin, fidelity=False):
            cand = super().evaluate(level, labels, origin)
            cand.allocation = self.allocation
            return cand

    class ByAllocation(FakeTrials):
        def promise(self, planner_, cand):
            self.asked.append(cand)
            filled = 0.01 if cand.labels else 0.0  # the fill spends the budget on fidelity
            return (0.9 if (cand.allocation == "uniform") == uniform_wins else 0.7) + filled, 0.0

    planner = Allocating()
    planner.quantizes = True
    planner.trials = ByAllocation({})
    dp = planner.evaluate(0.6, None, "pruning level")
    searched: list[str] = []

    def levels(sub, budget, window, dense):
        searched.append(sub.allocation)
        return sub.evaluate(0.7, None, "pruning level")

    monkeypatch.setattr(ps, "_levels_for_latency", levels)
    filled: list[str] = []
    monkeypatch.setattr(ps, "_precision_at", lambda p, cand, w: filled.append(cand.allocation))
    chosen = ps._uniform_allocation(planner, 5.0, (FILL * 5.0, SAFE * 5.0), None, dp)
    assert searched == ["uniform"]
    assert (chosen.allocation == "uniform") == uniform_wins
    assert filled == []  # the structures are compared at their fastest precisions: the fill follows the choice


def test_the_uniform_allocation_shares_the_problem_and_the_dense_model(tmp_path):
    """The uniform family is a view of the DP's problem (one set of units, rankings and curves): each unit is cut
    at the level's share of the grid's largest ratio (graded between its legal options), level 1 is the same model for both (built once), and the
    dense model's calibration is the root planner's."""
    from deploy.compiler.candidates import Planner
    from deploy.compiler.job import CompressRequest, _setup

    request = CompressRequest(example=True, target="cpu", recover_steps=40, threads=1, out=str(tmp_path / "out"))
    setup = _setup(request, tmp_path / "work")
    planner = Planner(request, setup)
    uniform = planner.mix((), "uniform")
    assert uniform is planner.mix((), "uniform") and uniform.mix(()) is planner
    dp, flat = planner.family(), uniform.family()
    assert flat.problem is dp.problem and flat.allocation == "uniform" and dp.allocation == "dp"
    grid_max = max(dp.problem.config.grid)
    for level in (0.3, 0.6):
        removed = flat.removed(level)
        for unit in dp.problem.units:
            got, want = removed.get(unit.name, 0), level * grid_max * unit.size
            around = (max(o for o in unit.options if o <= want), min((o for o in unit.options if o >= want),
                                                                      default=max(unit.options)))
            assert got in around  # every unit at the same ratio, rounded to either legal option around it
    assert flat.removed(1.0) == dp.removed(1.0) == dp.problem.max_plan()
    assert uniform.module(1.0) is planner.module(1.0)  # the same model: built once
    assert flat.removed(0.0) == {} and uniform.module(0.0) is planner.module(0.0)
    assert uniform.calibrated(0.0) is planner.calibrated(0.0)  # one calibration of the dense model


def test_the_search_rounds_to_nearest_and_the_plan_applied_rounds_by_gptq(tmp_path):
    """GPTQ is most of a plan search's calibration time and latency does not depend on it: every calibration the
    search makes (a level timed, a level priced, a trial's recovered weights) rounds int8 weights to nearest; the
    quantize pass of the plan applied calibrates afresh, GPTQ on, instead of reusing the search's."""
    from deploy.compiler.candidates import Planner
    from deploy.compiler.quant_settings import quant_config
    from deploy.compiler.job import CompressRequest, _setup
    from deploy.compiler.to_passes import plan_passes
    from deploy.core.passes import Context, State

    request = CompressRequest(example=True, target="cpu", precisions=("fp32", "int8"), threads=1,
                              out=str(tmp_path / "out"))
    setup = _setup(request, tmp_path / "work")
    planner = Planner(request, setup)
    assert quant_config(request, setup).calibration.gptq and not quant_config(request, setup, True).calibration.gptq
    prep = planner.calibrated(0.0)
    labels = {n: next(o for o in opts if not o.is_float).label for n, opts in prep.spaces.items()}
    assert not prep.plan.rounded and not planner.quant(0.25).prep.plan.rounded
    decisions = {"budget": {}, "level": 0.0, "quantize": {"labels": labels}}
    assert planner.prebuilt(decisions) == {}
    quantize = next(p for p in plan_passes(decisions, request, setup) if p.name == "quantize")
    state = State(planner.module(0.0), list(setup.loaded.inputs), setup.target)
    state = quantize.run(state, Context(calibration=setup.calibration, prebuilt=planner.prebuilt(decisions)))
    rounded = state.attached["quant_plan"].rounded
    assert rounded and set(rounded) <= set(labels)
    assert all(state.attached["quant_plan"].layers[n].option.label in per for n, per in rounded.items())


def test_a_pruned_level_a_latency_search_times_is_calibrated_lightly_into_the_same_graph(tmp_path):
    """A pruned level that a latency budget's search times, in a plan that will be recovered, is judged after its
    trial recovery (calibrated afresh there): its own calibration only has to give the graph that is timed, so it
    takes min-max ranges from few samples, and the exported graph is the one a full calibration gives. The dense
    model and a fidelity floor's levels (judged on their own fidelity) keep the full calibration."""
    import onnx

    from deploy.compiler.budget import Budget
    from deploy.compiler.candidate_files import export_candidate
    from deploy.compiler.candidates import Planner
    from deploy.compiler.job import CompressRequest, _setup
    from deploy.compiler.quant_settings import quant_config
    from deploy.compiler.trial_recovery import Trials
    from deploy.compress.families import calibrated

    def methods(prep):
        return {m for report in prep.calibration.values() for m in report["errors"]}

    request = CompressRequest(example=True, target="cpu", precisions=("fp32", "int8"), threads=1,
                              budget=Budget("speedup", 2.0), out=str(tmp_path / "out"))
    setup = _setup(request, tmp_path / "work")
    planner = Planner(request, setup)
    planner.trials = Trials(request, setup)
    light, dense = planner.calibrated(0.5), planner.calibrated(0.0)
    assert methods(light) == {"minmax"} and len(methods(dense)) > 1
    full = calibrated(planner.module(0.5), setup.loaded.inputs, setup.calibration, setup.target,
                      quant_config(request, setup, search=True))
    labels = {n: next(o for o in opts if not o.is_float).label for n, opts in light.spaces.items()}
    graphs = []
    for name, prep in (("light", light), ("full", full)):
        export_candidate(planner.module(0.5), setup, labels, prep, tmp_path / f"{name}.onnx")
        graphs.append([(n.op_type, list(n.input)) for n in onnx.load(str(tmp_path / f"{name}.onnx")).graph.node])
    assert graphs[0] == graphs[1]  # the same nodes, wired the same: what is timed does not change
    floor = Planner(dataclasses.replace(request, budget=Budget("max_drop", 0.01)), setup)
    floor.trials = Trials(request, setup)
    assert len(methods(floor.calibrated(0.5))) > 1


def test_a_depth_mix_times_the_dense_models_fastest_precisions_on_the_layers_it_keeps(tmp_path, monkeypatch):
    """A depth mix's unpruned model is timed once, at the precisions the dense model measured fastest (layer names
    survive a dropped block), calibrated lightly: no precision problem of its own (calibration, sensitivities,
    prices) and no three picks of its own to export and time."""
    import deploy.compress.families as families
    from deploy.compiler.budget import Budget
    from deploy.compiler.candidates import Planner
    from deploy.compiler.job import CompressRequest, _setup
    from deploy.compiler.trial_recovery import Trials

    request = CompressRequest(example=True, target="cpu", precisions=("fp32", "int8"), threads=1,
                              budget=Budget("speedup", 2.0), out=str(tmp_path / "out"))
    setup = _setup(request, tmp_path / "work")
    planner = Planner(request, setup)
    planner.trials = Trials(request, setup)
    planner.time_against_dense()
    planner.dense = planner.evaluate(0.0, None, "dense fp32")
    dense = planner.fastest()
    problems: list[object] = []
    original = families.precision_problem
    monkeypatch.setattr(families, "precision_problem", lambda *a, **k: problems.append(a[0]) or original(*a, **k))
    mix = planner.mix((planner.drop_order()[0][0],))
    before = len(planner.candidates)
    timed = mix.fastest_measured()
    assert len(timed) == 1 and len(planner.candidates) == before + 1 and problems == []
    kept = mix.calibrated(0.0).spaces
    assert timed[0].labels == {name: dense[name] for name in kept} and set(kept) < set(dense)
    assert {m for report in mix.calibrated(0.0).calibration.values() for m in report["errors"]} == {"minmax"}
    assert mix.fastest() == timed[0].labels and timed[0].blocks == mix.blocks


def _structures(monkeypatch):
    """A quantizing planner whose structures (the DP's level, the uniform allocation, two depth mixes) are found
    at the fastest precisions, and the record of which get the precision fill and the alternation."""
    from types import SimpleNamespace

    import deploy.compiler.plan as ps

    class Quantizing(MixingPlanner):
        def __init__(self, blocks=(), parent=None, allocation="dp"):
            super().__init__(blocks, parent, allocation)
            self.quantizes, self.request = True, SimpleNamespace(precisions=("fp32", "int8"))

        def mix(self, blocks, allocation="dp"):
            return self if not blocks and allocation == "dp" else Quantizing(tuple(blocks), self, allocation)

        def owner(self, cand):
            return self.mix(cand.blocks, cand.allocation)

        def fastest_measured(self, level=0.0):  # the dense model's int8 plan, never near the budget: no edge search
            return [Candidate("int8", 0.0, {}, 1e9, None, 1.0, fastest)]

    fastest = {"a": "int8", "b": "int8"}

    def levels(sub, budget, window, dense):  # the most pruning, then the level found at the fastest precisions
        sub.evaluate(1.0, fastest, "most pruning")
        return sub.evaluate(max(0.1, 0.6 - 0.3 * len(sub.blocks)), fastest, "pruning level")

    filled: list[Candidate] = []
    alternated: list[tuple[Candidate, Candidate]] = []

    def precision_at(owner, cand, window):
        filled.append(cand)
        return owner.evaluate(cand.level, {"a": "int8", "b": "fp32"}, "filled")

    def alternate(owner, first, pruned, most, labels, window):
        alternated.append((pruned, most))
        return first

    monkeypatch.setattr(ps, "_levels_for_latency", levels)
    monkeypatch.setattr(ps, "_precision_at", precision_at)
    monkeypatch.setattr(ps, "_alternate", alternate)
    planner = Quantizing()
    planner.trials = FakeTrials({("b0",): 0.95, ("b0", "b1"): 0.9})
    return planner, filled, alternated


def test_only_the_structure_chosen_gets_the_precision_fill_and_the_alternation(monkeypatch):
    """The structures (the DP's pruning level, the uniform allocation, the depth mixes) are compared at their
    fastest precisions; the precision fill and the alternation each cost a precision problem of a pruned model, so
    only the winner gets them."""
    import deploy.compiler.plan as ps

    planner, filled, alternated = _structures(monkeypatch)
    chosen = ps.meet_latency(planner, 5.0, planner.evaluate(0.0, None, "dense"))
    fastest = {"a": "int8", "b": "int8"}
    compared = {(c.blocks, c.allocation) for c in planner.candidates if c.origin == "pruning level"}
    assert {(), ("b0",)} <= {blocks for blocks, _ in compared} and ((), "uniform") in compared  # all weighed
    assert len(filled) == 1 and filled[0].blocks == ("b0",)  # the winner only
    pruned, most = alternated[0]
    assert len(alternated) == 1 and pruned is filled[0]
    assert most.level == 1.0 and most.blocks == ("b0",) and most.labels == fastest  # its own most pruning
    assert chosen.origin == "filled" and chosen.blocks == ("b0",)


@pytest.mark.parametrize("deep", [True, False])
def test_past_the_search_minutes_the_first_plan_that_fits_is_kept_and_what_was_skipped_is_said(monkeypatch, deep):
    """The steps that find a plan inside the budget run; past the limit nothing more is tried (other allocations,
    depth mixes, the fill, the alternation), and the skipped steps are named for the report and the warning. Where
    the budget's pruning level is DEEP or more, the depth mixes come before the uniform allocation (a limit stops
    what is least likely to win)."""
    import deploy.compiler.plan as ps
    from deploy.compiler.search_clock import SearchClock

    planner, filled, alternated = _structures(monkeypatch)
    monkeypatch.setattr(ps, "DEEP", 0.6 if deep else 0.61)  # the DP's level for the budget is 0.6 here
    planner.clock = SearchClock(0.0)  # out of time as soon as it starts
    chosen = ps.meet_latency(planner, 5.0, planner.evaluate(0.0, None, "dense"))
    assert chosen.origin == "pruning level" and chosen.blocks == () and chosen.allocation == "dp"
    assert {(c.blocks, c.allocation) for c in planner.candidates if c.level > 0} == {((), "dp")}  # nothing else
    assert filled == [] and alternated == []
    first, second = "the uniform allocation", "depth mixes of 1 or more blocks dropped"
    fill = "the precision fill of the pruned model"
    assert planner.clock.skipped == ([second, first, fill] if deep else [first, second, fill])
    assert "--search-minutes" in planner.clock.warning() and "depth mixes" in planner.clock.warning()
    assert SearchClock(None).out_of_time("anything") is False and SearchClock(None).warning() is None


def test_past_the_search_minutes_the_report_does_not_score_every_candidate(tmp_path):
    """Scoring every candidate measured is for the report's plot alone (the choice scored what it compared): past
    the limit it is skipped, and said, as the search's other skipped steps are."""
    from deploy.compiler.candidates import Planner
    from deploy.compiler.job import CompressRequest, _setup
    from deploy.compiler.search_clock import SearchClock

    request = CompressRequest(example=True, target="cpu", threads=1, out=str(tmp_path / "out"))
    planner = Planner(request, _setup(request, tmp_path / "work"))
    planner.clock = SearchClock(0.0)
    planner.score_all()  # nothing measured: nothing skipped
    assert planner.clock.skipped == []
    planner.candidates.append(Candidate("fp32", 0.0, {}, 1.0, None, 1.0, None))
    planner.score_all()
    assert planner.candidates[0].fidelity is None
    assert planner.clock.skipped == ["the validation score of every candidate (report)"]
    assert "every candidate (report)" in planner.clock.warning()


def test_a_timed_level_smooths_every_tensor_it_may_at_one_alpha(tmp_path):
    """Choosing SmoothQuant's alpha per tensor is two thirds of a timed level's calibration and does not move its
    latency: a level the search only times smooths every tensor it may at one alpha, so its graph has a SmoothQuant
    Mul wherever the full calibration may put one (never fewer: what is timed is not faster than what is applied)."""
    from types import SimpleNamespace

    import onnx

    from deploy.compiler.quant_settings import quant_config
    from deploy.compress.families import calibrated, export_labelled
    from deploy.core.data import from_tensors
    from deploy.core.spec import InputSpec
    from deploy.examples.tiny_bert import example_inputs, tiny_bert
    from deploy.targets.target import resolve

    model = tiny_bert().eval()
    calibration = from_tensors([example_inputs(seed=i) for i in range(24)])
    inputs = [InputSpec("input_ids", (1, 16), "int64"), InputSpec("attention_mask", (1, 16), "int64")]
    target = resolve("cpu-openvino", threads=1)
    request, setup = SimpleNamespace(precisions=("fp32", "int8")), SimpleNamespace(target=target)
    muls = []
    for timing in (True, False):
        prep = calibrated(model, inputs, calibration, target, quant_config(request, setup, True, timing))
        chosen = [r["smooth_alpha"] for r in prep.calibration.values() if "smooth_alpha" in r]
        assert bool(chosen) != timing  # the alphas are chosen per tensor only where the calibration is full
        labels = {n: next(o for o in opts if not o.is_float).label for n, opts in prep.spaces.items()}
        export_labelled(prep, model, inputs, labels, tmp_path / f"{timing}.onnx")
        muls.append({n.output[0] for n in onnx.load(str(tmp_path / f"{timing}.onnx")).graph.node
                     if n.name.endswith("SmoothQuant/Mul")})
    timed, full = muls
    assert timed and full <= timed


def test_a_depth_mix_that_would_end_past_the_search_minutes_is_not_started(monkeypatch):
    """Under a limit, a step (here a depth mix, then the uniform allocation of the best one) is started only where
    it would end inside the limit if it took as long as the last structure weighed: the search stops near its
    limit, not one whole step past it."""
    from types import SimpleNamespace

    import deploy.compiler.plan as ps
    import deploy.compiler.search_clock as search_clock
    from deploy.compiler.search_clock import SearchClock

    now = [1000.0]
    monkeypatch.setattr(search_clock, "time", SimpleNamespace(monotonic=lambda: now[0]))
    planner = MixingPlanner()
    planner.trials = FakeTrials({})
    planner.clock = SearchClock(70 / 60)  # a mix takes 40 s: the second would end at 80 s

    def levels(mix, budget, window, dense):
        now[0] += 40.0
        return mix.evaluate(max(0.0, 0.8 - 0.3 * len(mix.blocks)), None, "mix level")

    monkeypatch.setattr(ps, "_levels_for_latency", levels)
    mixed = ps._depth_mixes(planner, 4.0, (FILL * 4.0, SAFE * 4.0), None)
    assert mixed.blocks == ("b0",) and now[0] == 1040.0  # one mix run, inside the limit
    assert planner.clock.skipped == ["depth mixes of 2 or more blocks dropped",
                                     "the best depth mix allocated uniformly"]


@pytest.mark.parametrize("bf16", [True, False])
def test_trials_and_the_plans_recovery_train_in_bf16_as_the_request_says(tmp_path, bf16):
    """The request says whether recovery's passes run in bf16 (by default: where this CPU runs bf16 in hardware);
    the trials and the plan's recover pass follow it, and the plan records it, so a replay trains as the run did."""
    from deploy.compiler.job import CompressRequest, _setup
    from deploy.compiler.to_passes import plan_passes, summary_of
    from deploy.compiler.trial_recovery import Trials

    request = CompressRequest(example=True, target="cpu", recover_bf16=bf16, threads=1, out=str(tmp_path / "out"))
    setup = _setup(request, tmp_path / "work")
    assert Trials(request, setup).config().bf16 is bf16 and Trials(request, setup).config(rounds=2).bf16 is bf16
    decisions = {"budget": {}, "level": 0.5, "prune": {"removed": {"layer1.0.conv1": 8}},
                 "recover": {"steps": None, "minutes": 0.5, "seed": 0, "bf16": bf16}}
    passes = plan_passes(decisions, request, setup)
    recover = next(p for p in passes if p.name == "recover")
    assert recover.config.bf16 is bf16 and summary_of(passes)["recover"]["bf16"] is bf16
