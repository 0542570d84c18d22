"""A per-layer precision choice (option labels) turned into an exported Q/DQ model.

`deploy compress` plans precisions as labels ({layer: "w8a8-pc-sa", ...}) and applies them twice: while searching,
on a calibrated problem that may belong to a sibling model (the dense model's calibration reused on a pruned copy,
whose layers keep their names: latency does not depend on the ranges), and at the end on the final weights, with a
fresh calibration, so the exported model is calibrated on what it computes. deploy.toml stores only the labels;
replaying re-calibrates on the same data and gets the same model.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from torch import nn

from deploy.export.qdq.plan import QuantPlan
from deploy.export.qdq.option import QuantOption
from deploy.core.spec import InputSpec
from deploy.core.data import CalibrationSet
from deploy.profiles import Profile
from deploy.targets.target import Target

Labels = dict[str, str]


def options_for(spaces: dict[str, tuple[QuantOption, ...]], labels: Labels) -> dict[str, QuantOption]:
    """Each layer's option by label. A layer the labels do not name, or whose space lacks the label (a pruned
    layer too narrow for a group size), keeps its float option (the space's first)."""
    options = {}
    for name, opts in spaces.items():
        wanted = labels.get(name)
        options[name] = next((o for o in opts if o.label == wanted), opts[0])
    return options


def refused_labels(prep: Any, labels: Labels, profile: Profile) -> list[tuple[str, str]]:
    """(layer, label) pairs of a replayed plan that the layer's options lack: `options_for` would run them in float
    unasked. Only one absence is expected: an int4 group wider than a Linear that pruning left narrower (on a
    target that runs int4), which `options_for` runs in float as the plan search priced it."""
    import re

    shapes = {s.name: s for s in prep.shapes}
    refused = []
    for name, label in labels.items():
        if any(o.label == label for o in prep.spaces[name]):
            continue
        group = re.fullmatch(r"w4-g(\d+)-[as]", label)
        shape = shapes.get(name)
        narrow = (group is not None and "int4" in profile.precisions and shape is not None
                  and shape.kind == "linear" and int(group[1]) > shape.in_features)
        if not narrow:
            refused.append((name, label))
    return refused


def plan_for(prep: Any, labels: Labels) -> QuantPlan:
    """The calibrated plan of `prep` (prepare.Prepared) with the labelled options (tied as the policy
    runs them: see `tied_labels`)."""
    return prep.plan.with_options(options_for(prep.spaces, tied_labels(prep, labels)))


def tied_labels(prep: Any, labels: Labels) -> Labels:
    """Where the target's policy ties the layers that read one tensor (OpenVINO), a group whose plan mixes low
    precision and float is made float throughout: that is what the runtime runs, so the plan, the simulation
    and the report say so too."""
    from deploy.export.qdq.policy import policy_for

    if prep.graph is None or not policy_for(prep.plan.policy).tie_shared_inputs:
        return labels
    options = options_for(prep.spaces, labels)
    out = dict(labels)
    for readers in prep.graph.input_groups().values():
        group = [n for n in readers if n in options]
        if len({options[n].is_float for n in group}) > 1:
            for name in group:
                out[name] = prep.spaces[name][0].label
    return out


def export_labels(prep: Any, module: nn.Module, inputs: Sequence[InputSpec], labels: Labels, path: str | Path,
                  policy: Any = None) -> Any:
    """Export `module` with the labelled precisions and `prep`'s calibration; returns export.qdq.QuantizedExport."""
    from deploy.export.qdq.writer import export_quantized

    return export_quantized(plan_for(prep, labels), module, inputs, path, policy)


def quantize_to_labels(module: nn.Module, inputs: Sequence[InputSpec], calibration: CalibrationSet, target: Target | Profile,
                       labels: Labels, path: str | Path, config: Any) -> tuple[Any, QuantPlan]:
    """Calibrate `module` afresh (config: quantize.QuantizeConfig) and export it with the labelled precisions."""
    from deploy.compress.quant.prepare import prepare

    prep = prepare(module, inputs, calibration, target, config.space, config.calibration, config.skip)
    plan = plan_for(prep, labels)
    from deploy.export.qdq.writer import export_quantized

    return export_quantized(plan, prep.folded, inputs, path), plan


def precision_map(plan: QuantPlan, default: str = "fp32") -> dict[str, str]:
    """{layer: precision} with '*' for the rest: how the latency model prices a plan for a device not at hand."""
    mapping = {name: lp.option.precision for name, lp in plan.layers.items()}
    mapping["*"] = default
    return mapping
