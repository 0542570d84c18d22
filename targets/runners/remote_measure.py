#!/usr/bin/env python3
"""Runs ON the remote device (copied there by deploy.targets.runners.ssh): time one ONNX model and print the raw
samples and the device's environment as one JSON line.

Standalone on purpose: a Jetson or a Raspberry Pi has Python 3, numpy and onnxruntime (or TensorRT's trtexec),
not deploy. So this file imports only the standard library, numpy and onnxruntime, and runs on Python 3.6+.
It follows deploy's measurement rules (warm-up, then >= N samples AND >= S seconds, under the host-wide lock).

Output: one stdout line 'DEPLOY-REMOTE-RESULT {json}'. On failure the JSON is {"ok": false, "kind", "error",
"hint"} and the exit status is 3, so the caller can print one clear line.
"""
import argparse
import errno
import gc
import json
import os
import platform
import signal
import socket
import sys
import time

try:  # shipped beside this file; as part of deploy (tests) it is a sibling module
    from . import remote_trtexec  # type: ignore[attr-defined]
except ImportError:
    import remote_trtexec  # type: ignore[no-redef]

Failure = remote_trtexec.Failure
trtexec_measure = remote_trtexec.trtexec_measure

if sys.version_info < (3, 6):
    sys.stderr.write("deploy: the measurement script needs Python 3.6 or newer, this is %s\n" % sys.version.split()[0])
    sys.exit(4)

RESULT_PREFIX = "DEPLOY-REMOTE-RESULT "
EXIT_FAILED = 3
DEFAULT_LOCK = "/tmp/deploy-measure.lock"  # the same file deploy's own lock uses, so local and remote runs serialise
INFERENCE_FLAGS = (
    "sse4_2", "avx", "avx2", "fma", "f16c", "avx_vnni",
    "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16",
    "asimd", "asimddp", "asimdhp", "sve", "sve2", "i8mm", "bf16",
)
RUNTIME_DISTS = {
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino"),
    "numpy": ("numpy",),
    "onnx": ("onnx",),
    "tensorrt": ("tensorrt", "tensorrt-cu12", "tensorrt-cu13", "tensorrt-cu11"),
}


# --- environment -------------------------------------------------------------------------------------------------

def _read(path):
    try:
        with open(path) as handle:
            return handle.read()
    except (OSError, IOError):
        return ""


