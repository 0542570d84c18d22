"""The command line: parse, build a config, call one library function, print. No logic lives here."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable, List, Optional

import typer
from rich.console import Console
from rich.table import Table

from deploy import __version__
from deploy.errors import EXIT_FAILURE, DeployError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="deploy: compress, export and measure PyTorch models for a target device.")
profiles_app = typer.Typer(no_args_is_help=True, help="Device profiles: what a device runs fast and how to time it.")
app.add_typer(profiles_app, name="profiles")

console = Console()
err_console = Console(stderr=True)
_state = {"debug": False}


def _version(value: bool) -> None:
    if value:
        typer.echo(f"deploy {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
) -> None:
    _state["debug"] = debug


def emit_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))


def main() -> None:
    """Console entry point: typed errors become one line and their exit code."""
    debug = "--debug" in sys.argv
    try:
        app(standalone_mode=False)
    except DeployError as exc:
        if debug:
            raise
        err_console.print(f"[bold red]error:[/] {exc.one_line()}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except typer.Abort:
        err_console.print("aborted")
        sys.exit(130)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as exc:  # click usage errors arrive here in standalone_mode=False
        import click

        if isinstance(exc, click.exceptions.Exit):
            sys.exit(exc.exit_code)
        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(2 if isinstance(exc, click.UsageError) else exc.exit_code)
        if debug:
            raise
        err_console.print(f"[bold red]internal error:[/] {type(exc).__name__}: {exc} (rerun with --debug for the traceback)",
                          highlight=False, soft_wrap=True)
        sys.exit(EXIT_FAILURE)


# --- profiles -----------------------------------------------------------------------------------------------------

@profiles_app.command("list")
def profiles_list(as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")) -> None:
    """List the built-in device profiles."""
    from deploy.profiles import builtin_profiles

    profiles = builtin_profiles()
    if as_json:
        emit_json([p.to_dict() for p in profiles])
        return
    table = Table(title="device profiles")
    for col in ("name", "runtime", "precisions", "measured here", "description"):
        table.add_column(col)
    for p in profiles:
        table.add_row(p.name, p.runtime, ", ".join(p.precisions), "yes" if p.runs_locally() else "predicted", p.description)
    console.print(table)


@profiles_app.command("show")
def profiles_show(
    name: str = typer.Argument(..., help="Profile name or alias (cpu, jetson)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Show one profile in full."""
    from deploy.profiles import resolve_target

    resolved = resolve_target(name)
    if as_json:
        emit_json({"resolved_from": resolved.asked, "note": resolved.note, **resolved.profile.to_dict()})
        return
    if resolved.note:
        err_console.print(resolved.note)
    table = Table(title=resolved.profile.name, show_header=False)
    for key, value in resolved.profile.to_dict().items():
        table.add_row(key, json.dumps(value) if isinstance(value, (dict, list)) else str(value))
    console.print(table)


def _load(model: Optional[Path], example: bool, arch: Optional[str], trust_pickle: bool, input_shape: List[str]):
    """MODEL or --example, never both."""
    from deploy.errors import UserInputError
    from deploy.model_io import load_example, load_model

    if example == (model is not None):
        raise UserInputError("give a model file or --example (exactly one)", "see --help")
    if example:
        return load_example()
    return load_model(model, arch=arch, trust_pickle=trust_pickle, input_shapes=input_shape)


# --- inspect ------------------------------------------------------------------------------------------------------

ARCH_HELP = "For a state_dict: module:factory that builds the model (imports and runs your code, like any import)."
PICKLE_HELP = "Allow loading a pickled nn.Module. Unpickling runs arbitrary code from the file: only for files you trust."
SHAPE_HELP = "Input NAME:DIMS:DTYPE, e.g. image:1x3x224x224:float32 or input_ids:1x128:int64 (repeat per input)."


@app.command("inspect")
def inspect_cmd(
    model: Optional[Path] = typer.Argument(None, help="Model file: TorchScript .pt, torch.export .pt2, state_dict .pt (+ --arch), pickled module (+ --trust-pickle)."),
    example: bool = typer.Option(False, "--example", help="Use the bundled example model (a CNN trained on digits)."),
    arch: Optional[str] = typer.Option(None, "--arch", help=ARCH_HELP),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help=PICKLE_HELP),
    input_shape: List[str] = typer.Option([], "--input-shape", help=SHAPE_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """What a model holds: inputs, layers with type, parameters and MACs, and what compression will touch."""
    from deploy.analysis import analyze
    from deploy.model_io import load_model

    loaded = _load(model, example, arch, trust_pickle, input_shape)
    summary = analyze(loaded)
    if as_json:
        emit_json(summary.to_dict())
        return
    for spec in summary.inputs:
        console.print(f"input [bold]{spec['name']}[/]: {'x'.join(map(str, spec['shape']))} {spec['dtype']}")
    table = Table(title=f"{loaded.path.name if loaded.path else 'model'} ({summary.format})")
    for col, justify in (("layer", "left"), ("type", "left"), ("params", "right"), ("MACs", "right"),
                         ("compression", "left"), ("note", "left")):
        table.add_column(col, justify=justify)
    for layer in summary.layers:
        table.add_row(layer.name, layer.type, f"{layer.params:,}", f"{layer.macs:,}", ", ".join(layer.passes) or "-",
                      layer.note)
    if summary.functional_macs:
        table.add_row("(ops without weights)", "-", "0", f"{summary.functional_macs:,}", "-", "e.g. attention matmuls")
    table.add_row("[bold]total[/]", "", f"[bold]{summary.total_params:,}[/]", f"[bold]{summary.total_macs:,}[/]", "", "")
    console.print(table)
    for note in summary.notes:
        err_console.print(f"note: {note}")


if __name__ == "__main__":
    main()
