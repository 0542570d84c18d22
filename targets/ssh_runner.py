"""Measure on a device at hand elsewhere (a Jetson, a Raspberry Pi) over SSH, with the system `ssh` client.

One `ssh` call does everything, so a run costs one connection: it makes a private temp folder on the remote,
unpacks a tar stream (the ONNX file, its external data, the inputs as .npz and `remote_measure.py`), runs the
measurement there with onnxruntime, or with trtexec when the runtime is TensorRT, and removes the folder on exit
(a trap; a second call cleans up after a timeout). The result is a `Measurement` in the same schema as a local
one, its fingerprint the remote machine's, marked remote. There is no Runner registry entry: a Runner returns a
local run-once function, and this one runs nothing locally.

URL: ssh://[user@]host[:port][?python=PATH&identity=FILE&workdir=DIR&trtexec=PATH&lock=FILE&option=KEY=VALUE]
"""
from __future__ import annotations

import dataclasses
import json
import shlex
import shutil
import subprocess
import tarfile
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence
from urllib.parse import parse_qs, urlsplit

from deploy.errors import (DeployError, MeasurementError, ModelLoadError, RuntimeUnavailableError,
                           UserInputError)
from deploy.targets.measure import MeasureConfig, Measurement, ProgressFn

REMOTE_SCRIPT = Path(__file__).with_name("remote_measure.py")
RESULT_PREFIX = "DEPLOY-REMOTE-RESULT "  # = remote_measure.RESULT_PREFIX (not imported: it is the remote's file)
URL_USAGE = "use ssh://user@host or ssh://user@host:port, e.g. ssh://nvidia@jetson.local"
_QUERY_KEYS = {"python": "remote_python", "identity": "identity_file", "workdir": "remote_workdir",
               "trtexec": "trtexec", "lock": "remote_lock", "option": "ssh_options"}
_UNREACHABLE = ("connection refused", "connection timed out", "timed out", "no route to host",
                "could not resolve", "name or service not known", "network is unreachable",
                "temporary failure in name resolution", "connection closed by", "connection reset")
_EXIT_NO_FOLDER, _EXIT_NO_TAR, _EXIT_NO_PYTHON, _EXIT_SCRIPT_FAILED, _EXIT_OLD_PYTHON = 90, 91, 92, 3, 4


@dataclass(frozen=True)
class SshConfig:
    """How to reach and run on the remote. Extra `ssh_options` ("KEY=VALUE", as for `ssh -o`) go first, so
    they win over our defaults (BatchMode=yes, StrictHostKeyChecking=accept-new, ConnectTimeout)."""

    identity_file: str | None = None
    remote_python: str = "python3"
    remote_workdir: str | None = None  # parent of the temp folder; None: the remote's $TMPDIR or /tmp
    ssh_options: tuple[str, ...] = ()
    connect_timeout_s: int = 10
    known_hosts: str | None = None  # None: a private, throwaway known_hosts (trust on first use, every run)
    trtexec: str | None = None  # None: trtexec on the remote PATH or in TensorRT's usual folders
    remote_lock: str = "/tmp/deploy-measure.lock"  # the remote's host-wide measurement lock


@dataclass(frozen=True)
class RemoteConfig:
    """What to measure there: runtime, threads (0: the remote's physical cores), the loop, and how to connect."""

    runtime: str = "onnxruntime"  # or "tensorrt": trtexec
    threads: int = 0
    max_threads: int = 0  # caps threads=0 (a CPU profile's core count); 0: no cap
    precisions: tuple[str, ...] = ()  # tensorrt: reduced precisions to enable (f16, int8, ...)
    trt_metric: str = "computeMs"  # GPU compute time, as the local TensorRT runner times it
    measure: MeasureConfig = MeasureConfig()
    ssh: SshConfig = SshConfig()
    timeout_s: float | None = None  # the whole remote run; None: max_seconds + time for set-up (an engine build)
    target: str | None = None  # the profile name, recorded in the result

    def __post_init__(self) -> None:
        if self.runtime not in ("onnxruntime", "tensorrt"):
            raise UserInputError(f"the ssh runner measures with onnxruntime or tensorrt, not {self.runtime}",
                                 "use --runtime ort or --runtime tensorrt")
        if self.threads < 0 or self.max_threads < 0:
            raise UserInputError(f"threads must be >= 0 (0: the remote's physical cores), got {self.threads}")


