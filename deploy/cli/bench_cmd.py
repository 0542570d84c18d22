"""`deploy bench` (latency in a loop) and `deploy regress` (the CI gate)."""
from __future__ import annotations

import contextlib
import dataclasses
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape

from deploy.cli.app import PICKLE_HELP, app, console, emit_json, err_console, non_negative, positive

MODEL_HELP = ("The exported model: .onnx, an OpenVINO IR .xml (--runtime openvino), or .pt/.pt2 with --runtime "
              "torch.")


CLOCK_HELP = ("wall (default) or cpu: the thread CPU time of each inference, which a neighbour's time slices do not "
              "inflate (needs --threads 1).")
BLOCKS_HELP = ("A comparison runs in this many independent blocks (fresh sessions, alternated order); its interval "
               "comes from their spread (default 12).")


def _measure_config(quick: bool, min_seconds: Optional[float], min_samples: Optional[int],
                    max_seconds: Optional[float], quick_samples: int = 0, blocks: Optional[int] = None):
    from deploy.targets.measure.loop import MeasureConfig

    config = MeasureConfig.quick(min_samples=quick_samples) if quick and quick_samples else (
        MeasureConfig.quick() if quick else MeasureConfig())
    changes = {k: v for k, v in (("min_seconds", min_seconds), ("min_samples", min_samples),
                                 ("max_seconds", max_seconds), ("blocks", blocks)) if v is not None}
    if max_seconds is None and min_seconds is not None and min_seconds > config.max_seconds:
        changes["max_seconds"] = 2 * min_seconds
    return dataclasses.replace(config, **changes), bool(quick or changes)


@app.command("bench")
def bench(
    model: Path = typer.Argument(..., help=MODEL_HELP),
    target: Optional[str] = typer.Option(None, "--target", "-t", help="Device profile or alias (cpu, cpu-avx512-vnni...); default: cpu, this machine."),
    profile: Optional[Path] = typer.Option(None, "--profile", help="A profile TOML file instead of --target."),
    runtime: Optional[str] = typer.Option(None, "--runtime", help="ort (onnxruntime), openvino, torch or tensorrt; default: the profile's (openvino for an .xml)."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="Threads; default: physical cores, capped at the profile's."),
    input_shape: List[str] = typer.Option([], "--input-shape", help="NAME:DIMS[:DTYPE] (e.g. input_ids:1x128:int64) or DIM=SIZE (e.g. sequence=128); repeat per input."),
    precision: Optional[str] = typer.Option(None, "--precision", help="f32 or bf16 (an explicit OpenVINO / torch precision); default f32."),
    quick: bool = typer.Option(False, "--quick", help="A sub-second smoke measurement, not for decisions."),
    min_seconds: Optional[float] = typer.Option(None, "--min-seconds", callback=non_negative, help="Sample for at least this long (default 3)."),
    min_samples: Optional[int] = typer.Option(None, "--min-samples", min=1, help="Take at least this many samples (default 64)."),
    max_seconds: Optional[float] = typer.Option(None, "--max-seconds", callback=positive, help="Stop after this long whatever the counts (default 60)."),
    compare: Optional[Path] = typer.Option(None, "--compare", help="A second model to measure interleaved with MODEL (ratio = OTHER / MODEL)."),
    blocks: Optional[int] = typer.Option(None, "--blocks", min=1, help=BLOCKS_HELP),
    clock: str = typer.Option("wall", "--clock", help=CLOCK_HELP),
    runner: Optional[str] = typer.Option(None, "--runner", help="ssh://user@host:port (user and port optional): measure on that device over SSH (onnxruntime there, or trtexec for a TensorRT target)."),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help=PICKLE_HELP + " (--runtime torch)"),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON (schema deploy.measurement)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Also write the JSON result to this file (atomically)."),
) -> None:
    """Measure latency in a loop on this machine: warm-up, >= 64 samples and >= 3 s, percentiles and a median CI."""
    from deploy.core.atomic_io import atomic_write_json, check_writable_file
    from deploy.targets.bench import BenchRequest, run_bench
    from deploy.targets.bench_view import bench_table, comparison_line
    from deploy.targets.measure.progress import progress_bar

    if output is not None:
        check_writable_file(output, "--output")
    config, _ = _measure_config(quick, min_seconds, min_samples, max_seconds, blocks=blocks)
    request = BenchRequest(model_path=model, target=target, profile_path=profile, runtime=runtime, threads=threads,
                           input_shapes=tuple(input_shape), measure=config, compare=compare, precision=precision,
                           runner=runner, trust_pickle=trust_pickle, clock=clock)
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
        err_console.print(f"wrote {output}", highlight=False, soft_wrap=True)


