"""One candidate of a plan search: what was built (blocks dropped, pruning allocation and level, ranks,
precisions), how it measured and scored; how candidates are ranked (`faithfulness`), how a structure is named and
read back from a plan's decisions, the decisions recorded for the one chosen (`decisions_for`), and the
regula falsi step the searches share (`falsi_step`)."""
from __future__ import annotations

import dataclasses
import math
from collections import Counter
from dataclasses import dataclass
from typing import Any


@dataclass
class Candidate:
    precision: str  # fp32 | int8 (every quantizable layer low precision) | mixed
    level: float  # 0 = dense, 1 = the most the pruning allocator may remove
    removed: dict[str, int]
    latency_ms: float  # what the planner plans on: the measured p50, or the upper end of a predicted band
    fidelity: float | None  # validation fidelity of the exported model (the planner's split); None until scored
    size_mb: float
    labels: dict[str, str] | None = None  # per-layer precision option; None: every layer in float
    band_ms: tuple[float, float] | None = None  # predicted latency's error band
    origin: str = ""
    chosen: bool = False
    ranks: dict[str, int] = dataclasses.field(default_factory=dict)  # low rank: layer -> rank (float layers)
    predicted_ms: float | None = None  # a predicted target's point estimate (latency_ms is its band's upper end)
    blocks: tuple[str, ...] = ()  # whole blocks dropped (depth pruning) before `removed` applies
    sqnr_db: float | None = None  # output SQNR on the same split as `fidelity` (breaks its ties, `faithfulness`)
    trial: dict[str, Any] | None = None  # validation fidelity after a short recovery (`trial_recovery`)
    allocation: str = "dp"  # how `removed` was spread over the units: the DP's, or one uniform ratio
    remeasured: dict[str, Any] | None = None  # measured again inside the noise margin (`near_fit`)

    def row(self) -> dict[str, Any]:
        row = dataclasses.asdict(self)
        row.pop("labels")
        row["counts"] = dict(Counter(self.labels.values())) if self.labels else {"fp32": "all"}
        return row


def measured_before(candidates: list[Candidate], blocks: tuple[str, ...], allocation: str, removed: dict[str, int],
                    labels: dict[str, str] | None) -> Candidate | None:
    """An earlier candidate of the same plan (blocks, allocation, units removed, precisions), where one was
    measured: the pruning family's plans change in steps, so a level search meets one plan at several levels, and
    timing it again only spends the search's time (the digits CNN: 4 of 6 steps re-timed one uniform plan)."""
    return next((c for c in candidates if c.blocks == blocks and c.allocation == allocation and not c.ranks
                 and c.removed == removed and c.labels == labels and math.isfinite(c.latency_ms)), None)


def falsi_step(a: float, f_a: float, b: float, f_b: float) -> float:
    """Regula falsi's next point between `a` and `b` (f: measured latency minus the aim, of opposite signs), kept
    2% of the span inside either end: the level and low-rank searches step on it."""
    x = b - f_b * (b - a) / (f_b - f_a) if f_b != f_a else (a + b) / 2
    low, high = min(a, b), max(a, b)
    return min(max(x, low + 0.02 * (high - low)), high - 0.02 * (high - low))


def faithfulness(candidate: Candidate) -> tuple[float, float]:
    """How the planner ranks candidates: the primary metric at 4 decimals, then the output SQNR. Top-1 agreement
    on a small validation split ties often (38 digits move in steps of 0.026, and before recovery every heavily
    pruned candidate sat at 5 of 38); the SQNR still tells how much of the output each one kept."""
    return ranked(candidate.fidelity, candidate.sqnr_db)


def ranked(fidelity: float | None, sqnr_db: float | None) -> tuple[float, float]:
    """`faithfulness` of a metric and an SQNR (+inf: the outputs are exact; None or NaN ranks last)."""
    sqnr = -math.inf if sqnr_db is None or math.isnan(sqnr_db) else sqnr_db
    return round(fidelity or 0.0, 4), sqnr


def depth_label(blocks: tuple[str, ...]) -> str:
    return f"{len(blocks)} block{'s' if len(blocks) > 1 else ''} dropped"


def structure_label(blocks: tuple[str, ...], allocation: str) -> str:
    """'2 blocks dropped', 'uniform allocation', or both: how a sub-planner's candidates are named."""
    parts = ([depth_label(blocks)] if blocks else []) + (["uniform allocation"] if allocation == "uniform" else [])
    return ", ".join(parts)


def structure_of(decisions: dict[str, Any]) -> tuple[tuple[str, ...], str]:
    """The blocks dropped and the allocation of a plan's decisions (what `Planner.mix` takes)."""
    prune = decisions.get("prune", {})
    return tuple(prune.get("blocks") or ()), str(prune.get("allocation") or "dp")


def precision_word(labels: dict[str, str] | None, prep: Any) -> str:
    """A candidate's `precision`: fp32 (no low-precision layer), int8 or int4 (every layer in it), or mixed."""
    if labels is None:
        return "fp32"
    from deploy.compress.families import options_of

    options = options_of(prep.spaces, labels).values()
    low = [o for o in options if not o.is_float]
    if not low:
        return "fp32"
    kinds = {o.precision for o in low}
    return kinds.pop() if len(low) == len(options) and len(kinds) == 1 else "mixed"


def decisions_for(planner: Any, choice: Candidate, budget: dict[str, Any]) -> dict[str, Any]:
    """The record of `choice` (among `planner`'s candidates, marked chosen) that the passes are built from and
    report.json keeps."""
    for cand in planner.candidates:
        cand.chosen = cand is choice
    request = planner.request
    return {
        "precision": choice.precision, "level": choice.level,
        "prune": {"removed": choice.removed, "blocks": list(choice.blocks), "allocation": choice.allocation},
        "lowrank": {"ranks": choice.ranks}, "quantize": {"labels": choice.labels} if choice.labels else {},
        "budget": budget, "dense_latency_ms": planner.dense.latency_ms,
        "candidates": [c.row() for c in planner.candidates],
        "recover": {"steps": request.recover_steps, "minutes": request.recover_minutes, "seed": request.seed,
                    "bf16": bool(request.recover_bf16)},
        "quant_problems": planner.problems(),
        "layer_price_ms": planner.layer_prices(choice),
    }
