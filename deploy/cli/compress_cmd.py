"""`deploy compress` (one budget, one model) and `deploy search` (the Pareto front)."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape
from rich.table import Table

from deploy.cli.app import ARCH_HELP, PICKLE_HELP, SHAPE_HELP, app, console, emit_json, err_console, finite, positive
from deploy.cli.progress import job_progress
from deploy.cli.tables import id_column

LOWRANK_HELP = ("Also try low-rank factorization where pruning is needed; kept when more faithful before recovery "
                "(off by default: see CLI.md).")
DEPTH_HELP = ("Where pruning is needed, also try dropping whole blocks (transformer layers, identity residual blocks), "
              "up to half of them, each mix then width-pruned to the budget; the most faithful wins.")
CALIB_HELP = "Calibration data: image folder, .npy/.npz, .txt (+ --tokenizer), module:function, or 'random'."
HELD_OUT_HELP = ("Held-out data the report is scored on (the kinds --calib takes, not 'random'); all of --calib then "
                 "calibrates and recovers (default: a quarter of --calib is held out).")


@app.command("compress")
def compress_cmd(
    model: Optional[Path] = typer.Argument(None, help="The model (.pt state_dict + --arch, TorchScript, .pt2, trusted pickle)."),
    example: bool = typer.Option(False, "--example", help="Use the bundled example model and its calibration data."),
    arch: Optional[str] = typer.Option(None, "--arch", help=ARCH_HELP),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help=PICKLE_HELP),
    input_shape: List[str] = typer.Option([], "--input-shape", help=SHAPE_HELP),
    target: str = typer.Option("cpu", "--target", "-t", help="Device profile or alias (cpu, jetson, ...)."),
    profile: Optional[Path] = typer.Option(None, "--profile", help="A profile TOML of your own instead of --target."),
    calib: Optional[str] = typer.Option(None, "--calib", help=CALIB_HELP),
    held_out: Optional[str] = typer.Option(None, "--held-out", help=HELD_OUT_HELP),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="A saved Hugging Face tokenizer folder, for .txt data."),
    budget_ms: Optional[float] = typer.Option(None, "--budget-ms", callback=positive, help="Latency budget: p50 in milliseconds on the target."),
    speedup: Optional[float] = typer.Option(None, "--speedup", callback=positive, help="Latency budget as a speed-up over the dense fp32 model."),
    size_mb: Optional[float] = typer.Option(None, "--size-mb", callback=positive, help="Size budget of the exported model in MB."),
    max_drop: Optional[float] = typer.Option(None, "--max-drop", callback=finite, help="Fidelity floor: at most this drop of the primary metric, then the fastest model."),
    output: Path = typer.Option(Path("out"), "--output", "-o", help="Output folder (refused if it exists, unless --force)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output folder."),
    plan: Optional[Path] = typer.Option(None, "--plan", help="Replay a deploy.toml from an earlier run (no search)."),
    precision: List[str] = typer.Option([], "--precision", help="Precisions layers may take (default fp32, fp16 and bf16 where the target runs them, int8; add int4 for weight-only int4 where the target has it); repeat."),
    no_prune: bool = typer.Option(False, "--no-prune", help="Do not prune."),
    lowrank: bool = typer.Option(False, "--lowrank/--no-lowrank", help=LOWRANK_HELP),
    depth: bool = typer.Option(True, "--depth/--no-depth", help=DEPTH_HELP),
    batch: int = typer.Option(1, "--batch", min=1, help="Batch size latency is measured at (and a TensorRT plan built for); needs a dynamic batch axis."),
    recover_steps: Optional[int] = typer.Option(None, "--recover-steps", min=0, help="Most distillation steps after pruning (default: as many as --recover-minutes allow, with early stop; 0: none)."),
    recover_minutes: Optional[float] = typer.Option(None, "--recover-minutes", callback=finite, help="Time budget for distillation (default: 2 minutes per GMAC of one sample, 1 to 10)."),
    recover_bf16: Optional[bool] = typer.Option(None, "--recover-bf16/--recover-f32", help="Distillation's passes in bf16 autocast or in f32 (default: bf16 where this CPU runs bf16 in hardware)."),
    search_minutes: Optional[float] = typer.Option(None, "--search-minutes", callback=positive, help="Time limit for the plan search: past it, no more structures or refinements are tried and the best plan measured is kept (default: none)."),
    eval_hook: Optional[str] = typer.Option(None, "--eval", help="module:function(onnx_path) -> dict of your own metrics (imports your code)."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="Threads for measurement; default: physical cores."),
    measure_seconds: float = typer.Option(1.0, "--measure-seconds", callback=positive, help="Seconds per candidate measurement."),
    seed: int = typer.Option(0, "--seed", help="Seed for the data split and recovery."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Compress a model for a target under one budget, export it, and measure the result.
    Exit 0: budget met; 3: uncertain (the measured p50's interval or a predicted band straddles the budget);
    4: budget missed (the model and report are still written)."""
    from deploy.compiler.budget import from_flags
    from deploy.compiler.job import DEFAULT_PRECISIONS, CompressRequest, compress

    request = CompressRequest(
        model=str(model) if model else None, example=example, arch=arch, trust_pickle=trust_pickle,
        input_shapes=tuple(input_shape), target=target, profile_path=str(profile) if profile else None,
        calib=calib, held_out=held_out, tokenizer=str(tokenizer) if tokenizer else None,
        budget=from_flags(budget_ms, speedup, size_mb, max_drop), out=str(output), force=force,
        plan=str(plan) if plan else None, precisions=tuple(precision) or DEFAULT_PRECISIONS, prune=not no_prune,
        lowrank=lowrank, depth=depth, recover_steps=recover_steps, recover_minutes=recover_minutes, recover_bf16=recover_bf16, search_minutes=search_minutes, eval_hook=eval_hook, threads=threads,
        measure_seconds=measure_seconds, seed=seed, batch=batch)
    with job_progress(err_console, "compress", not as_json) as progress:
        report = compress(request, progress)
    for warning in report["warnings"]:
        err_console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False, soft_wrap=True)
    if as_json:
        emit_json(report)
    else:
        _print_report(report)
    if report.get("exit_code"):
        sys.exit(report["exit_code"])


