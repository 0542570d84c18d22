"""One host-wide lock around every measurement, so that two processes never time each other's load.

The lock is a file lock at a fixed path (override with DEPLOY_MEASURE_LOCK). What we record (the time spent
waiting and the wall-clock window the lock was held) lets anyone check afterwards that windows never overlapped.
"""
from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

from deploy.core.errors import MeasurementError

DEFAULT_LOCK_PATH = "/tmp/deploy-measure.lock"
LOCK_ENV = "DEPLOY_MEASURE_LOCK"


def lock_path() -> str:
    return os.environ.get(LOCK_ENV) or DEFAULT_LOCK_PATH


@dataclass
class LockRecord:
    """How long we waited for the lock and when (time.time()) we held it: start after acquiring, end before release."""

    path: str
    waited_s: float = 0.0
    start: float = 0.0
    end: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "waited_s": self.waited_s, "window": [self.start, self.end]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LockRecord":
        start, end = data.get("window", [0.0, 0.0])
        return cls(data.get("path", ""), float(data.get("waited_s", 0.0)), float(start), float(end))


@contextmanager
def measurement_lock(timeout_s: float = 600.0) -> Iterator[LockRecord]:
    """Hold the host-wide measurement lock; re-entrant within one thread (interleaved A/B holds it once)."""
    from filelock import FileLock, Timeout

    path = lock_path()
    record = LockRecord(path)
    # is_singleton: a second FileLock on the same path in this process is the same object, so nesting cannot deadlock.
    lock = FileLock(path, timeout=timeout_s, mode=0o666, is_singleton=True)
    t0 = time.perf_counter()
    try:
        lock.acquire()
    except Timeout:
        raise MeasurementError(f"another measurement held the lock {path} for more than {timeout_s:.0f} s",
                               "wait for it to finish, or point DEPLOY_MEASURE_LOCK at another file") from None
    except OSError as exc:
        raise MeasurementError(f"cannot open the measurement lock {path} ({exc.strerror or exc})",
                               f"set {LOCK_ENV} to a writable path") from None
    try:
        record.waited_s = time.perf_counter() - t0
        record.start = time.time()
        try:
            yield record
        finally:
            record.end = time.time()
    finally:
        lock.release()
