"""The plan search's time limit (`--search-minutes`). The steps that find the first plan inside the budget always run
(the dense model, its fastest precisions, the pruning level); the exploration after them (other allocations, low
rank, depth mixes, trial rounds, the precision fill, the alternation) is skipped once the limit has passed, and
what was skipped is reported. A depth mix, and the uniform allocation of one, is also skipped where the limit
would pass before it ends, as long as the like step before it took (`needs`): a mix of all-MiniLM-L6-v2 takes about
a minute, and one started just inside a 5-minute limit ran the search to 6.2 minutes. The best candidate measured
so far is the answer, so a limit trades fidelity for a predictable compile time and never leaves the budget
unmet."""
from __future__ import annotations

import time


class SearchClock:
    """The time left to one plan search; None minutes: no limit."""

    def __init__(self, minutes: float | None = None):
        self.minutes = minutes
        self.started = time.monotonic()
        self.skipped: list[str] = []  # what the limit left untried, in the order the search came to it

    def out_of_time(self, what: str, needs: float = 0.0) -> bool:
        """Whether the limit has passed, or will have `needs` seconds from now (what the step about to start is
        expected to take); if so `what` (that step) is recorded as skipped."""
        if self.minutes is None or time.monotonic() - self.started + needs < 60.0 * self.minutes:
            return False
        if what not in self.skipped:
            self.skipped.append(what)
        return True

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