@dataclass(frozen=True)
class SshUrl:
    """A parsed ssh:// URL; `apply` lays its query (python=, identity=, ...) over an SshConfig."""

    host: str
    user: str | None = None
    port: int | None = None
    query: tuple[tuple[str, str], ...] = ()

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"ssh://{self.user + '@' if self.user else ''}{host}{f':{self.port}' if self.port else ''}"

    def apply(self, ssh: SshConfig) -> SshConfig:
        changes: dict[str, Any] = {}
        for key, value in self.query:
            name = _QUERY_KEYS[key]
            changes[name] = changes.get(name, ()) + (value,) if name == "ssh_options" else value
        if "ssh_options" in changes:
            changes["ssh_options"] = ssh.ssh_options + changes["ssh_options"]
        return dataclasses.replace(ssh, **changes)


def parse_ssh_url(url: str) -> SshUrl:
    """ssh://[user@]host[:port][?python=..&identity=..&workdir=..&trtexec=..&lock=..&option=K=V]; bad: one line."""
    text = (url or "").strip()
    if not text.lower().startswith("ssh://"):
        raise UserInputError(f"runner '{url}' is not an ssh:// URL", URL_USAGE)
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise UserInputError(f"runner URL '{url}' is malformed ({exc})", URL_USAGE) from None
    if parts.password is not None:
        raise UserInputError(f"runner URL '{url}' carries a password", "ssh runs in batch mode with keys only; "
                             "drop the password and give ?identity=KEYFILE or use ssh-agent")
    host = parts.hostname or ""
    if not host or host.startswith("-") or any(c.isspace() for c in host):
        raise UserInputError(f"runner URL '{url}' names no valid host", URL_USAGE)
    if parts.path not in ("", "/") or parts.fragment:
        raise UserInputError(f"runner URL '{url}' has a path; the remote folder is set with ?workdir=DIR", URL_USAGE)
    user = parts.username or None
    if user is not None and (user.startswith("-") or any(c.isspace() for c in user)):
        raise UserInputError(f"runner URL '{url}' has an invalid user name '{user}'", URL_USAGE)
    query: list[tuple[str, str]] = []
    for key, values in parse_qs(parts.query, keep_blank_values=True, strict_parsing=False).items():
        if key not in _QUERY_KEYS:
            raise UserInputError(f"runner URL '{url}': unknown option '{key}'",
                                 f"known: {', '.join(sorted(_QUERY_KEYS))}")
        query += [(key, v) for v in values]
    return SshUrl(host=host, user=user, port=port, query=tuple(query))


# --- ssh -----------------------------------------------------------------------------------------------------------

def ssh_argv(target: SshUrl, ssh: SshConfig, known_hosts: Path) -> list[str]:
    """The `ssh` command line up to the host: no prompts ever, new host keys accepted into a private file."""
    binary = shutil.which("ssh")
    if binary is None:
        raise RuntimeUnavailableError("the ssh client is not installed here", "install openssh-client")
    argv = [binary, "-T", "-x", "-a"]
    for option in ssh.ssh_options:  # first: for `ssh -o` the first value given wins
        argv += ["-o", option]
    argv += ["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=accept-new",
             "-o", f"UserKnownHostsFile={ssh.known_hosts or known_hosts}",
             "-o", f"ConnectTimeout={max(1, int(ssh.connect_timeout_s))}", "-o", "LogLevel=ERROR",
             "-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=4"]
    if ssh.identity_file:
        identity = Path(ssh.identity_file).expanduser()
        if not identity.is_file():
            raise UserInputError(f"ssh identity file {identity} does not exist", "give the private key's path")
        argv += ["-i", str(identity), "-o", "IdentitiesOnly=yes"]
    if target.port:
        argv += ["-p", str(target.port)]
    if target.user:
        argv += ["-l", target.user]
    return argv + ["--", target.host]


