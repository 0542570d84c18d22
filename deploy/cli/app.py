"""The typer apps, the two consoles and what every command shares (option checks, JSON output, model loading)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.console import Console

from deploy import __version__

CONTEXT = {"help_option_names": ["-h", "--help"]}
app = typer.Typer(add_completion=False, no_args_is_help=True, context_settings=CONTEXT,
                  help="deploy: compress, export and measure PyTorch models for a target device.")
profiles_app = typer.Typer(no_args_is_help=True, context_settings=CONTEXT,
                           help="Device profiles: what a device runs fast and how to time it.")
cache_app = typer.Typer(no_args_is_help=True, context_settings=CONTEXT,
                        help="The on-disk cache of sensitivity curves and latency tables.")
app.add_typer(profiles_app, name="profiles")
app.add_typer(cache_app, name="cache")

# Wide enough that identifiers (profile names, paths, hashes) are never cut: rich folds long cells instead.
console = Console()
err_console = Console(stderr=True)

ARCH_HELP = "For a state_dict: module:factory that builds the model (imports and runs your code, like any import)."
PICKLE_HELP = "Allow loading a pickled nn.Module. Unpickling runs arbitrary code from the file: only for files you trust."
SHAPE_HELP = "Input NAME:DIMS:DTYPE, e.g. image:1x3x224x224:float32 or input_ids:1x128:int64 (repeat per input)."


def _version(value: bool) -> None:
    if value:
        typer.echo(f"deploy {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors (exit codes stay the same)."),
) -> None:
    """deploy: compress, export and measure PyTorch models for a target device."""


def finite(value: Optional[float]) -> Optional[float]:
    """Option callback: NaN and infinity are refused at parse time, before any work."""
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"{value} is not a finite number")
    return value


def positive(value: Optional[float]) -> Optional[float]:
    """Option callback: a finite number above zero."""
    finite(value)
    if value is not None and value <= 0:
        raise typer.BadParameter(f"{value} must be above zero")
    return value


def non_negative(value: Optional[float]) -> Optional[float]:
    finite(value)
    if value is not None and value < 0:
        raise typer.BadParameter(f"{value} must not be negative")
    return value


def emit_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))


def load_model_arg(model: Optional[Path], example: bool, arch: Optional[str], trust_pickle: bool,
                   input_shape: List[str]) -> Any:
    """MODEL or --example, never both."""
    from deploy.core.errors import UserInputError
    from deploy.core.model.load import load_example, load_model

    if example == (model is not None):
        raise UserInputError("give a model file or --example (exactly one)", "see --help")
    if example:
        return load_example(input_shape)
    return load_model(model, arch=arch, trust_pickle=trust_pickle, input_shapes=input_shape)
