"""A stop request (Ctrl-C, SIGTERM, SIGHUP) that cannot be lost.

The signal handler raises in the main thread, and that unwinds every `with` block. But Python swallows an exception
raised while a finalizer runs ("Exception ignored in ..."), and a comparison that builds fresh sessions block after
block finalizes sessions all the time: a Ctrl-C that lands there would let the job run on and publish its output.
So the handler also records the request here, and the measurement loop and the output folder's publication check it.
"""
from __future__ import annotations

requested: str | None = None  # the signal's name, once one arrived


class Stopped(BaseException):
    """A stop request, raised again where a swallowed first raise would otherwise let the work go on."""

    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


def request(name: str) -> None:
    global requested
    requested = requested or name


def check() -> None:
    """Raise Stopped if a stop was requested (cheap: one global read)."""
    if requested is not None:
        raise Stopped(requested)
