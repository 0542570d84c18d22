"""Device profiles: what a device runs fast and how to get its latency. Data lives in one TOML file per device.

Validation is strict so a typo in a user's profile fails loudly, naming the file, the field and the expected type.
"""
from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from deploy.core.errors import ProfileError, UnknownTargetError, nearest

RUNTIMES = ("onnxruntime", "openvino", "tensorrt")
PRECISIONS = ("fp32", "fp16", "bf16", "fp8", "int8", "int4")
GRANULARITIES = ("per-tensor", "per-channel", "per-group")
QDQ_POLICIES = ("ort-cpu", "openvino", "tensorrt")
MEASURE_MODES = ("local", "predicted")
ALIASES = {"jetson": "jetson-orin-nano"}
# resolved by reading this machine's CPU flags: the first profile in the list that runs here
CPU_ALIASES = {"cpu": ("cpu-avx512-vnni", "cpu-avx-vnni", "cpu-avx2"),
               "cpu-openvino": ("cpu-amx-openvino", "cpu-avx512-vnni-openvino", "cpu-avx-vnni-openvino",
                                "cpu-avx2-openvino")}


@dataclass(frozen=True)
class PublishedFit:
    """The roofline efficiency fitted on published batch-1 latencies of this device (written by
    benchmarks/reference_fit.py), so a device nobody here can measure gets the band its published numbers support."""

    efficiency: float  # share of peak: the roofline bound is divided by it
    band: float  # ln of the 90% quantile of |leave-one-model-out error| ratios
    points: int  # published latencies the fit used
    architectures: int  # architecture families among them
    source: str = ""  # where the published figures and their citations are


@dataclass(frozen=True)
class Profile:
    """One device. Peak ops are dense tera-operations per second per precision: for the whole device on GPUs and
    edge SoCs, per core on CPUs (kind = "cpu"), where the latency model scales them by the thread count."""

    name: str
    description: str
    kind: str  # cpu | gpu | edge
    runtime: str
    measure: str  # local: measurable on this machine when its CPU matches; predicted: roofline model only
    precisions: tuple[str, ...]
    weight_granularities: tuple[str, ...]
    qdq_policy: str
    channel_multiple: int
    peak_tops: dict[str, float]
    memory_bandwidth_gbs: float
    op_overhead_us: float
    cores: int = 0
    sparse_2_4: bool = False
    required_cpu_flags: tuple[str, ...] = ()
    # 7 where the CPU's int8 dot products may saturate (no VNNI: vpmaddubsw's 16-bit pair sums): int8 weights in
    # [-63, 63], so that u8 x s8 pairs cannot overflow (OpenVINO's documented workaround, NNCF's overflow fix)
    int8_weight_bits: int = 8
    published_fit: PublishedFit | None = None  # absent: the default efficiency and the unverified band
    # the width step pruning and low rank keep to, where the int8 kernels block channels more coarsely than the
    # fp32 lanes of `channel_multiple` (AMX: 64 int8 per tile row); 0: `channel_multiple`
    prune_multiple: int = 0
    source: str = ""  # where the numbers came from; "builtin" or a path, set by the loader

    def to_dict(self) -> dict[str, Any]:
        """Every field, `prune_multiple` as the step pruning keeps to (never the 0 that means "channel_multiple")."""
        data = {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}
        data["prune_multiple"] = self.width_step
        return data

    @property
    def width_step(self) -> int:
        """Channels a pruned or factorized width is a multiple of: between two, a kernel runs a slower tail."""
        return self.prune_multiple or self.channel_multiple

    def runs_locally(self, cpu_flags: set[str] | None = None) -> bool:
        """True when this machine can measure the profile for real."""
        if self.measure != "local":
            return False
        flags = cpu_flags if cpu_flags is not None else local_cpu_flags()
        return all(f in flags for f in self.required_cpu_flags)


def _plain(value: Any) -> Any:
    if isinstance(value, PublishedFit):
        return dataclasses.asdict(value)
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, dict):
        return dict(value)
    return value


