"""Progress of a long job on stderr: a live bar on a terminal, plain lines everywhere else (a CI log).

Plain lines come at least every 10 s while the job runs, from a thread that sleeps in between (it wakes once a
second: nothing that competes with a measurement), and at every change of step once the first 10 s have passed.
A job that ends (or fails on bad input) within 10 s prints no progress at all, so its error stays one line.
Each line says the step, the count where there is one (N/M), the elapsed time and an estimate of what is left.
"""
from __future__ import annotations

import contextlib
import threading
import time
from typing import Any, Callable, Iterator, Optional

HEARTBEAT_S = 10.0  # the longest silence in a log; DEPLOY_PROGRESS_SECONDS may shorten it, never lengthen it
ProgressFn = Callable[..., None]  # (step, fraction, done=None, total=None, extra="")


def _clock(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60}:{seconds % 60:02d}" if seconds >= 60 else f"{seconds} s"


class PlainProgress:
    """Lines such as `compress: measuring candidates 3/8 [41%] 0:52 elapsed, ~1:15 left`."""

    def __init__(self, console: Any, label: str, heartbeat_s: float = HEARTBEAT_S):
        self.console, self.label, self.heartbeat_s = console, label, heartbeat_s
        self.start = time.monotonic()
        self.state: dict[str, Any] = {"step": "starting", "fraction": 0.0, "done": None, "total": None, "extra": ""}
        self.last_line = self.start  # the first line comes after a heartbeat: quick runs stay quiet
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True)

    def __call__(self, step: str, fraction: float, done: Optional[int] = None, total: Optional[int] = None,
                 extra: str = "") -> None:
        with self.lock:
            changed = step != self.state["step"] or done != self.state["done"]
            self.state = {"step": step, "fraction": min(max(fraction, 0.0), 1.0), "done": done, "total": total,
                          "extra": extra}
            started = time.monotonic() - self.start >= self.heartbeat_s
            if (changed and started) or time.monotonic() - self.last_line >= self.heartbeat_s:
                self._print()

    def line(self) -> str:
        s = self.state
        elapsed = time.monotonic() - self.start
        count = f" {s['done']}/{s['total']}" if s["done"] is not None and s["total"] else ""
        left = ""
        if 0.02 < s["fraction"] < 1.0:
            left = f", ~{_clock(elapsed / s['fraction'] * (1 - s['fraction']))} left"
        extra = f"; {s['extra']}" if s["extra"] else ""
        return f"{self.label}: {s['step']}{count} [{s['fraction']:.0%}] {_clock(elapsed)} elapsed{left}{extra}"

    def _print(self) -> None:
        self.last_line = time.monotonic()
        self.console.print(self.line(), highlight=False, soft_wrap=True, markup=False)

    def _beat(self) -> None:
        while not self.stop.wait(1.0):
            with self.lock:
                if time.monotonic() - self.last_line >= self.heartbeat_s:
                    self._print()


def heartbeat_seconds() -> float:
    """HEARTBEAT_S, or DEPLOY_PROGRESS_SECONDS where that is a shorter positive number of seconds."""
    import os

    try:
        asked = float(os.environ.get("DEPLOY_PROGRESS_SECONDS", HEARTBEAT_S))
    except ValueError:
        return HEARTBEAT_S
    return min(HEARTBEAT_S, asked) if asked > 0 else HEARTBEAT_S


@contextlib.contextmanager
def job_progress(console: Any, label: str, enabled: bool = True) -> Iterator[Optional[ProgressFn]]:
    """A progress callback for a long job, or None when disabled (JSON output)."""
    if not enabled:
        yield None
        return
    if console.is_terminal:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                      console=console, transient=True) as bar:
            task = bar.add_task(label, total=1.0)

            def update(step: str, fraction: float, done: Optional[int] = None, total: Optional[int] = None,
                       extra: str = "") -> None:
                count = f" {done}/{total}" if done is not None and total else ""
                tail = f" ({extra})" if extra else ""
                bar.update(task, completed=fraction, description=f"{label}: {step}{count}{tail}")

            yield update
        return
    plain = PlainProgress(console, label, heartbeat_seconds())
    plain.thread.start()
    try:
        yield plain
    finally:
        plain.stop.set()
        plain.thread.join(timeout=2)
