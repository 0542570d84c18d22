"""Latency prediction on held-out models, on this CPU.

Fits the latency model of the local CPU profile on the reference models (deploy.targets.latency.reference: their
per-layer tables), then predicts and measures models it never saw: other CNN widths, depths and input sizes, pruned
CNNs (narrower inner convs), other BERT widths, depths and sequence lengths, BERTs with a pruned FFN, and int8
twins. Reports predicted vs measured end to end, the share within +-10% and +-15%, and whether each measurement
fell inside the predicted band.

Measuring on a shared host: by default every inference is timed by the process CPU time it took (one inference
thread), which leaves out the time slices other tenants' processes got meanwhile; wall-time p50s are recorded
too. Every held-out model is timed in several passes interleaved across models, and keeps its lowest p50.

    .venv/bin/python benchmarks/latency_prediction.py [--threads 1] [--passes 4] [--clock cpu|wall]
writes benchmarks/results/latency_prediction.{json,md}; then run benchmarks/render.py.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
COMMAND = ".venv/bin/python benchmarks/latency_prediction.py"


def held_out() -> list:
    """Models outside the fitting set (latency_reference.reference_set): none shares a name or configuration."""
    from deploy.targets.latency.reference import bert, cnn

    cnns = [cnn((12, 24, 48), 1, 48), cnn((24, 48, 96), 1, 64), cnn((24, 48, 96), 2, 32), cnn((16, 32, 64), 2, 64),
            cnn((32, 64, 128), 2, 32), cnn((40, 80, 160), 1, 48), cnn((8, 16, 32), 3, 64), cnn((64, 128, 256), 1, 32),
            cnn((32, 64, 128), 1, 64, keep=0.4), cnn((16, 32, 64), 2, 64, keep=0.6),
            cnn((48, 96, 192), 1, 32, keep=0.5)]
    berts = [bert(96, 3, 256), bert(192, 2, 128), bert(256, 4, 128), bert(320, 2, 64, heads=5), bert(160, 3, 96),
             bert(256, 2, 128, ffn=512), bert(128, 2, 128, ffn=256)]
    int8 = [cnns[2], cnns[8], cnns[9], cnns[0], cnns[5], berts[2], berts[1], berts[5]]
    return cnns + berts + [m.at("int8") for m in int8]


def fit(tables: dict, passes_of: dict, threads: int):
    """The calibration from the reference models' layer tables (node times, possibly cached from an earlier run)
    and their end to end from this run's interleaved passes, the same passes the held-out models are measured in,
    so fit and check see the host in the same state."""
    from deploy.profiles import resolve_target
    from deploy.targets.latency import cache as latency_cache
    from deploy.targets.latency.fit import TrainingModel, fit_calibration
    from deploy.targets.latency.model import save_calibration

    profile = resolve_target("cpu").profile
    models = [TrainingModel(name, t.nodes, min(p["p50_ms"] for p in passes_of[name])) for name, t in tables.items()]
    calibration = fit_calibration(models, profile, threads, profile.runtime, latency_cache.env_key(threads))
    save_calibration(calibration, profile)
    return profile, calibration, models


def artifact(model, folder: Path) -> tuple[Path, list]:
    """The file that is measured: exported, and quantized with the same settings predict_latency uses."""
    from deploy.targets.latency.export import export_static, quantize_qdq

    specs = model.inputs()
    path = export_static(model.build(), specs, folder / f"{model.name}.onnx")
    if model.precision == "int8":
        path = quantize_qdq(path, specs, folder / f"{model.name}-q.onnx")
    return path, specs


def cpu_busy(interval_s: float = 0.1) -> float:
    """Share of all CPUs busy over `interval_s` (from /proc/stat) while we sit idle: the neighbours' load."""
    def sample() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        return sum(fields), fields[3] + (fields[4] if len(fields) > 4 else 0)

    try:
        total0, idle0 = sample()
        time.sleep(interval_s)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return float("nan")
    return 1.0 - (idle1 - idle0) / max(total1 - total0, 1)


def measure_all(paths: dict, threads: int, passes: int, clock: str, say) -> dict[str, list[dict]]:
    """Per model and pass: p50 on `clock`, p50 of wall time, and the neighbours' load just before."""
    from deploy.targets.measure.clock import timed
    from deploy.targets.latency.export import feeds_for
    from deploy.targets.measure.loop import MeasureConfig, measure
    from deploy.targets.runners.registry import get_runner

    runs = {name: get_runner("onnxruntime", threads).prepare(path, feeds_for(specs))
            for name, (path, specs) in paths.items()}
    config = MeasureConfig(warmup_min_s=0.1, warmup_min_runs=10, min_samples=40, min_seconds=0.4)
    out: dict[str, list[dict]] = {name: [] for name in runs}
    for i in range(passes):
        for name, run_once in runs.items():
            busy = cpu_busy()
            p50 = float(measure(timed(run_once, clock), config).summary["p50"])
            wall = float(measure(run_once, MeasureConfig.quick(min_samples=20)).summary["p50"])
            out[name].append({"p50_ms": p50, "wall_p50_ms": wall, "neighbour_load": round(busy, 2)})
        say(f"  measured pass {i + 1}/{passes}")
    return out


