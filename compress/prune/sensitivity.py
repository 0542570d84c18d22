"""What pruning a unit costs in fidelity: importance rankings and distortion curves, cached on disk.

d_l(n) is the mean squared change of the model output on fixed calibration batches when ONLY unit l loses its n
least important elements (the seed paper's per-layer distortion). Units are zero-masked in place, which computes
exactly what the physically pruned model computes (see edit), so a curve point costs one forward pass, and
only from the unit's first layer on (trace replays the untouched prefix). A curve may be measured at a
subset of its legal counts (geometric in the count, so small removals are resolved finely) and interpolated
between them. Curves are cached as JSON keyed by the model's weights, the exact calibration tensors, the unit set
and the measured counts.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
from torch import nn

from deploy.compress.prune.edit import Masker, Removal, slice_params
from deploy.compress.prune.refit import InputMoments
from deploy.compress.prune.trace import CallTrace, PrefixReuse, unit_plans
from deploy.compress.prune.units import PruneUnit
from deploy.core.data import concatenated
from deploy.core.cache import model_hash
from deploy.core.metrics import first_tensor

CACHE_VERSION = 2
Importance = Literal["l2"]


# --- importance: which elements of a unit go first -----------------------------------------------------------------

def ranking(module: nn.Module, unit: PruneUnit, importance: Importance = "l2") -> torch.Tensor:
    """Element indices, least important first. Channels and heads: group-aggregated L2 magnitude (the mean over
    the unit's slices of each element's L2 norm); single weights: |w|; 2:4: each group's two smallest first."""
    if importance != "l2":
        raise ValueError(f"unknown importance {importance!r}")
    with torch.no_grad():
        if unit.kind == "sparse":
            return torch.argsort(module.get_submodule(unit.root).weight.detach().abs().reshape(-1), stable=True)
        if unit.kind == "2:4":
            return _two_four_order(module.get_submodule(unit.root).weight.detach())
        scores = torch.zeros(unit.size, dtype=torch.float64)
        for slice_ in unit.slices:
            scores += _slice_norms(module, slice_, unit.size)
        return torch.argsort(scores / len(unit.slices), stable=True)


def _slice_norms(module: nn.Module, slice_: Any, size: int) -> torch.Tensor:
    squares = torch.zeros(size, dtype=torch.float64)
    for param, dim in slice_params(module, slice_):
        moved = param.detach().double().movedim(dim, 0)
        per_channel = moved.reshape(moved.shape[0], -1).pow(2).sum(1)
        squares += per_channel.reshape(size, slice_.width).sum(1)
    return squares.sqrt()


def _two_four_order(weight: torch.Tensor) -> torch.Tensor:
    """Flat positions of the two smallest |w| in every 4 consecutive input weights, then the rest."""
    flat = torch.arange(weight.numel()).reshape(weight.shape).movedim(1, -1).reshape(-1, 4)
    magnitude = weight.abs().movedim(1, -1).reshape(-1, 4)
    small = magnitude.argsort(dim=1, stable=True)[:, :2]
    zeroed = flat.gather(1, small).reshape(-1).sort().values
    rest = torch.ones(weight.numel(), dtype=torch.bool)
    rest[zeroed] = False
    return torch.cat([zeroed, torch.nonzero(rest).reshape(-1)])


def removal_for(rankings: dict[str, torch.Tensor], removed: dict[str, int]) -> Removal:
    """The plan (unit -> count) as element indices: the first `count` of each ranking."""
    return {name: rankings[name][: int(count)] for name, count in removed.items() if int(count) > 0}


# --- the probe: output change on fixed calibration batches ---------------------------------------------------------

@dataclass
class ProbeData:
    """Fixed batches (tuples in input order) and the input names; hashed by their exact bytes."""

    batches: list[tuple[torch.Tensor, ...]]
    input_names: tuple[str, ...]
    data_hash: str = ""

    def __post_init__(self) -> None:
        if not self.batches:
            raise ValueError("sensitivity needs at least one calibration batch")
        if not self.data_hash:
            digest = hashlib.sha256()
            for batch in self.batches:
                for tensor in batch:
                    digest.update(str((tuple(tensor.shape), str(tensor.dtype))).encode())
                    digest.update(tensor.contiguous().numpy().tobytes())
            self.data_hash = digest.hexdigest()[:16]

    @classmethod
    def from_samples(cls, samples: Sequence[tuple[torch.Tensor, ...]], input_names: Sequence[str],
                     limit: int, batch_size: int) -> "ProbeData":
        """The first `limit` samples (batch 1 each), concatenated into batches: deterministic by construction."""
        return cls(concatenated(list(samples)[:limit], batch_size), tuple(input_names))




