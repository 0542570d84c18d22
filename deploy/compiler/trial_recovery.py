"""A short recovery of each structure the plan search weighs, before it chooses between them.

Before recovery every heavily pruned candidate sits near chance, so fidelity before recovery does not say which
structure recovery will bring back: on the width-16 digits CNN at 1.2x near-total channel pruning and a dropped
block scored 4 and 3 of 38 validation digits; the search chose the first, which recovered to 0.47-0.78 held-out
top-1 agreement, where the block dropped recovers to 1.0.
Where the plan will be recovered, each structure (blocks dropped, units removed, ranks) is distilled for
TRIAL_SHARE of the recovery budget, every structure the same share, then exported with the candidate's precisions
(calibrated on the recovered weights) and scored on the validation split; candidates that differ only in
precision share one recovered model. The structure chosen then gets the full recovery from its own starting
weights, as deploy.toml replays it.
Where the recovery is bound by minutes, the first trial times its training steps and runs as many as its share
allows; every later trial and round runs that many steps (`Trials.steps`), with twice the minutes as a bound:
timing each run's steps again took half of each of all-MiniLM-L6-v2's 18-second trials, and equal steps compare
structures whose latencies the budget already made alike.
The search compares structures on their first rounds; the two at the top (`most_promising`: the best and the
runner-up of every structure compared for the budget) go on for another round from where they stopped where they
came out close (within CLOSE of what the better one still misses), before the choice is made: about 30 steps rank
structures whose recovery curves are still steep, and which depth mix won them moved all-MiniLM-L6-v2's 0.5x
result between runs (held-out cosine 0.74-0.80 after the full recovery) more than any change did. Only the two:
giving a second round to every close pair as it was met gave one to all six structures of all-MiniLM-L6-v2's 0.5x
search, 14 trial rounds where 10 served in the next run (same machine, same choice: 3 blocks dropped).
"""
from __future__ import annotations

import copy
import math
from typing import Any

from deploy.compiler.candidate import Candidate, faithfulness, ranked

TRIAL_SHARE = 0.15  # of the recovery's minutes (or steps), what each structure's trial gets
TRIAL_MINUTES = (0.05, 1.0)  # the trial's minutes are clamped to this range
KEEP_STUDENTS = 4  # recovered models kept in memory (candidates of one structure reuse them)
ROUNDS = 2  # a structure's trial in rounds: the second only for the two at the top, where they come out close
CLOSE = 0.25  # two trials are close within this share of the better one's distance from a perfect score


def structure(candidate: Candidate) -> tuple[Any, ...]:
    """What recovery acts on: blocks dropped, the units removed, ranks (precision is applied after it). Not the
    allocation and level that removed the units: the DP's plan near its deepest level and the uniform allocation's
    can remove the same units (one model; all-MiniLM-L6-v2's 0.5x search gave them two trials that scored alike)."""
    removed = tuple(sorted((k, int(v)) for k, v in candidate.removed.items() if int(v) > 0))
    return candidate.blocks, removed, tuple(sorted(candidate.ranks.items()))


def needs_recovery(candidate: Candidate) -> bool:
    return any(structure(candidate))  # blocks dropped, units removed or ranks


def promise(planner: Any, candidate: Candidate) -> tuple[float, float]:
    """How the plan search compares candidates of different structures: where the plan will be recovered, by
    validation fidelity after a trial recovery (before it, heavy pruning sits at chance whatever recovery makes of
    it); else by validation fidelity (`faithfulness`)."""
    if planner.trials is None:
        return faithfulness(planner.with_fidelity(candidate))
    return planner.trials.promise(planner, candidate)


def more_promising(planner: Any, a: Candidate, b: Candidate) -> bool:
    """Whether `a` ranks above `b` (`promise`), their trials at equal rounds (`Trials.settle`); both are kept for
    the final choice (`most_promising`)."""
    if planner.trials is not None:
        planner.trials.settle(planner, a, b)
    return promise(planner, a) > promise(planner, b)


