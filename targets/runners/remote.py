"""Measuring on a device over SSH: what is sent (the model, its external data, the inputs and the stdlib-only
measurement scripts), the run there, and its result read back as a Measurement (deploy.targets.runners.ssh holds
the URL, the login and the shell)."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import tarfile
import tempfile
import uuid
from pathlib import Path
from typing import Any, Mapping

from deploy.core.errors import (DeployError, MeasurementError, ModelLoadError, RuntimeUnavailableError,
                           UserInputError)
from deploy.targets.measure.loop import MeasureConfig, Measurement, ProgressFn

from deploy.profiles import Profile
from deploy.targets.runners.ssh import (EXIT_NO_FOLDER, EXIT_NO_PYTHON, EXIT_NO_TAR, EXIT_OLD_PYTHON,
                                        EXIT_SCRIPT_FAILED, RESULT_PREFIX, RemoteConfig, SshConfig, SshUrl, as_sh,
                                        cleanup_command, login_refused, parse_ssh_url, remote_shell, ssh_argv,
                                        ssh_failure, unreachable)

REMOTE_SCRIPTS = (Path(__file__).with_name("remote_measure.py"), Path(__file__).with_name("remote_trtexec.py"))


# --- what is sent -------------------------------------------------------------------------------------------------

def _external_data(model_path: Path) -> list[str]:
    """Relative paths of external-data files the ONNX model refers to (they travel with it); a location outside
    the model's folder is refused (deploy.core.model.onnx_guard)."""
    import onnx

    from deploy.core.model.onnx_guard import external_data_files

    return external_data_files(onnx.load(str(model_path), load_external_data=False), model_path)


def feeds_for(model_path: Path, feeds_or_input_specs: Any) -> dict[str, Any]:
    """Inputs as arrays: given arrays as they are; InputSpecs or `--input-shape` strings (or None) through
    make_feeds, the same deterministic data a local bench uses."""
    import numpy as np

    from deploy.targets.measure.feeds import make_feeds, resolve_inputs

    if isinstance(feeds_or_input_specs, Mapping):
        return {str(k): np.ascontiguousarray(v) for k, v in feeds_or_input_specs.items()}
    items = list(feeds_or_input_specs or ())
    if items and not all(isinstance(i, str) for i in items):
        return make_feeds(items)
    from deploy.targets.model_files import load_onnx

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
        for script in REMOTE_SCRIPTS:
            add(script, script.name)
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
    from deploy.core.model.files import file_sha256

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
        command = as_sh(remote_shell(ssh, name, script_args(config, model_path.name)))
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
    if document is not None and (document.get("ok") or proc.returncode == EXIT_SCRIPT_FAILED):
        if not document.get("ok"):
            raise _script_failure(document)
        return document
    if proc.returncode == 255:
        if not (unreachable(proc.stderr) or login_refused(proc.stderr)):
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
    if proc.returncode == EXIT_NO_PYTHON:
        return RuntimeUnavailableError(f"{target} has no python '{ssh.remote_python}'",
                                       "install Python 3 with numpy and onnxruntime there, or give its path with "
                                       "?python=PATH")
    if proc.returncode == EXIT_NO_FOLDER:
        return RuntimeUnavailableError(f"cannot create a temp folder on {target} ({last})",
                                       "give a writable folder with ?workdir=DIR")
    if proc.returncode == EXIT_NO_TAR:
        return RuntimeUnavailableError(f"cannot unpack the files on {target} ({last})",
                                       "the remote needs tar and free space in its temp folder")
    if proc.returncode == EXIT_OLD_PYTHON or "SyntaxError" in proc.stderr:
        return RuntimeUnavailableError(f"the python '{ssh.remote_python}' on {target} is too old ({last})",
                                       "the measurement script needs Python 3.6 or newer; give one with ?python=PATH")
    return MeasurementError(f"the measurement on {target} failed (exit {proc.returncode}): {last}")


def _cleanup(argv: list[str], ssh: SshConfig, name: str) -> None:
    """Best effort: remove the remote folder when the run's own trap may not have."""
    try:
        subprocess.run([*argv, as_sh(cleanup_command(ssh, name))], stdin=subprocess.DEVNULL,
                       capture_output=True, timeout=ssh.connect_timeout_s + 20)
    except (OSError, subprocess.SubprocessError):
        pass


def to_measurement(document: dict[str, Any], config: RemoteConfig, model_info: dict[str, Any] | None,
                   target: SshUrl | str) -> Measurement:
    """The remote's JSON as a Measurement: summary and warnings computed here, as for a local run."""
    from deploy.targets.measure.lock import LockRecord
    from deploy.targets.measure.loop import measurement_from

    try:
        samples = [float(x) for x in document["samples_ms"]]
        lock = LockRecord.from_dict(document.get("lock") or {})
        environment = dict(document.get("environment") or {})
        runtime = dict(document.get("runtime") or {})
    except (KeyError, TypeError, ValueError) as exc:
        raise MeasurementError(f"the remote's result is malformed ({type(exc).__name__}: {exc})") from None
    if not samples:
        raise MeasurementError(f"the measurement on {target} returned no samples")
    measured = measurement_from(samples, config.measure, lock)
    fingerprint = {**environment, "profile": config.target, "remote": True, "ssh": str(target)}
    runtime["remote"] = str(target)
    if document.get("warmup_runs") is not None:
        runtime["warmup_runs"] = document["warmup_runs"]
    return dataclasses.replace(measured, model=model_info, target=config.target, runtime=runtime,
                               fingerprint=fingerprint)


# --- deploy bench --runner ssh://... ------------------------------------------------------------------------------

def remote_config_for(profile: Profile, runtime: str, threads: int | None, precision: str | None,
                      measure: MeasureConfig, ssh: SshConfig = SshConfig()) -> RemoteConfig:
    """A RemoteConfig from bench's choices: TensorRT precisions as the local TensorRT runner picks them,
    threads left to the remote (its physical cores, capped at a CPU profile's cores)."""
    precisions: tuple[str, ...] = ()
    if runtime == "tensorrt":
        from deploy.targets.runners.registry import RunnerConfig
        from deploy.targets.runners.tensorrt import TensorRtRunner

        precisions = tuple(TensorRtRunner(RunnerConfig(precision=precision, profile=profile)).precisions())
    elif runtime != "onnxruntime":
        raise UserInputError(f"--runner ssh:// measures with onnxruntime or tensorrt, not {runtime}",
                             "use --runtime ort (or a tensorrt profile)")
    elif precision not in (None, "f32"):
        raise UserInputError(f"onnxruntime cannot be asked for precision {precision}: it runs the model in the "
                             "types it was exported with")
    cap = profile.cores if profile.kind == "cpu" else 0
    return RemoteConfig(runtime=runtime, threads=threads or 0, max_threads=cap or 0, precisions=precisions,
                        measure=measure, ssh=ssh, target=profile.name)