class OutputProbe:
    """Reference outputs of the unpruned model; `distortion()` is the mean squared change now. For sequence
    outputs with an attention_mask input, padded positions are left out (nobody reads them)."""

    def __init__(self, module: nn.Module, data: ProbeData):
        self.module = module.eval()
        self.data = data
        self.weights = [self._weight(batch) for batch in data.batches]
        self.reference = self.outputs()
        total = sum(self._weighted(r * r, w)[0] for r, w in zip(self.reference, self.weights))
        self.reference_power = total / sum(self._weighted(r, w)[1] for r, w in zip(self.reference, self.weights))

    def _weight(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor | None:
        if "attention_mask" not in self.data.input_names:
            return None
        return batch[self.data.input_names.index("attention_mask")].float()

    @staticmethod
    def _weighted(squares: torch.Tensor, weight: torch.Tensor | None) -> tuple[float, float]:
        if weight is None or squares.dim() != 3 or squares.shape[:2] != weight.shape:
            return squares.double().sum().item(), float(squares.numel())
        w = weight.double().unsqueeze(-1)
        return (squares.double() * w).sum().item(), w.sum().item() * squares.shape[-1]

    def outputs(self, module: nn.Module | None = None, reuse: PrefixReuse | None = None,
                unit: str | None = None) -> list[torch.Tensor]:
        """Outputs on every probe batch; with `reuse` (the probe's own module, only `unit` masked) the untouched
        prefix of each pass is replayed from the reference pass instead of recomputed."""
        model = module if module is not None else self.module
        results = []
        with torch.no_grad():
            for index, batch in enumerate(self.data.batches):
                if reuse is not None and unit is not None and module is None:
                    with reuse.replaying(unit, index):
                        results.append(first_tensor(model(*batch)).detach().float())
                else:
                    results.append(first_tensor(model(*batch)).detach().float())
        return results

    def distortion(self, module: nn.Module | None = None, reuse: PrefixReuse | None = None,
                   unit: str | None = None) -> float:
        total = count = 0.0
        for ref, out, weight in zip(self.reference, self.outputs(module, reuse, unit), self.weights):
            s, c = self._weighted((out - ref).pow(2), weight)
            total += s
            count += c
        return total / count


# --- curves ---------------------------------------------------------------------------------------------------------

@dataclass
class Curve:
    """Distortion at every legal count of a unit; those not in `measured` are interpolated."""

    removed: tuple[int, ...]
    distortion: tuple[float, ...]
    measured: tuple[int, ...] = ()  # empty: every count was measured

    def at(self, count: int) -> float:
        return self.distortion[self.removed.index(int(count))]


def measured_counts(options: Sequence[int], points: int) -> tuple[int, ...]:
    """The legal counts a curve is measured at: 0, the smallest and largest removal, and in between counts spaced
    geometrically (each about the same factor above the last), `points` non-zero counts in all. Every count when
    `points` is 0 or covers them all."""
    nonzero = sorted(int(n) for n in options if int(n) > 0)
    if points <= 0 or len(nonzero) <= points:
        return tuple(sorted(int(n) for n in options))
    low, high = nonzero[0], nonzero[-1]
    chosen = {low, high}
    for i in range(1, points - 1):
        want = low * (high / low) ** (i / (points - 1))
        chosen.add(min(nonzero, key=lambda n: (abs(math.log(n / want)), n)))
    while len(chosen) < points:  # two targets snapped to one count: split the widest remaining gap
        ordered = sorted(chosen)
        gaps = [(b / a, a, b) for a, b in zip(ordered, ordered[1:]) if any(a < n < b for n in nonzero)]
        _, a, b = max(gaps)
        chosen.add(min((n for n in nonzero if a < n < b), key=lambda n: abs(math.log(n / math.sqrt(a * b)))))
    return (0, *sorted(chosen))


def interpolate(options: Sequence[int], measured: dict[int, float]) -> tuple[float, ...]:
    """Every option's distortion from the measured ones (0 at 0): piecewise linear in the count."""
    xs = sorted(measured)
    values = []
    for n in options:
        if n in measured:
            values.append(float(measured[n]))
            continue
        right = next((x for x in xs if x > n), xs[-1])
        left = max((x for x in xs if x < n), default=xs[0])
        if right == left:
            values.append(float(measured[left]))
            continue
        t = (n - left) / (right - left)
        values.append(float(measured[left] + t * (measured[right] - measured[left])))
    return tuple(values)


@dataclass
class Curves:
    curves: dict[str, Curve]
    reference_power: float
    key: str
    cached: bool = False
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def predicted(self, removed: dict[str, int]) -> float:
        """The additive prediction: sum of each unit's distortion alone."""
        return sum(self.curves[name].at(count) for name, count in removed.items())

    def to_dict(self) -> dict[str, Any]:
        return {"version": CACHE_VERSION, "key": self.key, "reference_power": self.reference_power,
                "units": {n: {"removed": list(c.removed), "distortion": list(c.distortion),
                              "measured": list(c.measured)} for n, c in self.curves.items()}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Curves":
        curves = {n: Curve(tuple(v["removed"]), tuple(v["distortion"]), tuple(v.get("measured", ())))
                  for n, v in data["units"].items()}
        return cls(curves, float(data["reference_power"]), data["key"], cached=True)


def cache_key(module: nn.Module, units: Sequence[PruneUnit], data: ProbeData, importance: str,
              points: int = 0, refit: InputMoments | None = None) -> str:
    signature = {"model": model_hash(module), "data": data.data_hash, "importance": importance,
                 "version": CACHE_VERSION, "points": int(points), "refit": refit.key() if refit else None,
                 "units": [[u.name, u.kind, u.size, list(u.options), [list(map(str, (s.module, s.axis, s.width)))
                                                                      for s in u.slices]] for u in units]}
    return hashlib.sha256(json.dumps(signature, sort_keys=True).encode()).hexdigest()[:20]


def distortion_curves(probe: OutputProbe, units: Sequence[PruneUnit], importance: Importance = "l2",
                      cache_dir: Path | None = None, points: int = 0, reuse: PrefixReuse | None = None,
                      refit: InputMoments | None = None) -> Curves:
    """d_l(n) for every unit and legal count on the probe's model and data, from the cache when the same weights,
    data, units, measured counts and refit were seen before. `points`: non-zero counts measured per unit (0: all),
    the rest interpolated; `reuse`: replay of the untouched prefix (built here when not given); `refit`: the
    readers of removed channels refit at every point (`prune.refit`)."""
    start = time.perf_counter()
    key = cache_key(probe.module, units, probe.data, importance, points, refit)
    path = Path(cache_dir) / "sensitivity" / f"{key}.json" if cache_dir is not None else None
    if path is not None and path.exists():
        try:
            curves = Curves.from_dict(json.loads(path.read_text()))
            curves.seconds = time.perf_counter() - start
            return curves
        except (ValueError, KeyError, TypeError):
            pass  # a damaged cache entry is recomputed
    if reuse is None:
        trace = CallTrace.record(probe.module, probe.data.batches[0])
        reuse = PrefixReuse(probe.module, trace, unit_plans(probe.module, trace, units), probe.data.batches)
    curves = _measure_curves(probe, units, importance, key, points, reuse, refit)
    curves.seconds = time.perf_counter() - start
    if path is not None:
        _write_atomic(path, json.dumps(curves.to_dict()))
    return curves


def _measure_curves(probe: OutputProbe, units: Sequence[PruneUnit], importance: Importance, key: str,
                    points: int, reuse: PrefixReuse | None, refit: InputMoments | None) -> Curves:
    module = probe.module
    masker = Masker(module, units, refit)
    if reuse is not None:
        reuse.record()  # before any mask: the recorded outputs are the reference pass's
    result = {}
    for unit in units:
        order = ranking(module, unit, importance)
        counts = measured_counts(unit.options, points)
        measured = {0: 0.0}
        for count in counts:
            if count == 0:
                continue
            with masker.applied({unit.name: order[:count]}):
                measured[count] = probe.distortion(reuse=reuse, unit=unit.name)
        exact = len(counts) == len(unit.options)
        result[unit.name] = Curve(tuple(unit.options), interpolate(unit.options, measured),
                                  () if exact else tuple(counts))
    return Curves(result, probe.reference_power, key)


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{id(text)}")
    tmp.write_text(text)
    tmp.replace(path)


__all__ = ["ranking", "removal_for", "ProbeData", "OutputProbe", "Curve", "Curves", "distortion_curves",
           "model_hash", "cache_key", "measured_counts", "interpolate"]
