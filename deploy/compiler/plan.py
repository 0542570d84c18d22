"""Find the plan for one budget in a closed loop on the target: every candidate is exported and its latency
measured in the target's runtime (or predicted, with its band, for a device not at hand).

The plan has two levels (DESIGN 3.4). Pruning acts on dependency groups spanning layers: the DP allocator over
additive distortion curves gives a one-knob family from "dense" (level 0) to "the most it may remove" (level 1).
Precision acts per layer: the quantization allocator picks each layer's option (fp32, int8 per-channel, ...) from
its sensitivity and price table, for a latency estimate. For a latency budget:

1. the dense model in float; if it fits, it is the answer (nothing is more faithful);
2. the dense model at its fastest precisions (the fastest of the price table's picks, as measured); if that fits,
   no pruning is needed: the precision allocator spends the budget on the most sensitive layers (its estimate
   steered onto the measured latency);
3. else pruning: the level is found by regula falsi on the measured latency of the fastest precisions;
4. where pruning was needed, the other structures at the same precisions: the uniform allocation (one pruning ratio
   for every unit, its level found as in 3), the low-rank family (per-layer ranks from the allocator for a share of
   the factorizable MACs, in float) at the least factorization that fits, and depth mixes (1, 2, ... whole blocks
   dropped, each mix's pruning level found as in 3, the best mix's width pruning allocated by the DP or
   uniformly); the more faithful exported model wins, after a short recovery of each where the plan will be
   recovered (`trial_recovery`). Where the level found in 3 is DEEP or more, the depth mixes come first, so that a
   time limit stops what is least likely to win (all-MiniLM-L6-v2 at 0.5x NNCF int8's latency, level 0.72-0.98:
   the three best structures dropped blocks, on both CPUs measured; the distorted-digits CNN, 0.71: a mix tied);
5. the structure chosen only: the precision allocator runs again on its pruned model (sensitivities measured on
   it, the dense model's prices rescaled to its layer sizes) to fill the budget; then one alternation: a step
   more pruning with more layers back in float, kept if its exported model is more faithful on the validation
   split (`_refined`).

A measured p50 within [0.85, 0.95] x budget (5% kept for noise) ends a search early (the pruning level: only within
3% of 0.9); a speed-up budget plans on each candidate's interleaved ratio to the dense model. The dense model at its
fastest precisions measured outside the margin but within 5% over the budget is timed again as the final
measurement times it and kept where that p50 is within the budget; where it is not, the least pruning whose p50
timed again fits competes in 4 (`near_fit`). The final model is measured again against the original. Of every
candidate inside 0.95 x budget, the most faithful on validation is the answer (`most_faithful`). Fidelity floors
and size budgets: `floor_and_size`.
"""
from __future__ import annotations

import math
from typing import Any, Callable

from deploy.compiler.candidate import Candidate, decisions_for, falsi_step, measured_before, structure_of
from deploy.compiler.candidates import Planner
from deploy.compiler.near_fit import edge_line, fits_when_remeasured, least_pruning_at_edge, near_miss_line
from deploy.compiler.precision_fill import PRECISION_STEPS, fill_precision
from deploy.compiler.search_clock import SearchClock
from deploy.compiler.trial_recovery import (Trials, more_promising, most_promising, needs_recovery, promise,
                                            structure)
from deploy.core.errors import BudgetInfeasibleError

FILL = 0.85  # a latency budget is met when FILL x budget <= p50 <= budget, where the model family allows
SAFE = 0.95  # while searching a candidate fits at <= SAFE x budget: the final measurement repeats it with noise
LEVEL_STEPS = 6  # regula falsi / bisection steps on the pruning level
NEAR = 0.03  # the level search stops early within this share of SAFE x budget around the window's middle
ALTERNATE = 0.8  # the alternation's deeper pruning step: fastest precisions at about this share of the budget
DEEP = 0.5  # a pruning level for the budget at or past this: depth mixes are weighed before the other structures


# --- latency budgets --------------------------------------------------------------------------------------------

