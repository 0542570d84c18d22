"""The closed-loop plan search on synthetic latency curves: the pruning level found by regula falsi lands in the
budget window, the precision allocator's estimate is steered onto measured latency, and the alternation keeps
the more faithful plan. No model is built: the planner is a stand-in with a known latency and fidelity."""
from __future__ import annotations

import pytest

from deploy.compiler.plan import FILL, SAFE, Candidate, _alternate, _level_for_latency
from deploy.compiler.precision_fill import estimate_for
from deploy.compiler.search_clock import SearchClock


class FakePlanner:
    """latency(level) = dense x (1 - 0.8 level), minus a little per int8 layer; fidelity falls with pruning."""

    def __init__(self, dense_ms: float = 10.0, prune_cost: float = 0.5, int8_cost: float = 0.01, steps: int = 0):
        self.dense_ms, self.prune_cost, self.int8_cost, self.steps = dense_ms, prune_cost, int8_cost, steps
        self.blocks, self.allocation = (), "dp"
        self.candidates: list[Candidate] = []
        self.trials = None  # no recovery: candidates compare on their own fidelity
        self.clock = SearchClock()  # no time limit on the search

    def removed(self, level: float) -> dict[str, int]:
        """`steps` > 0: the family's plans change in that many steps of the level (one unit each), else every
        level is a plan of its own."""
        return {"unit": round(level * self.steps)} if self.steps else {"level": level}

    def latency(self, level: float, labels: dict[str, str] | None) -> float:
        int8 = sum(v == "int8" for v in (labels or {}).values())
        share = round(level * self.steps) / self.steps if self.steps else level
        return self.dense_ms * (1 - 0.8 * share) * (1 - 0.05 * int8)

    def evaluate(self, level: float, labels: dict[str, str] | None, origin: str, fidelity: bool = False
                 ) -> Candidate:
        cand = Candidate("mixed" if labels else "fp32", round(level, 4), self.removed(level),
                         self.latency(level, labels), None, 1.0, labels, origin=origin)
        self.candidates.append(cand)
        return cand

    def lowrank_family(self) -> None:  # nothing to factorize here: the pruning and precision levels alone
        return None

    def drop_order(self) -> list[tuple[str, float]]:  # no blocks to drop (depth mixes: test_depth)
        return []

    def mix(self, blocks: tuple[str, ...], allocation: str = "dp") -> "FakePlanner":
        assert not blocks and allocation == "dp"  # a re-plan stays with the structure chosen
        return self

    def problems(self) -> dict:
        return {}

    def layer_prices(self, cand: Candidate) -> dict[str, float]:
        return {name: -0.05 * self.dense_ms for name, label in (cand.labels or {}).items() if label == "int8"}

    def score_all(self, limited: bool = True) -> None:  # (no time limit here)
        for cand in self.candidates:
            if cand.fidelity is None:
                self.with_fidelity(cand)

    def with_fidelity(self, cand: Candidate) -> Candidate:
        if cand.fidelity is None:  # as the planner: a candidate is scored once
            int8 = sum(v == "int8" for v in (cand.labels or {}).values())
            cand.fidelity = 1.0 - self.prune_cost * cand.level - self.int8_cost * int8
        return cand


@pytest.mark.parametrize("budget", [3.0, 5.0, 7.5])
def test_pruning_level_lands_in_the_budget_window(budget):
    planner = FakePlanner()
    window = (FILL * budget, SAFE * budget)
    low, high = planner.evaluate(0.0, None, "dense"), planner.evaluate(1.0, None, "most")
    found = _level_for_latency(planner, None, window, low, high)
    assert window[0] <= found.latency_ms <= window[1]
    assert len(planner.candidates) <= 2 + 3  # regula falsi on a straight line needs one or two steps