@app.command("regress")
def regress(
    model: Path = typer.Argument(..., help=MODEL_HELP),
    baseline: Optional[Path] = typer.Option(None, "--baseline", "-b", help="Baseline file (JSON of `deploy bench --json`); create it with --update."),
    baseline_model: Optional[Path] = typer.Option(None, "--baseline-model", help="The old model file: measure old and new interleaved in this run (most trustworthy)."),
    update: bool = typer.Option(False, "--update", help="Measure MODEL and (re)write --baseline atomically instead of judging."),
    threshold: float = typer.Option(0.05, "--threshold", callback=non_negative, help="Slowdown of the median that counts (0.05 = 5%)."),
    alpha: float = typer.Option(0.01, "--alpha", callback=positive, help="Mann-Whitney U significance level."),
    max_cov: float = typer.Option(0.10, "--max-cov", callback=positive, help="Refuse to judge (exit 3) when either side's robust CoV (1.4826 MAD / median) is above this."),
    require_samples: int = typer.Option(20, "--require-samples", min=1, help="Refuse to judge (exit 3) with fewer samples on either side."),
    target: Optional[str] = typer.Option(None, "--target", "-t", help="Device profile or alias; default: the baseline's, else cpu."),
    profile: Optional[Path] = typer.Option(None, "--profile", help="A profile TOML file instead of --target."),
    runtime: Optional[str] = typer.Option(None, "--runtime", help="ort, openvino, torch or tensorrt; default: the baseline's, else the profile's."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="Threads; default: the baseline's, else physical cores."),
    input_shape: List[str] = typer.Option([], "--input-shape", help="NAME:DIMS[:DTYPE] or DIM=SIZE; default: the baseline's inputs."),
    precision: Optional[str] = typer.Option(None, "--precision", help="f32 or bf16 (OpenVINO / torch)."),
    quick: bool = typer.Option(False, "--quick", help="A sub-second smoke measurement (tests), not for real gating."),
    min_seconds: Optional[float] = typer.Option(None, "--min-seconds", callback=non_negative, help="Sample for at least this long (default: the baseline's, else 3)."),
    min_samples: Optional[int] = typer.Option(None, "--min-samples", min=1, help="Take at least this many samples (default: the baseline's, else 64)."),
    max_seconds: Optional[float] = typer.Option(None, "--max-seconds", callback=positive, help="Stop after this long whatever the counts."),
    blocks: Optional[int] = typer.Option(None, "--blocks", min=1, help=BLOCKS_HELP + " With --baseline-model."),
    clock: Optional[str] = typer.Option(None, "--clock", help=CLOCK_HELP + " Default: the baseline's, else wall."),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help=PICKLE_HELP + " (--runtime torch)"),
    markdown: Optional[Path] = typer.Option(None, "--markdown", help="Write the markdown summary to this file (also appended to $GITHUB_STEP_SUMMARY when set)."),
    junit: Optional[Path] = typer.Option(None, "--junit", help="Write JUnit XML (one testcase) to this file."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON (schema deploy.regress)."),
) -> None:
    """CI latency gate: exit 0 pass, 1 regression (slower by > --threshold AND p < --alpha), 3 inconclusive (rerun)."""
    from deploy.core.atomic_io import atomic_write_text, check_writable_file
    from deploy.targets.measure.progress import progress_bar
    from deploy.targets.regress.gate import RegressRequest, regress as run_regress
    from deploy.targets.regress.decide import GateConfig
    from deploy.targets.regress.report import append_step_summary, headline, to_junit, to_markdown

    for flag, path in (("--markdown", markdown), ("--junit", junit), ("--baseline", baseline if update else None)):
        if path is not None:
            check_writable_file(path, flag)
    gate = GateConfig(threshold=threshold, alpha=alpha, max_cov=max_cov, min_samples=require_samples)
    config, changed = _measure_config(quick, min_seconds, min_samples, max_seconds, max(16, require_samples), blocks)
    request = RegressRequest(model_path=model, baseline=baseline, baseline_model=baseline_model, update=update,
                             gate=gate, measure=config if changed else None, target=target, profile_path=profile,
                             runtime=runtime, threads=threads, input_shapes=tuple(input_shape), precision=precision,
                             trust_pickle=trust_pickle, clock=clock)
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
            err_console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False, soft_wrap=True)
        emit_json(data)
    else:
        console.print(summary, highlight=False, soft_wrap=True, markup=False)
        err_console.print(headline(data), highlight=False, soft_wrap=True, markup=False)
    if result.exit_code:
        sys.exit(result.exit_code)
