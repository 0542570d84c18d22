"""Fidelity of an EXPORTED model, run in its runtime (not the torch simulation), on held-out data.

The reference is the original torch model on the same inputs; the candidate is what ONNX Runtime or OpenVINO
computes from the exported file, so the number a report shows is the number a user will get.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from deploy.metrics import fidelity, first_tensor




def torch_outputs(module: torch.nn.Module, batches: Sequence[tuple[torch.Tensor, ...]]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [first_tensor(module(*b)).float() for b in batches]


def runtime_predictor(path: str | Path, input_names: Sequence[str], runtime: str = "onnxruntime",
                      threads: int = 1, precision: str | None = None
                      ) -> Callable[[tuple[torch.Tensor, ...]], torch.Tensor]:
    """A function that runs one batch through the exported model in `runtime` (OpenVINO: at `precision`, f32 or
    bf16, f32 by default) and returns its first output."""
    if runtime in ("openvino", "ov"):
        import openvino as ov
        import openvino.properties as props
        import openvino.properties.hint as hints

        ov_type = ov.Type.bf16 if precision == "bf16" else ov.Type.f32
        compiled = ov.Core().compile_model(str(path), "CPU", {hints.inference_precision: ov_type,
                                                             props.inference_num_threads: threads})

        def run_ov(batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
            result = compiled({name: t.numpy() for name, t in zip(input_names, batch)})
            return torch.from_numpy(np.asarray(result[compiled.outputs[0]])).float()

        return run_ov
    from deploy.targets.ort_runner import OrtRunner
    from deploy.targets.runner import RunnerConfig

    session = OrtRunner(RunnerConfig(threads=threads)).session(path)
    names = [i.name for i in session.get_inputs()]

    def run_ort(batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        feeds = {name: t.numpy() for name, t in zip(input_names, batch) if name in names}
        return torch.from_numpy(session.run(None, feeds)[0]).float()

    return run_ort


def exported_fidelity(original: torch.nn.Module, path: str | Path, calibration: Any, input_names: Sequence[str],
                      runtime: str = "onnxruntime", reference: list[torch.Tensor] | None = None,
                      precision: str | None = None) -> dict[str, Any]:
    """Held-out fidelity of the exported file against the original module (labels and masks used when present)."""
    batches = calibration.batches("held_out", 32)
    reference = reference if reference is not None else torch_outputs(original, batches)
    run = runtime_predictor(path, input_names, runtime, precision=precision)
    candidate = [run(b) for b in batches]
    mask = None
    if "attention_mask" in input_names:
        index = list(input_names).index("attention_mask")
        mask = torch.cat([b[index] for b in batches])
    result = fidelity(reference, candidate, labels=calibration.held_out_labels, attention_mask=mask)
    result["runtime"] = runtime
    if precision:
        result["runtime_precision"] = precision
    return result
