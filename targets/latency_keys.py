"""The lookup-table keys of a torch model: each Conv2d (with the BN/ReLU it fuses with) and Linear, found with
forward hooks, and each activation x activation matmul (attention) found at the ATen level outside them. The
allocator edits these keys (fewer channels, another precision, a rank) to price options it has not built.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from deploy.pipeline import InputSpec
from deploy.targets.latency_ops import OpKey, conv_key, linear_key

FUNCTIONAL = "(functional)"


@dataclass(frozen=True)
class PricedModel:
    """A model's ops priced by a table: (module, key, ms) rows, their sum, and the closed-loop total."""

    ops: tuple[tuple[str, OpKey, float], ...]
    table_ms: float
    ms: float
    ratio: float = 1.0


class _Matmuls(TorchDispatchMode):
    """Records bmm calls that happen outside a Conv2d/Linear forward (attention scores and context)."""

    def __init__(self) -> None:
        super().__init__()
        self.depth = 0  # > 0 inside a hooked module
        self.found: list[tuple[int, int, int, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.depth == 0 and func.overloadpacket.__name__ == "bmm":
            a, b = args[0], args[1]
            self.found.append((int(a.shape[0]), int(a.shape[1]), int(a.shape[2]), int(b.shape[2])))
        return out


def model_keys(module: nn.Module, inputs: Sequence[InputSpec],
               precision: str | Mapping[str, str] = "fp32") -> list[tuple[str, OpKey]]:
    """(module name, key) for every conv, linear and attention matmul of one forward pass at `inputs`.

    `precision` is one precision for all, or a map from module name to precision (missing names: fp32)."""
    keys: list[tuple[str, OpKey]] = []
    recorder = _Matmuls()
    handles = []

    def prec(name: str) -> str:
        return precision if isinstance(precision, str) else precision.get(name, "fp32")

    def pre_hook(mod: nn.Module, args: Any) -> None:
        recorder.depth += 1

    def make_hook(name: str):
        def hook(mod: nn.Module, args: Any, out: Any) -> None:
            recorder.depth -= 1
            x = args[0]
            if isinstance(mod, nn.Conv2d):
                k = int(round(math.sqrt(mod.kernel_size[0] * mod.kernel_size[1])))
                keys.append((name, conv_key(mod.in_channels, mod.out_channels, (int(x.shape[-2]), int(x.shape[-1])),
                                            k, int(mod.stride[0]), mod.groups, prec(name))))
            else:
                tokens = int(x.numel() // x.shape[-1])
                keys.append((name, linear_key(tokens, mod.in_features, mod.out_features, prec(name))))
        return hook

    for name, mod in module.named_modules():
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            handles.append(mod.register_forward_pre_hook(pre_hook))
            handles.append(mod.register_forward_hook(make_hook(name)))
    try:
        gen = torch.Generator().manual_seed(0)
        args = tuple(spec.example(None, gen) for spec in inputs)
        with torch.no_grad(), recorder:
            module.eval()(*args)
    finally:
        for h in handles:
            h.remove()
    matmul_prec = precision if isinstance(precision, str) else precision.get(FUNCTIONAL, "fp32")
    keys += [(FUNCTIONAL, OpKey("matmul", shape, matmul_prec)) for shape in recorder.found]
    return keys


def measured_correction(table: Any, module: nn.Module, inputs: Sequence[InputSpec],
                        precision: str | Mapping[str, str] = "fp32", measured_ms: float | None = None) -> Any:
    """The closed loop for one built model: its end-to-end latency (measured here with the table's runtime and
    threads unless given; fp32 only, an int8 model is measured as its QDQ file elsewhere) over its table sum."""
    import tempfile
    from pathlib import Path


    keys = [key for _, key in model_keys(module, inputs, precision)]
    if measured_ms is None:
        from deploy.targets.latency_export import export_static, feeds_for
        from deploy.targets.measure import measure
        from deploy.targets.runner import get_runner

        with tempfile.TemporaryDirectory(prefix="deploy-loop-") as tmp:
            path = export_static(module, inputs, Path(tmp) / "model.onnx")
            runner = get_runner(table.config.runtime, table.config.threads)
            measured_ms = float(measure(runner.prepare(path, feeds_for(inputs)), table.config.measure).summary["p50"])
    return table.correction(keys, measured_ms)


def price_model(table: Any, keys: Sequence[tuple[str, OpKey]], correction: Any = None,
                measure: bool = False) -> PricedModel:
    """Price a model's keys with a LatencyTable; `correction` (a table Correction) closes the loop."""
    rows = tuple((name, key, table.lookup(key, measure=measure)) for name, key in keys)
    total = sum(ms for _, _, ms in rows)
    ratio = correction.ratio if correction is not None else 1.0
    return PricedModel(rows, total, total * ratio, ratio)