def _print_report(report: dict) -> None:
    o, r = report["original"], report["result"]
    table = Table(title=f"{report['target']['name']}: {report['budget']['described']}")
    for col in ("", "latency p50 (ms)", "size (MB)", report["fidelity_metric"]):
        table.add_column(col, justify="right")
    source = "" if report["latency_source"] == "measured" else " (predicted)"
    table.add_row("original", f"{o['latency_ms']:.4g}{source}", f"{o['size_mb']:.3g}", "1.0")
    band = r.get("band_ms") or r.get("interval_ms")
    extra = f" [{band[0]:.3g}-{band[1]:.3g}]" if band else ""
    table.add_row(f"compressed ({r['precision']})", f"{r['latency_ms']:.4g}{extra}{source}", f"{r['size_mb']:.3g}",
                  f"{r['fidelity']:.4g}")
    console.print(table)
    recovery = report.get("recovery")
    if recovery:
        minutes = report["decisions"].get("recover", {}).get("minutes")
        limit = f" of a {minutes:g}-minute budget" if minutes else ""
        bf16 = " in bf16" if recovery.get("precision") == "bf16" else ""
        console.print(f"recovery{bf16}: {recovery['steps']} steps in {recovery['seconds']:.0f} s{limit} "
                      f"({recovery['stopped']}, kept step {recovery['kept_step']}{_rate(recovery)}"
                      f"{_augmented(recovery)}); "
                      f"validation {recovery['metric']} "
                      f"{recovery['before']:.4g} -> {recovery['after']:.4g}", highlight=False)
    if r.get("speedup"):
        ci = r.get("speedup_ci")
        how = f" (95% CI {ci[0]:.3g}-{ci[1]:.3g}x, measured interleaved)" if ci else f"{source}"
        console.print(f"speed-up {r['speedup']:.3g}x{how}", highlight=False)
    if report.get("verdict"):
        word = {"met": "met", "uncertain": "UNCERTAIN", "missed": "MISSED"}[report["verdict"]]
        budget = report["budget"]
        goal = f"{budget['target_ms']:.4g} ms" if budget.get("target_ms") is not None else f"{budget['value']:g} MB"
        if budget.get("kind") == "speedup" and r.get("speedup_ci"):
            goal = f"speed-up {budget['value']:g}x, judged by the measured speed-up's interval"
        console.print(f"budget {word}: target {goal}", highlight=False)
    console.print(f"wrote {report['output']}/model.onnx, report.json, report.html, deploy.toml", highlight=False,
                  soft_wrap=True)


def _rate(recovery: dict) -> str:
    """The peak learning rate the recovery went on with, and whether the probes chose it."""
    rate = recovery.get("rate")
    if not rate:
        return ""
    return f", learning rate {rate:g}" + (f" of {len(recovery['probes'])} probed" if recovery.get("probes") else "")