def test_the_level_search_times_each_plan_once():
    """The family's plans change in steps (a handful of units): levels that give a plan already measured reuse its
    measurement, so each plan is exported and timed once, and the search still ends on the least pruning that fits."""
    planner = FakePlanner(steps=4)  # 10, 8, 6, 4 and 2 ms: a window of [4.25, 4.75] ms holds none of them
    window = (FILL * 5.0, SAFE * 5.0)
    low, high = planner.evaluate(0.0, None, "dense"), planner.evaluate(1.0, None, "most")
    found = _level_for_latency(planner, None, window, low, high)
    plans = [tuple(c.removed.items()) for c in planner.candidates]
    assert len(plans) == len(set(plans)) and len(plans) < 2 + 6  # fewer than the search's 6 steps were timed
    assert found.removed == {"unit": 3} and found.latency_ms == pytest.approx(4.0)  # the least pruning that fits


def test_estimate_is_steered_by_measured_points():
    # the estimate says 8 ms where 10 ms was measured, 4 ms where 6 ms was: linear between them
    points = [(8.0, 10.0), (4.0, 6.0)]
    assert estimate_for(8.0, points) == pytest.approx(6.0)
    assert estimate_for(5.0, [(4.0, 8.0)]) == pytest.approx(2.5)  # one point: proportional


@pytest.mark.parametrize("prune_cost, int8_cost, deeper_wins", [(0.5, 0.01, False), (0.01, 0.05, True)])
def test_alternation_keeps_the_more_faithful_plan(monkeypatch, prune_cost, int8_cost, deeper_wins):
    import deploy.compiler.plan as ps

    planner = FakePlanner(prune_cost=prune_cost, int8_cost=int8_cost)
    window = (FILL * 7.5, SAFE * 7.5)
    pruned = planner.evaluate(0.3, {"a": "int8", "b": "int8"}, "level")
    most = planner.evaluate(1.0, {"a": "int8", "b": "int8"}, "most")
    first = pruned

    def precision_at(planner_, cand, window_):  # gives the latency freed back: one layer to float
        return planner_.evaluate(cand.level, {"a": "int8", "b": "fp32"}, "filled")

    monkeypatch.setattr(ps, "_precision_at", precision_at)
    chosen = _alternate(planner, first, pruned, most, pruned.labels, window)
    origins = [c.origin for c in planner.candidates]
    assert "alternation: one pruning step further" in origins
    deeper = [c for c in planner.candidates if c.origin == "filled"][0]
    assert deeper.level > first.level and deeper.latency_ms <= window[1]
    assert chosen is (deeper if deeper_wins else first)
    assert chosen.fidelity == max(first.fidelity, deeper.fidelity)


def test_a_final_miss_is_planned_again_against_a_tighter_budget():
    from types import SimpleNamespace

    from deploy.compiler.plan import replan_after_miss

    planner = FakePlanner()
    planner.quantizes, planner.can_prune, planner._quant = False, True, {}
    planner.request = SimpleNamespace(precisions=("fp32",), recover_steps=0, recover_minutes=0.0, seed=0,
                                      recover_bf16=False)
    planner.dense = planner.evaluate(0.0, None, "dense")
    decisions = {"budget": {"target_ms": 5.0}}
    assert replan_after_miss(planner, decisions, measured_ms=4.9) is None  # met: nothing to do
    again = replan_after_miss(planner, decisions, measured_ms=6.0)
    tighter = 5.0 * 5.0 / 6.0
    assert again["retried_after_miss"] == {"measured_ms": 6.0, "searched_for_ms": pytest.approx(tighter)}
    chosen = [c for c in planner.candidates if c.chosen]
    assert len(chosen) == 1 and chosen[0].latency_ms <= SAFE * tighter and again["level"] == chosen[0].level
    assert replan_after_miss(planner, decisions, measured_ms=1000.0) is None  # nothing that fast: keep the first


