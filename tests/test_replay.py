"""deploy.toml is the plan: a header and the pass configs. Replaying it runs those passes through run_pipeline, so
an edit to one entry changes exactly what that entry says, a user's own registered pass runs where it is listed,
and an unedited replay rebuilds the same model."""
from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tomli_w

from conftest import FAST, run_cli


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return {"DEPLOY_CACHE_DIR": str(cache), "DEPLOY_MEASURE_LOCK": str(cache / "measure.lock")}


@pytest.fixture
def sized_run(example_runs):
    """conftest's size budget the example meets only by pruning and int8: prune, recover, quantize and export."""
    run = example_runs["sized"]
    assert run.returncode == 0, run.stderr
    return run.out, run.report()


def _ort(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def _plan(out: Path) -> dict:
    return tomllib.loads((out / "deploy.toml").read_text())


def test_deploy_toml_is_a_header_and_the_pass_list(sized_run):
    out, report = sized_run
    plan = _plan(out)
    header = plan["header"]
    assert header["schema"] == "deploy.plan" and header["schema_version"] == 2
    assert header["model_sha256"] == report["model"]["sha256"] and header["target"] == report["target"]["name"]
    assert header["budget"]["kind"] == "size_mb" and header["layers_digest"]
    assert [p["type"] for p in plan["passes"]] == ["prune", "recover", "quantize", "export"]
    recover = next(p for p in plan["passes"] if p["type"] == "recover")["data"]
    kept = report["recovery"]["kept_step"]
    assert recover["steps"] == kept and recover["seed"] == 0 and recover["recover_minutes"] >= 1e5
    from deploy.targets.target import has_bf16  # no flag: recovery trains in bf16 where this CPU runs it, and says so

    assert recover["bf16"] is has_bf16() and report["recovery"]["precision"] == ("bf16" if has_bf16() else "fp32")
    assert report["decisions"]["passes"] == ["prune", "recover", "quantize", "export"]


def test_replay_rebuilds_the_same_model(sized_run, tmp_path, env):
    out, _ = sized_run
    replay = tmp_path / "replay"
    result = run_cli("compress", "--example", "--plan", out / "deploy.toml", "-o", replay, *FAST, env=env)
    assert result.returncode == 0, result.stderr
    x = np.random.default_rng(0).normal(size=(4, 1, 32, 32)).astype(np.float32)
    np.testing.assert_allclose(_ort(out / "model.onnx", x), _ort(replay / "model.onnx", x), atol=1e-5, rtol=0)
    assert (replay / "deploy.toml").read_text() == (out / "deploy.toml").read_text()


def test_editing_one_layers_precision_changes_exactly_that_layer(sized_run, tmp_path, env):
    out, report = sized_run
    plan = _plan(out)
    labels = next(p for p in plan["passes"] if p["type"] == "quantize")["data"]["labels"]
    layer = next(name for name, label in labels.items() if "a8" in label)  # an int8 layer (w8a8, or w7a8 here)
    labels[layer] = "fp32"
    plan["header"]["budget"]["value"] = 1.0  # a float layer is bigger: judge the edited model against a roomy size
    edited = tmp_path / "edited.toml"
    edited.write_text(tomli_w.dumps(plan))
    again_out = tmp_path / "edited"
    result = run_cli("compress", "--example", "--plan", edited, "-o", again_out, *FAST, "--json", env=env)
    assert result.returncode == 0, result.stderr
    again = json.loads(result.stdout)
    before = {row["layer"]: row for row in report["layers"]}
    after = {row["layer"]: row for row in again["layers"]}
    changed = [n for n in before if before[n]["precision"] != after[n]["precision"]]
    assert changed == [layer] and after[layer]["precision"] == "fp32"
    assert all(before[n]["params_after"] == after[n]["params_after"] for n in before)  # the pruning is the same


def test_a_precision_the_target_does_not_run_is_refused(sized_run, tmp_path, env):
    """A plan's label that none of the target's options has (here TensorRT's symmetric activations on a CPU; or a
    plan made before the profile's int8 weights changed bits) is refused, not run in float."""
    out, _ = sized_run
    plan = _plan(out)
    labels = next(p for p in plan["passes"] if p["type"] == "quantize")["data"]["labels"]
    labels[next(iter(labels))] = "w8a8-pc-ss"
    edited = tmp_path / "foreign.toml"
    edited.write_text(tomli_w.dumps(plan))
    result = run_cli("compress", "--example", "--plan", edited, "-o", tmp_path / "foreign", *FAST, env=env)
    assert result.returncode == 2 and not (tmp_path / "foreign").exists()
    assert result.stderr.strip().splitlines()[-1].startswith("error: the precision plan asks for w8a8-pc-ss, which")


@dataclass(frozen=True)
class MarkerConfig:
    path: str = ""


def test_a_registered_pass_in_deploy_toml_runs(sized_run, tmp_path, env, monkeypatch):
    """A pass of the user's own, registered with the decorator and listed in deploy.toml, runs in its place."""
    from deploy.compiler.job import CompressRequest, compress
    from deploy.core.passes import PASSES, register_pass

    if "test-marker" not in PASSES:
        @register_pass("test-marker", MarkerConfig)
        class MarkerPass:
            def __init__(self, config: MarkerConfig):
                self.config = config

            def run(self, state, ctx):
                Path(self.config.path).write_text(f"{type(state.module).__name__} {sorted(state.attached)}")
                return state

    out, _ = sized_run
    plan = _plan(out)
    marker = tmp_path / "ran.txt"
    plan["passes"].insert(len(plan["passes"]) - 1, {"type": "test-marker", "version": 1, "data": {"path": str(marker)}})
    edited = tmp_path / "with-marker.toml"
    edited.write_text(tomli_w.dumps(plan))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    report = compress(CompressRequest(example=True, plan=str(edited), out=str(tmp_path / "marked"), measure_seconds=0.2))
    assert marker.read_text().startswith("DigitsCNN") and "quant_plan" in marker.read_text()
    assert report["decisions"]["passes"] == ["prune", "recover", "quantize", "test-marker", "export"]


def test_a_plan_for_another_target_or_an_older_deploy_is_refused(sized_run, tmp_path, env):
    out, _ = sized_run
    plan = _plan(out)
    plan["header"]["target"] = "cpu-avx2-elsewhere"
    other = tmp_path / "other.toml"
    other.write_text(tomli_w.dumps(plan))
    result = run_cli("compress", "--example", "--plan", other, "-o", tmp_path / "x", env=env)
    assert result.returncode == 2 and "made for target cpu-avx2-elsewhere" in result.stderr
    old = tmp_path / "old.toml"
    old.write_text('deploy_plan_version = 1\n[request]\nmodel = "m.pt"\n[decisions]\nprecision = "int8"\n')
    result = run_cli("compress", "--example", "--plan", old, "-o", tmp_path / "y", env=env)
    assert result.returncode == 2 and "schema version 1" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "y").exists()