def _login_refused(stderr: str) -> bool:
    low = stderr.lower()
    return "permission denied" in low or "too many authentication failures" in low


def _unreachable(stderr: str) -> bool:
    return any(marker in stderr.lower() for marker in _UNREACHABLE)


def ssh_failure(target: SshUrl, stderr: str) -> DeployError:
    """ssh's own failure (exit 255) as one line: unreachable, login refused, host key, or ssh's last words."""
    lines = [l.strip() for l in stderr.strip().splitlines() if l.strip()]
    last = lines[-1] if lines else "no message"
    low = stderr.lower()
    port = target.port or 22
    if _login_refused(stderr):
        return RuntimeUnavailableError(f"{target} refused the ssh login ({last})",
                                       "give ?identity=KEYFILE whose public key is in the remote "
                                       "~/.ssh/authorized_keys; passwords cannot be typed in batch mode")
    if "host key verification failed" in low or "identification has changed" in low:
        return RuntimeUnavailableError(f"the host key of {target} does not match the known one ({last})",
                                       "check that it is the right device, then fix the known_hosts entry")
    if _unreachable(stderr):
        return RuntimeUnavailableError(f"cannot reach {target} ({last})",
                                       f"check that the device is on and sshd listens on port {port}")
    return RuntimeUnavailableError(f"ssh to {target} failed ({last})")


def _workdir_expr(workdir: str | None) -> str:
    if not workdir:
        return '"${TMPDIR:-/tmp}"'
    if workdir == "~" or workdir.startswith("~/"):
        return '"$HOME"' + (shlex.quote(workdir[1:]) if len(workdir) > 1 else "")
    return shlex.quote(workdir)


def remote_shell(ssh: SshConfig, name: str, script_args: Sequence[str]) -> str:
    """The remote sh script: make the folder, remove it on any exit, unpack stdin, run the measurement."""
    py = shlex.quote(ssh.remote_python)
    return "\n".join([
        f"base={_workdir_expr(ssh.remote_workdir)}; d=\"$base\"/{name}",
        f"command -v {py} >/dev/null 2>&1 || {{ echo \"deploy: no python {py} on this host\" >&2; "
        f"exit {_EXIT_NO_PYTHON}; }}",
        "umask 077",
        f"mkdir -p -- \"$base\" && mkdir -- \"$d\" || exit {_EXIT_NO_FOLDER}",
        "trap 'cd / && rm -rf -- \"$d\"' EXIT",
        "trap 'exit 129' HUP; trap 'exit 130' INT; trap 'exit 143' TERM",
        f"cd \"$d\" && tar -xf - || exit {_EXIT_NO_TAR}",
        " ".join([py, "remote_measure.py", *map(shlex.quote, script_args)]),
    ])


def _cleanup_command(ssh: SshConfig, name: str) -> str:
    """Stop a measurement still running (a timeout here does not stop it there) and remove its folder."""
    return (f"base={_workdir_expr(ssh.remote_workdir)}; d=\"$base\"/{name}; "
            "[ -f \"$d/pid\" ] && kill -TERM \"$(cat \"$d/pid\")\" 2>/dev/null; rm -rf -- \"$d\"")


def _as_sh(script: str) -> str:
    """Whatever the remote login shell is (bash, zsh, fish), run the script with sh."""
    return "sh -c " + shlex.quote(script)


# --- what is sent -------------------------------------------------------------------------------------------------

def _external_data(model_path: Path) -> list[str]:
    """Relative paths of external-data files the ONNX model refers to (they travel with it); a location outside
    the model's folder is refused (deploy.onnx_guard)."""
    import onnx

    from deploy.onnx_guard import external_data_files

    return external_data_files(onnx.load(str(model_path), load_external_data=False), model_path)


