"""int8 on a CPU without VNNI: 8-bit against 7-bit weights, in OpenVINO and ONNX Runtime, beside NNCF.

Without VNNI, both runtimes' int8 dot products use vpmaddubsw, which sums pairs of u8 x s8 products in 16 bits and
saturates; 7-bit weights ([-63, 63]) cannot overflow it (OpenVINO's saturation workaround, NNCF's overflow fix,
ONNX Runtime's `reduce_range`). deploy's profiles for such CPUs (`cpu-avx2`, `cpu-avx2-openvino`) keep int8
weights in 7 bits. Each row is the compress preset's pure int8 plan of all-MiniLM-L6-v2 (every Linear int8
per-channel) with the weight bits named, or NNCF int8 (transformer preset) with its default overflow fix (the
first layer only) or on every layer; the same 256 calibration docstrings for all. Scored on held-out docstrings
in the runtime named: pooled cosine to fp32 and nearest-neighbour agreement, with a paired bootstrap CI of the
cosine difference to NNCF with the fix on every layer. On a CPU with VNNI nothing saturates, and the rows show
what the 7th bit costs there.

    .venv/bin/python benchmarks/int8_saturation.py [--quick] [--threads 2]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE))
from int8_fidelity import load_case, paired_ci, reference, scores  # noqa: E402
from quantization import head_to_head, outputs  # noqa: E402

VNNI = ("avx512_vnni", "avx_vnni", "amx_int8")
REFERENCE = "NNCF int8, overflow fix on every layer"


def saturating_int8() -> bool:
    """This CPU has no VNNI: int8 dot products (vpmaddubsw) sum pairs in 16 bits and may saturate."""
    from deploy.profiles import local_cpu_flags

    return not set(VNNI) & local_cpu_flags()


def ours(case: dict[str, Any], profile: Any, bits: int, threads: int, path: Path) -> tuple[Path, float]:
    """The compress preset's pure int8 plan on `profile` with `bits`-bit weights: its IR (OpenVINO) or ONNX."""
    from deploy.compress.quant.api import QuantizeConfig
    from deploy.compress.quant.prepare import prepare
    from deploy.export.qdq.writer import export_quantized
    from deploy.targets.target import for_profile

    target = for_profile(dataclasses.replace(profile, int8_weight_bits=bits), threads=threads)
    started = time.perf_counter()
    prep = prepare(case["module"], case["inputs"], case["calibration"], target,
                   config=QuantizeConfig.fast().calibration)
    int8 = {n: next(o for o in opts if o.precision == "int8" and o.granularity == "per-channel")
            for n, opts in prep.spaces.items()}
    result = export_quantized(prep.plan.with_options(int8), case["module"], case["inputs"], path)
    return (result.openvino_xml or result.onnx), time.perf_counter() - started


def nncf(float_onnx: Path, case: dict[str, Any], everywhere: bool, path: Path) -> tuple[Path, float]:
    from peers import _nncf_int8

    names = [s.name for s in case["inputs"]]
    feeds = [{k: t.numpy() for k, t in zip(names, s)} for s in case["calibration"].calibration]
    started = time.perf_counter()
    _nncf_int8(SimpleNamespace(fp32=float_onnx, case=SimpleNamespace(transformer=True, calib=feeds,
                                                                       overflow_fix_everywhere=everywhere)), path)
    return path, time.perf_counter() - started


