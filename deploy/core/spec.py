"""A model input (name, shape with named dynamic axes, dtype) and the dtype names deploy uses.

torch is imported only where a tensor is made, so that code reading specs (ONNX files, reports) stays light.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from deploy.core.errors import ConfigError

if TYPE_CHECKING:
    import torch

DTYPE_NAMES = ("float32", "float16", "bfloat16", "float64", "int64", "int32", "int8", "uint8", "bool")


@dataclass(frozen=True)
class InputSpec:
    """One model input. A dimension is an int, or a name for a dynamic axis ("batch", "sequence")."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str = "float32"

    def concrete_shape(self, sizes: dict[str, int] | None = None) -> tuple[int, ...]:
        sizes = {"batch": 1, **(sizes or {})}
        return tuple(d if isinstance(d, int) else int(sizes.get(d, 1)) for d in self.shape)

    def example(self, sizes: dict[str, int] | None = None, generator: "torch.Generator | None" = None
                ) -> "torch.Tensor":
        """A deterministic stand-in tensor of this spec (for tracing, export and timing, never for fidelity)."""
        import torch

        shape = self.concrete_shape(sizes)
        dtype = torch_dtype(self.dtype)
        gen = generator or torch.Generator().manual_seed(0)
        if dtype.is_floating_point:
            return torch.randn(shape, generator=gen).to(dtype)
        if dtype == torch.bool:
            return torch.ones(shape, dtype=torch.bool)
        if self.name in ("attention_mask",):
            return torch.ones(shape, dtype=dtype)
        if self.name in ("token_type_ids",):
            return torch.zeros(shape, dtype=dtype)
        return torch.randint(0, 100, shape, generator=gen, dtype=dtype)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "InputSpec":
        return cls(data["name"], tuple(data["shape"]), data.get("dtype", "float32"))


def torch_dtype(name: str) -> "torch.dtype":
    import torch

    if name not in DTYPE_NAMES:
        raise ConfigError(f"unknown dtype '{name}'", f"use one of {', '.join(DTYPE_NAMES)}")
    return getattr(torch, name)


def dtype_name(dtype: Any) -> str:
    """'float32' for torch.float32 (and for numpy's float32)."""
    name = str(dtype).replace("torch.", "")
    if name not in DTYPE_NAMES:
        raise ConfigError(f"unsupported dtype {dtype}")
    return name