def _augmented(recovery: dict) -> str:
    how, share = recovery.get("augmentation"), recovery.get("augmented")
    return f", {how} on {share:.0%} of each batch" if how and share else ""


@app.command("search")
def search_cmd(
    model: Optional[Path] = typer.Argument(None, help="The model, as for compress."),
    example: bool = typer.Option(False, "--example", help="Use the bundled example model and its calibration data."),
    arch: Optional[str] = typer.Option(None, "--arch", help=ARCH_HELP),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help=PICKLE_HELP),
    input_shape: List[str] = typer.Option([], "--input-shape", help=SHAPE_HELP),
    target: str = typer.Option("cpu", "--target", "-t", help="Device profile or alias."),
    profile: Optional[Path] = typer.Option(None, "--profile", help="A profile TOML of your own."),
    calib: Optional[str] = typer.Option(None, "--calib", help="Calibration data (as for compress)."),
    held_out: Optional[str] = typer.Option(None, "--held-out", help="Held-out data the trials are scored on (as for compress)."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="Tokenizer folder for .txt data."),
    output: Path = typer.Option(Path("search-out"), "--output", "-o", help="Folder for the study, trials and the front (resumable)."),
    trials: int = typer.Option(20, "--trials", min=1, help="Completed trials to reach (a resumed study counts earlier ones)."),
    timeout: Optional[float] = typer.Option(None, "--timeout", callback=positive, help="Stop this worker after this many seconds."),
    storage: Optional[str] = typer.Option(None, "--storage", help="optuna storage URL (default sqlite:///OUT/study.db; postgresql://... for many workers)."),
    study_name: str = typer.Option("deploy-search", "--study-name", help="Study name inside the storage."),
    precision: List[str] = typer.Option([], "--precision", help="Precisions layers may take (default fp32, fp16/bf16 where the target runs them, int8)."),
    no_prune: bool = typer.Option(False, "--no-prune", help="Do not prune."),
    lowrank: bool = typer.Option(False, "--lowrank/--no-lowrank", help=LOWRANK_HELP),
    batch: int = typer.Option(1, "--batch", min=1, help="Batch size latency is measured at; needs a dynamic batch axis."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="Threads for measurement."),
    measure_seconds: float = typer.Option(1.0, "--measure-seconds", callback=positive, help="Seconds per trial measurement."),
    seed: int = typer.Option(0, "--seed", help="Seed of the sampler and the data split."),
    as_json: bool = typer.Option(False, "--json", help="Print the front as JSON."),
) -> None:
    """The latency-vs-fidelity Pareto front: a resumable, multi-worker optuna study with every trial measured."""
    from deploy.compress.study import StudyConfig
    from deploy.core.errors import UserInputError
    from deploy.compiler.job import DEFAULT_PRECISIONS, CompressRequest
    from deploy.compiler.search import SearchRequest, search

    request = CompressRequest(
        model=str(model) if model else None, example=example, arch=arch, trust_pickle=trust_pickle,
        input_shapes=tuple(input_shape), target=target, profile_path=str(profile) if profile else None,
        calib=calib, held_out=held_out, tokenizer=str(tokenizer) if tokenizer else None, out=str(output), force=True,
        precisions=tuple(precision) or DEFAULT_PRECISIONS, prune=not no_prune, lowrank=lowrank,
        recover_steps=0, threads=threads,
        measure_seconds=measure_seconds, seed=seed, batch=batch)
    try:
        config = StudyConfig(trials=trials, timeout_s=timeout, storage=storage, study_name=study_name, seed=seed)
    except ValueError as exc:
        raise UserInputError(str(exc)) from None
    with job_progress(err_console, "search", not as_json) as progress:
        summary = search(SearchRequest(request, config), progress)
    if as_json:
        emit_json(summary)
        return
    table = Table(title=f"Pareto front on {summary['target']} ({summary['completed']} trials)")
    id_column(table, "trial", [str(row["number"]) for row in summary["front"]])
    for col in ("precision", "level", "latency p50 (ms)", "fidelity"):
        table.add_column(col)
    for row in summary["front"]:
        table.add_row(str(row["number"]), str(row["params"].get("precision")), f"{row['params'].get('level', 0):.3f}",
                      f"{row['latency_ms']:.4g}", f"{row['fidelity']:.4g}")
    console.print(table)
    for row in summary["front"]:  # whole paths, never cut by a table column
        console.print(f"trial {row['number']}: {row['artifact']}/model.onnx", highlight=False, soft_wrap=True)
    console.print(f"front: {output}/front.json, {output}/front.png, {output}/report.html", highlight=False,
                  soft_wrap=True)
