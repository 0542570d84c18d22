#!/usr/bin/env bash
# TensorRT check of the tensorrt Q/DQ policy, for a machine with an NVIDIA GPU and TensorRT 10 (nothing is
# installed: it uses the project's virtual environment, the `tensorrt` Python package and, if on PATH, trtexec).
#
#   benchmarks/gpu_check.sh [PROFILE] [OUT_DIR]      # PROFILE: nvidia-h100 (default), nvidia-a100, jetson-*
#
# For the digits CNN and a transformer (all-MiniLM-L6-v2 if the bench extra is installed, else the bundled tiny
# BERT) it: quantizes through the Python API for PROFILE (quantize_model with a latency budget, proxy-priced since
# the plan is made before the GPU is timed) and also writes the pure int8 plan, exports both with the tensorrt
# policy (symmetric int8, per-channel weights on axis 0, Q/DQ on op inputs); builds TensorRT engines for them and
# for the float model in fp32 and fp16; times each engine (trtexec's GPU compute median, or CUDA events through
# deploy's TensorRT runner, interleaved A/B against the fp16 engine); and prints how many layers run in INT8
# (trtexec --exportLayerInfo, or the engine inspector). Without a GPU or TensorRT it stops with one line, exit 2.
set -euo pipefail

PROFILE="${1:-nvidia-h100}"
OUT="${2:-$(mktemp -d -t deploy-gpu-check-XXXXXX)}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3)"

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu_check: no NVIDIA GPU here (nvidia-smi missing or sees no GPU); run this on a machine with one" >&2
  exit 2
fi
if ! "$PY" -c "import tensorrt, torch; assert torch.cuda.is_available()" >/dev/null 2>&1; then
  echo "gpu_check: TensorRT or CUDA torch is missing in $PY (pip install tensorrt, and a CUDA build of torch)" >&2
  exit 2
fi
TRTEXEC="$(command -v trtexec || true)"
mkdir -p "$OUT"
echo "gpu_check: profile $PROFILE, output in $OUT, trtexec: ${TRTEXEC:-not on PATH (using the tensorrt Python API)}"

cd "$ROOT"
export HF_HUB_OFFLINE=1 DEPLOY_GPU_PROFILE="$PROFILE" DEPLOY_GPU_OUT="$OUT" DEPLOY_TRTEXEC="$TRTEXEC"
exec "$PY" - <<'PYTHON'
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from deploy.compress.quant.space import QuantOption
from deploy.compress.quant.api import QuantizeConfig, quantize_model
from deploy.core.data import from_tensors
from deploy.core.errors import BudgetInfeasibleError
from deploy.export.qdq.writer import export_quantized, float_onnx
from deploy.core.passes import InputSpec
from deploy.profiles import load_builtin
from deploy.targets.measure.feeds import make_feeds

PROFILE, OUT, TRTEXEC = os.environ["DEPLOY_GPU_PROFILE"], Path(os.environ["DEPLOY_GPU_OUT"]), os.environ["DEPLOY_TRTEXEC"]
profile = load_builtin(PROFILE)


def digits():
    from deploy.examples.digits_cnn import load_digits_split, load_example_model

    _, _, x, y = load_digits_split()
    return "digits_cnn", load_example_model(), [InputSpec("image", ("batch", 1, 32, 32))], \
        from_tensors([(s[None],) for s in x[:128]], labels=y[:128].tolist())


def transformer():
    try:
        sys.path.insert(0, "benchmarks")
        from models import load_minilm
        from deploy.examples.docstring_corpus import docstring_corpus

        module, tok = load_minilm()
        enc = tok(docstring_corpus()[-48:], padding="max_length", truncation=True, max_length=128, return_tensors="pt")
        name, seq = "minilm", 128
        samples = [(enc["input_ids"][i:i + 1], enc["attention_mask"][i:i + 1]) for i in range(48)]
    except (ImportError, SystemExit):
        from deploy.examples.tiny_bert import example_inputs, tiny_bert

        module, name, seq = tiny_bert(), "tiny_bert", 64
        samples = [example_inputs(seq_len=seq, seed=i) for i in range(48)]
    spec = [InputSpec("input_ids", ("batch", seq), "int64"), InputSpec("attention_mask", ("batch", seq), "int64")]
    return name, module, spec, from_tensors(samples)


