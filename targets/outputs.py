"""What an exported model computes, run in its runtime on real batches (not the timing loop's stand-in feeds):
the numbers fidelity is measured on."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from deploy.targets.target import Target


def runtime_predictor(target: Target, path: str | Path, input_names: Sequence[str], runtime: str | None = None
                      ) -> Callable[[tuple[torch.Tensor, ...]], torch.Tensor]:
    """A function that runs one batch (any batch size the file allows) through the exported model in the target's
    runtime, or `runtime` (OpenVINO at the target's float precision), and returns its first output."""
    runtime = runtime or ("openvino" if target.runtime == "openvino" else "onnxruntime")
    if runtime == "openvino":
        import openvino as ov
        import openvino.properties as props
        import openvino.properties.hint as hints

        ov_type = ov.Type.bf16 if target.float_precision == "bf16" else ov.Type.f32
        compiled = ov.Core().compile_model(str(path), "CPU", {hints.inference_precision: ov_type,
                                                             props.inference_num_threads: target.threads})

        def run_ov(batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
            result = compiled({name: t.numpy() for name, t in zip(input_names, batch)})
            return torch.from_numpy(np.asarray(result[compiled.outputs[0]])).float()

        return run_ov
    session = target.runner(runtime="onnxruntime").session(path)
    names = [i.name for i in session.get_inputs()]

    def run_ort(batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        feeds = {name: t.numpy() for name, t in zip(input_names, batch) if name in names}
        return torch.from_numpy(session.run(None, feeds)[0]).float()

    return run_ort
