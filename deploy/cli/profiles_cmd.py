"""`deploy profiles list | show | calibrate`."""
from __future__ import annotations

import json
import math
from typing import Optional

import typer
from rich.table import Table

from deploy.cli.app import console, emit_json, err_console, profiles_app
from deploy.cli.tables import id_column


@profiles_app.command("list")
def profiles_list(as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")) -> None:
    """List the built-in device profiles."""
    from deploy.profiles import builtin_profiles

    profiles = builtin_profiles()
    if as_json:
        emit_json([p.to_dict() for p in profiles])
        return
    wide = console.width >= 120  # descriptions only where they fit beside the names (all in `profiles show`)
    table = Table(title="device profiles")
    id_column(table, "name", [p.name for p in profiles])
    id_column(table, "runtime", [p.runtime for p in profiles])
    table.add_column("precisions")
    table.add_column("latency", no_wrap=True)
    if wide:
        table.add_column("description")
    for p in profiles:
        row = [p.name, p.runtime, ", ".join(p.precisions), "measured" if p.runs_locally() else "predicted"]
        table.add_row(*row, *([p.description] if wide else []))
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
        err_console.print(resolved.note, highlight=False, soft_wrap=True)
    table = Table(title=resolved.profile.name, show_header=False)
    data = resolved.profile.to_dict()
    id_column(table, "field", list(data))
    table.add_column("value", overflow="fold")
    for key, value in data.items():
        table.add_row(key, json.dumps(value) if isinstance(value, (dict, list)) else str(value))
    console.print(table)


@profiles_app.command("calibrate")
def profiles_calibrate(
    target: str = typer.Argument(..., help="Profile name or alias (cpu) of this machine's CPU."),
    quick: bool = typer.Option(False, "--quick", help="A small reference set: a smoke test, not for decisions."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="Threads (default: physical cores, capped "
                                          "by the profile)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Fit this machine's latency model for a profile: the reference models are profiled per node in its runtime and
    fitted, so predictions for it carry an earned error band. Cached under DEPLOY_CACHE_DIR (default
    ~/.cache/deploy)."""
    from deploy.targets.latency.calibrate import CalibrateRequest, calibrate

    request = CalibrateRequest(target=target, quick=quick, threads=threads)
    result = calibrate(request, progress=None if as_json else
                       (lambda line: err_console.print(line, highlight=False, soft_wrap=True)))
    if as_json:
        emit_json(result.to_dict())
        return
    model = result.model
    rows = [("runtime", result.runtime), ("threads", str(result.threads)),
            ("latency model", f"{model['models']} reference models, {model['kinds']} op kinds"),
            ("error band", f"x/÷ {math.exp(model['band']):.2f} (leave one model out)"), ("file", model["path"]),
            ("time", f"{result.seconds:.1f} s")]
    table = Table(title=f"calibrated {result.profile}", show_header=False)
    id_column(table, "field", [k for k, _ in rows])
    table.add_column("value", overflow="fold")
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)
