"""A throwaway sshd on 127.0.0.1 for tests of the ssh runner: its own host key, client key and config in a temp
folder, running as the current user, so the "remote" is this machine reached through a real SSH login.

Use: `from sshd import sshd_server` in a test module (tests/ is on sys.path), then take `sshd_server` as a fixture.
Skips, with the reason, when the ssh client, sshd or ssh-keygen is missing (.ci/run installs openssh-server).
"""
from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

SSHD_PLACES = ("/usr/sbin/sshd", "/usr/local/sbin/sshd", "/sbin/sshd")


@dataclass(frozen=True)
class Sshd:
    """A running sshd: log in as `user` on 127.0.0.1:`port` with the private key `identity`."""

    port: int
    user: str
    identity: Path
    folder: Path

    @property
    def url(self) -> str:
        return f"ssh://{self.user}@127.0.0.1:{self.port}"


def find_sshd() -> str | None:
    """sshd insists on an absolute path (it re-executes itself); /usr/sbin is often off a user's PATH."""
    found = shutil.which("sshd")
    return found or next((p for p in SSHD_PLACES if os.access(p, os.X_OK)), None)


def missing_tools() -> str | None:
    missing = [name for name in ("ssh", "ssh-keygen", "tar") if shutil.which(name) is None]
    if find_sshd() is None:
        missing.append("sshd")
    return ", ".join(missing) or None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "deploy-test", "-f", str(path)],
                   check=True, capture_output=True, timeout=30)
    return path


def _config(folder: Path, port: int) -> Path:
    config = folder / "sshd_config"
    config.write_text("\n".join([
        f"Port {port}",
        "ListenAddress 127.0.0.1",
        f"HostKey {folder / 'host_ed25519'}",
        f"AuthorizedKeysFile {folder / 'authorized_keys'}",
        f"PidFile {folder / 'sshd.pid'}",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "PermitRootLogin prohibit-password",
        "StrictModes no",
        "UsePAM no",
        "UseDNS no",
        "PrintMotd no",
        "LogLevel ERROR",
        "",
    ]))
    return config


def _wait_listening(proc: subprocess.Popen, port: int, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def start_sshd(folder: Path) -> tuple[Sshd, subprocess.Popen]:
    """Keys, config and a foreground sshd (-D -e) on a free port; a few tries in case the port is taken meanwhile."""
    folder.mkdir(parents=True, exist_ok=True)
    keygen(folder / "host_ed25519")
    identity = keygen(folder / "client_ed25519")
    (folder / "authorized_keys").write_text((folder / "client_ed25519.pub").read_text())
    os.chmod(folder / "authorized_keys", 0o600)
    try:
        os.makedirs("/run/sshd", exist_ok=True)  # the privilege-separation folder sshd checks for
    except OSError:
        pass
    errors = ""
    for _ in range(3):
        port = free_port()
        log = open(folder / f"sshd-{port}.log", "w+")
        proc = subprocess.Popen([find_sshd(), "-D", "-e", "-f", str(_config(folder, port))],
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        if _wait_listening(proc, port):
            log.close()
            return Sshd(port=port, user=getpass.getuser(), identity=identity, folder=folder), proc
        stop(proc)
        log.seek(0)
        errors = log.read().strip()
        log.close()
    raise RuntimeError(f"sshd did not start: {errors or 'no output'}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


@pytest.fixture(scope="module")
def sshd_server(tmp_path_factory) -> Iterator[Sshd]:
    """One sshd for a test module; skipped only when the OpenSSH binaries are not installed."""
    missing = missing_tools()
    if missing:
        pytest.skip(f"OpenSSH tools missing ({missing}): apt-get install openssh-server openssh-client")
    server, proc = start_sshd(tmp_path_factory.mktemp("sshd"))
    try:
        yield server
    finally:
        stop(proc)
