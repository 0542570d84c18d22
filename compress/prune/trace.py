"""Reusing the untouched prefix of a forward pass while one unit is masked.

When only unit l is masked, every module call that finishes before the first call of a layer whose parameters
unit l masks computes exactly what it computed on the reference pass (same inputs, same weights). Its recorded
output can be returned instead of recomputed, so a distortion-curve point of a late unit costs only the forward
pass from that unit on. The result is the same function evaluated the same way: only work that provably repeats
the reference pass is skipped.

A `CallTrace` records the module calls of one forward pass (order, nesting, the estimated work of the operators
each runs, whether the output is plain tensors). `skip_plan` finds, for a set of masked parameters, the outermost
calls that may be replayed; `PrefixReuse` records those outputs on the probe batches and replays them during a
masked forward. The estimated work also sizes the probe (problem.probe_samples).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from deploy.compress.prune.edit import slice_params
from deploy.compress.prune.units import PruneUnit

MAX_REUSE_BYTES = 1 << 30  # recorded outputs kept for replay, over all probe batches
ELEMENT_MACS = 40  # an element an operator writes costs about this many MACs of time (norms, activations, adds)


@dataclass
class Call:
    index: int
    name: str
    nth: int  # this module's nth call in the pass
    parent: int  # index of the enclosing call, -1 for the outermost
    start: int
    end: int = -1
    work: float = 0.0  # operators run by this call itself (children not included): MACs + ELEMENT_MACS/element
    nbytes: int = 0  # size of the output
    plain: bool = False  # the output is a tensor, or tuples/lists of tensors (and None): it can be replayed


def _plain(output: Any) -> bool:
    if output is None or isinstance(output, torch.Tensor):
        return True
    if type(output) in (tuple, list):
        return all(_plain(o) for o in output)
    return False


def _nbytes(output: Any) -> int:
    if isinstance(output, torch.Tensor):
        return output.numel() * output.element_size()
    if type(output) in (tuple, list):
        return sum(_nbytes(o) for o in output)
    return 0


def _numel(output: Any) -> int:
    if isinstance(output, torch.Tensor):
        return output.numel()
    if type(output) in (tuple, list):
        return sum(_numel(o) for o in output)
    return 0


def _clone(output: Any) -> Any:
    if isinstance(output, torch.Tensor):
        return output.detach().clone()
    if type(output) in (tuple, list):
        return type(output)(_clone(o) for o in output)
    return output


def _batch_size_of(batch: Sequence[torch.Tensor]) -> int:
    return int(batch[0].shape[0]) if batch and batch[0].dim() else 1


def _op_work(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
    """Estimated cost of one operator: multiply-accumulates for matrix products, convolutions and attention,
    plus ELEMENT_MACS per element written; views are free."""
    if getattr(func, "is_view", False):
        return 0.0
    from torch.utils.flop_counter import flop_registry

    macs = 0.0
    packet = getattr(func, "overloadpacket", None)
    if packet in flop_registry:
        try:
            macs = flop_registry[packet](*args, **kwargs, out_val=out) / 2
        except Exception:  # an overload the formula does not cover: elements only
            macs = 0.0
    elif "scaled_dot_product" in str(packet) and len(args) >= 3:
        q, k, v = args[:3]
        macs = q.numel() * k.shape[-2] + q.numel() // q.shape[-1] * k.shape[-2] * v.shape[-1]
    return float(macs + ELEMENT_MACS * _numel(out))


class _WorkMode(TorchDispatchMode):
    """Adds every operator's work to the innermost module call running it."""

    def __init__(self, recorder: "_Recorder"):
        super().__init__()
        self.recorder = recorder

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.recorder._stack:
            self.recorder.calls[self.recorder._stack[-1]].work += _op_work(func, args, kwargs, out)
        return out


class _Recorder:
    """Forward pre/post hooks on every module: the calls of one pass, in order."""

    def __init__(self, module: nn.Module, keep: set[tuple[str, int]] = frozenset()):
        self.module = module
        self.keep = keep
        self.calls: list[Call] = []
        self.outputs: dict[int, Any] = {}
        self._stack: list[int] = []
        self._counts: dict[str, int] = {}
        self._clock = 0

    def _pre(self, name: str):
        def hook(mod: nn.Module, args: Any) -> None:
            nth = self._counts.get(name, 0)
            self._counts[name] = nth + 1
            call = Call(len(self.calls), name, nth, self._stack[-1] if self._stack else -1, self._clock)
            self._clock += 1
            self.calls.append(call)
            self._stack.append(call.index)
        return hook

    def _post(self, name: str):
        def hook(mod: nn.Module, args: Any, output: Any) -> None:
            call = self.calls[self._stack.pop()]
            call.end = self._clock
            self._clock += 1
            call.plain = _plain(output)
            call.nbytes = _nbytes(output)
            if (call.name, call.nth) in self.keep and call.plain:
                self.outputs[call.index] = _clone(output)
        return hook

    @contextmanager
    def hooked(self) -> Iterator["_Recorder"]:
        handles = []
        for name, sub in self.module.named_modules():
            handles.append(sub.register_forward_pre_hook(self._pre(name)))
            handles.append(sub.register_forward_hook(self._post(name)))
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()


@dataclass
class CallTrace:
    calls: list[Call]
    batch: int = 1  # samples in the traced batch

    @classmethod
    def record(cls, module: nn.Module, batch: Sequence[torch.Tensor]) -> "CallTrace":
        recorder = _Recorder(module)
        with recorder.hooked(), torch.no_grad(), _WorkMode(recorder):
            module(*batch)
        return cls(recorder.calls, _batch_size_of(batch))

    @property
    def work(self) -> float:
        """Estimated cost of one sample's forward pass, in MACs (see Call.work)."""
        return sum(c.work for c in self.calls) / self.batch

    def signature(self) -> list[tuple[str, int, int]]:
        return [(c.name, c.nth, c.parent) for c in self.calls]


