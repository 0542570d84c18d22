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
    # types and numbers are never cut either; the passes and the note wrap around them
    id_column(table, "type", [layer.type for layer in summary.layers])
    id_column(table, "params", ["000.0 M"], justify="right")
    id_column(table, "MACs", ["000.0 M"], justify="right")
    table.add_column("P Q L", no_wrap=True)
    table.add_column("note")
    for layer in summary.layers:
        table.add_row(layer.name, layer.type, _count(layer.params), _count(layer.macs), _letters(layer.passes),
                      "; ".join(filter(None, [*_details(layer.passes), layer.note])))
    if summary.functional_macs:
        table.add_row("(ops without weights)", "-", "0", _count(summary.functional_macs), "- - -",
                      "e.g. attention matmuls")
    table.add_row("[bold]total[/]", "", f"[bold]{_count(summary.total_params)}[/]",
                  f"[bold]{_count(summary.total_macs)}[/]", "", "")
    console.print(table)
    console.print("P Q L: what compression may do to the layer: prune, quantize, low rank", highlight=False)
    for note in summary.notes:
        err_console.print(f"note: {escape(note)}", highlight=False, soft_wrap=True)


def _letters(passes: list[str]) -> str:
    """The passes as P Q L columns (short enough for 80 columns; what a pass only partly does is in the note)."""
    names = [p.split(" ")[0] for p in passes]
    return " ".join(letter if name in names else "-"
                    for letter, name in (("P", "prune"), ("Q", "quantize"), ("L", "lowrank")))


def _details(passes: list[str]) -> list[str]:
    short = {"prune (follows its producer)": "pruned with its producer", "prune (inputs only)": "inputs pruned"}
    return [short.get(p, p) for p in passes if "(" in p]


def _count(value: int) -> str:
    """4 significant digits, k/M/G (exact counts are in --json)."""
    for scale, suffix in ((1e9, " G"), (1e6, " M"), (1e3, " k")):
        if value >= scale:
            return f"{value / scale:.4g}{suffix}"
    return str(value)