def test_a_speedup_budget_or_a_floor_plans_on_ratios_to_the_dense_model():
    """A first measurement of the dense model that came out slow (1.72 ms for a 0.94 ms model) scales the target
    and every candidate alike: a candidate is planned on its interleaved ratio x the dense p50."""
    from types import SimpleNamespace as NS

    from deploy.compiler.budget import Budget
    from deploy.compiler.candidates import Planner

    setup = NS(target=NS(profile=NS(precisions=["fp32"], name="cpu")), loaded=NS(structural=False), warnings=[])
    timing = {"latency_ms": 0.95, "ratio_to_dense": 0.55, "source": "measured"}
    relative = Planner(NS(precisions=("fp32",), prune=False, budget=Budget("speedup", 1.6)), setup)
    relative.dense = Candidate("fp32", 0.0, {}, 1.72, None, 1.0)
    assert relative.planned(timing) == pytest.approx(0.55 * 1.72)
    assert relative.planned(timing) <= relative.dense.latency_ms / 1.6  # fits 1.6x, as its ratio says
    absolute = Planner(NS(precisions=("fp32",), prune=False, budget=Budget("latency_ms", 1.0)), setup)
    absolute.dense = relative.dense
    assert absolute.planned(timing) == 0.95
    for floor in (Budget("max_drop", 0.01), Budget()):  # a floor's fastest is the lowest ratio, drift-free too
        planner = Planner(NS(precisions=("fp32",), prune=False, budget=floor), setup)
        planner.dense = relative.dense
        assert planner.planned(timing) == pytest.approx(0.55 * 1.72)


def test_the_most_faithful_candidate_inside_the_budget_is_chosen():
    """A precision fill ranks by estimated distortion; a candidate measured on the way may fit and be more
    faithful. One that is more faithful but over the limit is not taken; on a tie the search's choice stays."""
    from deploy.compiler.plan import most_faithful

    planner = FakePlanner(prune_cost=0.5, int8_cost=0.05)
    early = planner.evaluate(0.3, None, "pruning level")  # 7.6 ms, fidelity 0.85
    over = planner.evaluate(0.1, None, "pruning level")  # 9.2 ms, 0.95: over the limit
    chosen = planner.evaluate(0.35, {"a": "int8", "b": "int8"}, "filled")  # 6.5 ms, 0.725
    assert most_faithful(planner, chosen, limit=8.0) is early
    assert over.fidelity is None  # over the limit: not compared, so not scored
    assert planner.with_fidelity(over).fidelity > early.fidelity and over.latency_ms > 8.0
    assert most_faithful(planner, early, limit=8.0) is early
    twin = planner.evaluate(0.3, None, "pruning level again")  # same fidelity as `early`: no reason to switch
    assert most_faithful(planner, early, limit=8.0) is early and twin.fidelity == early.fidelity
    assert most_faithful(planner, chosen, limit=7.0) is chosen  # nothing more faithful fits 7 ms


def test_the_fastest_precision_plan_is_the_fastest_measured(monkeypatch):
    """The price table times each layer's kernel alone; on OpenVINO an all-int8 ResNet ran 0.70 ms where the
    table's pick (most convs in bf16) ran 0.90 ms. The planner measures the table's distinct candidates for "the
    fastest plan" (every layer low precision, each layer's fastest kernel, the allocator's plan) and keeps the
    fastest measured, whatever the table estimated."""
    from types import SimpleNamespace as NS

    import deploy.compress.quant.search as qs
    from deploy.compiler.candidates import Planner

    bf16, int8 = (NS(label=name, is_float=name == "bf16", kernel_class=name) for name in ("bf16", "int8"))
    spaces = {"a": (bf16, int8), "b": (bf16, int8), "c": (bf16, int8)}
    kernel = {"a": {"int8": -0.1}, "b": {"int8": 0.05}, "c": {"int8": 0.05}}  # int8 "slower" for b and c alone
    space = NS(spaces=spaces, table=NS(kernel=kernel), fastest=lambda: {"a": "int8", "b": "bf16", "c": "bf16"},
               latency=lambda labels: sum(kernel[n]["int8"] for n, v in labels.items() if v == "int8"))
    monkeypatch.setattr(qs, "allocator_plan", lambda sp, ms: ({"a": "int8", "b": "bf16", "c": "bf16"},))
    measured = {"int8,int8,int8": 0.70, "int8,bf16,bf16": 0.90}  # what the runtime says
    planner = Planner.__new__(Planner)
    planner._fastest, planner.request = {}, NS(precisions=("fp32", "bf16", "int8"))
    planner.blocks, planner.allocation, planner.parent = (), "dp", None
    planner.quant = lambda level: NS(space=space)
    planner.evaluate = lambda level, labels, origin: Candidate(
        "mixed", level, {}, measured[",".join(labels[n] for n in "abc")], None, 1.0, labels, origin=origin)
    best = planner.fastest_candidate()
    assert best.labels == {"a": "int8", "b": "int8", "c": "int8"} and best.latency_ms == 0.70
    assert planner.fastest() == best.labels and planner.fastest_candidate() is best  # measured once
    origins = [origin for origin, _ in planner.fastest_plans(0.0)]
    assert len(origins) == 2  # the allocator's plan equals the table's pick: measured once
    planner.request = NS(precisions=("bf16", "int8"))  # no float layers allowed: only the all-low plan
    assert [labels for _, labels in planner.fastest_plans(0.0)] == [best.labels]


