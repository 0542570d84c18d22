"""`deploy inspect`: what a model holds."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape
from rich.table import Table

from deploy.cli.app import ARCH_HELP, PICKLE_HELP, SHAPE_HELP, app, console, emit_json, err_console, load_model_arg
from deploy.cli.tables import id_column


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
    from deploy.core.analysis import analyze

    loaded = load_model_arg(model, example, arch, trust_pickle, input_shape)
    summary = analyze(loaded)
    if as_json:
        emit_json(summary.to_dict())
        return
    for spec in summary.inputs:
        console.print(f"input [bold]{escape(spec['name'])}[/]: {'x'.join(map(str, spec['shape']))} {spec['dtype']}",
                      soft_wrap=True)
    table = Table(title=f"{loaded.path.name if loaded.path else 'model'} ({summary.format})")
    id_column(table, "layer", [layer.name for layer in summary.layers] + ["(ops without weights)"])
    for col, justify in (("type", "left"), ("params", "right"), ("MACs", "right"), ("compression", "left"),
                         ("note", "left")):
        table.add_column(col, justify=justify)
    for layer in summary.layers:
        table.add_row(layer.name, layer.type, f"{layer.params:,}", f"{layer.macs:,}", ", ".join(layer.passes) or "-",
                      layer.note)
    if summary.functional_macs:
        table.add_row("(ops without weights)", "-", "0", f"{summary.functional_macs:,}", "-", "e.g. attention matmuls")
    table.add_row("[bold]total[/]", "", f"[bold]{summary.total_params:,}[/]", f"[bold]{summary.total_macs:,}[/]", "", "")
    console.print(table)
    for note in summary.notes:
        err_console.print(f"note: {escape(note)}", highlight=False, soft_wrap=True)