def run(threads: int, passes: int, clock: str) -> dict:
    from deploy.targets.measure.fingerprint import fingerprint
    from deploy.targets.latency.model import predict_latency
    from deploy.targets.latency.reference import reference_set
    from deploy.targets.latency.layer_table import LayerTableConfig, layer_table_of_file

    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    started = time.perf_counter()
    references, models = reference_set(), held_out()
    with tempfile.TemporaryDirectory(prefix="deploy-latpred-") as tmp:
        paths = {m.name: artifact(m, Path(tmp)) for m in references + models}
        say(f"per-layer tables of {len(references)} reference models")
        config = LayerTableConfig(threads=threads, clock=clock)
        tables = {}
        for ref in references:
            path, specs = paths[ref.name]
            tables[ref.name] = layer_table_of_file(path, specs, config, {n for n, _ in ref.build().named_modules()})
        say(f"measuring {len(paths)} models end to end, {passes} interleaved passes")
        passes_of = measure_all(paths, threads, passes, clock, say)
    profile, calibration, training = fit(tables, passes_of, threads)
    rows = []
    for model in models:
        prediction = predict_latency(model.build(), model.inputs(), profile,
                                     precision_map="int8" if model.precision == "int8" else None,
                                     threads=threads, calibration=calibration)
        measured = min(p["p50_ms"] for p in passes_of[model.name])
        rows.append({"model": model.name, "kind": model.kind, "precision": model.precision,
                     "predicted_ms": prediction.ms, "low_ms": prediction.low_ms, "high_ms": prediction.high_ms,
                     "measured_ms": measured, "error": prediction.ms / measured - 1.0,
                     "in_band": prediction.low_ms <= measured <= prediction.high_ms,
                     "passes": passes_of[model.name]})
        say(f"  {model.name}: predicted {prediction.ms:.3f} ms, measured {measured:.3f} ms")
    errors = [abs(r["error"]) for r in rows]
    return {
        "schema": "deploy.benchmark.latency_prediction", "schema_version": 1,
        "command": f"{COMMAND} --threads {threads} --passes {passes} --clock {clock}",
        "clock": clock,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "fingerprint": fingerprint(threads, profile.name),
        "profile": profile.name, "runtime": profile.runtime, "threads": threads,
        "fit": {"models": [m.name for m in training], "e2e_ms": {m.name: m.e2e_ms for m in training},
                "kinds": len(calibration.factors), "band_log": calibration.band, "bands_log": calibration.bands,
                "scale": calibration.scale,
                "per_node_ms": calibration.per_node_ms, "session_ms": calibration.session_ms,
                "leave_one_out": dict(zip(calibration.models, calibration.residuals))},
        "held_out": rows,
        "summary": {"n": len(rows), "within_10": _share(errors, 0.10), "within_15": _share(errors, 0.15),
                    "in_band": sum(r["in_band"] for r in rows) / len(rows),
                    "median_abs_error": sorted(errors)[len(errors) // 2]},
        "seconds": round(time.perf_counter() - started, 1),
    }


def _bands(fit_info: dict) -> str:
    bands = fit_info.get("bands_log") or {"all": fit_info["band_log"]}
    return ", ".join(f"{prec}: x/÷ {math.exp(band):.2f}" for prec, band in sorted(bands.items()))


def _clock_text(clock: str) -> str:
    if clock == "cpu":
        return ("per-inference process CPU time (1 thread: on an idle machine this is the latency; on this shared "
                "host wall time also counts other tenants' time slices, recorded in the JSON)")
    return "per-inference wall time"


def _share(errors: list[float], limit: float) -> float:
    return sum(e <= limit + 1e-12 for e in errors) / len(errors)


def markdown(result: dict) -> str:
    s, f = result["summary"], result["fingerprint"]
    lines = [
        "## Latency prediction",
        "",
        f"`{result['command']}` ({result['date']}), profile `{result['profile']}` ({result['runtime']}, "
        f"{result['threads']} thread(s)) on {f['cpu']} ({f['usable_cores']} usable cores, flags "
        f"{', '.join(f['cpu_flags'])}; onnxruntime {f['versions'].get('onnxruntime', '?')}).",
        "",
        f"The latency model (roofline + per-op-kind correction factors, `deploy.targets.latency.model`) was fitted "
        f"on the layer tables of {len(result['fit']['models'])} reference models "
        f"({', '.join(result['fit']['models'])}); the {s['n']} models below were never seen by the fit. "
        f"Measured = the lowest p50 over interleaved passes of {_clock_text(result['clock'])}. The band is the one "
        f"each prediction carries: the 90th percentile of the leave-one-model-out errors of fit models of its "
        f"precision ({_bands(result['fit'])}).",
        "",
        f"**Within ±10%: {s['within_10']:.0%} · within ±15%: {s['within_15']:.0%} · inside the band: "
        f"{s['in_band']:.0%} · median |error| {s['median_abs_error']:.1%} ({s['n']} held-out models)**",
        "",
        "| model | precision | predicted ms | band ms | measured ms | error |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in result["held_out"]:
        lines.append(f"| {r['model']} | {r['precision']} | {r['predicted_ms']:.3f} | {r['low_ms']:.3f}–"
                     f"{r['high_ms']:.3f} | {r['measured_ms']:.3f} | {r['error']:+.1%} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--passes", type=int, default=4)
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                        help="cpu: process CPU time per inference (1 thread; robust to other tenants' time slices)")
    parser.add_argument("--render-only", action="store_true", help="rewrite the markdown from the stored JSON")
    args = parser.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.render_only:
        result = json.loads((RESULTS / "latency_prediction.json").read_text())
    else:
        result = run(args.threads, args.passes, args.clock)
        (RESULTS / "latency_prediction.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    (RESULTS / "latency_prediction.md").write_text(markdown(result))
    s = result["summary"]
    print(f"within 10%: {s['within_10']:.0%}, within 15%: {s['within_15']:.0%} of {s['n']} held-out models")
    return 0


if __name__ == "__main__":
    sys.exit(main())