def meet_latency(planner: Planner, budget: float, dense: Candidate, depth: bool = True) -> Candidate:
    """The most faithful candidate measured inside [FILL, SAFE] x budget (or the best below it): the precision and
    pruning levels' answer, a depth mix's (blocks dropped, then the same levels), or a low-rank one where the model
    factorizes well; where pruning is needed the exported models are compared on the validation split (after a
    trial recovery each where the plan will be recovered: `promise`). `depth` False: no depth mixes (a re-plan
    stays with the structure chosen)."""
    window = (FILL * budget, SAFE * budget)
    if dense.latency_ms <= window[1] and "fp32" in planner.request.precisions:
        return dense
    if planner.trials is not None:
        planner.trials.begin()
    try:
        with planner.clock.step():  # a structure's step: its level search and its trial (every later one's too)
            structured = _levels_for_latency(planner, budget, window, dense)
            if structured.level > 0:
                promise(planner, structured)
    except BudgetInfeasibleError as error:
        found = [c for c in (_lowrank_for_latency(planner, window, dense, needed=True),
                             _depth_mixes(planner, budget, window, dense, needed=True) if depth else None)
                 if c is not None]
        if not found:  # the least achievable is the fastest allowed candidate measured, a depth mix's included
            floats = "fp32" in planner.request.precisions
            fastest = min((c.latency_ms for c in planner.candidates if (floats or c.labels)
                           and math.isfinite(c.latency_ms)), default=math.inf)
            if window[1] < fastest < math.inf:
                _infeasible(budget, fastest, dense)
            raise error
        return _refined(planner, most_promising(planner, found), window)
    if structured.level <= 0:  # precision alone fits (nothing pruned): nothing needs cutting or factorizing
        return structured
    widths = [lambda: _uniform_allocation(planner, budget, window, dense, structured)] if depth else []
    widths.append(lambda: _lowrank_for_latency(planner, window, dense))  # (a re-plan keeps allocation and blocks)
    depths = [lambda: _depth_mixes(planner, budget, window, dense)] if depth else []
    steps = depths + widths if structured.level >= DEEP else widths + depths
    edge = least_pruning_at_edge(planner, budget, structured, SAFE)  # where precision alone just missed
    best = most_promising(planner, [c for c in (structured, edge, *(step() for step in steps)) if c is not None])
    return best if best is edge and best.latency_ms > window[1] else _refined(planner, best, window)  # (no slack)


def _uniform_allocation(planner: Planner, budget: float, window: tuple[float, float], dense: Candidate,
                        best: Candidate, what: str = "the uniform allocation") -> Candidate | None:
    """The same pruning (`best`'s blocks dropped) with one ratio for every unit (its level found as in
    `_levels_for_latency`), kept where it is more faithful than the DP's `best` (both at the fastest precisions);
    None where the search's time limit stops the step (`what`). The DP spreads the cuts by each unit's distortion
    measured alone before recovery; far from dense that stops predicting what recovery brings back (the
    distorted-digits ResNet at 0.5x NNCF's latency: the DP's plan recovered to 0.65 held-out top-1 agreement, the
    uniform plan at fewer MACs to 0.90)."""
    if planner.clock.out_of_time(what):
        return None
    with planner.clock.step():
        uniform = _uniform_of(planner, budget, window, dense, best)
        return uniform if uniform is not None and more_promising(planner, uniform, best) else best


def _uniform_of(planner: Planner, budget: float, window: tuple[float, float], dense: Candidate,
                cand: Candidate) -> Candidate | None:
    """The uniform allocation's plan for `cand`'s blocks dropped (its level found as in `_levels_for_latency`, at
    the fastest precisions); None where even its most pruning does not fit."""
    try:
        return _levels_for_latency(planner.mix(cand.blocks, "uniform"), budget, window, dense)
    except BudgetInfeasibleError:
        return None


def _refined(planner: Planner, best: Candidate, window: tuple[float, float]) -> Candidate:
    """The structure chosen, pruned at the fastest precisions, gets the precision fill on its own model and one
    alternation (`_alternate`); the candidates it measures compete in `most_faithful`. Only the winner: each costs
    a precision problem of its pruned model (calibration, sensitivities, prices), the most expensive step of a
    transformer's search, and filling every structure before comparing them made all-MiniLM-L6-v2's search build
    four where two serve."""
    if best.level <= 0 or best.labels is None or not planner.quantizes \
            or planner.clock.out_of_time("the precision fill of the pruned model"):
        return best
    owner = planner.owner(best)
    most = next((c for c in planner.candidates if c.level >= 1.0 and c.labels == best.labels and not c.ranks
                 and (c.blocks, c.allocation) == (best.blocks, best.allocation)), None)
    filled = _precision_at(owner, best, window)
    if most is None or planner.clock.out_of_time("the alternation (one pruning step further)"):
        return filled
    return _alternate(owner, filled, best, most, best.labels, window)


