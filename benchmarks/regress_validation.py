"""Does the regression gate keep its promises on this machine? 20 A/A runs (the same model as old and new, measured
interleaved) must flag no regression; 20 A/B runs against a variant whose latency is about 10% higher must flag at
least 19. The slower variant is honest extra work (a chain of 1x1 convolutions inside the network), sized by
measuring, and its measured ratio is reported.

Writes benchmarks/results/regress_validation.json (raw) and regress_validation.md (generated from that JSON).
Usage: .venv/bin/python benchmarks/regress_validation.py [--runs 20] [--min-seconds 2] [--render-only]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
JSON_PATH = RESULTS / "regress_validation.json"
MD_PATH = RESULTS / "regress_validation.md"
TARGET_RATIO = 1.10
CANDIDATE_DEPTHS = (1, 2, 3, 4, 6, 8)


def slowed_cnn(depth: int) -> Any:
    """The digits CNN with `depth` extra residual 1x1 conv + ReLU layers (32 channels, 16x16) before its last stage."""
    import torch
    from torch import nn

    from deploy.examples.digits_cnn import load_example_model

    base = load_example_model()

    class Slowed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.base = base
            self.extra = nn.ModuleList(nn.Conv2d(32, 32, 1) for _ in range(depth))
            for conv in self.extra:
                nn.init.normal_(conv.weight, std=0.01)
                nn.init.zeros_(conv.bias)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b = self.base
            x = b.layer2(b.layer1(b.stem(x)))
            for conv in self.extra:
                x = x + torch.relu(conv(x))
            return b.fc(b.flatten(b.pool(b.layer3(x))))

    return Slowed().eval()


def export(module: Any, path: Path) -> Path:
    from deploy.core.model.onnx_export import export_onnx
    from deploy.core.spec import InputSpec

    return export_onnx(module, [InputSpec("image", ("batch", 1, 32, 32))], path)


def gate_run(old: Path, new: Path, measure: Any, threads: int) -> Any:
    """One `deploy regress NEW --baseline-model OLD` with default gate settings, as the library call."""
    from deploy.targets.regress.gate import RegressRequest, regress

    return regress(RegressRequest(model_path=new, baseline_model=old, measure=measure, threads=threads))


def calibrate(folder: Path, base: Path, measure: Any, threads: int) -> tuple[int, list[dict[str, Any]]]:
    """Measure each candidate depth against the base once; keep the one whose ratio is closest to TARGET_RATIO."""
    trials = []
    for depth in CANDIDATE_DEPTHS:
        path = export(slowed_cnn(depth), folder / f"slowed_{depth}.onnx")
        verdict = gate_run(base, path, measure, threads).verdict
        trials.append({"depth": depth, "ratio": verdict.ratio, "outcome": verdict.outcome})
        print(f"calibration: depth {depth}: ratio {verdict.ratio}", file=sys.stderr)
        if verdict.ratio is not None and verdict.ratio > TARGET_RATIO * 1.08:
            break
    scored = [t for t in trials if t["ratio"] is not None]
    best = min(scored, key=lambda t: abs(t["ratio"] - TARGET_RATIO))
    return best["depth"], trials


def _row(kind: str, index: int, result: Any) -> dict[str, Any]:
    v = result.verdict
    return {"kind": kind, "run": index, "outcome": v.outcome, "improvement": v.improvement, "ratio": v.ratio,
            "ci": list(v.ci) if v.ci else None, "p_value": v.p_value, "noise_old": v.noise_old,
            "noise_new": v.noise_new, "n_old": v.n_old, "n_new": v.n_new, "median_old_ms": v.median_old,
            "median_new_ms": v.median_new, "seconds": result.seconds}


def file_mode_offline(first_old: list[float], later: list[list[float]], gate: Any) -> dict[str, int]:
    """The same A/A samples judged the other way: each run's new samples against run 1's stored old samples."""
    from deploy.targets.regress.decide import decide

    outcomes = [decide(first_old, samples, gate).outcome for samples in later]
    return {k: outcomes.count(k) for k in ("pass", "regression", "inconclusive")}


def run(args: argparse.Namespace) -> dict[str, Any]:
    import dataclasses

    from deploy.targets.measure.fingerprint import fingerprint
    from deploy.targets.measure.loop import MeasureConfig
    from deploy.targets.regress.decide import GateConfig

    measure = dataclasses.replace(MeasureConfig(), min_seconds=args.min_seconds, min_samples=64,
                                  max_seconds=max(10.0, 4 * args.min_seconds))
    started, load_before = time.time(), os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        base = export(slowed_cnn(0), folder / "base.onnx")
        depth, trials = calibrate(folder, base, dataclasses.replace(measure, min_seconds=0.5), args.threads)
        slow = folder / f"slowed_{depth}.onnx"
        rows, aa_new = [], []
        for i in range(args.runs):
            for kind, new in (("A/A", base), ("A/B", slow)):
                result = gate_run(base, new, measure, args.threads)
                rows.append(_row(kind, i + 1, result))
                if kind == "A/A":
                    aa_new.append((list(result.old.samples_ms), list(result.new.samples_ms)))
                print(f"run {i + 1} {kind}: {result.verdict.headline()}", file=sys.stderr)
    gate = GateConfig()
    return {
        "benchmark": "regress_validation", "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([".venv/bin/python", "benchmarks/regress_validation.py", *sys.argv[1:]]),
        "wall_seconds": round(time.time() - started, 1),
        "load_average_1_5_15": {"before": [round(x, 2) for x in load_before],
                                "after": [round(x, 2) for x in os.getloadavg()]}, "gate": gate.to_dict(), "measure": measure.to_dict(),
        "threads": args.threads, "model": "digits CNN (deploy.examples.digits_cnn), ONNX, image 1x1x32x32, onnxruntime",
        "slow_variant": {"depth": depth, "what": f"{depth} extra residual 1x1 conv (32 ch, 16x16) + ReLU layers",
                         "calibration": trials},
        "fingerprint": fingerprint(args.threads, "cpu"), "python": platform.python_version(),
        "file_mode_aa_offline": file_mode_offline(aa_new[0][0], [new for _, new in aa_new[1:]], gate),
        "runs": rows,
    }


def _counts(rows: list[dict[str, Any]], kind: str) -> dict[str, int]:
    mine = [r for r in rows if r["kind"] == kind]
    return {"runs": len(mine), **{k: sum(r["outcome"] == k for r in mine) for k in ("pass", "regression", "inconclusive")}}


def _median(values: list[float]) -> float:
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def render_markdown(data: dict[str, Any]) -> str:
    """The BENCHMARKS.md section, from the raw JSON only."""
    rows, gate, fp = data["runs"], data["gate"], data["fingerprint"]
    aa, ab = _counts(rows, "A/A"), _counts(rows, "A/B")
    ratios = {k: [r["ratio"] for r in rows if r["kind"] == k and r["ratio"] is not None] for k in ("A/A", "A/B")}
    lines = ["## Regression gate validation", "",
             f"`deploy regress NEW --baseline-model OLD` (interleaved A/B) run {aa['runs']} times with the same model "
             f"on both sides (A/A) and {ab['runs']} times against a slower variant (A/B): {data['model']}; slower "
             f"variant: {data['slow_variant']['what']}. Goal: 0 regressions in A/A, at least 19 of 20 flagged in A/B.",
             "", "| runs | pass | regression | inconclusive | median ratio new/old (min - max) |", "|---|---:|---:|---:|---|"]
    for label, c, kind in (("A/A (same model)", aa, "A/A"), ("A/B (slower variant)", ab, "A/B")):
        r = ratios[kind]
        spread = f"{_median(r):.3f} ({min(r):.3f} - {max(r):.3f})" if r else "-"
        lines.append(f"| {label}, {c['runs']} | {c['pass']} | {c['regression']} | {c['inconclusive']} | {spread} |")
    fm, m, load = data["file_mode_aa_offline"], data["measure"], data["load_average_1_5_15"]
    tried = ", ".join(f"{t['depth']}: x{t['ratio']:.3f}" for t in data["slow_variant"]["calibration"] if t["ratio"])
    lines += ["",
              f"Measured ratio of the slower variant: **x{_median(ratios['A/B']):.3f}** (median of the A/B runs; "
              f"calibration picked depth {data['slow_variant']['depth']} of "
              f"{tried}).",
              f"Gate: threshold {gate['threshold']:.0%}, alpha {gate['alpha']:g}, max robust CoV {gate['max_cov']:.0%}, "
              f"at least {gate['min_samples']} samples per side. Measurement per run: >= {m['min_samples']} samples and "
              f">= {m['min_seconds']:g} s per run, old and new interleaved, {data['threads']} thread.",
              f"The same A/A samples judged in baseline-file mode (each run against run 1's stored samples, no "
              f"interleaving): {fm['pass']} pass, {fm['regression']} regression, {fm['inconclusive']} inconclusive.",
              f"Machine: {fp['cpu']}, {fp['usable_cores']} usable cores ({'virtualized' if fp['virtualized'] else 'bare metal'}), "
              f"onnxruntime {fp['versions'].get('onnxruntime', '?')}, Python {fp['python']}, {fp['os']}. "
              f"Load average (1 min) before / after: {load['before'][0]:.2f} / {load['after'][0]:.2f} on "
              f"{fp['logical_cores']} logical cores (the machine is shared). "
              f"Date: {data['created'][:10]}; {data['wall_seconds']:.0f} s wall.",
              f"Command: `{data['command']}`"]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--min-seconds", type=float, default=2.0, help="per gate run (both models, interleaved)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--render-only", action="store_true", help="rewrite the .md from the existing JSON")
    args = parser.parse_args()
    from deploy.core.atomic_io import atomic_write_json, atomic_write_text

    if not args.render_only:
        atomic_write_json(JSON_PATH, run(args))
    atomic_write_text(MD_PATH, render_markdown(json.loads(JSON_PATH.read_text())))
    print(MD_PATH.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
