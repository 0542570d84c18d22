"""The one on-disk cache folder (sensitivity curves, latency tables, layer tables). `deploy cache clear` empties it.

Default `~/.cache/deploy`; the environment variable DEPLOY_CACHE_DIR moves it (tests point it at a temp folder).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path


def cache_dir() -> Path:
    root = os.environ.get("DEPLOY_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "deploy")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
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