def test_ties_in_the_metric_go_to_the_higher_output_sqnr():
    """Top-1 agreement on 38 validation digits moves in steps of 0.026, and before recovery every heavily pruned
    candidate sat at 5 of 38: the output SQNR still tells how much of the output each one kept."""
    import math

    from deploy.compiler.candidate import faithfulness
    from deploy.compiler.plan import most_faithful

    planner = FakePlanner()
    a, b, c = (planner.evaluate(level, None, name) for level, name in ((0.5, "a"), (0.6, "b"), (0.7, "c")))
    for cand, sqnr in ((a, -1.8), (b, 2.5), (c, None)):
        cand.fidelity, cand.sqnr_db = 5 / 38, sqnr
    assert most_faithful(planner, a, limit=100.0) is b
    assert faithfulness(c) < faithfulness(a) < faithfulness(b)  # no SQNR ranks last
    exact = Candidate("fp32", 0.0, {}, 1.0, 5 / 38, 1.0, sqnr_db=math.inf)
    assert faithfulness(exact) > faithfulness(b)  # identical outputs: SQNR is +inf, the best there is
    better = Candidate("fp32", 0.0, {}, 1.0, 6 / 38, 1.0, sqnr_db=-5.0)
    assert faithfulness(better) > faithfulness(exact)  # the metric first


def test_a_floor_answer_slower_than_the_original_gives_way_to_it():
    """The fastest candidate that keeps a floor was picked on short timings; when the final interleaved comparison
    puts its whole interval of the ratio above 1, the original (faster, and faithful) is written instead."""
    from types import SimpleNamespace

    from deploy.compiler.floor_and_size import dense_if_slower
    from deploy.compiler.candidate import decisions_for

    planner = FakePlanner()
    planner.request = SimpleNamespace(precisions=("fp32", "int8"), recover_steps=0, recover_minutes=0.0, seed=0,
                                      recover_bf16=False)
    planner.dense = planner.with_fidelity(planner.evaluate(0.0, None, "dense fp32"))
    picked = planner.with_fidelity(planner.evaluate(0.0, {"a": "int8"}, "every layer in low precision"))
    floor = {"floor": ["pooled_cosine", 0.98], "target_ms": None}
    decisions = decisions_for(planner, picked, floor)

    def timing(low, high, source="measured"):
        return {"source": source, "comparison": {"ratio": (low + high) / 2, "ci_low": low, "ci_high": high}}

    fell = dense_if_slower(planner, decisions, timing(1.04, 1.12))
    assert fell["fell_back_to_dense"] == {"instead_of": "every layer in low precision", "ratio": pytest.approx(1.08),
                                          "ratio_ci": [1.04, 1.12]}
    assert fell["precision"] == "fp32" and fell["quantize"] == {} and planner.dense.chosen and not picked.chosen

    decisions = decisions_for(planner, picked, floor)
    assert dense_if_slower(planner, decisions, timing(0.97, 1.05)) is None  # may be faster: kept
    assert dense_if_slower(planner, decisions, timing(1.04, 1.12, "predicted")) is None
    latency = decisions_for(planner, picked, {"floor": None, "target_ms": 12.0})
    assert dense_if_slower(planner, latency, timing(1.04, 1.12)) is None  # a latency budget is judged on itself
    planner.request.precisions = ("int8",)  # the user ruled float out
    assert dense_if_slower(planner, decisions_for(planner, picked, floor), timing(1.04, 1.12)) is None