def _depth_mixes(planner: Planner, budget: float, window: tuple[float, float], dense: Candidate,
                 needed: bool = False) -> Candidate | None:
    """Depth mixes where pruning is needed: 1, 2, ... blocks dropped (`Planner.drop_order`), each followed by the
    pruning level at the fastest precisions (the precision fill where no width pruning is needed); the most
    faithful mix on the validation split (after its trial recovery where the plan will be recovered), or the same
    blocks dropped with the width pruning allocated uniformly where that is more faithful. Stops at the first mix
    that needs no width pruning (dropping more only loses fidelity) and after two mixes in a row that were no
    better. Mixes are compared before the fill (`_refined`), as the other structures are. `needed` (nothing else
    fits): the search's time limit stops them only once one fits."""
    worse, mix = 0, None
    order = [name for name, _ in planner.drop_order()]
    for count in range(1, len(order) + 1):
        if (mix is not None or not needed) \
                and planner.clock.out_of_time(f"depth mixes of {count} or more blocks dropped"):
            break
        try:
            with planner.clock.step():
                cand = _levels_for_latency(planner.mix(tuple(order[:count])), budget, window, dense)
                if mix is None:  # its trial, as a later mix's in the comparison
                    promise(planner, cand)
                mix, worse = (cand, 0) if mix is None or more_promising(planner, cand, mix) else (mix, worse + 1)
        except BudgetInfeasibleError:
            continue
        if cand.level <= 0 or worse >= 2:
            break
    if mix is not None and mix.level > 0:  # the best mix's width pruning allocated uniformly, as for no blocks
        mix = _uniform_allocation(planner, budget, window, dense, mix, "the best depth mix allocated uniformly") or mix
    return mix


def most_faithful(planner: Planner, choice: Candidate, limit: float) -> Candidate:
    """The most faithful candidate measured within `limit` (validation fidelity, every one before recovery);
    `choice` unless another ranks higher (`faithfulness`: the metric at 4 decimals, then output SQNR). The
    search's steps aim at the budget's window, but a step on the way may have measured inside the budget and more
    faithful (the precision fill ranks plans by the allocator's distortion estimate, not by measured fidelity).
    Where the choice will be recovered, only its own structure's candidates compete, compared after its trial
    recovery (before it, the pruning's damage drowns what precision changes). Only these are scored here."""
    fits = [c for c in planner.candidates if c.latency_ms <= limit]
    if planner.trials is not None and needs_recovery(choice):
        fits = [c for c in fits if structure(c) == structure(choice)]
    fits = [c for c in fits if math.isfinite(planner.with_fidelity(c).fidelity)]
    best = max(fits, key=lambda c: promise(planner, c), default=choice)
    return best if promise(planner, best) > promise(planner, choice) else choice


def _levels_for_latency(planner: Planner, budget: float, window: tuple[float, float], dense: Candidate
                        ) -> Candidate:
    """Precision first (the dense model's fastest plan, then the budget filled back), else the pruning level at
    the fastest precisions (the fill and the alternation come after the structures are compared: `_refined`)."""
    target = window[1]
    fast0 = None
    if planner.quantizes:
        fast0 = planner.fastest_candidate()
        if fast0.latency_ms <= target or fits_when_remeasured(planner, fast0, budget):
            sp = planner.quant(0.0).space
            points = [(sp.latency(sp.float_labels()), dense.latency_ms), (sp.latency(fast0.labels), fast0.latency_ms)]
            return fill_precision(planner, 0.0, window, points, fast0)
    labels = planner.fastest() if planner.quantizes else None
    start = fast0 or dense
    if not planner.can_prune:
        _infeasible(budget, start.latency_ms, dense)
    most = _most_pruning(planner, labels, target)
    if most.latency_ms > target:
        _infeasible(budget, min(most.latency_ms, start.latency_ms), dense)
    if most.labels != labels:  # the level search brackets one plan: the dense model at the same precisions
        labels = most.labels
        start = next(c for c in planner.fastest_measured() if c.labels == labels)
    return _level_for_latency(planner, labels, window, start, most)


def _most_pruning(planner: Planner, labels: dict[str, str] | None, target: float) -> Candidate:
    """The most pruning at the dense model's fastest precisions; where that misses `target`, at the price table's
    other picks for the fastest plan too (a layer pruned to a few channels may run faster in float than in int8:
    the digits ResNet at level 1 measured 0.066 ms all-int8, 0.051 ms mostly bf16), the fastest measured kept."""
    most = planner.evaluate(1.0, labels, "most pruning, fastest precision")
    if most.latency_ms <= target or labels is None:
        return most
    for dense in planner.fastest_measured()[1:]:
        cand = planner.evaluate(1.0, dense.labels, f"most pruning, {dense.origin.split('dense, ', 1)[-1]}")
        most = cand if cand.latency_ms < most.latency_ms else most
    return most


