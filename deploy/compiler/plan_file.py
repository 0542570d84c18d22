"""deploy.toml: the resolved plan of a run, enough to rebuild the same model without re-measuring.

Plain TOML: the request (model, target, budget), every pass config as {type, version, data}, and the decisions
(units pruned and which elements, precision plan, recovery settings).
"""
from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import tomli_w

from deploy.core.errors import ConfigError

PLAN_VERSION = 1


def _clean(value: Any) -> Any:
    """TOML has no null and wants string keys: drop Nones, stringify keys, tuples to lists."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value if v is not None]
    if isinstance(value, Path):
        return str(value)
    return value


def dumps_plan(plan: dict[str, Any]) -> str:
    return tomli_w.dumps(_clean({"deploy_plan_version": PLAN_VERSION, **plan}))


def load_plan(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"plan file {path} does not exist", "give the deploy.toml a previous run wrote") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})", "give the deploy.toml a previous run wrote") from None
    version = data.pop("deploy_plan_version", None)
    if version != PLAN_VERSION:
        raise ConfigError(f"{path}: plan version {version!r}, this deploy reads version {PLAN_VERSION}",
                          "re-run the compression to write a current plan")
    for key in ("request", "decisions"):
        if key not in data:
            raise ConfigError(f"{path}: missing table [{key}]", "give the deploy.toml a previous run wrote")
    return data
