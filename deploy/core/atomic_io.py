"""Writing results so that nothing partial is ever left behind: files and output folders appear whole or not at all.

Every file deploy writes goes through `atomic_path` (a temporary sibling renamed over the target); every output
folder through `atomic_output_dir`, which also takes a lock beside the folder (a second run on the same `-o`
stops at once, naming the first), removes what killed runs left there, and never lets the final rename replace
a folder that appeared meanwhile unless `--force` was given. Outputs get the permissions the umask allows, as
files written by `open()` would.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

from deploy.core import stop
from deploy.core.errors import OutputExistsError, UserInputError

PARTIAL = ".partial-"


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def give_umask_mode(path: Path) -> None:
    """mkstemp/mkdtemp create 0600/0700; give the file or folder tree what the umask allows, like open()."""
    mask = _umask()
    if path.is_dir():
        for root, dirs, files in os.walk(path):
            os.chmod(root, 0o777 & ~mask)
            for name in files:
                os.chmod(os.path.join(root, name), 0o666 & ~mask)
    elif path.exists():
        os.chmod(path, 0o666 & ~mask)


def check_writable_file(path: str | Path, flag: str) -> Path:
    """Refuse, before any work, a file path that cannot be written: its folder is a file, missing and not
    creatable, or not writable; or the path is a folder."""
    path = Path(path)
    if path.is_dir():
        raise UserInputError(f"{flag} {path} is a folder", f"give {flag} a file name")
    _check_parent(path, flag)
    return path


def _check_parent(path: Path, flag: str) -> None:
    parent = path.parent if str(path.parent) else Path(".")
    ancestor = parent
    while not ancestor.exists():
        if ancestor.is_symlink():
            raise UserInputError(f"{flag} {path}: {ancestor} is a broken link", f"choose another {flag}")
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserInputError(f"{flag} {path}: {ancestor} is a file, not a folder", f"choose another {flag}")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UserInputError(f"{flag} {path}: {ancestor} is not writable (permission denied)",
                             f"choose a {flag} in a folder you can write")


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """A temporary path beside `path` for a writer that wants a file name; renamed over `path` on success,
    removed on any failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        give_umask_mode(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, data: Any) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, default=str, allow_nan=True) + "\n")


# --- output folders -----------------------------------------------------------------------------------------------

def check_output_dir(path: str | Path, force: bool, inputs: Iterable[str | Path | None] = ()) -> Path:
    """Refuse, before any work, an output folder that cannot be made or must not be replaced."""
    path = Path(path)
    resolved = path.resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise UserInputError(f"-o {path} is the folder you are in (or holds it): the output folder is replaced as a "
                             "whole", "choose a new folder, e.g. -o out")
    if resolved == Path(resolved.anchor):
        raise UserInputError(f"-o {path} is the root of the file system", "choose a new folder, e.g. -o out")
    for item in inputs:
        if item and (Path(item).resolve() == resolved or resolved in Path(item).resolve().parents):
            raise UserInputError(f"-o {path} holds an input of this run ({item})",
                                 "choose an output folder that does not hold the model or its data")
    if path.exists() and not force:
        kind = "folder" if path.is_dir() else "file"
        raise OutputExistsError(f"output {kind} {path} already exists", "pass --force to replace it, or choose another -o")
    _check_parent(path, "-o")
    return path


@contextlib.contextmanager
def output_lock(path: Path) -> Iterator[None]:
    """An exclusive lock beside the output folder, held for the whole run; a second run stops at once."""
    import fcntl

    lock_file = path.parent / f".{path.name}.lock"
    try:
        handle = open(lock_file, "a+")
    except OSError as exc:
        raise UserInputError(f"cannot create the lock {lock_file} ({exc.strerror})",
                             "choose a -o in a folder you can write") from None
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise OutputExistsError(f"another deploy run is writing {path} ({holder})",
                                    "wait for it to finish, or choose another -o") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}")
        handle.flush()
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                lock_file.unlink()
    finally:
        handle.close()


def remove_stale(path: Path) -> None:
    """What killed runs on this -o left beside it (partial and old folders); only called under the lock."""
    for leftover in path.parent.glob(f".{path.name}{PARTIAL}*"):
        _remove(leftover)
    for leftover in path.parent.glob(f".{path.name}.old-*"):
        _remove(leftover)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _rename_noreplace(src: Path, dst: Path) -> bool:
    """Rename unless `dst` exists (renameat2 RENAME_NOREPLACE where the kernel has it); False when it exists."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        renameat2 = None
    if renameat2 is not None:
        at_fdcwd, noreplace = -100, 1
        if renameat2(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), noreplace) == 0:
            return True
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            return False
        if err not in (errno.EINVAL, errno.ENOSYS):  # other failures are real; EINVAL: the file system lacks it
            raise OSError(err, os.strerror(err), str(dst))
    if dst.exists() or dst.is_symlink():
        return False
    os.rename(src, dst)
    return True


@contextlib.contextmanager
def atomic_output_dir(path: str | Path, force: bool = False, inputs: Iterable[str | Path | None] = ()
                      ) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success it becomes `path`, on any failure or signal it is
    removed. The folder is locked for the run; leftovers of killed runs on the same path are removed first."""
    path = check_output_dir(path, force, inputs)
    path.parent.mkdir(parents=True, exist_ok=True)
    with output_lock(path):
        remove_stale(path)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}{PARTIAL}", dir=path.parent))
        try:
            yield tmp
            stop.check()  # a stop request that was swallowed on the way: never publish that run's output
            give_umask_mode(tmp)
            _publish(tmp, path, force)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def _publish(tmp: Path, path: Path, force: bool) -> None:
    if _rename_noreplace(tmp, path):
        return
    if not force:
        kept = path.with_name(f"{path.name}.deploy-{os.getpid()}")
        os.rename(tmp, kept)
        raise OutputExistsError(f"{path} appeared while this run worked (another program wrote it); this run's "
                                f"result is in {kept}", "move one of them, or pass --force to replace")
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    os.replace(path, old)
    os.replace(tmp, path)
    _remove(old)