def _lowrank_for_latency(planner: Planner, window: tuple[float, float], dense: Candidate, needed: bool = False
                         ) -> Candidate | None:
    """The least factorization (in float) whose measured latency fits: regula falsi on the fraction of the
    factorizable layers' MACs kept, each fraction's ranks the allocator's least-distortion choice. None where the
    model has nothing to factorize or even its lowest ranks do not fit (or, unless `needed`, past the search's
    time limit)."""
    family = planner.lowrank_family()
    if family is None or "fp32" not in planner.request.precisions:
        return None
    if not needed and planner.clock.out_of_time("low rank"):
        return None
    least = family.least_fraction()
    most = planner.evaluate_ranks(family.ranks(least), "low rank: lowest ranks")
    if most.latency_ms > window[1]:
        return None
    aim, best = sum(window) / 2, most
    lo, f_lo = 1.0, dense.latency_ms - aim  # fraction 1: nothing factorized (too slow)
    hi, f_hi = least, most.latency_ms - aim
    for _ in range(LEVEL_STEPS - 1):
        fraction = falsi_step(lo, f_lo, hi, f_hi)
        ranks = family.ranks(fraction)
        if ranks == best.ranks:
            break
        cand = planner.evaluate_ranks(ranks, f"low rank: {fraction:.2f} of the MACs kept")
        if cand.latency_ms <= window[1] and family.distortion(cand.ranks) < family.distortion(best.ranks):
            best = cand
        if window[0] <= cand.latency_ms <= window[1]:
            return cand
        if cand.latency_ms > aim:
            lo, f_lo = fraction, cand.latency_ms - aim
        else:
            hi, f_hi = fraction, cand.latency_ms - aim
    return best


def _precision_at(planner: Planner, pruned: Candidate, window: tuple[float, float]) -> Candidate:
    """The second level: precisions re-planned on the pruned model to spend what the budget has left."""
    sp = planner.quant(pruned.level).space
    return fill_precision(planner, pruned.level, window, [(sp.latency(pruned.labels), pruned.latency_ms)], pruned)


def _alternate(planner: Planner, first: Candidate, pruned: Candidate, most: Candidate,
               labels: dict[str, str] | None, window: tuple[float, float]) -> Candidate:
    """One alternation between the levels: prune one step further (fastest precisions at about ALTERNATE x the
    budget), give the latency freed back to precision, and keep whichever exported model is more faithful on
    held-out data. Stops at the first plan when the step does not land inside the budget."""
    span = pruned.latency_ms - most.latency_ms
    if span <= 0 or pruned.level >= 1.0:
        return first
    aim = ALTERNATE * window[1] / SAFE
    level = pruned.level + (1.0 - pruned.level) * min(1.0, max(0.0, (pruned.latency_ms - aim) / span))
    if level - pruned.level < 0.01:
        return first
    deeper = planner.evaluate(level, labels, "alternation: one pruning step further")
    if deeper.latency_ms > window[1]:
        return first
    second = _precision_at(planner, deeper, window)
    if second.latency_ms > window[1] or second.labels == deeper.labels:  # nothing was given back to precision
        return first
    return second if more_promising(planner, second, first) else first


def _level_for_latency(planner: Planner, labels: dict[str, str] | None, window: tuple[float, float],
                       low: Candidate, high: Candidate) -> Candidate:
    """Regula falsi (Illinois) on the pruning level for the least pruning that fits, stopping early only within NEAR
    of the window's middle (latency is flat in level over wide spans: stopping anywhere in the window pruned MiniLM
    0.39 in one run, 0.76 in the next). `low` does not fit (level 0), `high` does (level 1)."""
    target = window[1]
    aim = sum(window) / 2
    best = high
    f_low, f_high = low.latency_ms - aim, high.latency_ms - aim
    a, b = low.level, high.level
    side = 0
    for _ in range(LEVEL_STEPS):
        level = falsi_step(a, f_low, b, f_high)
        cand = (measured_before(planner.candidates, planner.blocks, planner.allocation, planner.removed(level), labels)
                or planner.evaluate(level, labels, "pruning level for the budget"))
        if cand.latency_ms <= target and cand.level < best.level:
            best = cand
        if abs(cand.latency_ms - aim) <= NEAR * target:
            return cand
        value = cand.latency_ms - aim
        if value > 0:  # still too slow: more pruning
            a, f_low = level, value
            if side == -1:
                f_high /= 2
            side = -1
        else:
            b, f_high = level, value
            if side == 1:
                f_low /= 2
            side = 1
    return best


