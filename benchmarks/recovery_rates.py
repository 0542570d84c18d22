"""Recovery's peak learning rate and its augmentation: fixed rates beside the probed choice, and the default
without augmentation, on a pruned student of each frontier case.

One student per case, pruned as the frontier's baselines are (CNN: Torch-Pruning uniform 0.68 of every conv's
channels; MiniLM: every other block dropped), is distilled from the original for the same number of steps (about
what 2 and 4 minutes allow here) at each fixed peak rate and with the default (the first 6% of the steps probe
1e-4, 3e-4 and 1e-3, the best on the validation fifth goes on; with a step budget the two losing probes' steps are
run on top, with a time budget they come out of the minutes). Every row but the last augments half of each batch
(images: mixup of two samples; text: 30% of the inner tokens swapped for others of the batch; the text case
also runs the default at 15%, the default before). Steps, not
minutes, so that the rows compare the same training whatever else the machine runs. Calibration, early stopping
and scoring as in `frontier.py --quick`:
256 calibration samples (a fifth for early stopping), scored in float (PyTorch) on the held-out sets no step saw.

    .venv/bin/python benchmarks/recovery_rates.py [--case cnn|minilm]
Writes results/recovery_rates.json and .md, then BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import frontier  # noqa: E402
import render  # noqa: E402

STEPS = {"cnn": 450, "minilm": 260}  # about 2 and 4 minutes here (2 minutes of MiniLM are too few to probe)
FIXED = (1e-4, 3e-4, 1e-3)


def student_of(name: str, case: dict[str, Any]) -> torch.nn.Module:
    from deploy.compress.prune.depth import dropped
    from deploy.targets.measure.feeds import make_feeds
    from peers import prune_uniform

    if name == "minilm":
        return dropped(copy.deepcopy(case["module"]), case["every_other"])
    peer = SimpleNamespace(module=case["module"], prune_roots=case["tp_roots"],
                           timing_feeds=make_feeds(case["inputs"]), inputs=case["inputs"])
    return prune_uniform(peer, 0.68)


def run_case(name: str, case: dict[str, Any]) -> dict[str, Any]:
    from deploy.compress.distill import DistillConfig, distill
    from deploy.compress.recover import UNLIMITED_MINUTES

    split = frontier.early_stopping_split(case)
    start = student_of(name, case)
    steps = STEPS[name]
    with torch.no_grad():
        refs = {k: torch.cat([case["module"](*s) for s in samples]).float() for k, (samples, _) in case["sets"].items()}
    default = DistillConfig(steps=steps, recover_minutes=UNLIMITED_MINUTES, eval_every=25)  # the steps bound each run
    settings = [(f"fixed {r:g}", dataclasses.replace(default, lr=r, rates=())) for r in FIXED]
    settings.append(("probed (the default)", default))
    if case["transformer"]:
        settings.append(("probed, token swap 15% (before)", dataclasses.replace(default, token_swap=0.15)))
    settings.append(("probed, no augmentation", dataclasses.replace(default, augment=0.0)))
    rows = {}
    for key, config in settings:
        student = copy.deepcopy(start)
        began = time.perf_counter()
        result = distill(student, case["module"], split, config)
        row: dict[str, Any] = {"seconds": time.perf_counter() - began, "steps": result.steps,
                               "stopped": result.stopped, "kept_step": result.kept_step, "rate": result.rate,
                               "probes": result.probes, "metric": result.metric}
        with torch.no_grad():
            for set_name, (samples, labels) in case["sets"].items():
                got = torch.cat([student(*s) for s in samples]).float()
                scored = frontier.scores(case, refs[set_name], got, samples, labels)
                scored.pop("per_sample", None)
                row[set_name] = {k: float(v) for k, v in scored.items() if isinstance(v, (int, float))}
        rows[key] = row
        print(f"{name} {key}: {row}", file=sys.stderr, flush=True)
    return {"title": case["title"], "student": "every other block dropped" if name == "minilm" else
            "Torch-Pruning uniform 0.68 of every conv's channels", "steps": steps, "rows": rows,
            "metrics": list(case["metrics"]), "sets": {k: len(v[0]) for k, v in case["sets"].items()}}


def markdown(result: dict[str, Any]) -> str:
    lines = ["## Recovery's learning rate and augmentation (issue 16, item 5)", ""]
    lines += [" ".join(part.split()) for part in __doc__.split("\n\n")[:2]] + [""]
    for case in result["cases"].values():
        sets, metrics = list(case["sets"]), case["metrics"]
        head = ["peak rate", "steps (stop)", "rate run"] + [f"{m} ({s})" for s in sets for m in metrics]
        lines += [f"### {case['title']}", "", f"Command: `{case['command']}`; {case['date']}. Student: "
                  f"{case['student']}; {case['steps']} steps of recovery; scored on "
                  + ", ".join(f"{n} {s}" for s, n in case["sets"].items()) + ".", "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for key, row in case["rows"].items():
            probes = ", ".join(f"{p['rate']:g}: {p[row['metric']]:.3f}" for p in row["probes"])
            rate = f"{row['rate']:g}" + (f" (probes {probes})" if probes else "")
            cells = [key, f"{row['steps']} ({row['stopped']})", rate]
            cells += [f"{row[s][m]:.4f}" for s in sets for m in metrics]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


def quick_case(name: str) -> dict[str, Any]:
    """The frontier's quick case `name` (the trained CNN from the cache it is kept in between runs)."""
    from deploy.core.cache import cache_dir

    return frontier.minilm(True) if name == "minilm" else frontier.cnn(True, cache_dir() / "models")


def case_args(argv: list[str] | None, doc: str) -> tuple[str, ...]:
    """The cases a command line asks for (default: both)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--case", choices=("minilm", "cnn"), action="append", help="one case (default: both)")
    return tuple(parser.parse_args(argv).case or ())


def run_cases(stem: str, argv: list[str] | None, doc: str, run_case: Any, markdown: Any,
              **extra: Any) -> int:
    """A recovery benchmark's command: `run_case(name, case)` on each case asked (default: both), merged into the
    last results of `stem` (a case not rerun keeps its row), each case with its command, date and `extra`."""
    asked = case_args(argv, doc)
    torch.set_num_threads(frontier.THREADS)
    result = render.last_results(stem)
    command = f"python benchmarks/{stem}.py" + "".join(f" --case {c}" for c in asked)
    for name in asked or ("minilm", "cnn"):
        result["cases"][name] = {**run_case(name, quick_case(name)), "command": command, **extra,
                                 "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    result["cases"] = {k: result["cases"][k] for k in ("minilm", "cnn") if k in result["cases"]}
    render.publish(stem, result, markdown(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cases("recovery_rates", argv, __doc__, run_case, markdown)


if __name__ == "__main__":
    sys.exit(main())
