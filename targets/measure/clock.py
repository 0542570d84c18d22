"""Which clock times an inference. Wall time is latency on a machine of one's own; on a shared host it also counts
the time slices other tenants' processes got while ours waited. Process CPU time counts only the work our process
did, so with one inference thread it is the latency an idle machine would show (cache and memory-bandwidth
interference from neighbours still leak in). The measurement loop records what a `DeviceTimed` function returns,
so swapping clocks needs no change to the loop.
"""
from __future__ import annotations

import time
from typing import Callable

from deploy.core.errors import UserInputError

CLOCKS = ("wall", "cpu")


def check_clock(clock: str, threads: int) -> None:
    if clock not in CLOCKS:
        raise UserInputError(f"unknown clock '{clock}'", f"use one of {', '.join(CLOCKS)}")
    if clock == "cpu" and threads != 1:
        raise UserInputError("the cpu clock measures one inference thread", "use threads=1 or the wall clock")


def timed(run_once: Callable[[], object], clock: str) -> Callable[[], object]:
    """`run_once` as the loop should time it: unchanged for wall time, else returning its CPU milliseconds."""
    if clock == "wall":
        return run_once
    from deploy.targets.runners.registry import DeviceTimed

    def cpu_ms() -> float:
        start = time.process_time_ns()
        run_once()
        return (time.process_time_ns() - start) / 1e6

    return DeviceTimed(cpu_ms)