_FIELD_TYPES: dict[str, tuple[type, str]] = {
    "name": (str, "a string"),
    "description": (str, "a string"),
    "kind": (str, "one of cpu, gpu, edge"),
    "runtime": (str, f"one of {', '.join(RUNTIMES)}"),
    "measure": (str, f"one of {', '.join(MEASURE_MODES)}"),
    "precisions": (list, f"a list drawn from {', '.join(PRECISIONS)}"),
    "weight_granularities": (list, f"a list drawn from {', '.join(GRANULARITIES)}"),
    "qdq_policy": (str, f"one of {', '.join(QDQ_POLICIES)}"),
    "channel_multiple": (int, "a positive integer"),
    "prune_multiple": (int, "a positive integer (channels a pruned width keeps to; default channel_multiple)"),
    "peak_tops": (dict, "a table of precision = tera-ops per second"),
    "memory_bandwidth_gbs": (float, "a positive number (GB/s)"),
    "op_overhead_us": (float, "a non-negative number (microseconds)"),
    "cores": (int, "a non-negative integer"),
    "sparse_2_4": (bool, "true or false"),
    "required_cpu_flags": (list, "a list of CPU flag names"),
    "int8_weight_bits": (int, "7 or 8 (7 where int8 dot products may saturate: a CPU without VNNI)"),
    "published_fit": (dict, "a table: efficiency, band, points, architectures, source"),
}
_FIT_FIELDS: dict[str, tuple[type, str]] = {
    "efficiency": (float, "a number in (0, 1]: the share of peak"),
    "band": (float, "a positive number: ln of the error ratio"),
    "points": (int, "a positive integer"),
    "architectures": (int, "a positive integer"),
    "source": (str, "a string"),
}
_CHOICES = {
    "kind": ("cpu", "gpu", "edge"),
    "runtime": RUNTIMES,
    "measure": MEASURE_MODES,
    "qdq_policy": QDQ_POLICIES,
}
_LIST_CHOICES = {"precisions": PRECISIONS, "weight_granularities": GRANULARITIES}


def parse_profile(data: dict[str, Any], source: str) -> Profile:
    """Validate a profile table; every error names the file, the field and what was expected."""
    known = set(_FIELD_TYPES)
    for key in data:
        if key not in known:
            close = nearest(key, known)
            hint = f"did you mean '{close}'?" if close else f"known fields: {', '.join(sorted(known))}"
            raise ProfileError(f"{source}: unknown field '{key}'", hint)
    optional = {"cores", "sparse_2_4", "required_cpu_flags", "int8_weight_bits", "published_fit", "prune_multiple"}
    values: dict[str, Any] = {}
    for key, (typ, expected) in _FIELD_TYPES.items():
        if key not in data:
            if key in optional:
                continue
            raise ProfileError(f"{source}: missing field '{key}'", f"add it: {expected}")
        value = data[key]
        ok = isinstance(value, typ) and not (typ is int and isinstance(value, bool))
        if typ is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            raise ProfileError(f"{source}: field '{key}' must be {expected}, got {value!r}")
        if key in _CHOICES and value not in _CHOICES[key]:
            raise ProfileError(f"{source}: field '{key}' must be {expected}, got {value!r}")
        if key in _LIST_CHOICES:
            bad = [v for v in value if v not in _LIST_CHOICES[key]]
            if bad:
                raise ProfileError(f"{source}: field '{key}' must be {expected}, got {bad[0]!r}")
            value = tuple(value)
        if key == "required_cpu_flags":
            value = tuple(str(v) for v in value)
        if key == "published_fit":
            value = _published_fit(value, source)
        if key == "int8_weight_bits" and value not in (7, 8):
            raise ProfileError(f"{source}: field '{key}' must be {expected}, got {value!r}")
        if key in ("channel_multiple", "prune_multiple") and value < 1:
            raise ProfileError(f"{source}: field '{key}' must be {expected}, got {value!r}")
        if key in ("memory_bandwidth_gbs",) and value <= 0:
            raise ProfileError(f"{source}: field '{key}' must be {expected}, got {value!r}")
        if key == "peak_tops":
            for prec, tops in value.items():
                if prec not in PRECISIONS or isinstance(tops, bool) or not isinstance(tops, (int, float)) or tops <= 0:
                    raise ProfileError(
                        f"{source}: field 'peak_tops.{prec}' must be a positive number for a known precision "
                        f"({', '.join(PRECISIONS)}), got {tops!r}"
                    )
            value = {k: float(v) for k, v in value.items()}
        values[key] = value
    missing_peak = [p for p in values["precisions"] if p not in values["peak_tops"]]
    if missing_peak:
        raise ProfileError(f"{source}: field 'peak_tops' has no entry for precision '{missing_peak[0]}'",
                           "give every listed precision its peak")
    return Profile(**values, source=source)


