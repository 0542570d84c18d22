"""A transient progress bar for a measurement, drawn on stderr only when it is a terminal.

It refreshes only when the loop reports (a few times a second, between samples), never from a background thread
that would compete with the model for the CPU.
"""
from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Any, Iterator

from deploy.targets.measure.loop import ProgressFn


@contextmanager
def progress_bar(console: Any = None, label: str = "measuring") -> Iterator[ProgressFn | None]:
    """Yield a progress callback for `measure`, or None when stderr is not a terminal."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    console = console or Console(stderr=True)
    if not console.is_terminal or not sys.stderr.isatty():
        yield None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
               TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True, auto_refresh=False) as bar:
        task = bar.add_task(label, total=1.0)

        def report(phase: str, fraction: float) -> None:
            overall = 0.1 * fraction if phase == "warmup" else 0.1 + 0.9 * fraction  # warm-up is the first tenth
            bar.update(task, completed=overall, description=f"{label}: {phase}")
            bar.refresh()

        yield report
