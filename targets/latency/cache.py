"""The on-disk cache of latency tables and fitted latency models: JSON files under one folder.

A cached number is only reused in the environment it was measured in, so every key carries `env_key()`: a short
hash of this machine's fingerprint (CPU, flags, cores, runtime versions). DEPLOY_CACHE_DIR moves the folder.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from deploy.core.atomic_io import atomic_write_text
from deploy.core.cache import cache_dir


def env_key(threads: int | None = None) -> str:
    """12 hex digits naming this machine + software (+ thread count): different keys never share numbers."""
    from deploy.targets.measure.fingerprint import fingerprint

    data = fingerprint(threads)
    data.pop("profile", None)
    return short_hash(data)


def short_hash(data: Any, digits: int = 12) -> str:
    text = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:digits]


def cache_path(kind: str, key: str) -> Path:
    return cache_dir() / kind / f"{key}.json"


def read_json(kind: str, key: str) -> dict[str, Any] | None:
    """The cached document, or None when absent or unreadable (a broken cache file is only a cache miss)."""
    path = cache_path(kind, key)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_json(kind: str, key: str, data: dict[str, Any]) -> Path:
    """Write atomically (temp file + rename), so a reader never sees half a file."""
    return atomic_write_text(cache_path(kind, key), json.dumps(data, indent=1, sort_keys=True))
