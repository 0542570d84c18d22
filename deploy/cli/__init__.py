"""The command line: parse, build a config, call one library function, print. No logic lives here.

`main()` is the one place that turns what went wrong into one line on stderr and a documented exit code
(CLI.md): 2 for bad input and usage errors, 1 for a failure inside deploy, 3/4 for verdicts, 130/143/129 for
Ctrl-C, SIGTERM and SIGHUP (after the run's partial output is removed). `--debug` adds the traceback and keeps
the exit code.
"""
from __future__ import annotations

import errno
import importlib
import signal
import sys
from typing import Any, Sequence

from deploy.cli import bench_cmd, cache_cmd, compress_cmd, inspect_cmd, profiles_cmd  # noqa: F401  (commands)
from deploy.cli.app import app, err_console
from deploy.core.errors import EXIT_FAILURE, EXIT_USAGE, DeployError
from deploy.core.stop import Stopped

EXIT_INTERRUPTED = 130
SIGNAL_EXITS = {"SIGTERM": 143, "SIGHUP": 129}


def _on_signal(signum: int, frame: Any) -> None:
    from deploy.core import stop

    name = signal.Signals(signum).name
    stop.request(name)
    raise Stopped(name)  # raised in the main thread: every `with` block unwinds and cleans up as for Ctrl-C


def _on_interrupt(signum: int, frame: Any) -> None:
    from deploy.core import stop

    stop.request("SIGINT")
    raise KeyboardInterrupt


def _click_exceptions() -> list[Any]:
    """click's exception modules: typer vendors its own copy, and a plain click may be present too."""
    modules = []
    for name in ("typer._click.exceptions", "click.exceptions"):
        try:
            modules.append(importlib.import_module(name))
        except ImportError:
            continue
    return modules


def _isinstance_any(exc: BaseException, modules: list[Any], name: str) -> bool:
    return any(isinstance(exc, getattr(m, name)) for m in modules if hasattr(m, name))


def _say(text: str) -> None:
    from rich.markup import escape

    err_console.print(f"[bold red]error:[/] {escape(text)}", highlight=False, soft_wrap=True)


def _quiet_libraries() -> None:
    """Library warnings and log lines would break the one-line contract; results and reports carry ours."""
    import logging
    import os
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _report_native_crashes() -> None:
    """A crash inside a runtime's native code (OpenVINO once segfaulted in a long MiniLM search) ends the process
    before any handler of ours runs; Python's stack on stderr at least says which step it was in."""
    import faulthandler

    try:
        faulthandler.enable()
    except (AttributeError, ValueError, OSError):  # stderr is not a file with a descriptor (captured)
        pass


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    if debug:  # an option of `deploy` itself, taken wherever it is given (`deploy compress ... --debug` too)
        args = ["--debug"] + [a for a in args if a != "--debug"]
    _report_native_crashes()
    if not debug:
        _quiet_libraries()
    for name in SIGNAL_EXITS:
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), _on_signal)
    signal.signal(signal.SIGINT, _on_interrupt)
    sys.exit(_run(args, debug))


def _run(args: list[str], debug: bool) -> int:
    clicks = _click_exceptions()
    try:
        rc = app(args=args, prog_name="deploy", standalone_mode=False)  # typer.Exit(n) comes back as n
        return int(rc or 0)
    except SystemExit as exc:  # our own sys.exit(code) inside a command
        return exc.code if isinstance(exc.code, int) else EXIT_FAILURE
    except KeyboardInterrupt:
        err_console.print("interrupted", highlight=False)
        return EXIT_INTERRUPTED
    except Stopped as exc:
        if exc.name == "SIGINT":
            err_console.print("interrupted", highlight=False)
            return EXIT_INTERRUPTED
        err_console.print(f"stopped by {exc.name}", highlight=False)
        return SIGNAL_EXITS[exc.name]
    except BaseException as exc:  # noqa: BLE001 - every other outcome is one line and a documented code
        code, text = _classify(exc, clicks)
        if not text:  # help printed for a bare command group, or a plain exit
            return code
        if debug:
            import traceback

            traceback.print_exception(exc)
        _say(text)
        return code


def _classify(exc: BaseException, clicks: list[Any]) -> tuple[int, str]:
    """(exit code, one line) for an exception that escaped a command; no line when help was printed."""
    if isinstance(exc, DeployError):
        return exc.exit_code, exc.one_line()
    if _isinstance_any(exc, clicks, "NoArgsIsHelpError"):
        ctx = getattr(exc, "ctx", None)
        print(ctx.get_help() if ctx is not None else app.info.help)
        return 0, ""
    if _isinstance_any(exc, clicks, "Exit"):
        return getattr(exc, "exit_code", 0), ""
    if _isinstance_any(exc, clicks, "Abort"):
        return EXIT_INTERRUPTED, "aborted"
    if _isinstance_any(exc, clicks, "ClickException"):
        ctx = getattr(exc, "ctx", None)
        where = ctx.command_path if ctx is not None else "deploy"
        message = " ".join(exc.format_message().split()).rstrip(".")
        return EXIT_USAGE, f"{message}; see '{where} --help'."
    if isinstance(exc, OSError) and exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC,
                                                  errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ENOENT):
        where = f" {exc.filename}" if exc.filename else ""
        return EXIT_USAGE, f"cannot use{where}: {exc.strerror or exc}; check the path, its permissions and free space."
    if isinstance(exc, MemoryError):
        return EXIT_USAGE, "out of memory; use smaller input shapes, a smaller --batch or fewer calibration samples."
    return EXIT_FAILURE, (f"internal error: {type(exc).__name__}: {' '.join(str(exc).split())} "
                          "(rerun with --debug for the traceback)")