def _cpuinfo():
    fields = {}
    for line in _read("/proc/cpuinfo").splitlines():
        if not line.strip():
            if fields:
                break
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def _physical_cores(usable):
    cores, package, core = set(), None, None
    for line in _read("/proc/cpuinfo").splitlines() + [""]:
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "physical id":
            package = value.strip()
        elif key == "core id":
            core = value.strip()
        elif not line.strip() and core is not None:
            cores.add((package or "0", core))
            package = core = None
    logical = os.cpu_count() or usable
    if cores and logical:
        return max(1, usable // max(1, logical // len(cores)))
    return max(1, usable)


def _versions():
    try:
        from importlib import metadata
    except ImportError:  # Python < 3.8: versions come from the imported modules instead
        return {}
    found = {}
    for key, dists in RUNTIME_DISTS.items():
        for dist in dists:
            try:
                found[key] = metadata.version(dist)
                break
            except Exception:
                continue
    return found


def environment(threads):
    """What deploy's fingerprint records, read on this (remote) machine, plus hostname and board model."""
    info = _cpuinfo()
    flags = set((info.get("flags") or info.get("Features") or "").split())
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count() or 1
    board = _read("/proc/device-tree/model").strip("\x00 \n")
    data = {
        "cpu": info.get("model name") or info.get("Model") or board or platform.processor() or platform.machine(),
        "machine": platform.machine(),
        "cpu_flags": sorted(f for f in flags if f in INFERENCE_FLAGS or f.startswith("amx")),
        "virtualized": "hypervisor" in flags,
        "logical_cores": os.cpu_count() or 1,
        "usable_cores": usable,
        "physical_cores": _physical_cores(usable),
        "threads": threads,
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": _versions(),
        "hostname": socket.gethostname(),
    }
    if board:
        data["board"] = board
    governor = _read("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor").strip()
    if governor:
        data["cpu_governor"] = governor
    return data


# --- the host-wide lock ------------------------------------------------------------------------------------------

class HostLock(object):
    """flock on deploy's lock file (filelock uses flock too), so deploy runs on this host never overlap ours."""

    def __init__(self, path, timeout_s):
        self.path, self.timeout_s, self.fd = path, timeout_s, None
        self.waited_s = self.start = self.end = 0.0

    def __enter__(self):
        import fcntl

        t0 = time.perf_counter()
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise Failure("measure", "cannot open the measurement lock %s (%s)" % (self.path, exc.strerror),
                          "pass a writable lock path")
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if time.perf_counter() - t0 > self.timeout_s:
                    os.close(self.fd)
                    raise Failure("measure", "another measurement held the lock %s on %s for more than %.0f s"
                                  % (self.path, socket.gethostname(), self.timeout_s), "wait for it to finish")
                time.sleep(0.05)
        self.waited_s = time.perf_counter() - t0
        self.start = time.time()
        return self

    def __exit__(self, *exc):
        import fcntl

        self.end = time.time()
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        return False

    def record(self):
        return {"path": self.path, "waited_s": self.waited_s, "window": [self.start, self.end]}


# --- onnxruntime -------------------------------------------------------------------------------------------------

def _import_runtime():
    try:
        import numpy as np
    except ImportError:
        raise Failure("unavailable", "numpy is not installed for %s on %s" % (sys.executable, socket.gethostname()),
                      "pip install numpy onnxruntime there, or pass the remote python that has them")
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise Failure("unavailable", "onnxruntime is not installed for %s on %s (%s)"
                      % (sys.executable, socket.gethostname(), exc),
                      "pip install onnxruntime there, or pass the remote python that has it")
    return np, ort


def _first_line(exc):
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def ort_run_once(model, feeds, threads):
    """A latency-configured session (as deploy's OrtRunner) and a function running one bound inference."""
    np, ort = _import_runtime()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    try:
        sess = ort.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise Failure("model", "onnxruntime %s cannot load the model: %s" % (ort.__version__, _first_line(exc)),
                      "check that the model is valid ONNX for that onnxruntime version")
    info = {"runtime": "onnxruntime", "version": ort.__version__, "device": "cpu", "provider": "CPUExecutionProvider",
            "threads": threads, "inter_op_threads": 1, "execution_mode": "sequential", "graph_optimization": "all",
            "precision": "as-exported"}
    try:
        binding = sess.io_binding()
        inputs = {k: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v)) for k, v in feeds.items()}
        for name, value in inputs.items():
            binding.bind_ortvalue_input(name, value)
        for out in sess.get_outputs():
            binding.bind_output(out.name, "cpu")
        sess.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        for out, value in zip(sess.get_outputs(), outputs):
            binding.bind_ortvalue_output(out.name, value)
        info["io_binding"] = True

        def run_once(sess=sess, binding=binding, keep=(inputs, outputs)):  # binding points into `keep`
            sess.run_with_iobinding(binding)

        return run_once, info
    except Exception:
        info["io_binding"] = False
    try:
        sess.run(None, feeds)
    except Exception as exc:
        raise Failure("measure", "onnxruntime failed to run the model: %s" % _first_line(exc),
                      "check --input-shape against the model's inputs")
    return (lambda: sess.run(None, feeds)), info


def _clock_ms():
    if hasattr(time, "perf_counter_ns"):  # Python 3.7+
        return time.perf_counter_ns() / 1e6
    return time.perf_counter() * 1e3


def _phase(run_once, need_n, need_s, deadline):
    samples = []
    start = time.perf_counter()
    while True:
        t0 = _clock_ms()
        run_once()
        samples.append(_clock_ms() - t0)
        now = time.perf_counter()
        done = min(len(samples) / float(need_n), (now - start) / need_s if need_s > 0 else 1.0)
        if done >= 1.0 or now >= deadline:
            return samples


