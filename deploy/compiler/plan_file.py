"""deploy.toml: a header naming what the plan was made for, then the list of pass configs that rebuild the model.

    [header]
    schema = "deploy.plan"            schema_version = 2        deploy_version = "0.1.0"
    model_sha256 = "..."              layers_digest = "..."     target = "cpu-avx512-vnni"
    [header.budget]                   (what was asked: the verdict of a replay is judged against it)
    [[passes]]  type = "prune"     version = 2   [passes.data] removed = {...}
    [[passes]]  type = "recover"   ...           (exactly the steps the run kept, no time limit)
    [[passes]]  type = "quantize"  ...           [passes.data.labels] "layer1.conv1" = "w8a8-pc-sa"
    [[passes]]  type = "export"    ...

Replaying (`deploy compress --plan deploy.toml`) runs these passes through `run_pipeline`; any registered pass,
a user's own included, may appear in the list. A header that does not match the model or the target is refused.
"""
from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import tomli_w

from deploy import __version__
from deploy.core.errors import ConfigError
from deploy.core.passes import config_from_dict, config_to_dict

SCHEMA = "deploy.plan"
SCHEMA_VERSION = 2
REPLAY_HINT = "replay a deploy.toml with the model and target it was made for, or run without --plan"


def _clean(value: Any) -> Any:
    """TOML has no null and wants string keys: drop Nones, stringify keys, tuples to lists."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value if v is not None]
    if isinstance(value, Path):
        return str(value)
    return value


def header_for(model_sha256: str, layers_digest: str, target: str, budget: dict[str, Any]) -> dict[str, Any]:
    return {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "deploy_version": __version__,
            "model_sha256": model_sha256, "layers_digest": layers_digest, "target": target, "budget": budget}


def dumps_plan(header: dict[str, Any], passes: list[Any]) -> str:
    return tomli_w.dumps(_clean({"header": header, "passes": [config_to_dict(p) for p in passes]}))


def load_plan(path: str | Path) -> tuple[dict[str, Any], list[Any]]:
    """(header, passes) of a deploy.toml; one line naming what is wrong otherwise."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"plan file {path} does not exist", "give the deploy.toml a previous run wrote") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, IsADirectoryError) as exc:
        raise ConfigError(f"{path}: not a valid deploy.toml ({' '.join(str(exc).split())[:100]})",
                          "give the deploy.toml a previous run wrote") from None
    if "header" not in data and "deploy_plan_version" in data:
        raise ConfigError(f"{path} is a deploy.toml of schema version {data['deploy_plan_version']} (deploy before "
                          f"its pass pipeline); this deploy reads version {SCHEMA_VERSION}",
                          "re-run the compression to write a current plan")
    header = data.get("header")
    if not isinstance(header, dict) or header.get("schema") != SCHEMA:
        raise ConfigError(f"{path}: no [header] with schema = \"{SCHEMA}\"", "give the deploy.toml a previous run wrote")
    if header.get("schema_version") != SCHEMA_VERSION:
        raise ConfigError(f"{path}: deploy.toml schema version {header.get('schema_version')!r} (written by deploy "
                          f"{header.get('deploy_version', '?')}); this deploy reads version {SCHEMA_VERSION}",
                          "re-run the compression with this deploy to write a current plan")
    entries = data.get("passes")
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{path}: no [[passes]] to run", "give the deploy.toml a previous run wrote")
    passes = []
    for index, entry in enumerate(entries):
        try:
            passes.append(config_from_dict(entry))
        except ConfigError as exc:
            raise ConfigError(f"{path}: pass {index + 1}: {exc.message}", exc.hint) from None
    return header, passes


def check_header(path: str | Path, header: dict[str, Any], model_sha256: str, layers_digest: str, target: str) -> None:
    """Refuse (exit 2) a plan made for another model (weights or layers) or another target, naming the difference."""
    if header.get("layers_digest") and header["layers_digest"] != layers_digest:
        raise ConfigError(f"{path} was made for a model with other layers (layer digest {header['layers_digest']}, "
                          f"this model {layers_digest})", REPLAY_HINT)
    if header.get("model_sha256") and model_sha256 and header["model_sha256"] != model_sha256:
        raise ConfigError(f"{path} was made for model file sha256 {header['model_sha256'][:12]}..., this one is "
                          f"{model_sha256[:12]}...", REPLAY_HINT)
    if header.get("target") and header["target"] != target:
        raise ConfigError(f"{path} was made for target {header['target']}, this run is for {target}", REPLAY_HINT)
