"""What a pickle would import, and torch.load forced to its safe mode.

A pickle runs code by naming a callable (GLOBAL / STACK_GLOBAL) and calling it (REDUCE). torch's weights-only
unpickler refuses every callable it does not know; this module names what a refused file asked for, so the
refusal can say "a safe load refused code in it" instead of "corrupt", and it gives a context in which every
`torch.load` call, whatever its caller passes, unpickles weights only.
"""
from __future__ import annotations

import contextlib
import io
import pickletools
import zipfile
from typing import Iterator

_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8", "SHORT_BINSTRING", "BINSTRING", "STRING"}


def pickle_imports(data: bytes) -> list[str]:
    """`module.name` of every global a pickle (or a torch.save zip's data.pkl) would import, in order, unique."""
    if data[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                pickles = [archive.read(n) for n in archive.namelist() if n.endswith(".pkl")]
        except (zipfile.BadZipFile, OSError, ValueError):
            return []
        return _unique(name for blob in pickles for name in pickle_imports(blob))
    found: list[str] = []
    strings: list[str] = []
    stream = io.BytesIO(data)
    for _ in range(8):  # torch's legacy format is several pickles in a row; the object is the fourth
        start = stream.tell()
        try:
            for op, arg, _ in pickletools.genops(stream):
                if op.name in _STRING_OPS:
                    strings.append(str(arg))
                elif op.name == "GLOBAL":
                    found.append(str(arg).replace(" ", ".").replace("__builtin__.", "builtins."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    found.append(f"{strings[-2]}.{strings[-1]}")
                elif op.name == "STOP":
                    break
        except Exception:  # a malformed opcode stream ends the scan; what was found so far stands
            break
        if stream.tell() in (start, len(data)):
            break
    return _unique(found)


def unsafe_imports(data: bytes) -> list[str]:
    """The globals a pickle names that torch's weights-only unpickler does not allow: the code it would run.
    Empty for plain tensors and containers, and for bytes that are not a pickle at all (a corrupt file)."""
    import torch._weights_only_unpickler as safe

    allowed = set(safe._get_allowed_globals()) | {f"{getattr(g, '__module__', '')}.{getattr(g, '__name__', '')}"
                                                  for g in _user_safe_globals()}
    return [name for name in pickle_imports(data) if name not in allowed and not name.startswith("torch._utils.")]


def _user_safe_globals() -> list:
    import torch

    return [g[0] if isinstance(g, tuple) else g for g in torch.serialization.get_safe_globals()]


def describe(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")
    return f"it would import and call {shown}" if shown else "it holds pickled code"


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Within this block every `torch.load` unpickles weights only, whatever `weights_only` its caller passes:
    torch's own readers (the .pt2 archive reader among them) ask for `weights_only=False` and get the safe load."""
    import torch

    original = torch.load

    def safe_load(*args, **kwargs):
        kwargs["weights_only"] = True
        kwargs.pop("pickle_module", None)
        return original(*args, **kwargs)

    torch.load = safe_load
    try:
        yield
    finally:
        torch.load = original


def _unique(names) -> list[str]:
    seen: list[str] = []
    for name in names:
        if name not in seen:
            seen.append(name)
    return seen


def refused_by_safe_load(exc: BaseException) -> bool:
    """True when torch's weights-only unpickler stopped a load (a callable it does not allow, or bytes it cannot
    read as weights); callers scan the bytes with `unsafe_imports` to tell which."""
    return "Weights only load failed" in str(exc)