def trtexec(onnx: Path, flags: list[str], tag: str) -> dict:
    """Build and time with trtexec: the command `deploy compress` prints for the device (export.trtexec), plus
    layer info and profiling flags."""
    from deploy.export.trtexec import trtexec_command

    info = OUT / f"{tag}.layers.json"
    precisions = {"FP16": "fp16", "INT8": "int8"}
    argv = trtexec_command(onnx, [], {precisions[f] for f in flags}, engine_path=OUT / f"{tag}.engine")
    cmd = [TRTEXEC, *argv[1:], f"--exportLayerInfo={info}", "--profilingVerbosity=detailed", "--separateProfileRun"]
    log = subprocess.run(cmd, capture_output=True, text=True)
    (OUT / f"{tag}.trtexec.log").write_text(log.stdout + log.stderr)
    if log.returncode != 0:
        return {"error": f"trtexec failed (see {tag}.trtexec.log)"}
    median = re.search(r"GPU Compute Time:.*?median = ([0-9.]+) ms", log.stdout)
    return {"ms": float(median.group(1)) if median else None, "layers": layer_precisions(json.loads(info.read_text()))}


def layer_precisions(info: dict) -> dict:
    """Counts of engine layers by the precision of their outputs (INT8 / FP16 / FP32 ...)."""
    counts: dict[str, int] = {}
    for layer in info.get("Layers", []):
        if isinstance(layer, dict):
            outs = layer.get("Outputs", [])
            fmt = (outs[0].get("Format/Datatype", "") if outs else "") or layer.get("Precision", "?")
            key = "INT8" if "Int8" in fmt or "INT8" in fmt else "FP16" if "Half" in fmt or "FP16" in fmt else \
                "FP32" if "Float" in fmt or "FP32" in fmt else fmt or "?"
            counts[key] = counts.get(key, 0) + 1
    return counts


def python_engine(onnx: Path, flags: list[str], tag: str) -> dict:
    """Build with the tensorrt API (detailed profiling, for the inspector) and time with deploy's runner."""
    import tensorrt as trt

    from deploy.targets.measure.loop import MeasureConfig, measure
    from deploy.targets.runners.registry import get_runner

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx.read_bytes()):
        return {"error": "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))}
    config = builder.create_builder_config()
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    for flag in flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    blob = builder.build_serialized_network(network, config)
    if blob is None:
        return {"error": "the TensorRT build failed"}
    (OUT / f"{tag}.engine").write_bytes(bytes(blob))
    engine = trt.Runtime(logger).deserialize_cuda_engine(blob)
    info = json.loads(engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON))
    (OUT / f"{tag}.layers.json").write_text(json.dumps(info, indent=1))
    precision = "int8" if "INT8" in flags else "f16" if "FP16" in flags else "f32"
    run = get_runner("tensorrt", 1, precision, profile).prepare(onnx, FEEDS)
    stats = measure(run, MeasureConfig(min_samples=200, min_seconds=2.0))
    return {"ms": float(stats.summary["p50"]), "layers": layer_precisions(info)}


build = trtexec if TRTEXEC else python_engine
rows = []
for name, module, spec, calib in (digits(), transformer()):
    static = [InputSpec(s.name, s.concrete_shape(), s.dtype) for s in spec]
    FEEDS = make_feeds(static)
    folder = OUT / name
    folder.mkdir(parents=True, exist_ok=True)
    fp32, _ = float_onnx(module, static, folder, static=True)
    try:
        quantized, report = quantize_model(module, spec, calib, profile, QuantizeConfig.fast(budget=0.5, cost="proxy"))
    except BudgetInfeasibleError as exc:  # the roofline's per-op overhead bounds small models: the tightest budget
        config = QuantizeConfig.fast(budget_ms=exc.least_achievable * 1.005, cost="proxy")
        quantized, report = quantize_model(module, spec, calib, profile, config)
    mixed = quantized.export(static, folder / "mixed_qdq.onnx", "tensorrt").onnx
    int8 = QuantOption("int8", 8, 8, "per-channel", 0, True, True)  # the tensorrt policy's int8 form
    pure = export_quantized(quantized.plan.with_options({n: int8 for n in quantized.plan.layers}), quantized.module,
                            static, folder / "int8_qdq.onnx", "tensorrt").onnx
    qflags = ["INT8", "FP16"]  # trtexec: a Q/DQ file is built --stronglyTyped (export.trtexec)
    engines = {"fp32": build(fp32, [], f"{name}_fp32"), "fp16": build(fp32, ["FP16"], f"{name}_fp16"),
               "ours_pure_int8": build(pure, qflags, f"{name}_int8"),
               "ours_mixed": build(mixed, qflags, f"{name}_mixed")}
    rows.append((name, report["counts"], engines))

for name, counts, engines in rows:
    print(f"\n{name}: plan {counts}")
    base = engines["fp16"].get("ms")
    for tag, res in engines.items():
        if "error" in res:
            print(f"  {tag:16s} {res['error']}")
            continue
        ratio = f"{res['ms'] / base:.3f}x fp16" if base and res.get("ms") else ""
        print(f"  {tag:16s} {res.get('ms') or float('nan'):.3f} ms {ratio:14s} layers {res['layers']}")
PYTHON