def feeds_for(model_path: Path, feeds_or_input_specs: Any) -> dict[str, Any]:
    """Inputs as arrays: given arrays as they are; InputSpecs or `--input-shape` strings (or None) through
    make_feeds, the same deterministic data a local bench uses."""
    import numpy as np

    from deploy.targets.feeds import make_feeds, resolve_inputs

    if isinstance(feeds_or_input_specs, Mapping):
        return {str(k): np.ascontiguousarray(v) for k, v in feeds_or_input_specs.items()}
    items = list(feeds_or_input_specs or ())
    if items and not all(isinstance(i, str) for i in items):
        return make_feeds(items)
    from deploy.targets.onnx_model import load_onnx

    return make_feeds(resolve_inputs(load_onnx(model_path).inputs, items))


def _pack(folder: Path, model_path: Path, feeds: Mapping[str, Any], raw_inputs: bool = False) -> Path:
    """A tar of everything the remote needs: model (+ external data) under model/, the script, and the inputs:
    feeds.npz, or for trtexec raw .bin files and inputs.json (so that path needs no numpy there)."""
    import numpy as np

    inputs = folder / "inputs"
    inputs.mkdir()
    if raw_inputs:
        listed = []
        for i, (name, value) in enumerate(feeds.items()):
            np.ascontiguousarray(value).tofile(inputs / f"input_{i}.bin")
            listed.append({"name": name, "file": f"inputs/input_{i}.bin", "shape": list(value.shape)})
        (inputs / "inputs.json").write_text(json.dumps(listed))
    else:
        np.savez(inputs / "feeds.npz", **feeds)
    archive = folder / "payload.tar"

    def owned_by_remote(info: tarfile.TarInfo) -> tarfile.TarInfo:  # not by our uid, should root unpack it
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        return info

    with tarfile.open(archive, "w") as tar:
        add = lambda source, name: tar.add(str(source), arcname=name, filter=owned_by_remote)  # noqa: E731
        add(REMOTE_SCRIPT, "remote_measure.py")
        add(inputs, "inputs")
        add(model_path, f"model/{model_path.name}")
        for rel in _external_data(model_path):
            source = (model_path.parent / rel).resolve()
            if not source.is_file():
                raise ModelLoadError(f"{model_path} refers to external data {rel}, which does not exist",
                                     "keep the .onnx file next to its data file")
            add(source, f"model/{rel}")
    return archive


def script_args(config: RemoteConfig, model_name: str) -> list[str]:
    m = config.measure
    args = [f"model/{model_name}", "--runtime", config.runtime, "--threads", str(config.threads),
            "--max-threads", str(config.max_threads), "--warmup-runs", str(m.warmup_min_runs),
            "--warmup-seconds", repr(m.warmup_min_s), "--min-samples", str(m.min_samples),
            "--min-seconds", repr(m.min_seconds), "--max-seconds", repr(m.max_seconds),
            "--lock", config.ssh.remote_lock, "--lock-timeout", repr(m.lock_timeout_s), "--pid-file", "pid"]
    if config.runtime == "tensorrt":
        args += ["--trt-metric", config.trt_metric, "--precisions", ",".join(config.precisions)]
        if config.ssh.trtexec:
            args += ["--trtexec", config.ssh.trtexec]
    return args


# --- measuring ----------------------------------------------------------------------------------------------------

def measure_remote(url: str, model_path: str | Path, feeds_or_input_specs: Any = None,
                   config: RemoteConfig = RemoteConfig(), progress: ProgressFn | None = None) -> Measurement:
    """Copy the model to the ssh:// host, time it there and return the Measurement (remote fingerprint)."""
    from deploy.model_io import file_sha256

    target = parse_ssh_url(url)
    ssh = target.apply(config.ssh)
    config = dataclasses.replace(config, ssh=ssh)
    model_path = Path(model_path)
    if not model_path.is_file() or model_path.suffix.lower() != ".onnx":
        raise ModelLoadError(f"{model_path} is not an ONNX file", "the ssh runner copies an exported .onnx model")
    feeds = feeds_for(model_path, feeds_or_input_specs)
    model_info = {"path": str(model_path), "sha256": file_sha256(model_path),
                  "inputs": [{"name": k, "shape": list(v.shape), "dtype": str(v.dtype)} for k, v in feeds.items()]}
    name = f"deploy-measure-{uuid.uuid4().hex[:16]}"
    with tempfile.TemporaryDirectory(prefix="deploy-ssh-") as tmp:
        folder = Path(tmp)
        argv = ssh_argv(target, ssh, folder / "known_hosts")
        archive = _pack(folder, model_path, feeds, raw_inputs=config.runtime == "tensorrt")
        command = _as_sh(remote_shell(ssh, name, script_args(config, model_path.name)))
        if progress:
            progress("sampling", 0.0)
        document = _run(argv, command, archive, target, config, name)
        if progress:
            progress("sampling", 1.0)
    return to_measurement(document, config, model_info, target)


