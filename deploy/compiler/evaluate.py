"""Fidelity of an EXPORTED model, run in its runtime (not the torch simulation), on held-out data.

The reference is the original torch model on the same inputs; the candidate is what ONNX Runtime or OpenVINO
computes from the exported file, so the number a report shows is the number a user will get.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from deploy.core.data import CalibrationSet
from deploy.core.metrics import fidelity, first_tensor
from deploy.targets.outputs import runtime_predictor
from deploy.targets.target import Target


def torch_outputs(module: torch.nn.Module, batches: Sequence[tuple[torch.Tensor, ...]]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [first_tensor(module(*b)).float() for b in batches]


def exported_fidelity(original: torch.nn.Module, path: str | Path, calibration: CalibrationSet,
                      input_names: Sequence[str], target: Target, reference: list[torch.Tensor] | None = None,
                      split: str = "held_out") -> dict[str, Any]:
    """Fidelity of the exported file on `split` (held-out for what a report says, validation for what a search
    chooses), run in the target's runtime, against the original module (labels and masks used when present)."""
    batches = calibration.batches(split, 32)
    reference = reference if reference is not None else torch_outputs(original, batches)
    runtime = "openvino" if target.runtime == "openvino" else "onnxruntime"
    run = runtime_predictor(target, path, input_names, runtime)
    candidate = [run(b) for b in batches]
    mask = None
    if "attention_mask" in input_names:
        index = list(input_names).index("attention_mask")
        mask = torch.cat([b[index] for b in batches])
    labels = calibration.held_out_labels if split == "held_out" else None
    result = fidelity(reference, candidate, labels=labels, attention_mask=mask)
    result["runtime"] = runtime
    result["split"] = split
    if target.runtime_precision:
        result["runtime_precision"] = target.runtime_precision
    return result
