"""What the user asked for, as one budget: a latency (--budget-ms, --speedup), a size (--size-mb), or a fidelity
floor (--max-drop, or the documented default when no budget flag is given).

A latency or size budget means: the most faithful model within it. A fidelity floor means: the fastest model
whose held-out fidelity stays above it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from deploy.core.errors import UserInputError

BudgetKind = Literal["latency_ms", "speedup", "size_mb", "max_drop", "default_floor"]

# The default fidelity floor, by task: what "no visible change" means for most users. Documented in CLI.md.
DEFAULT_FLOOR_VALUE = 0.99
DEFAULT_FLOORS = {"classification": ("top1_agreement", DEFAULT_FLOOR_VALUE),
                  "embedding": ("pooled_cosine", DEFAULT_FLOOR_VALUE), "regression": ("cosine", DEFAULT_FLOOR_VALUE)}


@dataclass(frozen=True)
class Budget:
    kind: BudgetKind = "default_floor"
    value: float = 0.0

    def __post_init__(self) -> None:
        if not math.isfinite(self.value):
            raise UserInputError(f"the {self.flag} budget must be a finite number, got {self.value}")
        if self.kind not in ("latency_ms", "speedup", "size_mb", "max_drop", "default_floor"):
            raise UserInputError(f"unknown budget kind '{self.kind}'")
        if self.kind in ("latency_ms", "size_mb") and self.value <= 0:
            raise UserInputError(f"the {self.flag} budget must be positive, got {self.value:g}")
        if self.kind == "speedup" and self.value < 1.0:
            raise UserInputError(f"--speedup must be at least 1 (it is a factor over the dense model), got {self.value:g}")
        if self.kind == "max_drop" and not 0.0 <= self.value < 1.0:
            raise UserInputError(f"--max-drop must be in [0, 1) (a fraction of the fidelity metric), got {self.value:g}")

    @property
    def flag(self) -> str:
        return {"latency_ms": "--budget-ms", "speedup": "--speedup", "size_mb": "--size-mb",
                "max_drop": "--max-drop", "default_floor": "(default fidelity floor)"}[self.kind]

    @property
    def is_fidelity_floor(self) -> bool:
        return self.kind in ("max_drop", "default_floor")

    def describe(self) -> str:
        if self.kind == "default_floor":
            return "no budget flag: the fastest model within the default fidelity floor"
        return f"{self.flag} {self.value:g}"


def from_flags(budget_ms: float | None = None, speedup: float | None = None, size_mb: float | None = None,
               max_drop: float | None = None) -> Budget:
    """At most one budget flag; none means the default fidelity floor."""
    given = [(k, v) for k, v in (("latency_ms", budget_ms), ("speedup", speedup), ("size_mb", size_mb),
                                  ("max_drop", max_drop)) if v is not None]
    if len(given) > 1:
        raise UserInputError("give one budget flag at most (--budget-ms, --speedup, --size-mb or --max-drop)",
                             "they each define the whole budget")
    if not given:
        return Budget()
    kind, value = given[0]
    return Budget(kind, float(value))  # type: ignore[arg-type]


def latency_target_ms(budget: Budget, dense_ms: float) -> float | None:
    """The latency the plan must meet, or None when the budget is not a latency."""
    if budget.kind == "latency_ms":
        return budget.value
    if budget.kind == "speedup":
        return dense_ms / budget.value
    return None


def fidelity_floor(budget: Budget, task: str) -> tuple[str, float] | None:
    """(metric, minimum value) for fidelity-floor budgets; the metric is the task's primary one."""
    if not budget.is_fidelity_floor:
        return None
    metric, default = DEFAULT_FLOORS[task]
    if budget.kind == "default_floor":
        return metric, default
    return metric, 1.0 - budget.value
