"""Calling the user's own code (`--arch`, `--calib module:function`, `--eval`) so that whatever it does, the user
gets one line: an exception, a `sys.exit()` or a failed import become a typed error naming the flag."""
from __future__ import annotations

import importlib
import sys
from typing import Any, Callable, Iterable, Iterator

from deploy.core.errors import DeployError, ModelLoadError, UserInputError


def short(exc: BaseException, limit: int = 120) -> str:
    """An exception as a few words for a one-line message."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _exit_text(exc: SystemExit) -> str:
    return f"it called sys.exit({exc.code!r})"


def import_object(spec: str, flag: str, error: type[UserInputError] = ModelLoadError) -> Callable[..., Any]:
    """Import `package.module:attribute` for a flag such as --arch or a data hook (the current folder is importable,
    as with `python -m`)."""
    if ":" not in spec:
        raise error(f"{flag} '{spec}' is not of the form module:function", f"write {flag} package.module:function")
    module_name, _, attr = spec.partition(":")
    if "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, "")
    try:
        module = importlib.import_module(module_name)
    except SystemExit as exc:
        raise error(f"{flag} {spec}: importing '{module_name}' stopped: {_exit_text(exc)}",
                    "a module named by a flag must not exit when imported") from None
    except Exception as exc:
        raise error(f"{flag} {spec}: cannot import '{module_name}' ({short(exc)})",
                    "check the module name and that it is in the current folder or on PYTHONPATH") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise error(f"{flag} {spec}: '{module_name}' has no attribute '{attr}'", "check the function name")
        obj = getattr(obj, part)
    if not callable(obj):
        raise error(f"{flag} {spec} is not callable", "name a function")
    return obj


def call_user(function: Callable[..., Any], flag: str, spec: str, *args: Any,
              error: type[UserInputError] = ModelLoadError, what: str = "failed when called") -> Any:
    """Call user code; its exceptions and exits become one-line errors naming the flag."""
    try:
        return function(*args)
    except DeployError:
        raise
    except SystemExit as exc:
        raise error(f"{flag} {spec} stopped: {_exit_text(exc)}", "it must return, not exit") from None
    except Exception as exc:
        raise error(f"{flag} {spec} {what} ({short(exc)})", f"fix {spec} and run again") from None


def iterate_user(items: Iterable[Any], flag: str, spec: str,
                 error: type[UserInputError] = ModelLoadError) -> Iterator[Any]:
    """Iterate what user code returned (a generator runs user code at every step) under the same rules."""
    iterator = call_user(iter, flag, spec, items, error=error, what="did not return an iterable")
    while True:
        try:
            item = next(iterator)
        except StopIteration:
            return
        except DeployError:
            raise
        except SystemExit as exc:
            raise error(f"{flag} {spec} stopped: {_exit_text(exc)}", "it must return, not exit") from None
        except Exception as exc:
            raise error(f"{flag} {spec} failed while giving its items ({short(exc)})",
                        f"fix {spec} and run again") from None
        yield item
