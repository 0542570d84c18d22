"""`deploy search` as one library call: the latency-vs-fidelity Pareto front over (precision, pruning level),
every trial exported and measured on the target (hardware in the loop), in a resumable optuna study."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from deploy.compress.search import SearchConfig, TrialOutcome, run_search
from deploy.job import CompressRequest

SEED_LEVELS = (0.0, 0.25, 0.5, 0.75)


@dataclass(frozen=True)
class SearchRequest:
    compress: CompressRequest
    search: SearchConfig = SearchConfig()


class PlanSpace:
    """Precision x pruning level; allocator solutions at several budgets seed the study."""

    def __init__(self, precisions: list[str], can_prune: bool):
        self.precisions = precisions
        self.can_prune = can_prune

    def suggest(self, trial: Any) -> dict[str, Any]:
        precision = trial.suggest_categorical("precision", self.precisions)
        level = trial.suggest_float("level", 0.0, 1.0) if self.can_prune else 0.0
        return {"precision": precision, "level": round(level, 4)}

    def seeds(self) -> list[dict[str, Any]]:
        levels = SEED_LEVELS if self.can_prune else (0.0,)
        return [{"precision": p, "level": lv} for p in self.precisions for lv in levels]


def search(request: SearchRequest, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    from deploy.job import _setup
    from deploy.report import atomic_write_json
    from deploy.stages import Family, _evaluate, _precisions

    out = Path(request.compress.out)
    out.mkdir(parents=True, exist_ok=True)
    setup = _setup(request.compress, out / ".work")
    family = Family(setup, request.compress.prune)
    precisions = _precisions(request.compress, setup)
    candidates: list[Any] = []

    def evaluate(params: dict[str, Any], folder: Path) -> TrialOutcome:
        setup.workdir = folder
        cand = _evaluate(family, setup, params["precision"], float(params["level"]),
                         request.compress.measure_seconds, candidates)
        model = folder / "model.onnx"
        (folder / f"candidate-{len(candidates) - 1}.onnx").rename(model)
        details = {"removed": cand.removed, "size_mb": cand.size_mb, "band_ms": cand.band_ms}
        (folder / "trial.json").write_text(json.dumps({**params, **details, "latency_ms": cand.latency_ms,
                                                       "fidelity": cand.fidelity}, indent=2))
        return TrialOutcome(cand.latency_ms, cand.fidelity, str(folder), details)

    space = PlanSpace(precisions, family.problem is not None)
    summary = run_search(space, evaluate, out, request.search, progress)
    summary["target"] = setup.resolved.profile.name
    summary["latency_source"] = "measured" if setup.local else "predicted"
    atomic_write_json(out / "front.json", summary)
    _plot_front(summary, out / "front.png")
    return summary


def _plot_front(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    trials = summary["trials"]
    ax.scatter([t["latency_ms"] for t in trials], [t["fidelity"] for t in trials], c="tab:gray", label="trials")
    front = summary["front"]
    ax.plot([t["latency_ms"] for t in front], [t["fidelity"] for t in front], "o-", c="tab:red", label="Pareto front")
    ax.set_xlabel("latency p50 (ms)" + (", predicted" if summary.get("latency_source") == "predicted" else ""))
    ax.set_ylabel("held-out fidelity")
    ax.legend()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