@dataclass(frozen=True)
class SkipPlan:
    """The outermost calls whose recorded outputs are replayed, and the work (Call.work) that saves."""

    calls: tuple[int, ...]
    saved_work: float


def touched_parameters(module: nn.Module, unit: PruneUnit) -> set[int]:
    return {id(param) for s in unit.slices for param, _ in slice_params(module, s)}


def skip_plan(module: nn.Module, trace: CallTrace, touched: set[int]) -> SkipPlan:
    """Calls that end before any layer owning a touched parameter starts, whose module (with its children) holds
    no touched parameter, and whose output is plain tensors; only the outermost of them are listed."""
    modules = dict(module.named_modules())
    own = {name: {id(p) for p in sub.parameters(recurse=False)} for name, sub in modules.items()}
    starts = [c.start for c in trace.calls if own[c.name] & touched]
    if not starts:
        return SkipPlan((), 0.0)  # the masked layers never run through a module call: replay nothing
    first = min(starts)
    clean: dict[str, bool] = {}
    for name, sub in modules.items():
        clean[name] = not ({id(p) for p in sub.parameters()} & touched)
    skippable = [c.plain and clean[c.name] and 0 <= c.end < first for c in trace.calls]
    inside = [False] * len(trace.calls)
    outer, saved = [], 0.0
    for c in trace.calls:  # parents come before their children
        parent_inside = c.parent >= 0 and inside[c.parent]
        inside[c.index] = parent_inside or skippable[c.index]
        if skippable[c.index] and not parent_inside:
            outer.append(c.index)
        if inside[c.index]:
            saved += c.work
    return SkipPlan(tuple(outer), saved)


class PrefixReuse:
    """Recorded outputs of the replayable calls on each probe batch, and the replay itself."""

    def __init__(self, module: nn.Module, trace: CallTrace, plans: dict[str, SkipPlan],
                 batches: Sequence[Sequence[torch.Tensor]]):
        self.module = module
        self.trace = trace
        self.plans = plans
        self.batches = batches
        self.modules = dict(module.named_modules())
        self.outputs: list[dict[int, Any]] = []
        self.enabled = any(plan.calls for plan in plans.values())
        self._recorded = False

    def record(self) -> None:
        """One pass per batch keeping the replayable outputs. Call it on the UNMASKED model, before measuring
        (not at construction, so that a cache hit never pays for it); until then nothing is replayed."""
        if self._recorded:
            return
        self._recorded = True
        if not self.enabled:
            return
        wanted = {i for plan in self.plans.values() for i in plan.calls}
        keep = {(self.trace.calls[i].name, self.trace.calls[i].nth) for i in wanted}
        expected = self.trace.signature()
        per_sample = sum(self.trace.calls[i].nbytes for i in wanted) / self.trace.batch
        if per_sample * sum(_batch_size_of(b) for b in self.batches) > MAX_REUSE_BYTES:
            self.enabled = False
            return
        for batch in self.batches:
            recorder = _Recorder(self.module, keep)
            with recorder.hooked(), torch.no_grad():
                self.module(*batch)
            if [(c.name, c.nth, c.parent) for c in recorder.calls] != expected or len(recorder.outputs) != len(wanted):
                self.enabled, self.outputs = False, []  # the calls depend on the data: replay nothing
                return
            self.outputs.append(recorder.outputs)

    def saved_fraction(self, unit: str) -> float:
        """The share of a forward pass's work that replay saves while `unit` is masked."""
        plan = self.plans.get(unit)
        total = self.trace.work * self.trace.batch
        return plan.saved_work / total if plan is not None and total > 0 and self.enabled else 0.0

    @contextmanager
    def replaying(self, unit: str, batch: int) -> Iterator[None]:
        """While active, the planned calls of `unit` return their recorded outputs on probe batch `batch`."""
        plan = self.plans.get(unit)
        if not self._recorded or not self.enabled or plan is None or not plan.calls:
            yield
            return
        calls = self.trace.calls
        skipped = set(plan.calls)
        spans = [(calls[i].start, calls[i].end) for i in plan.calls]

        def runs(c: Call) -> bool:  # not strictly inside a replayed call: the module is really called for it
            return not any(s < c.start and c.end < e for s, e in spans)

        patched: dict[str, Any] = {}
        for name in {calls[i].name for i in plan.calls}:
            sub = self.modules[name]
            executed = [c.index for c in calls if c.name == name and runs(c)]
            patched[name] = sub.__dict__.get("forward")
            sub.forward = self._replay(sub, executed, skipped, self.outputs[batch])
        try:
            yield
        finally:
            for name, previous in patched.items():
                sub = self.modules[name]
                del sub.forward
                if previous is not None:
                    sub.forward = previous

    @staticmethod
    def _replay(sub: nn.Module, executed: list[int], skipped: set[int], recorded: dict[int, Any]):
        original = sub.forward
        counter = iter(executed)

        def forward(*args: Any, **kwargs: Any) -> Any:
            index = next(counter)
            if index in skipped:
                return _clone(recorded[index])
            return original(*args, **kwargs)

        return forward


def unit_plans(module: nn.Module, trace: CallTrace, units: Sequence[PruneUnit]) -> dict[str, SkipPlan]:
    return {u.name: skip_plan(module, trace, touched_parameters(module, u)) for u in units}


__all__ = ["CallTrace", "SkipPlan", "PrefixReuse", "skip_plan", "unit_plans", "touched_parameters"]