def _infeasible(budget: float, fastest: float, dense: Candidate) -> None:
    if not math.isfinite(fastest):
        from deploy.core.errors import MeasurementError

        raise MeasurementError("every faster candidate gives NaN or infinite outputs, so none can be used",
                               "try --precision fp32, or a looser budget")
    least = fastest / SAFE  # the margin the search keeps for measurement noise
    if dense.predicted_ms is not None:  # a device not at hand: the plan must fit with its whole band
        raise BudgetInfeasibleError(
            f"the latency budget {budget:.3g} ms is below the upper end of the fastest candidate's predicted band, "
            f"{fastest:.3g} ms, plus a {(1 - SAFE):.0%} margin (dense fp32: predicted {dense.predicted_ms:.3g} ms, "
            f"band up to {dense.latency_ms:.3g} ms)",
            f"raise the budget to at least {least:.3g} ms, or measure on the device (deploy bench --runner "
            "ssh://...) and calibrate its profile to narrow the band", least_achievable=least)
    raise BudgetInfeasibleError(
        f"the latency budget {budget:.3g} ms is below the fastest achievable {fastest:.3g} ms plus a "
        f"{(1 - SAFE):.0%} noise margin (dense fp32: {dense.latency_ms:.3g} ms)",
        f"raise the budget to at least {least:.3g} ms", least_achievable=least)


def search(request: Any, setup: Any, note: Callable[[str, float], None]) -> tuple[dict[str, Any], Planner]:
    """The decisions for `request`'s budget (see the module docstring), and the planner that holds what was built
    on the way (the pruning problem, the precision problems) for applying them."""
    from deploy.compiler.budget import fidelity_floor, latency_target_ms
    from deploy.compiler.floor_and_size import meet_floor, meet_size
    from deploy.core.metrics import task_of

    planner = Planner(request, setup)
    planner.note, planner.clock = note, SearchClock(request.search_minutes)
    if setup.loaded.structural and request.recover_steps != 0:  # a pruned or factorized plan is recovered
        planner.trials = Trials(request, setup)
    lowrank = LEVEL_STEPS + 1 if getattr(request, "lowrank", False) else 0
    planner.expected = 3 + LEVEL_STEPS + 2 * PRECISION_STEPS + lowrank  # an upper bound, for N/M and the ETA
    planner.time_against_dense()
    dense = planner.evaluate(0.0, None, "dense fp32")
    planner.dense = dense
    target = latency_target_ms(request.budget, dense.latency_ms)
    floor = fidelity_floor(request.budget, task_of(setup.reference[0]))
    if target is not None:
        choice = most_faithful(planner, meet_latency(planner, target, dense), SAFE * target)
        setup.warnings += [line for line in (near_miss_line(planner, choice, target, SAFE),
                                             edge_line(planner, choice, target)) if line]
    elif floor is not None:
        choice = meet_floor(planner, floor[0], floor[1], dense)
    else:
        choice = meet_size(planner, request.budget.value, dense)
    planner.score_all()  # every measured candidate gets its validation fidelity: the report plots them all
    limited = planner.clock.warning()
    if limited:
        setup.warnings.append(limited)
    budget = {"kind": request.budget.kind, "value": request.budget.value, "target_ms": target,
              "floor": list(floor) if floor else None, "described": request.budget.describe()}
    return {**decisions_for(planner, choice, budget), "search": planner.clock.summary()}, planner


def replan_after_miss(planner: Planner, decisions: dict[str, Any], measured_ms: float,
                      original_ms: float | None = None) -> dict[str, Any] | None:
    """The final measurement missed the budget (drift, or recovery moved it): search once more for a budget shrunk
    by the miss (a speed-up: by the final ratio to `original_ms`, in the planner's scale); None if nothing fits."""
    budget = decisions["budget"]
    target = budget.get("target_ms")
    if target is None:
        return None
    if budget.get("kind") == "speedup" and original_ms:
        ratio, aim = measured_ms / original_ms, 1.0 / budget["value"]
        if ratio <= aim:
            return None
        tighter = planner.dense.latency_ms * aim * aim / ratio
    elif measured_ms <= target:
        return None
    else:
        tighter = target * target / measured_ms
    try:  # within the structure chosen (its blocks dropped): the miss is about latency, not structure
        owner = planner.mix(*structure_of(decisions))
        choice = most_faithful(planner, meet_latency(owner, tighter, planner.dense, depth=False), SAFE * tighter)
    except BudgetInfeasibleError:
        return None
    planner.score_all(limited=False)  # (the search's clock ran through the recovery: a handful of candidates)
    retried = {"measured_ms": measured_ms, "searched_for_ms": tighter}
    return {**decisions_for(planner, choice, budget), "retried_after_miss": retried, "search": planner.clock.summary()}