def test_editing_one_rank_factorizes_exactly_that_layer(sized_run, tmp_path, env):
    """A lowrank entry with one layer's rank, added to the plan, factorizes that layer and nothing else."""
    out, report = sized_run
    plan = _plan(out)
    plan["passes"].insert(1, {"type": "lowrank", "version": 1, "data": {"cost": "macs", "ranks": {"fc": 4}}})
    quantize = next(p for p in plan["passes"] if p["type"] == "quantize")["data"]
    quantize["labels"].pop("fc", None)  # fc becomes two thin layers (fc.0, fc.1), left in float
    plan["header"]["budget"]["value"] = 1.0
    edited = tmp_path / "ranked.toml"
    edited.write_text(tomli_w.dumps(plan))
    result = run_cli("compress", "--example", "--plan", edited, "-o", tmp_path / "ranked", *FAST, "--json", env=env)
    assert result.returncode == 0, result.stderr
    again = json.loads(result.stdout)
    before = {row["layer"]: row for row in report["layers"]}
    after = {row["layer"]: row for row in again["layers"]}
    changed = [n for n in before if (before[n]["params_after"], before[n]["precision"]) !=
               (after[n]["params_after"], after[n]["precision"])]
    assert changed == ["fc"] and again["decisions"]["lowrank"]["ranks"] == {"fc": 4}
    assert after["fc"]["params_after"] < before["fc"]["params_after"]
    assert "lowrank" in again["decisions"]["passes"]


def test_only_an_int4_group_wider_than_a_pruned_linear_may_be_absent():
    """A replayed label the layer's options lack would run in float unasked, so it is refused, with one exception:
    an int4 group wider than a Linear pruning left narrower, on a target that runs int4 (the plan search priced
    that layer in float too)."""
    from types import SimpleNamespace as NS

    from deploy.compress.quant.apply import refused_labels
    from deploy.compress.quant.space import LayerShape, layer_space
    from deploy.profiles import load_builtin

    shapes = [LayerShape("fc", "linear", 24, 16), LayerShape("conv", "conv", 72, 16)]
    for name, runs_int4 in (("cpu-avx2", True), ("cpu-avx2-openvino", False)):
        profile = load_builtin(name)
        prep = NS(shapes=shapes, spaces={s.name: layer_space(s, profile) for s in shapes})
        int8 = f"w{profile.int8_weight_bits}a8-pc-sa"
        assert refused_labels(prep, {"fc": int8, "conv": int8}, profile) == []
        assert refused_labels(prep, {"fc": "w4-g32-a"}, profile) == ([] if runs_int4 else [("fc", "w4-g32-a")])
        assert refused_labels(prep, {"conv": "w4-g32-a"}, profile) == [("conv", "w4-g32-a")]  # no int4 conv
        assert refused_labels(prep, {"fc": "w4-g16-a"}, profile) == [("fc", "w4-g16-a")]  # 16 fits 24: not narrow
        assert refused_labels(prep, {"fc": "w8a8-pc-ss"}, profile) == [("fc", "w8a8-pc-ss")]
