"""The `recover` pass: distillation from the original model after the structural passes (deploy.compress.distill).

It records the steps it ran, the step whose weights it kept and the schedule's horizon (a run bound by its minutes
measures it), so that a plan replayed from deploy.toml runs exactly the kept steps on the same schedule, with the
same seed and no time limit, and gets the same weights.
"""
from __future__ import annotations

import dataclasses

from deploy.compress.distill import DistillConfig, distill
from deploy.core.errors import ConfigError
from deploy.core.passes import Context, State, register_pass

UNLIMITED_MINUTES = 1e6  # a replay is bound by its step count, never by the clock


def replay_config(config: DistillConfig, kept_step: int, horizon: int = 0, rate: float = 0.0
                  ) -> DistillConfig | None:
    """The config that reproduces a run whose best weights were those of step `kept_step`, on the schedule it ran
    (`horizon`: what a run bound by its minutes measured) at the peak rate it started at (`rate`: the probes'
    winner; the replay probes nothing); None: it kept the weights it started from, so replaying it changes
    nothing."""
    if kept_step < 1:
        return None
    return dataclasses.replace(config, steps=kept_step, recover_minutes=UNLIMITED_MINUTES, patience=kept_step + 1,
                               horizon=config.horizon or config.steps or horizon, lr=rate or config.lr, rates=())


def default_minutes(macs: int) -> float:
    """Recovery's time budget when none is asked: 2 minutes per GMAC of one sample, at least 1, at most 10."""
    return min(10.0, max(1.0, 2.0 * macs / 1e9))


@register_pass("recover", DistillConfig, version=5, needs_calibration=True, invalidates=("sensitivity", "quantize"))
class RecoverPass:
    """Distils the compressed module towards the original (the state's `original`) on calibration data."""

    def __init__(self, config: DistillConfig):
        self.config = config

    def run(self, state: State, ctx: Context) -> State:
        if state.original is None:
            raise ConfigError("the recover pass needs the original model to distil from", "run it through deploy")
        from deploy.targets.target import has_bf16

        if self.config.bf16 and not has_bf16():  # a plan recorded on a CPU with bf16, replayed on one without
            state.record(self.name, "warning", message="recovery trains in bf16 as the plan says, but this CPU has no "
                         "bf16 in hardware: it is emulated (slow), and the weights may differ from the run's")
        result = distill(state.module, state.original, ctx.calibration, self.config)
        state.record(self.name, "decision", **dataclasses.asdict(result))
        return state
