"""The plan search's time limit (`--search-minutes`). The steps that find the first plan inside the budget always run
(the dense model, its fastest precisions, the pruning level); the exploration after them (other allocations, low
rank, depth mixes, trial rounds, the precision fill, the alternation) is skipped where the limit would pass before
it ends if it took as long as the last structure weighed (`step`: a pruning level's, a depth mix's or an
allocation's level search and trial), and what was skipped is reported. Started as long as the limit had not
passed, a step ran to its end: all-MiniLM-L6-v2's depth mixes and trial rounds take about a minute each, and a
5-minute limit ran its search to 5.9-6.2 minutes. The last step, not the longest: the first (the dense model's
pruning family built, its level searched) is the longest, and as the estimate it stopped that search at 3.5
minutes, before the 3-block mix that had won with the last step's as the estimate. The best candidate measured so
far is the answer, so a limit trades fidelity for a predictable compile time and never leaves the budget unmet."""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator


class SearchClock:
    """The time left to one plan search; None minutes: no limit."""

    def __init__(self, minutes: float | None = None):
        self.minutes = minutes
        self.started = time.monotonic()
        self.skipped: list[str] = []  # what the limit left untried, in the order the search came to it
        self.step_s = 0.0  # the last structure's seconds: what a step about to start is expected to take

    def out_of_time(self, what: str) -> bool:
        """Whether the limit has passed, or will have before a step as long as the last structure ends; if so
        `what` (the step about to start) is recorded as skipped."""
        if self.minutes is None or time.monotonic() - self.started + self.step_s < 60.0 * self.minutes:
            return False
        if what not in self.skipped:
            self.skipped.append(what)
        return True

    @contextmanager
    def step(self) -> Iterator[None]:
        """Times one structure weighed: what later steps are expected to take. Only a step that found a plan counts
        (one whose level search raised, nothing inside the budget, took a few seconds)."""
        began = time.monotonic()
        yield
        self.step_s = time.monotonic() - began

    def summary(self) -> dict[str, object]:
        """For report.json: the limit, the search's seconds so far, and what it skipped."""
        return {"minutes_limit": self.minutes, "seconds": round(time.monotonic() - self.started, 1),
                "skipped": list(self.skipped)}

    def warning(self) -> str | None:
        """One line for the user where the limit skipped something."""
        if not self.skipped:
            return None
        return (f"the plan search reached its {self.minutes:g}-minute limit (--search-minutes) and did not try: "
                f"{'; '.join(self.skipped)}; the best plan measured before it was kept (raise the limit to "
                "weigh more structures)")
