"""Plain ONNX export of a torch module, with named inputs and dynamic axes where the input spec names them.

Written atomically: the file appears complete or not at all.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from deploy.core.atomic_io import atomic_path
from deploy.core.errors import DeployError
from deploy.core.spec import InputSpec

DEFAULT_OPSET = 18


@dataclass(frozen=True)
class OnnxExportConfig:
    opset: int = DEFAULT_OPSET
    dynamic: bool = True  # keep the spec's named dims (batch, sequence) dynamic
    output_names: tuple[str, ...] = ("output",)
    dynamo: bool = False  # the TorchScript-based exporter: fast and robust for CNNs and BERT-style encoders


def export_onnx(module: torch.nn.Module, inputs: Sequence[InputSpec], path: str | Path,
                config: OnnxExportConfig = OnnxExportConfig()) -> Path:
    """Export `module` (eval mode) to `path`; returns the path. Inputs are named after the spec."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    sizes = {"batch": 2} if config.dynamic else None  # trace with batch 2 so batch stays symbolic
    args = tuple(spec.example(sizes if any(isinstance(d, str) for d in spec.shape) else None, gen) for spec in inputs)
    dynamic_axes = None
    if config.dynamic:
        dynamic_axes = {}
        for spec in inputs:
            axes = {i: d for i, d in enumerate(spec.shape) if isinstance(d, str)}
            if axes:
                dynamic_axes[spec.name] = axes
        batch_dynamic = any(spec.shape and isinstance(spec.shape[0], str) for spec in inputs)
        if batch_dynamic:
            for name in config.output_names:
                dynamic_axes[name] = {0: "batch"}
    # nn.TransformerEncoder / MultiheadAttention in eval mode take a fused fast path (aten::_transformer_encoder_
    # layer_fwd, _native_multi_head_attention) that has no ONNX form: exported as their plain operators instead
    fastpath = torch.backends.mha.get_fastpath_enabled()
    try:
        module = module.eval()
        torch.backends.mha.set_fastpath_enabled(False)
        with atomic_path(path) as tmp, warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, args, str(tmp), input_names=[s.name for s in inputs],
                              output_names=list(config.output_names), opset_version=config.opset,
                              dynamic_axes=dynamic_axes or None, dynamo=config.dynamo, external_data=False)
    except DeployError:
        raise
    except Exception as exc:
        raise DeployError(f"ONNX export failed ({' '.join(str(exc).split())[:200]})",
                          "rerun with --debug for the traceback") from exc
    finally:  # the temporary file is atomic_path's to remove
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return path