def _timeout(config: RemoteConfig) -> float:
    if config.timeout_s is not None:
        return config.timeout_s
    setup = 1800.0 if config.runtime == "tensorrt" else 120.0  # an engine build takes minutes on a Jetson
    return config.measure.max_seconds + config.ssh.connect_timeout_s + setup + config.measure.lock_timeout_s


def _run(argv: list[str], command: str, archive: Path, target: SshUrl, config: RemoteConfig,
         name: str) -> dict[str, Any]:
    timeout = _timeout(config)
    try:
        with open(archive, "rb") as stdin:
            proc = subprocess.run([*argv, command], stdin=stdin, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        _cleanup(argv, config.ssh, name)
        raise MeasurementError(f"the measurement on {target} did not finish within {timeout:.0f} s",
                               "check the device (is it busy or hung?), or raise the timeout") from None
    document = _result_line(proc.stdout)
    if document is not None and (document.get("ok") or proc.returncode == _EXIT_SCRIPT_FAILED):
        if not document.get("ok"):
            raise _script_failure(document)
        return document
    if proc.returncode == 255:
        if not (_unreachable(proc.stderr) or _login_refused(proc.stderr)):
            _cleanup(argv, config.ssh, name)  # the link broke mid-run: the remote may still be running
        raise ssh_failure(target, proc.stderr)
    raise _shell_failure(proc, target, config.ssh)


def _result_line(stdout: str) -> dict[str, Any] | None:
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            try:
                return json.loads(line[len(RESULT_PREFIX):])
            except ValueError:
                return None
    return None


def _script_failure(document: dict[str, Any]) -> DeployError:
    kind = {"unavailable": RuntimeUnavailableError, "model": ModelLoadError, "usage": UserInputError}
    cls = kind.get(document.get("kind"), MeasurementError)
    return cls(f"remote: {document.get('error', 'the measurement failed')}", document.get("hint") or None)


def _shell_failure(proc: subprocess.CompletedProcess, target: SshUrl, ssh: SshConfig) -> DeployError:
    lines = [l.strip() for l in proc.stderr.strip().splitlines() if l.strip()]
    last = lines[-1] if lines else "no message"
    if proc.returncode == _EXIT_NO_PYTHON:
        return RuntimeUnavailableError(f"{target} has no python '{ssh.remote_python}'",
                                       "install Python 3 with numpy and onnxruntime there, or give its path with "
                                       "?python=PATH")
    if proc.returncode == _EXIT_NO_FOLDER:
        return RuntimeUnavailableError(f"cannot create a temp folder on {target} ({last})",
                                       "give a writable folder with ?workdir=DIR")
    if proc.returncode == _EXIT_NO_TAR:
        return RuntimeUnavailableError(f"cannot unpack the files on {target} ({last})",
                                       "the remote needs tar and free space in its temp folder")
    if proc.returncode == _EXIT_OLD_PYTHON or "SyntaxError" in proc.stderr:
        return RuntimeUnavailableError(f"the python '{ssh.remote_python}' on {target} is too old ({last})",
                                       "the measurement script needs Python 3.6 or newer; give one with ?python=PATH")
    return MeasurementError(f"the measurement on {target} failed (exit {proc.returncode}): {last}")


def _cleanup(argv: list[str], ssh: SshConfig, name: str) -> None:
    """Best effort: remove the remote folder when the run's own trap may not have."""
    try:
        subprocess.run([*argv, _as_sh(_cleanup_command(ssh, name))], stdin=subprocess.DEVNULL,
                       capture_output=True, timeout=ssh.connect_timeout_s + 20)
    except (OSError, subprocess.SubprocessError):
        pass


def to_measurement(document: dict[str, Any], config: RemoteConfig, model_info: dict[str, Any] | None,
                   target: SshUrl | str) -> Measurement:
    """The remote's JSON as a Measurement: summary and warnings computed here, as for a local run."""
    from deploy.targets.lock import LockRecord
    from deploy.targets.measure import _finish

    try:
        samples = [float(x) for x in document["samples_ms"]]
        lock = LockRecord.from_dict(document.get("lock") or {})
        environment = dict(document.get("environment") or {})
        runtime = dict(document.get("runtime") or {})
    except (KeyError, TypeError, ValueError) as exc:
        raise MeasurementError(f"the remote's result is malformed ({type(exc).__name__}: {exc})") from None
    if not samples:
        raise MeasurementError(f"the measurement on {target} returned no samples")
    measured = _finish(samples, config.measure, lock)
    fingerprint = {**environment, "profile": config.target, "remote": True, "ssh": str(target)}
    runtime["remote"] = str(target)
    if document.get("warmup_runs") is not None:
        runtime["warmup_runs"] = document["warmup_runs"]
    return dataclasses.replace(measured, model=model_info, target=config.target, runtime=runtime,
                               fingerprint=fingerprint)


# --- deploy bench --runner ssh://... ------------------------------------------------------------------------------

def remote_config_for(profile: Any, runtime: str, threads: int | None, precision: str | None,
                      measure: MeasureConfig, ssh: SshConfig = SshConfig()) -> RemoteConfig:
    """A RemoteConfig from bench's choices: TensorRT precisions as the local TensorRT runner picks them,
    threads left to the remote (its physical cores, capped at a CPU profile's cores)."""
    precisions: tuple[str, ...] = ()
    if runtime == "tensorrt":
        from deploy.targets.runner import RunnerConfig
        from deploy.targets.tensorrt_runner import TensorRtRunner

        precisions = tuple(TensorRtRunner(RunnerConfig(precision=precision, profile=profile)).precisions())
    elif runtime != "onnxruntime":
        raise UserInputError(f"--runner ssh:// measures with onnxruntime or tensorrt, not {runtime}",
                             "use --runtime ort (or a tensorrt profile)")
    elif precision not in (None, "f32"):
        raise UserInputError(f"onnxruntime cannot be asked for precision {precision}: it runs the model in the "
                             "types it was exported with")
    cap = getattr(profile, "cores", 0) if getattr(profile, "kind", "") == "cpu" else 0
    return RemoteConfig(runtime=runtime, threads=threads or 0, max_threads=cap or 0, precisions=precisions,
                        measure=measure, ssh=ssh, target=getattr(profile, "name", None))


def run_remote_bench(request: Any, profile: Any, runtime: str, note: str = "",
                     progress: ProgressFn | None = None) -> Any:
    """`deploy bench --runner ssh://...`: the BenchResult of one remote measurement (no --compare)."""
    from deploy.targets.bench import BenchResult

    if request.compare is not None:
        raise UserInputError("--compare is not supported with --runner ssh://",
                             "measure each model remotely with --json and compare the files with `deploy regress`")
    config = remote_config_for(profile, runtime, request.threads, request.precision, request.measure)
    started = time.perf_counter()
    result = measure_remote(request.runner, request.model_path, list(request.input_shapes), config, progress)
    remote_note = f"measured on {parse_ssh_url(request.runner)} in {time.perf_counter() - started:.1f} s"
    return BenchResult(result, note="; ".join(n for n in (note, remote_note) if n))


__all__ = ["SshConfig", "RemoteConfig", "SshUrl", "parse_ssh_url", "measure_remote", "to_measurement",
           "remote_config_for", "run_remote_bench"]
