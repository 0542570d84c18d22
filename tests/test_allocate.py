"""The allocator equals brute force on small instances, respects budgets and fails clearly when infeasible."""
from __future__ import annotations

import itertools
import math
import random

import pytest

from deploy.compress.allocate import Option, Unit, allocate, allocate_inverse
from deploy.core.errors import BudgetInfeasibleError


def _random_units(rng: random.Random, n_units: int, n_options: int) -> list[Unit]:
    units = []
    for u in range(n_units):
        options = [Option(float(rng.randint(0, 20)), round(rng.uniform(0, 10), 3), label=i) for i in range(n_options)]
        units.append(Unit(f"u{u}", tuple(options)))
    return units


def _brute(units, budget):
    best = None
    for combo in itertools.product(*[range(len(u.options)) for u in units]):
        cost = sum(u.options[i].cost for u, i in zip(units, combo))
        if cost > budget:
            continue
        dist = sum(u.options[i].distortion for u, i in zip(units, combo))
        if best is None or dist < best - 1e-12:
            best = dist
    return best


@pytest.mark.parametrize("seed", range(30))
def test_dp_equals_brute_force(seed):
    rng = random.Random(seed)
    units = _random_units(rng, rng.randint(1, 5), rng.randint(1, 4))
    floor = sum(min(o.cost for o in u.options) for u in units)
    budget = float(int(floor) + rng.randint(0, 40))
    expected = _brute(units, budget)
    # a whole number of buckets per cost unit: integer costs are exact on the grid
    steps = int(budget) * math.ceil(2000 / int(budget)) if budget > 0 else 2000
    got = allocate(units, budget, steps=steps)
    assert got.cost <= budget + 1e-9
    assert got.distortion == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("seed", range(10))
def test_inverse_finds_the_least_cost_under_a_cap(seed):
    rng = random.Random(100 + seed)
    units = _random_units(rng, 4, 3)
    cap = sum(min(o.distortion for o in u.options) for u in units) + rng.uniform(0, 8)
    got = allocate_inverse(units, cap, steps=2000)
    assert got.distortion <= cap + 1e-9
    cheapest = min(
        sum(u.options[i].cost for u, i in zip(units, combo))
        for combo in itertools.product(*[range(len(u.options)) for u in units])
        if sum(u.options[i].distortion for u, i in zip(units, combo)) <= cap + 1e-12
    )
    span = sum(max(o.cost for o in u.options) for u in units)
    assert got.cost <= cheapest + len(units) * span / 2000 + 1e-9  # exact up to one bucket per unit


def test_real_valued_costs_respect_the_budget():
    rng = random.Random(7)
    units = [Unit(f"u{i}", tuple(Option(rng.uniform(0, 3), rng.uniform(0, 1)) for _ in range(6))) for i in range(20)]
    for budget in (10.0, 20.0, 35.0):
        plan = allocate(units, budget, fixed_cost=1.5)
        assert plan.cost <= budget
        assert len(plan.choice) == 20


def test_infeasible_budget_names_the_least_achievable_cost():
    units = [Unit("a", (Option(5.0, 0.0), Option(3.0, 1.0))), Unit("b", (Option(4.0, 0.0), Option(2.0, 2.0)))]
    with pytest.raises(BudgetInfeasibleError) as info:
        allocate(units, 4.0, fixed_cost=1.0, unit_name=" ms")
    assert info.value.least_achievable == 6.0
    assert "least achievable cost 6 ms" in info.value.one_line()
    assert info.value.exit_code == 2


def test_ties_are_deterministic():
    units = [Unit("a", (Option(1.0, 1.0, "first"), Option(1.0, 1.0, "second")))]
    assert allocate(units, 5.0).labels == {"a": "first"}


def test_more_budget_never_hurts():
    rng = random.Random(3)
    units = _random_units(rng, 8, 5)
    distortions = [allocate(units, float(b), steps=2000).distortion for b in range(40, 160, 10)]
    assert all(later <= earlier + 1e-9 for earlier, later in zip(distortions, distortions[1:]))
