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
"""
from __future__ import annotations

import copy
import math
from typing import Any

from deploy.compiler.candidate import Candidate, faithfulness, ranked

TRIAL_SHARE = 0.15  # of the recovery's minutes (or steps), what each structure's trial gets
TRIAL_MINUTES = (0.05, 1.0)  # the trial's minutes are clamped to this range
KEEP_STUDENTS = 4  # recovered models kept in memory (candidates of one structure reuse them)


def structure(candidate: Candidate) -> tuple[Any, ...]:
    """What recovery acts on: blocks dropped, the pruning allocation and level, ranks (precision is applied after
    it)."""
    return candidate.blocks, candidate.allocation, candidate.level, tuple(sorted(candidate.ranks.items()))


def needs_recovery(candidate: Candidate) -> bool:
    return bool(candidate.blocks or any(int(v) > 0 for v in candidate.removed.values()) or candidate.ranks)


def promise(planner: Any, candidate: Candidate) -> tuple[float, float]:
    """How the plan search compares candidates of different structures: where the plan will be recovered, by
    validation fidelity after a trial recovery (before it, heavy pruning sits at chance whatever recovery makes of
    it); else by validation fidelity (`faithfulness`)."""
    if planner.trials is None:
        return faithfulness(planner.with_fidelity(candidate))
    return planner.trials.promise(planner, candidate)


class Trials:
    """The short recoveries of one plan search, by structure."""

    def __init__(self, request: Any, setup: Any):
        self.request, self.setup = request, setup
        self._students: dict[tuple[Any, ...], Any] = {}
        self.count = 0

    def config(self) -> Any:
        from deploy.compress.distill import DistillConfig

        minutes = float(self.request.recover_minutes or 1.0)
        minutes = min(max(TRIAL_SHARE * minutes, TRIAL_MINUTES[0]), TRIAL_MINUTES[1])
        steps = self.request.recover_steps
        steps = None if steps is None else max(2, math.ceil(TRIAL_SHARE * steps))
        return DistillConfig(steps=steps, recover_minutes=minutes, seed=int(self.request.seed),
                             eval_every=max(1, steps // 2) if steps else 10)

    def promise(self, planner: Any, candidate: Candidate) -> tuple[float, float]:
        """How faithful `candidate` is after recovery, as a trial shows it (`faithfulness` order); a candidate
        that needs no recovery is ranked by its own validation fidelity."""
        if not needs_recovery(candidate):
            return faithfulness(planner.with_fidelity(candidate))
        if candidate.trial is None:
            self._run(planner, candidate)
        return ranked(candidate.trial["fidelity"], candidate.trial["sqnr_db"])

    def _run(self, planner: Any, candidate: Candidate) -> None:
        from deploy.compiler.candidate_files import export_candidate, fidelity_of
        from deploy.compiler.candidates import quant_config
        from deploy.core.metrics import primary_metric

        student, recovery, preps = self._student(planner, candidate)
        if candidate.labels is not None and not preps:  # one calibration of the recovered weights serves all plans
            from deploy.compress.families import calibrated

            preps.append(calibrated(student, self.setup.loaded.inputs, self.setup.calibration, self.setup.target,
                                    quant_config(self.request, self.setup)))
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
                           "float_after": recovery.after}

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
            recovery = recover(student, self.setup.loaded.module, self.setup.calibration, self.config())
            if len(self._students) >= KEEP_STUDENTS:
                self._students.pop(next(iter(self._students)))
            self._students[key] = (student, recovery, [])
        return self._students[key]