def _published_fit(data: dict[str, Any], source: str) -> PublishedFit:
    values: dict[str, Any] = {}
    for key in data:
        if key not in _FIT_FIELDS:
            raise ProfileError(f"{source}: unknown field 'published_fit.{key}'",
                               f"known fields: {', '.join(_FIT_FIELDS)}")
    for key, (typ, expected) in _FIT_FIELDS.items():
        if key not in data:
            if key == "source":
                continue
            raise ProfileError(f"{source}: missing field 'published_fit.{key}'", f"add it: {expected}")
        value = data[key]
        if typ is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        ok = isinstance(value, typ) and not isinstance(value, bool)
        if ok and key == "efficiency":
            ok = 0 < value <= 1
        elif ok and typ is not str:
            ok = value > 0
        if not ok:
            raise ProfileError(f"{source}: field 'published_fit.{key}' must be {expected}, got {data[key]!r}")
        values[key] = value
    return PublishedFit(**values)


def load_profile_file(path: str | Path) -> Profile:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ProfileError(f"profile file {path} does not exist", "check the path given to --profile") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ProfileError(f"{path}: not valid TOML ({exc})", "fix the syntax") from None
    return parse_profile(data, str(path))


def builtin_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("deploy.profiles").iterdir() if p.name.endswith(".toml"))


def builtin_profiles() -> list[Profile]:
    return [load_builtin(n) for n in builtin_names()]


def load_builtin(name: str) -> Profile:
    text = resources.files("deploy.profiles").joinpath(f"{name}.toml").read_text()
    profile = parse_profile(tomllib.loads(text), f"profiles/{name}.toml")
    if profile.name != name:
        raise ProfileError(f"profiles/{name}.toml: field 'name' is {profile.name!r}, expected {name!r}")
    return profile


def local_cpu_flags() -> set[str]:
    """This CPU's instruction-set flags (x86 'flags', ARM 'Features'), the one reader every layer uses."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@dataclass(frozen=True)
class Resolved:
    profile: Profile
    asked: str
    note: str  # how the name resolved, for the user and the report ("" when taken literally)


def resolve_target(name: str | None = None, profile_path: str | Path | None = None) -> Resolved:
    """Turn `--target NAME` or `--profile PATH` into a profile; aliases say what they resolved to."""
    if profile_path is not None:
        profile = load_profile_file(profile_path)
        return Resolved(profile, str(profile_path), f"profile from {profile_path}")
    if not name:
        raise UnknownTargetError("no target given", "pass --target NAME (see `deploy profiles list`) or --profile FILE")
    names = builtin_names()
    if name in CPU_ALIASES:
        flags = local_cpu_flags()
        best = None
        for candidate in CPU_ALIASES[name]:
            prof = load_builtin(candidate)
            if prof.runs_locally(flags):
                best = prof
                break
        if best is None:
            least = load_builtin(CPU_ALIASES[name][-1]).required_cpu_flags
            raise UnknownTargetError(
                f"target '{name}' found no matching CPU profile: this CPU lacks "
                f"{', '.join(sorted(set(least) - flags))}",
                "write a profile for it and pass --profile FILE",
            )
        return Resolved(best, name, f"'{name}' resolved to '{best.name}' from this CPU's flags")
    if name in ALIASES:
        real = ALIASES[name]
        return Resolved(load_builtin(real), name, f"'{name}' resolved to '{real}'")
    if name not in names:
        close = nearest(name, names + [*CPU_ALIASES, *ALIASES])
        hint = f"did you mean '{close}'?" if close else "see `deploy profiles list`"
        raise UnknownTargetError(f"unknown target '{name}'", hint)
    return Resolved(load_builtin(name), name, "")
