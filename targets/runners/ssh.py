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
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import parse_qs, urlsplit

from deploy.core.errors import (DeployError, RuntimeUnavailableError,
                           UserInputError)
from deploy.targets.measure.loop import MeasureConfig

RESULT_PREFIX = "DEPLOY-REMOTE-RESULT "  # = remote_measure.RESULT_PREFIX (not imported: it is the remote's file)
URL_USAGE = "use ssh://user@host or ssh://user@host:port, e.g. ssh://nvidia@jetson.local"
_QUERY_KEYS = {"python": "remote_python", "identity": "identity_file", "workdir": "remote_workdir",
               "trtexec": "trtexec", "lock": "remote_lock", "option": "ssh_options"}
_UNREACHABLE = ("connection refused", "connection timed out", "timed out", "no route to host",
                "could not resolve", "name or service not known", "network is unreachable",
                "temporary failure in name resolution", "connection closed by", "connection reset")
EXIT_NO_FOLDER, EXIT_NO_TAR, EXIT_NO_PYTHON, EXIT_SCRIPT_FAILED, EXIT_OLD_PYTHON = 90, 91, 92, 3, 4


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


def login_refused(stderr: str) -> bool:
    low = stderr.lower()
    return "permission denied" in low or "too many authentication failures" in low


def unreachable(stderr: str) -> bool:
    return any(marker in stderr.lower() for marker in _UNREACHABLE)


def ssh_failure(target: SshUrl, stderr: str) -> DeployError:
    """ssh's own failure (exit 255) as one line: unreachable, login refused, host key, or ssh's last words."""
    lines = [l.strip() for l in stderr.strip().splitlines() if l.strip()]
    last = lines[-1] if lines else "no message"
    low = stderr.lower()
    port = target.port or 22
    if login_refused(stderr):
        return RuntimeUnavailableError(f"{target} refused the ssh login ({last})",
                                       "give ?identity=KEYFILE whose public key is in the remote "
                                       "~/.ssh/authorized_keys; passwords cannot be typed in batch mode")
    if "host key verification failed" in low or "identification has changed" in low:
        return RuntimeUnavailableError(f"the host key of {target} does not match the known one ({last})",
                                       "check that it is the right device, then fix the known_hosts entry")
    if unreachable(stderr):
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
        f"exit {EXIT_NO_PYTHON}; }}",
        "umask 077",
        f"mkdir -p -- \"$base\" && mkdir -- \"$d\" || exit {EXIT_NO_FOLDER}",
        "trap 'cd / && rm -rf -- \"$d\"' EXIT",
        "trap 'exit 129' HUP; trap 'exit 130' INT; trap 'exit 143' TERM",
        f"cd \"$d\" && tar -xf - || exit {EXIT_NO_TAR}",
        " ".join([py, "remote_measure.py", *map(shlex.quote, script_args)]),
    ])


def cleanup_command(ssh: SshConfig, name: str) -> str:
    """Stop a measurement still running (a timeout here does not stop it there) and remove its folder."""
    return (f"base={_workdir_expr(ssh.remote_workdir)}; d=\"$base\"/{name}; "
            "[ -f \"$d/pid\" ] && kill -TERM \"$(cat \"$d/pid\")\" 2>/dev/null; rm -rf -- \"$d\"")


def as_sh(script: str) -> str:
    """Whatever the remote login shell is (bash, zsh, fish), run the script with sh."""
    return "sh -c " + shlex.quote(script)
