"""The environment a number was measured in: CPU, the flags that pick inference kernels, cores, threads, OS and
runtime versions. A latency is only comparable with another taken in the same environment; `diff_fingerprints`
says what changed.
"""
from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

# CPU flags that change which kernels a runtime picks (x86 /proc/cpuinfo "flags", Arm "Features").
INFERENCE_FLAGS = (
    "sse4_2", "avx", "avx2", "fma", "f16c", "avx_vnni",
    "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16",
    "asimd", "asimddp", "asimdhp", "sve", "sve2", "i8mm", "bf16",
)
# distribution name -> key; alternatives (onnxruntime-gpu, ...) are tried in order, the first installed wins
RUNTIME_DISTS = {
    "torch": ("torch",),
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino", "onnxruntime-directml"),
    "openvino": ("openvino",),
    "onnx": ("onnx",),
    "tensorrt": ("tensorrt", "tensorrt-cu12", "tensorrt-cu13", "tensorrt-cu11"),
}


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields from /proc/cpuinfo (empty where there is none)."""
    fields: dict[str, str] = {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return fields
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_flags() -> set[str]:
    from deploy.profiles import local_cpu_flags

    return local_cpu_flags()


def cpu_model() -> str:
    info = _cpuinfo()
    return info.get("model name") or info.get("Model") or platform.processor() or platform.machine()


def physical_cores() -> int:
    """Physical cores this process may use (hyper-threads share a core's vector units, so they rarely help)."""
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count() or 1
    cores: set[tuple[str, str]] = set()
    package = core = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "physical id":
                package = value.strip()
            elif key == "core id":
                core = value.strip()
            elif not line.strip() and core is not None:
                cores.add((package or "0", core))
                package = core = None
        if core is not None:
            cores.add((package or "0", core))
    except OSError:
        pass
    logical = os.cpu_count() or usable
    if cores and logical:
        per_core = max(1, logical // len(cores))
        return max(1, usable // per_core)
    return max(1, usable)


def runtime_versions() -> dict[str, str]:
    """Versions of the runtimes installed, read from package metadata (nothing is imported); absent ones omitted."""
    from importlib import metadata

    versions: dict[str, str] = {}
    for key, dists in RUNTIME_DISTS.items():
        for dist in dists:
            try:
                versions[key] = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                continue
    return versions


def _governor() -> str | None:
    try:
        return Path("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor").read_text().strip()
    except OSError:
        return None


def fingerprint(threads: int | None = None, profile: str | None = None) -> dict[str, Any]:
    """A JSON-ready description of this machine and software, as it matters for latency."""
    flags = cpu_flags()
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count() or 1
    data: dict[str, Any] = {
        "cpu": cpu_model(),
        "machine": platform.machine(),
        "cpu_flags": sorted(f for f in flags if f in INFERENCE_FLAGS or f.startswith("amx")),
        "virtualized": "hypervisor" in flags,
        "logical_cores": os.cpu_count() or 1,
        "usable_cores": usable,
        "physical_cores": physical_cores(),
        "threads": threads,
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": runtime_versions(),
        "profile": profile,
    }
    governor = _governor()
    if governor:
        data["cpu_governor"] = governor
    return data


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def diff_fingerprints(a: dict[str, Any], b: dict[str, Any], ignore: tuple[str, ...] = ()) -> list[str]:
    """The keys (dotted for nested ones, e.g. 'versions.onnxruntime') whose values differ or exist on one side only."""
    fa, fb = _flatten(a), _flatten(b)
    keys = sorted(set(fa) | set(fb))
    return [k for k in keys if k not in ignore and fa.get(k, _MISSING) != fb.get(k, _MISSING)]


_MISSING = object()
