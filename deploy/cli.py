"""The command line: parse, build a config, call one library function, print. No logic lives here."""
from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.console import Console
from rich.markup import escape
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
    if not debug:
        # warnings reach the user through results and reports; stray log lines would break the one-line contract
        import logging

        logging.getLogger("deploy").propagate = False
    try:
        rc = app(standalone_mode=False)  # a command's typer.Exit(n) comes back as n here
        sys.exit(rc or 0)
    except DeployError as exc:
        if debug:
            raise
        err_console.print(f"[bold red]error:[/] {escape(exc.one_line())}", highlight=False, soft_wrap=True)
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
        err_console.print(f"[bold red]internal error:[/] {type(exc).__name__}: {escape(str(exc))} (rerun with --debug for the traceback)",
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


@profiles_app.command("calibrate")
def profiles_calibrate(
    target: str = typer.Argument(..., help="Profile name or alias (cpu) of the device to measure."),
    runner: Optional[str] = typer.Option(None, "--runner", help="Time on a remote device: ssh://user@host[:port]."),
    quick: bool = typer.Option(False, "--quick", help="A small grid at a tiny budget, no latency-model fit: a smoke "
                               "test, not for decisions."),
    threads: Optional[int] = typer.Option(None, "--threads", help="Threads (default: physical cores, capped by "
                                          "the profile)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Measure a device: its op latency lookup table (single-op microbenchmarks) and, unless --quick, its fitted
    latency model. Results are cached under DEPLOY_CACHE_DIR (default ~/.cache/deploy)."""
    from deploy.targets.latency_calibrate import CalibrateRequest, calibrate

    request = CalibrateRequest(target=target, runner=runner, quick=quick, threads=threads)
    result = calibrate(request, progress=None if as_json else err_console.print)
    if as_json:
        emit_json(result.to_dict())
        return
    table = Table(title=f"calibrated {result.profile} ({result.device})", show_header=False)
    rows = [("runtime", result.runtime), ("threads", str(result.threads)), ("table", result.table_path),
            ("entries", f"{result.entries} ({result.measured} measured now, {result.cached} from the cache)"),
            ("precisions", ", ".join(result.precisions)),
            *((f"skipped {p}", why) for p, why in result.skipped.items()),
            ("latency model", f"{result.model['models']} models, band x/÷ {2.718281828 ** result.model['band']:.2f}, "
                              f"{result.model['path']}" if result.model else "not fitted (--quick or remote)"),
            ("time", f"{result.seconds:.1f} s")]
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)


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


# --- bench --------------------------------------------------------------------------------------------------------

@app.command("bench")
def bench(
    model: Path = typer.Argument(..., help="The exported model (.onnx; .pt/.pt2 with --runtime torch)."),
    target: Optional[str] = typer.Option(None, "--target", "-t", help="Device profile or alias (cpu, cpu-avx512-vnni...); default: cpu, this machine."),
    profile: Optional[Path] = typer.Option(None, "--profile", help="A profile TOML file instead of --target."),
    runtime: Optional[str] = typer.Option(None, "--runtime", help="ort (onnxruntime), openvino, torch or tensorrt; default: the profile's."),
    threads: Optional[int] = typer.Option(None, "--threads", help="Threads; default: physical cores, capped at the profile's."),
    input_shape: List[str] = typer.Option([], "--input-shape", help="NAME:DIMS[:DTYPE] (e.g. input_ids:1x128:int64) or DIM=SIZE (e.g. sequence=128); repeat per input."),
    precision: Optional[str] = typer.Option(None, "--precision", help="f32 or bf16 (an explicit OpenVINO / torch precision); default f32."),
    quick: bool = typer.Option(False, "--quick", help="A sub-second smoke measurement, not for decisions."),
    min_seconds: Optional[float] = typer.Option(None, "--min-seconds", help="Sample for at least this long (default 3)."),
    min_samples: Optional[int] = typer.Option(None, "--min-samples", help="Take at least this many samples (default 64)."),
    max_seconds: Optional[float] = typer.Option(None, "--max-seconds", help="Stop after this long whatever the counts (default 60)."),
    compare: Optional[Path] = typer.Option(None, "--compare", help="A second model to measure interleaved with MODEL (ratio = OTHER / MODEL)."),
    runner: Optional[str] = typer.Option(None, "--runner", help="ssh://user@host:port (user and port optional): measure on that device over SSH (onnxruntime there, or trtexec for a TensorRT target)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON (schema deploy.measurement)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Also write the JSON result to this file (atomically)."),
) -> None:
    """Measure latency in a loop on this machine: warm-up, >= 64 samples and >= 3 s, percentiles and a median CI."""
    import contextlib
    import dataclasses

    from rich.markup import escape

    from deploy.report import atomic_write_json
    from deploy.targets.bench import BenchRequest, run_bench
    from deploy.targets.bench_view import bench_table, comparison_line
    from deploy.targets.measure import MeasureConfig
    from deploy.targets.progress_bar import progress_bar

    config = MeasureConfig.quick() if quick else MeasureConfig()
    changes = {k: v for k, v in (("min_seconds", min_seconds), ("min_samples", min_samples),
                                 ("max_seconds", max_seconds)) if v is not None}
    if max_seconds is None and min_seconds is not None and min_seconds > config.max_seconds:
        changes["max_seconds"] = 2 * min_seconds
    request = BenchRequest(model_path=model, target=target, profile_path=profile, runtime=runtime, threads=threads,
                           input_shapes=tuple(input_shape), measure=dataclasses.replace(config, **changes),
                           compare=compare, precision=precision, runner=runner)
    with (contextlib.nullcontext(None) if as_json else progress_bar(err_console)) as report:
        result = run_bench(request, report)
    if result.note:
        err_console.print(f"note: {escape(result.note)}", highlight=False, soft_wrap=True)
    measurements = [result.measurement] + ([result.other] if result.other else [])
    for warning in dict.fromkeys(w for m in measurements for w in m.warnings):
        err_console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False, soft_wrap=True)
    data = result.to_dict()
    if output is not None:
        atomic_write_json(output, data)
    if as_json:
        emit_json(data)
        return
    console.print(bench_table(result))
    if result.comparison is not None:
        console.print(comparison_line(result), highlight=False, soft_wrap=True)
    if output is not None:
        err_console.print(f"wrote {output}", highlight=False)


# --- regress ------------------------------------------------------------------------------------------------------

@app.command("regress")
def regress(
    model: Path = typer.Argument(..., help="The new model (.onnx; .pt/.pt2 with --runtime torch)."),
    baseline: Optional[Path] = typer.Option(None, "--baseline", "-b", help="Baseline file (JSON of `deploy bench --json`); create it with --update."),
    baseline_model: Optional[Path] = typer.Option(None, "--baseline-model", help="The old model file: measure old and new interleaved in this run (most trustworthy)."),
    update: bool = typer.Option(False, "--update", help="Measure MODEL and (re)write --baseline atomically instead of judging."),
    threshold: float = typer.Option(0.05, "--threshold", help="Slowdown of the median that counts (0.05 = 5%)."),
    alpha: float = typer.Option(0.01, "--alpha", help="Mann-Whitney U significance level."),
    max_cov: float = typer.Option(0.10, "--max-cov", help="Refuse to judge (exit 3) when either side's robust CoV (1.4826 MAD / median) is above this."),
    require_samples: int = typer.Option(20, "--require-samples", help="Refuse to judge (exit 3) with fewer samples on either side."),
    target: Optional[str] = typer.Option(None, "--target", "-t", help="Device profile or alias; default: the baseline's, else cpu."),
    profile: Optional[Path] = typer.Option(None, "--profile", help="A profile TOML file instead of --target."),
    runtime: Optional[str] = typer.Option(None, "--runtime", help="ort, openvino, torch or tensorrt; default: the baseline's, else the profile's."),
    threads: Optional[int] = typer.Option(None, "--threads", help="Threads; default: the baseline's, else physical cores."),
    input_shape: List[str] = typer.Option([], "--input-shape", help="NAME:DIMS[:DTYPE] or DIM=SIZE; default: the baseline's inputs."),
    precision: Optional[str] = typer.Option(None, "--precision", help="f32 or bf16 (OpenVINO / torch)."),
    quick: bool = typer.Option(False, "--quick", help="A sub-second smoke measurement (tests), not for real gating."),
    min_seconds: Optional[float] = typer.Option(None, "--min-seconds", help="Sample for at least this long (default: the baseline's, else 3)."),
    min_samples: Optional[int] = typer.Option(None, "--min-samples", help="Take at least this many samples (default: the baseline's, else 64)."),
    max_seconds: Optional[float] = typer.Option(None, "--max-seconds", help="Stop after this long whatever the counts."),
    markdown: Optional[Path] = typer.Option(None, "--markdown", help="Write the markdown summary to this file (also appended to $GITHUB_STEP_SUMMARY when set)."),
    junit: Optional[Path] = typer.Option(None, "--junit", help="Write JUnit XML (one testcase) to this file."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON (schema deploy.regress)."),
) -> None:
    """CI latency gate: exit 0 pass, 1 regression (slower by > --threshold AND p < --alpha), 3 inconclusive (rerun)."""
    import dataclasses

    from deploy.report import atomic_write_text
    from deploy.targets.measure import MeasureConfig
    from deploy.targets.progress_bar import progress_bar
    from deploy.targets.regress import RegressRequest, regress as run_regress
    from deploy.targets.regress_decide import GateConfig
    from deploy.targets.regress_report import append_step_summary, headline, to_junit, to_markdown

    gate = GateConfig(threshold=threshold, alpha=alpha, max_cov=max_cov, min_samples=require_samples)
    changes = {k: v for k, v in (("min_seconds", min_seconds), ("min_samples", min_samples),
                                 ("max_seconds", max_seconds)) if v is not None}
    measure = None  # like the baseline file
    if quick or changes:
        config = MeasureConfig.quick(min_samples=max(16, require_samples)) if quick else MeasureConfig()
        if max_seconds is None and min_seconds is not None and min_seconds > config.max_seconds:
            changes["max_seconds"] = 2 * min_seconds
        measure = dataclasses.replace(config, **changes)
    request = RegressRequest(model_path=model, baseline=baseline, baseline_model=baseline_model, update=update,
                             gate=gate, measure=measure, target=target, profile_path=profile, runtime=runtime,
                             threads=threads, input_shapes=tuple(input_shape), precision=precision)
    with progress_bar(err_console, "regress") as report:
        result = run_regress(request, report)
    data = result.to_dict()
    summary = to_markdown(data)
    if markdown is not None:
        atomic_write_text(markdown, summary)
    if junit is not None:
        atomic_write_text(junit, to_junit(data))
    append_step_summary(summary)
    if as_json:
        for warning in data["warnings"]:  # the markdown lists them in text mode
            err_console.print(f"[yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)
        emit_json(data)
    else:
        console.print(summary, highlight=False, soft_wrap=True, markup=False)
        err_console.print(headline(data), highlight=False, soft_wrap=True, markup=False)
    if result.exit_code:
        sys.exit(result.exit_code)  # not typer.Exit: main() runs the app with standalone_mode=False, which drops it


# --- compress, search, cache ---------------------------------------------------------------------------------------

cache_app = typer.Typer(no_args_is_help=True, help="The on-disk cache of sensitivity curves and latency tables.")
app.add_typer(cache_app, name="cache")


@contextlib.contextmanager
def _phase_bar(enabled: bool, label: str):
    """A progress bar over the phases of a long job (stderr, terminals only)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    if not enabled or not err_console.is_terminal:
        yield None
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=err_console,
                  transient=True) as bar:
        task = bar.add_task(label, total=1.0)
        yield lambda phase, fraction: bar.update(task, completed=fraction, description=f"{label}: {phase}")


def _compress_request(model, example, arch, trust_pickle, input_shape, target, profile, calib, tokenizer, budget_ms,
                      speedup, size_mb, max_drop, output, force, plan, precision, no_prune, recover_steps,
                      recover_minutes, eval_hook, threads, measure_seconds, seed, batch=1):
    from deploy.budget import from_flags
    from deploy.job import CompressRequest

    return CompressRequest(
        model=str(model) if model else None, example=example, arch=arch, trust_pickle=trust_pickle,
        input_shapes=tuple(input_shape), target=target, profile_path=str(profile) if profile else None,
        calib=calib, tokenizer=str(tokenizer) if tokenizer else None,
        budget=from_flags(budget_ms, speedup, size_mb, max_drop), out=str(output), force=force,
        plan=str(plan) if plan else None, precisions=tuple(precision) or ("fp32", "int8"), prune=not no_prune,
        recover_steps=recover_steps, recover_minutes=recover_minutes, eval_hook=eval_hook, threads=threads,
        measure_seconds=measure_seconds, seed=seed, batch=batch)


@app.command("compress")
def compress_cmd(
    model: Optional[Path] = typer.Argument(None, help="The model (.pt state_dict + --arch, TorchScript, .pt2, trusted pickle)."),
    example: bool = typer.Option(False, "--example", help="Use the bundled example model and its calibration data."),
    arch: Optional[str] = typer.Option(None, "--arch", help=ARCH_HELP),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help=PICKLE_HELP),
    input_shape: List[str] = typer.Option([], "--input-shape", help=SHAPE_HELP),
    target: str = typer.Option("cpu", "--target", "-t", help="Device profile or alias (cpu, jetson, ...)."),
    profile: Optional[Path] = typer.Option(None, "--profile", help="A profile TOML of your own instead of --target."),
    calib: Optional[str] = typer.Option(None, "--calib", help="Calibration data: image folder, .npy/.npz, .txt (+ --tokenizer), module:function, or 'random'."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="A saved Hugging Face tokenizer folder, for .txt data."),
    budget_ms: Optional[float] = typer.Option(None, "--budget-ms", help="Latency budget: p50 in milliseconds on the target."),
    speedup: Optional[float] = typer.Option(None, "--speedup", help="Latency budget as a speed-up over the dense fp32 model."),
    size_mb: Optional[float] = typer.Option(None, "--size-mb", help="Size budget of the exported model in MB."),
    max_drop: Optional[float] = typer.Option(None, "--max-drop", help="Fidelity floor: at most this drop of the primary metric, then the fastest model."),
    output: Path = typer.Option(Path("out"), "--output", "-o", help="Output folder (refused if it exists, unless --force)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output folder."),
    plan: Optional[Path] = typer.Option(None, "--plan", help="Replay a deploy.toml from an earlier run (no search)."),
    precision: List[str] = typer.Option([], "--precision", help="Precisions layers may take (default fp32 and int8; add int4 for weight-only int4 where the target has it); repeat."),
    no_prune: bool = typer.Option(False, "--no-prune", help="Do not prune."),
    batch: int = typer.Option(1, "--batch", help="Batch size latency is measured at (and a TensorRT plan built for); needs a dynamic batch axis."),
    recover_steps: int = typer.Option(200, "--recover-steps", help="Distillation steps after pruning (0: none)."),
    recover_minutes: float = typer.Option(1.0, "--recover-minutes", help="Time budget for distillation."),
    eval_hook: Optional[str] = typer.Option(None, "--eval", help="module:function(onnx_path) -> dict of your own metrics (imports your code)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="Threads for measurement; default: physical cores."),
    measure_seconds: float = typer.Option(1.0, "--measure-seconds", help="Seconds per candidate measurement."),
    seed: int = typer.Option(0, "--seed", help="Seed for the data split and recovery."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Compress a model for a target under one budget, export it, and measure the result."""
    from deploy.job import compress

    request = _compress_request(model, example, arch, trust_pickle, input_shape, target, profile, calib, tokenizer,
                                budget_ms, speedup, size_mb, max_drop, output, force, plan, precision, no_prune,
                                recover_steps, recover_minutes, eval_hook, threads, measure_seconds, seed, batch)
    with _phase_bar(not as_json, "compress") as bar:
        report = compress(request, bar)
    if as_json:
        emit_json(report)
        return
    for warning in report["warnings"]:
        err_console.print(f"[yellow]note:[/] {escape(warning)}", highlight=False, soft_wrap=True)
    o, r = report["original"], report["result"]
    table = Table(title=f"{report['target']['name']}: {report['budget']['described']}")
    for col in ("", "latency p50 (ms)", "size (MB)", report["fidelity_metric"]):
        table.add_column(col, justify="right")
    source = "" if report["latency_source"] == "measured" else " (predicted)"
    table.add_row("original", f"{o['latency_ms']:.4g}{source}", f"{o['size_mb']:.3g}", "1.0")
    band = r.get("band_ms")
    extra = f" [{band[0]:.3g}-{band[1]:.3g}]" if band else ""
    table.add_row(f"compressed ({r['precision']})", f"{r['latency_ms']:.4g}{extra}{source}", f"{r['size_mb']:.3g}",
                  f"{r['fidelity']:.4g}")
    console.print(table)
    if report["budget_met"] is not None:
        console.print(f"budget {'met' if report['budget_met'] else 'MISSED'}: target {report['budget']['target_ms']:.4g} ms")
    console.print(f"wrote {report['output']}/model.onnx, report.json, report.html, deploy.toml")


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
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="Tokenizer folder for .txt data."),
    output: Path = typer.Option(Path("search-out"), "--output", "-o", help="Folder for the study, trials and the front (resumable)."),
    trials: int = typer.Option(20, "--trials", help="Completed trials to reach (a resumed study counts earlier ones)."),
    timeout: Optional[float] = typer.Option(None, "--timeout", help="Stop this worker after this many seconds."),
    storage: Optional[str] = typer.Option(None, "--storage", help="optuna storage URL (default sqlite:///OUT/study.db; postgresql://... for many workers)."),
    study_name: str = typer.Option("deploy-search", "--study-name", help="Study name inside the storage."),
    precision: List[str] = typer.Option([], "--precision", help="Precisions layers may take (default fp32 and int8)."),
    no_prune: bool = typer.Option(False, "--no-prune", help="Do not prune."),
    batch: int = typer.Option(1, "--batch", help="Batch size latency is measured at; needs a dynamic batch axis."),
    threads: Optional[int] = typer.Option(None, "--threads", help="Threads for measurement."),
    measure_seconds: float = typer.Option(1.0, "--measure-seconds", help="Seconds per trial measurement."),
    seed: int = typer.Option(0, "--seed", help="Seed of the sampler and the data split."),
    as_json: bool = typer.Option(False, "--json", help="Print the front as JSON."),
) -> None:
    """The latency-vs-fidelity Pareto front: a resumable, multi-worker optuna study with every trial measured."""
    from deploy.compress.search import SearchConfig
    from deploy.search_job import SearchRequest, search

    request = _compress_request(model, example, arch, trust_pickle, input_shape, target, profile, calib, tokenizer,
                                None, None, None, None, output, True, None, precision, no_prune, 0, 1.0, None,
                                threads, measure_seconds, seed, batch)
    try:
        config = SearchConfig(trials=trials, timeout_s=timeout, storage=storage, study_name=study_name, seed=seed)
    except ValueError as exc:
        from deploy.errors import UserInputError

        raise UserInputError(str(exc)) from None
    with _phase_bar(not as_json, "search") as bar:
        summary = search(SearchRequest(request, config), (lambda done, total: bar("trials", done / total)) if bar else None)
    if as_json:
        emit_json(summary)
        return
    table = Table(title=f"Pareto front on {summary['target']} ({summary['completed']} trials)")
    for col in ("trial", "precision", "level", "latency p50 (ms)", "fidelity", "artifact"):
        table.add_column(col)
    for row in summary["front"]:
        table.add_row(str(row["number"]), str(row["params"].get("precision")), f"{row['params'].get('level', 0):.3f}",
                      f"{row['latency_ms']:.4g}", f"{row['fidelity']:.4g}", f"{row['artifact']}/model.onnx")
    console.print(table)
    console.print(f"front: {output}/front.json, {output}/front.png")


@cache_app.command("clear")
def cache_clear(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Empty the cache folder (~/.cache/deploy, or $DEPLOY_CACHE_DIR)."""
    from deploy.cache import cache_dir, clear_cache

    files, size = clear_cache()
    if as_json:
        emit_json({"cache_dir": str(cache_dir()), "removed_files": files, "removed_bytes": size})
        return
    console.print(f"removed {files} files ({size / 1e6:.2f} MB) from {cache_dir()}")


@cache_app.command("show")
def cache_show(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Where the cache is and what it holds."""
    from deploy.cache import cache_dir, cache_size

    files, size = cache_size()
    if as_json:
        emit_json({"cache_dir": str(cache_dir()), "files": files, "bytes": size})
        return
    console.print(f"{cache_dir()}: {files} files, {size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
