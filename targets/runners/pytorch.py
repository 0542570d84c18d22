"""PyTorch eager on the CPU: the reference every exported model is compared against (same feeds, same loop).

Runs under torch.inference_mode with torch.set_num_threads(threads); bf16 runs under CPU autocast.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

from deploy.core.errors import ModelLoadError, UserInputError
from deploy.targets.runners.registry import RunnerConfig, register_runner


@register_runner("torch")
class TorchRunner:
    """PyTorch eager. The model is an nn.Module, or the path of a TorchScript .pt or torch.export .pt2 file;
    feeds are passed positionally in their dict order."""

    name = "torch"

    def __init__(self, config: RunnerConfig):
        if config.precision not in (None, "f32", "bf16"):
            raise UserInputError(f"the torch runner takes precision f32 or bf16, got {config.precision}")
        self.config = config
        self.precision = config.precision or "f32"

    def describe(self) -> dict[str, Any]:
        import torch

        return {
            "runtime": self.name,
            "version": torch.__version__,
            "device": "cpu",
            "threads": self.config.threads,
            "mode": "eager, inference_mode",
            "precision": self.precision,
        }

    def prepare(self, model: Any, feeds: dict[str, np.ndarray]) -> Callable[[], object]:
        import torch

        module = load_torch_module(model)
        try:
            module.eval()
        except NotImplementedError:  # a torch.export module has no train/eval switch; it is traced in eval already
            pass
        torch.set_num_threads(self.config.threads)
        args = tuple(torch.from_numpy(np.ascontiguousarray(arr)) for arr in feeds.values())
        autocast = self.precision == "bf16"

        def run_once(module=module, args=args) -> object:
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                return module(*args)

        run_once()
        return run_once


def load_torch_module(model: Any) -> Any:
    """An nn.Module as given, or loaded from TorchScript (.pt) / torch.export (.pt2). Pickles are not loaded here."""
    import torch

    if isinstance(model, torch.nn.Module):
        return model
    if not isinstance(model, (str, Path)):
        raise UserInputError(f"the torch runner takes an nn.Module or a .pt/.pt2 path, got {type(model).__name__}")
    path = Path(model)
    if not path.is_file():
        raise ModelLoadError(f"model file {path} does not exist", "check the path")
    try:
        if path.suffix == ".pt2":
            from deploy.core.model.load import load_exported_program

            return load_exported_program(path).module()
        if path.suffix == ".pt":
            return torch.jit.load(str(path), map_location="cpu")
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"torch cannot load {path} ({type(exc).__name__})",
                             "give a TorchScript .pt or a torch.export .pt2 file") from None
    raise ModelLoadError(f"the torch runner cannot run {path.name}",
                         "give an nn.Module, a TorchScript .pt or a torch.export .pt2; for .onnx use ort or openvino")
