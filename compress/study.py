"""`deploy search`: a multi-objective optuna study (latency down, fidelity up) with hardware in the loop.

Studies live in optuna's RDB storage: a SQLite file by default, so a search killed with `kill -9` resumes with every
completed trial intact; the killed trial (left RUNNING, its heartbeat stopped) is failed after the grace period and
retried with the same parameters. Any database URL (PostgreSQL) lets several workers on several machines share one
study; the host-wide measurement lock keeps workers on one host from timing each other.
Artifacts are keyed by a hash of the trial's parameters and written atomically, so a retried or repeated trial
never leaves a duplicate or a partial folder.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from deploy.core.errors import UserInputError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StudyConfig:
    trials: int = 20
    timeout_s: float | None = None
    storage: str | None = None  # None: sqlite:///<out>/study.db
    study_name: str = "deploy-search"
    seed: int = 0
    heartbeat_s: int = 1
    grace_s: int = 4

    def __post_init__(self) -> None:
        if self.trials < 1:
            raise ValueError(f"trials must be >= 1, got {self.trials}")
        if self.timeout_s is not None and self.timeout_s <= 0:
            raise ValueError(f"timeout must be positive, got {self.timeout_s}")
        if self.heartbeat_s < 1 or self.grace_s <= self.heartbeat_s:
            raise ValueError("heartbeat must be >= 1 s and the grace period longer than the heartbeat")


@dataclass
class TrialOutcome:
    latency_ms: float
    fidelity: float
    artifact: str  # folder holding the trial's exported model
    details: dict[str, Any] = field(default_factory=dict)  # JSON-ready: plan, measurement window, ...


class StudySpace(Protocol):
    """What to search: how a trial draws parameters, and allocator solutions to try first."""

    def suggest(self, trial: Any) -> dict[str, Any]: ...

    def seeds(self) -> list[dict[str, Any]]: ...


Evaluate = Callable[[dict[str, Any], Path], TrialOutcome]  # (params, folder to fill) -> outcome


def params_key(params: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:16]


def storage_url(config: StudyConfig, out_dir: Path) -> str:
    return config.storage or f"sqlite:///{(out_dir / 'study.db').resolve()}"


def open_study(config: StudyConfig, out_dir: Path) -> Any:
    import warnings

    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    url = storage_url(config, out_dir)
    for attempt in range(5):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # heartbeats are marked experimental in optuna
                storage = RDBStorage(url, heartbeat_interval=config.heartbeat_s, grace_period=config.grace_s,
                                     heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=3),
                                     engine_kwargs=None if url.startswith("sqlite") else {"pool_pre_ping": True})
            break
        except Exception as exc:
            # two workers creating the schema at once: one loses the race and simply tries again
            if "duplicate key" in str(exc) or "already exists" in str(exc):
                time.sleep(0.5 + attempt)
                continue
            raise UserInputError(f"cannot open the study storage {url} ({' '.join(str(exc).split())[:160]})",
                                 "check the --storage URL, the server and its credentials") from None
    else:
        raise UserInputError(f"cannot create the study tables in {url}", "try again")
    sampler = optuna.samplers.NSGAIISampler(seed=config.seed)
    return optuna.create_study(study_name=config.study_name, storage=storage, load_if_exists=True,
                               directions=["minimize", "maximize"], sampler=sampler)


def check_identity(study: Any, identity: dict[str, str]) -> None:
    """A study holds trials of one model on one target: resuming or joining it with another is refused (exit 2),
    naming what differs. A new study records what it is for."""
    stored = {k[len("deploy."):]: v for k, v in study.user_attrs.items() if k.startswith("deploy.")}
    if not stored and not study.get_trials(deepcopy=False):
        for key, value in identity.items():
            study.set_user_attr(f"deploy.{key}", value)
        return
    differ = [f"{k} {stored.get(k)!r} in the study, {v!r} now" for k, v in identity.items() if stored.get(k) != v]
    if differ:
        raise UserInputError(f"the study '{study.study_name}' was made for another run: {'; '.join(differ[:3])}",
                             "use another -o (or --study-name) for this model and target, or resume with the "
                             "same ones")


def _artifact(out_dir: Path, params: dict[str, Any], evaluate: Evaluate) -> TrialOutcome:
    """Evaluate into a temporary folder; publish it under the parameters' key only when complete."""
    trials_dir = out_dir / "trials"
    trials_dir.mkdir(parents=True, exist_ok=True)
    final = trials_dir / params_key(params)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=trials_dir))
    try:
        outcome = evaluate(params, tmp)
        if final.exists():  # the same parameters were tried before: keep the first artifact
            shutil.rmtree(tmp)
        else:
            from deploy.core.atomic_io import give_umask_mode

            give_umask_mode(tmp)
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    outcome.artifact = str(final)
    return outcome


