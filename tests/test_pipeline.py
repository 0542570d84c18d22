"""The pass protocol: registry, config round trip with unknown keys rejected, the runner and its instruments."""
from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import tomllib
import tomli_w
import torch

from deploy.core.errors import ConfigError, DataError
from deploy.core.spec import InputSpec
from deploy.core.passes import (PASSES, Context, PassTiming, State, config_from_dict, config_to_dict,
                             load_builtin_passes, make_pass, register_pass, run_pipeline)
from deploy.targets.target import resolve


@dataclass(frozen=True)
class ScaleConfig:
    factor: float = 2.0
    layers: tuple[str, ...] = ()

    def __post_init__(self):
        if self.factor <= 0:
            raise ValueError("factor must be positive")


if "test-scale" not in PASSES:
    @register_pass("test-scale", ScaleConfig, needs_calibration=False, invalidates=("stats-a",))
    class ScalePass:
        def __init__(self, config: ScaleConfig):
            self.config = config

        def run(self, state: State, ctx: Context) -> State:
            with torch.no_grad():
                for param in state.module.parameters():
                    param.mul_(self.config.factor)
            state.record(self.name, "decision", factor=self.config.factor)
            return state

    @register_pass("test-needs-data", ScaleConfig, needs_calibration=True)
    class NeedsData(ScalePass):
        pass


def _state():
    return State(torch.nn.Linear(2, 2), [InputSpec("x", ("batch", 2))], resolve("cpu"))


def test_the_builtin_passes_are_registered():
    assert {"prune", "lowrank", "quantize"} <= set(load_builtin_passes())


@pytest.mark.parametrize("name", sorted(load_builtin_passes()))
def test_every_registered_pass_round_trips_through_toml_and_json(name):
    pass_ = make_pass(name)
    entry = config_to_dict(pass_)
    assert set(entry) == {"type", "version", "data"}
    via_json = config_from_dict(json.loads(json.dumps(entry)))
    via_toml = config_from_dict(tomllib.loads(tomli_w.dumps(entry)))
    assert via_json.config == pass_.config == via_toml.config


def test_unknown_keys_are_rejected_with_a_suggestion():
    with pytest.raises(ConfigError, match="unknown key 'facter'.*did you mean 'factor'"):
        config_from_dict({"type": "test-scale", "version": 1, "data": {"facter": 3}})
    with pytest.raises(ConfigError, match="unknown key 'extra'"):
        config_from_dict({"type": "test-scale", "version": 1, "data": {}, "extra": 1})


def test_wrong_types_and_invalid_values_are_rejected():
    with pytest.raises(ConfigError, match="expected float"):
        config_from_dict({"type": "test-scale", "data": {"factor": "big"}})
    with pytest.raises(ConfigError, match="factor must be positive"):
        config_from_dict({"type": "test-scale", "data": {"factor": -1.0}})
    with pytest.raises(ConfigError, match="version 9"):
        config_from_dict({"type": "test-scale", "version": 9, "data": {}})


def test_unknown_pass_lists_the_known_ones():
    with pytest.raises(ConfigError, match="did you mean 'test-scale'"):
        make_pass("test-scal")


def test_runner_applies_passes_records_and_times_them():
    state = _state()
    before = state.module.weight.detach().clone()
    ctx = Context(instruments=[PassTiming()], stats={"stats-a": 1, "stats-b": 2})
    state = run_pipeline([make_pass("test-scale", ScaleConfig(factor=3.0))], state, ctx)
    torch.testing.assert_close(state.module.weight, before * 3)
    kinds = [(r.source, r.kind) for r in state.records]
    assert kinds == [("test-scale", "decision"), ("test-scale", "timing")]
    assert ctx.stats == {"stats-b": 2}  # the declared invalidation ran, the rest stayed


def test_runner_checks_declared_needs():
    with pytest.raises(DataError, match="needs calibration data"):
        run_pipeline([make_pass("test-needs-data")], _state(), Context())


def test_register_pass_demands_a_frozen_config():
    @dataclass
    class Mutable:
        x: int = 1

    with pytest.raises(TypeError, match="frozen"):
        register_pass("test-mutable", Mutable)
