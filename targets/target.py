"""The one typed Target: a device profile resolved once, with everything the rest of deploy asks of it.

profile, the runtime that runs it, the thread count, what float layers run in, the Q/DQ policy, and whether its
latency is measured here or predicted. Runners come from it (`target.runner()`), so no other layer builds one.
The float-precision rule lives here and only here: OpenVINO runs float layers in bf16 where the profile allows it
and the CPU has bf16 instructions (its own default on such CPUs, made explicit so that measurement, fidelity and
quantization prices agree); everything else runs them in fp32.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from deploy.core.errors import RuntimeUnavailableError
from deploy.profiles import Profile, local_cpu_flags, resolve_target

if TYPE_CHECKING:
    from deploy.targets.runners.registry import Runner

BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def has_bf16(cpu_flags: set[str] | None = None) -> bool:
    """This CPU (or the given flags) runs bf16 in hardware."""
    flags = local_cpu_flags() if cpu_flags is None else cpu_flags
    return any(f in flags for f in BF16_FLAGS)


def float_precision(profile: Profile, cpu_flags: set[str] | None = None) -> str:
    """What float layers run in on `profile`: "bf16" or "fp32" (the one rule)."""
    if profile.qdq_policy == "openvino" and "bf16" in profile.precisions and has_bf16(cpu_flags):
        return "bf16"
    return "fp32"


def runtime_hint(precision: str, runtime: str) -> str | None:
    """The runner's precision request for float layers in `precision`: OpenVINO needs it said ("bf16" / "f32"),
    other runtimes run the file as it is (None)."""
    if runtime != "openvino":
        return None
    return "bf16" if precision == "bf16" else "f32"


def default_threads(profile: Profile) -> int:
    """This machine's physical cores, capped at the profile's core count when it names one."""
    from deploy.targets.measure.fingerprint import physical_cores

    cores = physical_cores()
    return min(cores, profile.cores) if profile.cores > 0 else cores


@dataclass(frozen=True)
class Target:
    profile: Profile
    asked: str  # what the user wrote (--target NAME, or the --profile path)
    note: str  # how it resolved ("'cpu' resolved to ..."), "" when taken literally
    runtime: str  # canonical runtime name: onnxruntime | openvino | tensorrt | torch
    threads: int
    float_precision: str  # fp32 | bf16: what float layers run in
    measured: bool  # True: latency is measured on this machine; False: predicted with a band

    @property
    def name(self) -> str:
        return self.profile.name

    @property
    def qdq_policy(self) -> str:
        return self.profile.qdq_policy

    @property
    def runtime_precision(self) -> str | None:
        """The runner's precision request for float layers (OpenVINO: "bf16" or "f32"; others: None)."""
        return runtime_hint(self.float_precision, self.runtime)

    def runner(self, precision: str | None = None, runtime: str | None = None) -> "Runner":
        """A runner of this target's runtime (or `runtime`) at its threads; `precision` overrides the float hint."""
        from deploy.targets.runners.registry import get_runner

        return get_runner(runtime or self.runtime, self.threads,
                          precision if precision is not None else self.runtime_precision, self.profile)

    def require_measurable(self, runtime: str | None = None) -> None:
        """Refuse, in one line, a target this machine cannot time for real."""
        profile, runtime = self.profile, runtime or self.runtime
        if profile.measure == "predicted":
            raise RuntimeUnavailableError(
                f"target '{profile.name}' is not measurable here: its latency is predicted, not measured on this "
                "machine", f"bench a local target (--target cpu); predicted latency for {profile.name} comes from "
                f"`deploy compress --target {profile.name}`")
        if not profile.runs_locally():
            missing = [f for f in profile.required_cpu_flags if f not in local_cpu_flags()]
            raise RuntimeUnavailableError(f"target '{profile.name}' is not measurable here: this CPU lacks "
                                          f"{', '.join(missing)}", "bench --target cpu to measure this machine's CPU")
        if runtime == "tensorrt":
            from deploy.targets.runners.tensorrt import require_tensorrt

            require_tensorrt()


def resolve(name: str | None = "cpu", profile_path: str | Path | None = None, runtime: str | None = None,
            threads: int | None = None) -> Target:
    """`--target NAME` or `--profile FILE` (plus an optional runtime and thread count) as a Target."""
    from deploy.targets.runners.registry import canonical_runtime

    resolved = resolve_target(name or (None if profile_path else "cpu"), profile_path)
    profile = resolved.profile
    chosen = canonical_runtime(runtime or profile.runtime)
    return Target(profile, resolved.asked, resolved.note, chosen,
                  threads if threads is not None else default_threads(profile), float_precision(profile),
                  profile.runs_locally())


def for_profile(profile: Profile, threads: int | None = None, runtime: str | None = None) -> Target:
    """A Target for a profile already in hand (the Python API's entry: a profile object, not a name)."""
    from deploy.targets.runners.registry import canonical_runtime

    return Target(profile, profile.name, "", canonical_runtime(runtime or profile.runtime),
                  threads if threads is not None else default_threads(profile), float_precision(profile),
                  profile.runs_locally())


def as_target(target: Target | Profile) -> Target:
    """The Python API takes a Target or a bare Profile (then measured at one thread: pass a Target for more)."""
    return target if isinstance(target, Target) else for_profile(target, threads=1)