def _clean_partials(out_dir: Path, older_than_s: float) -> None:
    """Folders of trials killed mid-way (never published) are removed on resume; a live worker's are younger."""
    for stale in (out_dir / "trials").glob(".*.partial-*"):
        if time.time() - stale.stat().st_mtime > older_than_s:
            shutil.rmtree(stale, ignore_errors=True)


def _recover_killed(study: Any, config: StudyConfig) -> int:
    """Trials left RUNNING by a killed worker are failed once their heartbeat is stale, so they are retried.

    Watch the RUNNING trials for one grace period: a live worker's trial finishes (and leaves the watch list), a
    killed one goes stale and is failed here. Returns how many were failed."""
    import warnings

    from optuna.storages import fail_stale_trials
    from optuna.trial import TrialState

    watch = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    failed = 0
    deadline = time.monotonic() + config.grace_s + 2 * config.heartbeat_s
    while watch and time.monotonic() < deadline:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fail_stale_trials(study)
        states = {t.number: t.state for t in study.get_trials(deepcopy=False)}
        failed += sum(1 for n in watch if states.get(n) == TrialState.FAIL)
        watch = {n for n in watch if states.get(n) == TrialState.RUNNING}
        if watch:
            time.sleep(0.25)
    return failed


def run_study(space: StudySpace, evaluate: Evaluate, out_dir: str | Path, config: StudyConfig = StudyConfig(),
               progress: Callable[..., None] | None = None, identity: dict[str, str] | None = None
               ) -> dict[str, Any]:
    """Run (or resume, or join) the study until `config.trials` trials have completed; returns the front.
    `progress(step, fraction, done, total, extra)` hears of every finished trial, with the best so far."""
    import optuna
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    study = open_study(config, out_dir)
    check_identity(study, identity or {})
    retried = _recover_killed(study, config)
    _clean_partials(out_dir, older_than_s=config.grace_s)
    if not study.get_trials(deepcopy=False):
        for params in space.seeds():
            study.enqueue_trial(params, skip_if_exists=True)

    def objective(trial: Any) -> tuple[float, float]:
        params = space.suggest(trial)
        outcome = _artifact(out_dir, params, evaluate)
        trial.set_user_attr("artifact", outcome.artifact)
        trial.set_user_attr("params", params)
        trial.set_user_attr("details", outcome.details)
        return outcome.latency_ms, outcome.fidelity

    def report(study: Any, trial: Any) -> None:
        if progress:
            complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            best = max(complete, key=lambda t: (t.values[1], -t.values[0]), default=None)
            extra = f"best so far {best.values[1]:.4g} fidelity at {best.values[0]:.4g} ms" if best else ""
            progress("trials", min(1.0, len(complete) / config.trials), len(complete), config.trials, extra)

    done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    if progress:
        progress("trials", min(1.0, done / config.trials), done, config.trials, "")
    if done < config.trials:
        study.optimize(objective, n_trials=config.trials - done + retried, timeout=config.timeout_s,
                       callbacks=[MaxTrialsCallback(config.trials, states=(TrialState.COMPLETE,)), report],
                       catch=())
    return summarize_study(study)


def summarize_study(study: Any) -> dict[str, Any]:
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    rows = [{"number": t.number, "latency_ms": t.values[0], "fidelity": t.values[1],
             "artifact": t.user_attrs.get("artifact"), "params": t.user_attrs.get("params", t.params),
             "details": t.user_attrs.get("details", {})} for t in complete]
    front_numbers = {t.number for t in study.best_trials}
    for row in rows:
        row["pareto"] = row["number"] in front_numbers
    front = sorted((r for r in rows if r["pareto"]), key=lambda r: r["latency_ms"])
    failed = len(study.get_trials(deepcopy=False, states=(TrialState.FAIL,)))
    return {"study": study.study_name, "completed": len(rows), "failed": failed, "trials": rows, "front": front}
