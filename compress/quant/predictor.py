"""A cheap accuracy predictor fitted on measured candidates (EQ-Net's CQAP idea), to rank many candidates without
simulating each.

Features per candidate: one indicator per (layer, non-float option) plus the log of the additive sensitivity sum;
target: the log of the measured output MSE. A ridge regression (closed form, numpy) is enough at this size and
cannot overfit silently: its rank correlation (Spearman) on held-out measured candidates is reported.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

EPS = 1e-12


@dataclass
class AccuracyPredictor:
    spaces: dict[str, tuple[str, ...]]  # layer -> option labels (the first is the float one)
    sensitivity: dict[str, dict[str, float]]  # layer -> label -> additive distortion
    ridge: float = 1e-2
    columns: list[tuple[str, str]] = field(default_factory=list)
    weights: np.ndarray | None = None
    bias: float = 0.0

    def __post_init__(self) -> None:
        self.columns = [(n, label) for n, labels in self.spaces.items() for label in labels[1:]]
        self._index = {c: i for i, c in enumerate(self.columns)}

    def additive(self, labels: dict[str, str]) -> float:
        return sum(self.sensitivity.get(n, {}).get(label, 0.0) for n, label in labels.items())

    def features(self, labels: dict[str, str]) -> np.ndarray:
        x = np.zeros(len(self.columns) + 1)
        for n, label in labels.items():
            i = self._index.get((n, label))
            if i is not None:
                x[i] = 1.0
        x[-1] = math.log(self.additive(labels) + EPS)
        return x

    def fit(self, candidates: Sequence[dict[str, str]], measured: Sequence[float]) -> "AccuracyPredictor":
        x = np.stack([self.features(c) for c in candidates])
        y = np.log(np.asarray(measured, dtype=float) + EPS)
        mean_x, mean_y = x.mean(0), y.mean()
        xc = x - mean_x
        gram = xc.T @ xc
        lam = self.ridge * (np.trace(gram) / max(gram.shape[0], 1) + 1e-12)
        self.weights = np.linalg.solve(gram + lam * np.eye(gram.shape[0]), xc.T @ (y - mean_y))
        self.bias = float(mean_y - mean_x @ self.weights)
        return self

    def predict(self, labels: dict[str, str]) -> float:
        """Predicted output MSE (not its log)."""
        if self.weights is None:
            return self.additive(labels)
        return float(math.exp(self.features(labels) @ self.weights + self.bias))


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Rank correlation; nan when fewer than 3 points or a constant side."""
    if len(a) < 3 or len(set(a)) < 2 or len(set(b)) < 2:
        return float("nan")
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def holdout_split(n: int, test_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic train / test indices (at least 3 test points when n allows)."""
    order = np.random.default_rng(seed).permutation(n).tolist()
    n_test = min(max(3, int(round(n * test_fraction))), max(n - 3, 0))
    return order[n_test:], order[:n_test]
