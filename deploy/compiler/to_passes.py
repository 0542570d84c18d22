"""A plan search's decisions as the list of pass configs that builds the model, in the order
prune -> lowrank -> recover -> quantize -> export, and back: what a list of passes amounts to, for the report.

The list is what `apply` runs through `run_pipeline` and what deploy.toml stores; a replay reads it back and runs
the same passes, so the search, the applied plan and the replay cannot drift apart.
"""
from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any

from deploy.core.passes import make_pass


def plan_passes(decisions: dict[str, Any], request: Any, setup: Any) -> list[Any]:
    """The passes for the decisions of `deploy.compiler.plan.search` (dropped blocks and removed units, ranks,
    labels, recovery)."""
    from deploy.compiler.quant_settings import quant_config
    from deploy.compiler.candidate import structure_of
    from deploy.compress.distill import DistillConfig
    from deploy.compress.lowrank.api import LowRankConfig
    from deploy.compress.prune.api import PruneConfig
    from deploy.export.export_pass import ExportConfig

    passes = []
    removed = {k: int(v) for k, v in decisions.get("prune", {}).get("removed", {}).items() if int(v) > 0}
    ranks = {k: int(v) for k, v in decisions.get("lowrank", {}).get("ranks", {}).items()}
    blocks, method = structure_of(decisions)  # the method records how `removed` was allocated (replayed as is)
    labels = dict(decisions.get("quantize", {}).get("labels") or {})
    if removed or blocks:
        passes.append(make_pass("prune", PruneConfig(budget_kind="macs", removed=removed, blocks=blocks,
                                                     method=method)))
    if ranks:
        passes.append(make_pass("lowrank", LowRankConfig(cost="macs", ranks=ranks)))  # as the family priced it
    recover = decisions.get("recover", {})
    steps = recover.get("steps", 0)  # None: as many as the minutes allow
    if (removed or blocks or ranks) and (steps is None or int(steps) > 0):
        every = DistillConfig.eval_every if steps is None else max(1, int(steps) // 8)
        passes.append(make_pass("recover", DistillConfig(steps=None if steps is None else int(steps),
                                                          recover_minutes=float(recover.get("minutes", 1.0)),
                                                          seed=int(recover.get("seed", 0)), eval_every=every,
                                                          bf16=bool(recover.get("bf16", False)))))
    if labels:
        passes.append(make_pass("quantize", dataclasses.replace(quant_config(request, setup), labels=labels)))
    runtime = setup.target.runtime
    passes.append(make_pass("export", ExportConfig(openvino_ir=runtime == "openvino",
                                                   tensorrt_engine=runtime == "tensorrt", batch=request.batch)))
    return passes


def replayable(passes: list[Any], state: Any) -> list[Any]:
    """The passes as a replay must run them: a recover pass exactly the steps whose weights were kept, with no
    time limit (or dropped when it kept the weights it started from)."""
    from deploy.compress.recover import replay_config

    kept = [(r.data.get("kept_step", 0), r.data.get("horizon", 0), r.data.get("rate", 0.0)) for r in state.records
            if r.source == "recover" and r.kind == "decision"]
    out, recovered = [], iter(kept)
    for pass_ in passes:
        if pass_.name == "recover":
            config = replay_config(pass_.config, *next(recovered, (0, 0, 0.0)))
            if config is None:
                continue
            pass_ = make_pass("recover", config)
        out.append(pass_)
    return out


def summary_of(passes: list[Any]) -> dict[str, Any]:
    """What a list of passes amounts to: units removed, ranks, each layer's precision, recovery settings."""
    summary: dict[str, Any] = {"prune": {"removed": {}, "blocks": [], "allocation": "dp"}, "lowrank": {"ranks": {}}, "quantize": {},
                               "recover": {}, "passes": [p.name for p in passes]}
    for pass_ in passes:
        config = pass_.config
        if pass_.name == "prune":
            summary["prune"]["removed"] = dict(getattr(config, "removed", {}) or {})
            summary["prune"]["blocks"] = list(getattr(config, "blocks", ()) or ())
            summary["prune"]["allocation"] = getattr(config, "method", "dp")
        elif pass_.name == "lowrank":
            summary["lowrank"]["ranks"] = dict(getattr(config, "ranks", {}) or {})
        elif pass_.name == "recover":
            summary["recover"] = {"steps": config.steps, "minutes": config.recover_minutes, "seed": config.seed,
                                  "bf16": config.bf16}
        elif pass_.name == "quantize" and getattr(config, "labels", None):
            summary["quantize"] = {"labels": dict(config.labels)}
    return summary


def precision_name(plan: Any) -> str:
    """fp32 (no low-precision layer), int8 / int4 (every layer in that one), or mixed: for a Q/DQ plan or None."""
    if plan is None:
        return "fp32"
    kinds = Counter(lp.option.precision for lp in plan.layers.values())
    low = {k for k in kinds if k not in ("fp32", "fp16", "bf16")}
    if not low:
        return "fp32"
    return low.pop() if len(low) == 1 and len(kinds) == 1 else "mixed"