def most_promising(planner: Any, candidates: list[Candidate]) -> Candidate:
    """The candidate that ranks above the others, compared as `more_promising` compares two; then, where trials
    decide, it and the runner-up (the most promising other structure compared since `Trials.begin`) each get
    another round where they came out close, and the higher ranked of the two is the answer."""
    best = candidates[0]
    for candidate in candidates[1:]:
        if more_promising(planner, candidate, best):
            best = candidate
    trials = planner.trials
    others = [c for c in (trials.compared if trials is not None else []) if structure(c) != structure(best)]
    if not needs_recovery(best) or not others:
        return best
    runner = max(others, key=lambda c: promise(planner, c))
    trials.settle(planner, best, runner, another=True)
    return runner if promise(planner, runner) > promise(planner, best) else best


class Trials:
    """The short recoveries of one plan search, by structure."""

    def __init__(self, request: Any, setup: Any):
        self.request, self.setup = request, setup
        self._students: dict[tuple[Any, ...], Any] = {}
        self._rounds: dict[tuple[Any, ...], int] = {}  # by structure: how many rounds its trial has had
        self.count = 0
        self.steps: int | None = None  # a round's steps, as the first trial bound by minutes ran them
        self.compared: list[Candidate] = []  # compared since `begin` (one budget's search): the runner-up's pool

    def begin(self) -> None:
        """A search for a budget starts: the structures compared before it are not its runners-up."""
        self.compared = []

    def config(self, rounds: int = 1, first: int = 1) -> Any:
        """`rounds` trial rounds' recovery in one run, the first of them round `first` (its own seed)."""
        from deploy.compress.distill import DistillConfig

        minutes = float(self.request.recover_minutes or 1.0)
        minutes = rounds * min(max(TRIAL_SHARE * minutes, TRIAL_MINUTES[0]), TRIAL_MINUTES[1])
        seed, bf16 = int(self.request.seed) + first - 1, bool(self.request.recover_bf16)
        steps = self.request.recover_steps
        if steps is None and self.steps is not None:  # as many steps as the first trial's time allowed
            return DistillConfig(steps=rounds * self.steps, recover_minutes=2 * minutes, seed=seed, eval_every=10,
                                 bf16=bf16)
        steps = None if steps is None else rounds * max(2, math.ceil(TRIAL_SHARE * steps))
        return DistillConfig(steps=steps, recover_minutes=minutes, seed=seed,
                             eval_every=max(1, steps // (2 * rounds)) if steps else 10, bf16=bf16)

    def _ran(self, recovery: Any, rounds: int) -> Any:
        """`recovery` (of `rounds` rounds); the first that its minutes bound sets every later round's steps."""
        if self.steps is None and self.request.recover_steps is None and recovery.stopped == "time":
            self.steps = max(1, recovery.steps // rounds)
        return recovery

    def settle(self, planner: Any, a: Candidate, b: Candidate, another: bool = False) -> None:
        """Where `a` and `b` will be recovered from different structures: the one with fewer trial rounds gets
        more (two structures are compared at equal rounds); with `another`, at equal rounds both get another
        where their trials came out within CLOSE of each other, up to ROUNDS."""
        if not (needs_recovery(a) and needs_recovery(b)) or structure(a) == structure(b):
            return
        self.compared += [c for c in (a, b) if all(c is not seen for seen in self.compared)]
        goal = max(self.rounds(a), self.rounds(b))
        if another and self.rounds(a) == self.rounds(b):
            fa, fb = self.promise(planner, a)[0], self.promise(planner, b)[0]
            if goal >= ROUNDS or abs(fa - fb) >= CLOSE * (1.0 - max(fa, fb)) \
                    or planner.clock.out_of_time("second trial rounds"):
                return
            goal += 1
        for candidate in (a, b):
            while self.rounds(candidate) < goal:
                self._another_round(planner, candidate)

    def rounds(self, candidate: Candidate) -> int:
        return self._rounds.get(structure(candidate), 1)

    def _another_round(self, planner: Any, candidate: Candidate) -> None:
        """The structure's trial recovered for one more round from where it stopped (with that round's seed)."""
        from deploy.compress.families import recover

        key, rounds = structure(candidate), self.rounds(candidate) + 1
        student, _, _ = self._student(planner, candidate)
        planner.note("trial recovery of each structure", 0.6, len(self._students), None,
                     f"round {rounds}: {candidate.origin}")
        recovery = self._ran(recover(student, self.setup.loaded.module, self.setup.calibration,
                                     self.config(1, rounds)), 1)
        self._students[key] = (student, recovery, [])
        self._rounds[key] = rounds

    def promise(self, planner: Any, candidate: Candidate) -> tuple[float, float]:
        """How faithful `candidate` is after recovery, as a trial shows it (`faithfulness` order); a candidate
        that needs no recovery is ranked by its own validation fidelity."""
        if not needs_recovery(candidate):
            return faithfulness(planner.with_fidelity(candidate))
        if candidate.trial is None or candidate.trial["round"] < self.rounds(candidate):
            earlier = candidate.trial
            self._run(planner, candidate)
            if earlier is not None:  # the report shows what each round said
                candidate.trial["earlier"] = [*earlier.get("earlier", []), earlier["fidelity"]]
        return ranked(candidate.trial["fidelity"], candidate.trial["sqnr_db"])

    def _run(self, planner: Any, candidate: Candidate) -> None:
        from deploy.compiler.candidate_files import export_candidate, fidelity_of
        from deploy.compiler.quant_settings import quant_config
        from deploy.core.metrics import primary_metric

        student, recovery, preps = self._student(planner, candidate)
        if candidate.labels is not None and not preps:  # one calibration of the recovered weights serves all plans
            from deploy.compress.families import calibrated

            preps.append(calibrated(student, self.setup.loaded.inputs, self.setup.calibration, self.setup.target,
                                    quant_config(self.request, self.setup, search=True)))
        prep = preps[0] if candidate.labels is not None else None
        self.count += 1
        path = self.setup.workdir / f"trial-{self.count}.onnx"
        export_candidate(student, self.setup, candidate.labels, prep, path)
        result = fidelity_of(self.setup, path, "validation")
        path.unlink(missing_ok=True)
        candidate.trial = {"fidelity": primary_metric(result)[1],
                           "sqnr_db": float(result["sqnr_db"]) if result.get("sqnr_db") is not None else None,
                           "steps": recovery.steps, "kept_step": recovery.kept_step,
                           "seconds": recovery.seconds, "float_before": recovery.before,
                           "float_after": recovery.after, "round": self.rounds(candidate)}

    def _student(self, planner: Any, candidate: Candidate) -> tuple[Any, Any, list[Any]]:
        """The candidate's structure in float after its trial recovery (run once per structure), what the recovery
        did, and the recovered weights' calibration once made."""
        key = structure(candidate)
        if key not in self._students:
            from deploy.compress.families import recover

            if candidate.ranks:
                student = planner.mix(()).lowrank_family().build(candidate.ranks)
            else:
                student = copy.deepcopy(planner.owner(candidate).module(candidate.level))
            planner.note("trial recovery of each structure", 0.6, len(self._students) + 1, None,
                         candidate.origin)
            # (a structure put out of memory comes back with all its rounds)
            recovery = self._ran(recover(student, self.setup.loaded.module, self.setup.calibration,
                                         self.config(self.rounds(candidate))), self.rounds(candidate))
            if len(self._students) >= KEEP_STUDENTS:
                self._students.pop(next(iter(self._students)))
            self._students[key] = (student, recovery, [])
        return self._students[key]
