"""Checks on a loaded model before any work: it runs on its input spec, its inputs fit in memory, its weights are
finite numbers. Each failure is one line (exit 2) naming what was wrong."""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch

from deploy.core.errors import InputSpecError, ModelLoadError
from deploy.core.spec import InputSpec, torch_dtype
from deploy.core.user_code import short as _short


def check_runs(module: torch.nn.Module, inputs: Sequence[InputSpec], sizes: dict[str, int] | None = None) -> Any:
    """Run the model once on its input spec; a mismatch becomes one line naming the shape that was tried."""
    check_input_sizes(inputs, sizes)
    shapes = ", ".join(f"{s.name}:{'x'.join(map(str, s.concrete_shape(sizes)))}:{s.dtype}" for s in inputs)
    gen = torch.Generator().manual_seed(0)
    try:
        args = tuple(spec.example(sizes, gen) for spec in inputs)
        with torch.inference_mode():
            return module(*args)
    except MemoryError:
        raise InputSpecError(f"the model ran out of memory on input {shapes}", "pass smaller --input-shape sizes") from None
    except Exception as exc:
        if "alloc" in str(exc).lower() and "memory" in str(exc).lower():
            raise InputSpecError(f"the model ran out of memory on input {shapes}",
                                 "pass smaller --input-shape sizes") from None
        raise InputSpecError(f"the model does not run on input {shapes} ({_short(exc)})",
                             "pass the right --input-shape NAME:DIMS:DTYPE for each input") from None


def _memory_bytes() -> int:
    import os

    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 34


def check_input_sizes(specs: Iterable[InputSpec], sizes: dict[str, int] | None = None) -> None:
    """Refuse, before allocating, inputs that could not fit in memory (a typo such as 1x3x22400x22400)."""
    limit = _memory_bytes() // 8  # one input may take an eighth of memory: the model needs room for activations
    for spec in specs:
        shape = spec.concrete_shape(sizes)
        count = 1
        for dim in shape:
            count *= int(dim)
        need = count * torch.empty((), dtype=torch_dtype(spec.dtype)).element_size()
        if need > limit:
            raise InputSpecError(f"input {spec.name}:{'x'.join(map(str, shape))} would take {need / 2**30:.3g} GiB, "
                                 f"more than this machine can run ({limit / 2**30:.3g} GiB per input)",
                                 "check the --input-shape dimensions")


def check_finite_weights(module: torch.nn.Module) -> None:
    """NaN or infinite weights make every fidelity number meaningless: refuse them before any work, naming one."""
    tensors = list(module.state_dict().items())
    for name, tensor in tensors:
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise ModelLoadError(f"the model's tensor {name} holds {bad} NaN or infinite value(s) of {tensor.numel()}",
                                 "fix the training or the checkpoint; deploy cannot measure fidelity of such a model")
