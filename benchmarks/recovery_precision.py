"""Recovery's passes in bf16 autocast against f32, in the same minutes, on a pruned student of each frontier case.

The students are recovery_rates.py's (MiniLM: every other block dropped; CNN: Torch-Pruning uniform 0.68 of every
conv's channels), distilled from the original for the same minutes (MiniLM 2, CNN 1.5; the default schedule, rate
probes and augmentation), once with every pass in f32 and once with the forward and backward passes in bf16
autocast (weights, losses and the validation score in f32), for two seeds, in the order f32, bf16, bf16, f32 so
that a drift of the machine falls on both alike. `deploy compress` trains in bf16 where the CPU runs bf16 in
hardware. Calibration, early stopping and scoring as in `frontier.py --quick`: 256 calibration samples (a fifth
for early stopping), scored in float (PyTorch) on the held-out sets no step saw.

    .venv/bin/python benchmarks/recovery_precision.py [--case cnn|minilm]
Writes results/recovery_precision.json and .md, then BENCHMARKS.md.
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import frontier  # noqa: E402
from recovery_rates import run_cases, student_of  # noqa: E402

MINUTES = {"cnn": 1.5, "minilm": 2.0}
RUNS = ((False, 0), (True, 0), (True, 1), (False, 1))  # (bf16, seed)


def run_case(name: str, case: dict[str, Any]) -> dict[str, Any]:
    """Each of RUNS on the case's student, from the same start: its steps, seconds, rate and held-out scores."""
    from deploy.compress.distill import DistillConfig, distill

    split = frontier.early_stopping_split(case)
    start = student_of(name, case)
    with torch.no_grad():
        refs = {k: torch.cat([case["module"](*s) for s in samples]).float() for k, (samples, _) in case["sets"].items()}
    runs = []
    for bf16, seed in RUNS:
        student = copy.deepcopy(start)
        result = distill(student, case["module"], split,
                         DistillConfig(steps=None, recover_minutes=MINUTES[name], seed=seed, bf16=bf16))
        run: dict[str, Any] = {"precision": result.precision, "seed": seed, "seconds": result.seconds,
                               "steps": result.steps, "stopped": result.stopped, "kept_step": result.kept_step,
                               "rate": result.rate}
        with torch.no_grad():
            for set_name, (samples, labels) in case["sets"].items():
                got = torch.cat([student(*s) for s in samples]).float()
                scored = frontier.scores(case, refs[set_name], got, samples, labels)
                run[set_name] = {k: float(v) for k, v in scored.items() if isinstance(v, (int, float))}
        runs.append(run)
        print(f"{name}: {run}", file=sys.stderr, flush=True)
    return {"title": case["title"], "student": "every other block dropped" if name == "minilm" else
            "Torch-Pruning uniform 0.68 of every conv's channels", "minutes": MINUTES[name], "runs": runs,
            "metrics": list(case["metrics"]), "sets": {k: len(v[0]) for k, v in case["sets"].items()}}


def markdown(result: dict[str, Any]) -> str:
    """The BENCHMARKS.md section, from the JSON alone."""
    lines = ["## Recovery in bf16 (issue 16, item 5)", "", " ".join(__doc__.split("\n\n")[0].split()), "",
             " ".join(__doc__.split("\n\n")[1].split()), ""]
    for case in result["cases"].values():
        sets, metrics = list(case["sets"]), case["metrics"]
        head = ["passes", "seed", "steps (stop)", "seconds", "peak rate"]
        head += [f"{m} ({s})" for s in sets for m in metrics]
        lines += [f"### {case['title']}", "", f"Command: `{case['command']}`; {case['date']}. {case['machine']}. "
                  f"Student: {case['student']}; {case['minutes']:g} minutes of recovery; scored on "
                  + ", ".join(f"{n} {s}" for s, n in case["sets"].items()) + ".", "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for run in sorted(case["runs"], key=lambda r: (r["precision"], r["seed"])):
            cells = [run["precision"], str(run["seed"]), f"{run['steps']} ({run['stopped']})", f"{run['seconds']:.0f}",
                     f"{run['rate']:g}"]
            cells += [f"{run[s][m]:.4f}" for s in sets for m in metrics]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from deploy.targets.measure.fingerprint import fingerprint
    from deploy.targets.target import has_bf16

    machine = (f"{fingerprint(frontier.THREADS)['cpu']}, {frontier.THREADS} threads; bf16 in hardware: "
               f"{'yes' if has_bf16() else 'no (emulated)'}")
    return run_cases("recovery_precision", argv, __doc__, run_case, markdown, machine=machine)


if __name__ == "__main__":
    sys.exit(main())
