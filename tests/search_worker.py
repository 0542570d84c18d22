"""A search worker for the kill/resume and multi-worker tests: a synthetic space, a real (tiny) measurement.

Run as `python tests/search_worker.py OUT STORAGE TRIALS [HANG_AT]`: with HANG_AT, the worker hangs inside that
trial number (so the test can kill -9 it mid-trial).
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from deploy.compress.study import StudyConfig, TrialOutcome, run_study
from deploy.targets.measure.loop import MeasureConfig, measure


class Space:
    def suggest(self, trial):
        return {"x": round(trial.suggest_float("x", 0.0, 1.0), 4)}

    def seeds(self):
        return [{"x": 0.25}, {"x": 0.75}]


def make_evaluate(hang_at: int | None, counter: list[int]):
    def evaluate(params, folder: Path) -> TrialOutcome:
        counter[0] += 1
        (folder / "model.txt").write_text(json.dumps(params))
        if hang_at is not None and counter[0] == hang_at:
            (folder.parent.parent / "hanging").write_text(json.dumps(params))
            time.sleep(3600)
        x = params["x"]
        result = measure(lambda: sum(i * i for i in range(2000)), MeasureConfig.quick(min_samples=8, min_seconds=0.05))
        window = result.to_dict()["lock"]["window"]
        return TrialOutcome(1.0 + x, 1.0 - x * x, str(folder), {"window": window})
    return evaluate


def _barrier() -> None:
    """With DEPLOY_TEST_BARRIER set, announce readiness and wait for the test's go, so workers start together."""
    barrier = os.environ.get("DEPLOY_TEST_BARRIER")
    if not barrier:
        return
    Path(f"{barrier}.ready.{os.getpid()}").write_text("")
    deadline = time.time() + 120
    while not Path(f"{barrier}.go").exists() and time.time() < deadline:
        time.sleep(0.05)


def main() -> None:
    _barrier()
    out, storage, trials = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    hang_at = int(sys.argv[4]) if len(sys.argv) > 4 else None
    config = StudyConfig(trials=trials, storage=None if storage == "-" else storage, heartbeat_s=1, grace_s=2)
    summary = run_study(Space(), make_evaluate(hang_at, [0]), out, config)
    print(json.dumps({"completed": summary["completed"], "front": len(summary["front"])}))


if __name__ == "__main__":
    main()
