"""The one on-disk cache folder (sensitivity curves, latency tables, layer tables). `deploy cache clear` empties it.

Default `~/.cache/deploy`; the environment variable DEPLOY_CACHE_DIR moves it (tests point it at a temp folder).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any


def cache_dir() -> Path:
    """The cache folder, created on first use; one clear line (exit 2) when it cannot be."""
    from deploy.core.errors import UserInputError

    named = os.environ.get("DEPLOY_CACHE_DIR")
    root = named or os.path.join(os.path.expanduser("~"), ".cache", "deploy")
    where = f"DEPLOY_CACHE_DIR={named}" if named else f"the cache folder {root}"
    path = Path(root)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UserInputError(f"{where} is a file, not a folder", "point DEPLOY_CACHE_DIR at a folder") from None
    except OSError as exc:
        raise UserInputError(f"cannot create {where} ({exc.strerror})",
                             "point DEPLOY_CACHE_DIR at a folder you can write") from None
    if not path.is_dir():
        raise UserInputError(f"{where} is a file, not a folder", "point DEPLOY_CACHE_DIR at a folder")
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserInputError(f"{where} is not writable", "point DEPLOY_CACHE_DIR at a folder you can write")
    return path


def cache_size() -> tuple[int, int]:
    """(files, bytes) held in the cache."""
    files = [p for p in cache_dir().rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def clear_cache() -> tuple[int, int]:
    """Remove everything in the cache folder; returns what was removed as (files, bytes)."""
    removed = cache_size()
    root = cache_dir()
    for child in root.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
    return removed


def model_hash(module: Any) -> str:
    """Hash of an nn.Module's state_dict names, shapes, dtypes and bytes: the same weights give the same hash (the
    key of every cache entry that depends on a model's weights)."""
    import hashlib

    import torch

    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]
