"""Runs ON the remote device beside remote_measure.py: time one ONNX model with TensorRT's trtexec (build the
engine, run it, read its per-inference times). Standard library only, Python 3.6+, like remote_measure.py."""
import json
import math
import os
import shutil
import socket
import subprocess
import sys

TRTEXEC_PLACES = ("/usr/src/tensorrt/bin/trtexec", "/usr/local/tensorrt/bin/trtexec", "/opt/tensorrt/bin/trtexec")
TRT_PRECISION_FLAGS = {"f16": "--fp16", "bf16": "--bf16", "int8": "--int8", "fp8": "--fp8"}


class Failure(Exception):
    """A failure the caller turns into one line: kind is unavailable | model | measure | usage."""

    def __init__(self, kind, message, hint=""):
        Exception.__init__(self, message)
        self.kind, self.message, self.hint = kind, message, hint


# --- trtexec -----------------------------------------------------------------------------------------------------

def find_trtexec(given):
    if given:
        if os.path.isfile(given) and os.access(given, os.X_OK):
            return given
        raise Failure("unavailable", "trtexec %s is not an executable file on %s" % (given, socket.gethostname()),
                      "give the path of TensorRT's trtexec there")
    for place in [shutil.which("trtexec")] + list(TRTEXEC_PLACES):
        if place and os.path.isfile(place) and os.access(place, os.X_OK):
            return place
    raise Failure("unavailable", "trtexec is not found on %s (looked on PATH and in %s)"
                  % (socket.gethostname(), ", ".join(os.path.dirname(p) for p in TRTEXEC_PLACES)),
                  "install TensorRT there (JetPack ships /usr/src/tensorrt/bin/trtexec), give its path, "
                  "or measure with --runtime onnxruntime")


def parse_trtexec_times(data, metric="computeMs"):
    """Per-inference times (ms) from trtexec --exportTimes JSON: a list of one dict per inference.

    computeMs (GPU compute, what deploy's TensorRT runner times with CUDA events) by default; entries without
    timing keys (a leading {"count": N} in some versions) are skipped.
    """
    if isinstance(data, dict):
        data = data.get("times") or data.get("inferences") or []
    if not isinstance(data, list):
        raise ValueError("trtexec times JSON is not a list")
    samples = []
    for entry in data:
        if not isinstance(entry, dict):
            continue
        value = entry.get(metric)
        if value is None and metric == "computeMs" and "startComputeMs" in entry and "endComputeMs" in entry:
            value = float(entry["endComputeMs"]) - float(entry["startComputeMs"])
        if value is None:
            continue
        value = float(value)
        if not math.isfinite(value) or value < 0:
            raise ValueError("trtexec times JSON has a bad %s value %r" % (metric, entry.get(metric)))
        samples.append(value)
    if not samples:
        raise ValueError("trtexec times JSON has no %s entries" % metric)
    return samples


def _trtexec_info(text):
    info = {}
    for line in text.splitlines():
        if "[TensorRT v" in line and "version" not in info:
            raw = line.split("[TensorRT v", 1)[1].split("]", 1)[0].strip()
            if raw.isdigit() and len(raw) >= 4:  # 100300 -> 10.3.0, 8601 -> 8.6.1
                n = int(raw)
                raw = "%d.%d.%d" % (n // 10000, n // 100 % 100, n % 100) if n >= 10000 else \
                    "%d.%d.%d" % (n // 1000, n // 100 % 10, n % 100)
            info["version"] = raw
        if "Selected Device:" in line and "device_name" not in info:
            info["device_name"] = line.split("Selected Device:", 1)[1].strip()
    return info


def _raw_inputs(args):
    """(name, file, shape) of each input: the raw files sent along, else written here from the .npz."""
    if os.path.exists(args.raw_inputs):
        with open(args.raw_inputs) as handle:
            return [(i["name"], i["file"], i["shape"]) for i in json.load(handle)]
    listed = []
    for name, value in sorted(load_feeds(args.feeds).items()):
        path = "input_%d.bin" % len(listed)
        value.tofile(path)
        listed.append((name, path, list(value.shape)))
    return listed


def trtexec_measure(args):
    """Build and time the engine with trtexec (>= iterations AND >= duration), return (samples, info)."""
    exe = find_trtexec(args.trtexec)
    loads, shapes = [], []
    for name, path, shape in _raw_inputs(args):
        loads.append("%s:%s" % (name, path))
        shapes.append("%s:%s" % (name, "x".join(str(d) for d in shape) or "scalar"))
    cmd = [exe, "--onnx=" + args.model, "--exportTimes=times.json", "--iterations=%d" % args.min_samples,
           "--duration=%d" % max(1, int(math.ceil(args.min_seconds))),
           "--warmUp=%d" % max(1, int(math.ceil(args.warmup_seconds * 1000)))]
    if loads:
        cmd += ["--loadInputs=" + ",".join(loads), "--shapes=" + ",".join(shapes)]
    precisions = [p for p in (args.precisions or "").split(",") if p and p != "f32"]
    for p in precisions:
        if p not in TRT_PRECISION_FLAGS:
            raise Failure("usage", "trtexec has no flag for precision %s" % p,
                          "use one of " + ", ".join(sorted(TRT_PRECISION_FLAGS)))
        cmd.append(TRT_PRECISION_FLAGS[p])
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True)
    if proc.returncode != 0:
        errors = [l for l in proc.stdout.splitlines() if "[E]" in l or "FAILED" in l]
        raise Failure("measure", "trtexec failed (exit %d): %s" % (proc.returncode,
                      (errors or proc.stdout.strip().splitlines() or ["no output"])[0].strip()),
                      "run the same trtexec command on the device to see its full log")
    try:
        with open("times.json") as handle:
            samples = parse_trtexec_times(json.load(handle), args.trt_metric)
    except (OSError, IOError, ValueError) as exc:
        raise Failure("measure", "cannot read trtexec's exported times: %s" % exc)
    info = {"runtime": "tensorrt", "device": "cuda", "tool": exe, "timing": "trtexec " + args.trt_metric,
            "precision": "+".join(["f32"] + precisions)}
    info.update(_trtexec_info(proc.stdout))
    return samples, info


def load_feeds(path):
    """The inputs sent as .npz (numpy is needed only for this)."""
    if not os.path.exists(path):
        return {}
    try:
        import numpy as np
    except ImportError:
        raise Failure("unavailable", "numpy is not installed for %s on %s" % (sys.executable, socket.gethostname()),
                      "pip install numpy there, or pass the remote python that has it")
    with np.load(path, allow_pickle=False) as data:
        return {name: data[name] for name in data.files}