def run(quick: bool, threads: int, log: Any = print) -> dict[str, Any]:
    from deploy.core.model.onnx_export import OnnxExportConfig, export_onnx
    from deploy.profiles import local_cpu_flags, resolve_target
    from deploy.targets.measure.fingerprint import fingerprint

    torch.set_num_threads(threads)
    case = load_case(256, 300 if quick else 1000)
    mask = torch.cat([s[1] for s in case["calibration"].held_out])
    ref = reference(case)
    ov_profile, ort_profile = resolve_target("cpu-openvino").profile, resolve_target("cpu").profile
    rows: dict[str, dict[str, Any]] = {}
    paths: dict[str, tuple[Path, str]] = {}
    with tempfile.TemporaryDirectory(prefix="int8-saturation-") as tmp:
        folder = Path(tmp)
        fp32 = export_onnx(case["module"], case["inputs"], folder / "fp32.onnx", OnnxExportConfig(dynamic=False))
        for key, everywhere in ((REFERENCE, True), ("NNCF int8, its default overflow fix (first layer only)", False)):
            path, seconds = nncf(fp32, case, everywhere, folder / f"nncf-{int(everywhere)}.xml")
            paths[key], rows[key] = (path, "openvino"), {"tool_seconds": seconds, "runtime": "openvino"}
        for profile, runtime in ((ov_profile, "openvino"), (ort_profile, "onnxruntime")):
            for bits in (8, 7):
                key = f"deploy pure int8, {bits}-bit weights ({profile.name}, {runtime})"
                path, seconds = ours(case, profile, bits, threads, folder / f"ours-{runtime}-{bits}.onnx")
                paths[key], rows[key] = (path, runtime), {"tool_seconds": seconds, "runtime": runtime}
                log(f"{key}: built in {seconds:.0f} s")
        for key, (path, runtime) in paths.items():
            got = outputs(path, case, threads, (runtime, "f32") if runtime == "openvino" else ("onnxruntime", None))
            rows[key].update(scores(ref, got, mask))
            log(f"{key}: cosine {rows[key]['pooled_cosine']:.5f}, NN {rows[key]['nn_agreement']:.3f}")
        for key in rows:
            rows[key]["minus_reference_ci"] = paired_ci(rows[key]["per_sample"], rows[REFERENCE]["per_sample"])
        ov7, ov8 = (paths[f"deploy pure int8, {b}-bit weights ({ov_profile.name}, openvino)"][0] for b in (7, 8))
        speed = head_to_head(ov8, ov7, case, threads, 1.0 if quick else 3.0, "f32")
    for row in rows.values():
        row.pop("per_sample")
        row.pop("nn_per_sample")
    flags = local_cpu_flags()
    return {"rows": rows, "cpu": fingerprint(threads)["cpu"], "vnni": sorted(f for f in VNNI if f in flags),
            "threads": threads, "n_held_out": len(case["calibration"].held_out), "seven_over_eight": speed}


def markdown(result: dict[str, Any], command: str, date: str, wall: float) -> str:
    vnni = ", ".join(result["vnni"]) or "none"
    speed = result["seven_over_eight"]
    lines = ["## int8 on a CPU without VNNI: 7-bit weights (issue 16, item 2)", ""]
    lines += [" ".join(part.split()) for part in __doc__.split("\n\n")[:2]] + [""]
    lines += [f"Command: `{command}`; {date}; wall time {wall:.0f} s. Machine: {result['cpu']} (VNNI flags: {vnni}), "
              f"{result['threads']} threads, float layers in f32; scored on {result['n_held_out']} held-out "
              "docstrings. OpenVINO latency of the 7-bit plan over the 8-bit one, interleaved: "
              f"{speed['ratio']:.3f} ({speed['ratio_ci'][0]:.3f}-{speed['ratio_ci'][1]:.3f}).", "",
              "| row | runtime | pooled cosine | - NNCF with the fix everywhere (95% CI) | NN agreement | tool s |",
              "|---|---|---|---|---|---|"]
    for key, row in result["rows"].items():
        lo, hi = row["minus_reference_ci"]
        lines.append(f"| {key} | {row['runtime']} | {row['pooled_cosine']:.5f} | {lo:+.5f} to {hi:+.5f} | "
                     f"{row['nn_agreement']:.3f} | {row['tool_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="300 held-out docstrings, 1 s timing")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    result = run(args.quick, args.threads)
    command = "python benchmarks/int8_saturation.py" + (" --quick" if args.quick else "") + f" --threads {args.threads}"
    date = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "int8_saturation.json").write_text(json.dumps({"command": command, "date": date, **result}, indent=1))
    md = markdown(result, command, date, time.perf_counter() - started)
    (RESULTS / "int8_saturation.md").write_text(md)
    subprocess.run([sys.executable, str(HERE / "render.py")], check=True)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