def time_loop(run_once, args):
    """deploy's stop rule: warm-up (>= runs AND >= seconds), then >= samples AND >= seconds, capped by max_seconds."""
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        begin = time.perf_counter()
        warm = _phase(run_once, args.warmup_runs, args.warmup_seconds, begin + args.max_seconds / 2)
        samples = _phase(run_once, args.min_samples, args.min_seconds, begin + args.max_seconds)
    finally:
        if was_enabled:
            gc.enable()
    return samples, len(warm)


# --- main --------------------------------------------------------------------------------------------------------

def measure(args):
    threads = args.threads
    if threads <= 0:  # auto: this machine's physical cores, capped
        threads = environment(None)["physical_cores"]
        if args.max_threads > 0:
            threads = min(threads, args.max_threads)
    if args.runtime == "tensorrt":
        with HostLock(args.lock, args.lock_timeout) as lock:
            samples, info = trtexec_measure(args)
        warmup_runs = None
    elif args.runtime == "onnxruntime":
        run_once, info = ort_run_once(args.model, remote_trtexec.load_feeds(args.feeds), threads)
        with HostLock(args.lock, args.lock_timeout) as lock:
            samples, warmup_runs = time_loop(run_once, args)
    else:
        raise Failure("usage", "remote runtime %r is not supported" % args.runtime, "use onnxruntime or tensorrt")
    env = environment(threads)
    if info.get("version"):  # trtexec's own banner wins; onnxruntime's fills in where metadata is missing (< 3.8)
        if args.runtime == "tensorrt":
            env["versions"]["tensorrt"] = info["version"]
        else:
            env["versions"].setdefault(args.runtime, info["version"])
    if "device_name" in info:
        env["gpu"] = info["device_name"]
    return {"ok": True, "samples_ms": samples, "warmup_runs": warmup_runs, "runtime": info, "environment": env,
            "lock": lock.record()}


def parse_args(argv):
    p = argparse.ArgumentParser(description="Time one ONNX model on this machine (deploy's remote side).")
    p.add_argument("model")
    p.add_argument("--feeds", default="inputs/feeds.npz", help="inputs as .npz (one array per input name)")
    p.add_argument("--raw-inputs", default="inputs/inputs.json",
                   help="trtexec: a JSON list of {name, file, shape} for raw input files (no numpy needed)")
    p.add_argument("--runtime", default="onnxruntime", choices=("onnxruntime", "tensorrt"))
    p.add_argument("--threads", type=int, default=0, help="0: physical cores")
    p.add_argument("--max-threads", type=int, default=0)
    p.add_argument("--warmup-runs", type=int, default=10)
    p.add_argument("--warmup-seconds", type=float, default=0.2)
    p.add_argument("--min-samples", type=int, default=64)
    p.add_argument("--min-seconds", type=float, default=3.0)
    p.add_argument("--max-seconds", type=float, default=60.0)
    p.add_argument("--lock", default=DEFAULT_LOCK)
    p.add_argument("--lock-timeout", type=float, default=600.0)
    p.add_argument("--trtexec", default=None, help="path of trtexec (default: PATH, then TensorRT's usual places)")
    p.add_argument("--trt-metric", default="computeMs", help="computeMs (GPU time) or latencyMs (with copies)")
    p.add_argument("--precisions", default="", help="tensorrt: comma-separated reduced precisions (f16,int8,...)")
    p.add_argument("--pid-file", default=None, help="write this process's id here")
    return p.parse_args(argv)


def emit(document):
    sys.stdout.write(RESULT_PREFIX + json.dumps(document) + "\n")
    sys.stdout.flush()


def _stop_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)  # unwinds: the lock is released, subprocess.run kills a running trtexec


def main(argv=None):
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    if args.pid_file:  # the caller's clean-up after a timeout stops us through it
        with open(args.pid_file, "w") as handle:
            handle.write("%d\n" % os.getpid())
    try:
        emit(measure(args))
    except Failure as failure:
        emit({"ok": False, "kind": failure.kind, "error": failure.message, "hint": failure.hint})
        return EXIT_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())
