"""`deploy compress` end to end, as a user runs it: outputs, budgets, errors, replay."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli

FAST = ("--measure-seconds", "0.2", "--recover-steps", "16")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return {"DEPLOY_CACHE_DIR": str(cache), "DEPLOY_MEASURE_LOCK": str(cache / "measure.lock")}


@pytest.fixture(scope="module")
def example_run(tmp_path_factory, env):
    out = tmp_path_factory.mktemp("runs") / "example"
    result = run_cli("compress", "--example", "--target", "cpu", "-o", out, *FAST, env=env)
    assert result.returncode == 0, result.stderr
    return out, result


def _ort(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def test_example_writes_every_output(example_run):
    out, result = example_run
    assert {p.name for p in out.iterdir()} == {"model.onnx", "report.json", "report.html", "deploy.toml"}
    report = json.loads((out / "report.json").read_text())
    assert report["schema"] == "deploy.report" and report["latency_source"] == "measured"
    assert report["budget"]["kind"] == "default_floor" and report["budget"]["floor"] == ["top1_agreement", 0.99]
    # the fidelity reported is the exported model's, run in ONNX Runtime, on held-out data
    assert report["result"]["fidelity_detail"]["runtime"] == "onnxruntime"
    assert report["result"]["fidelity"] >= 0.99
    assert len(report["latency"]["result"]["samples_ms"]) >= 64  # raw samples are kept
    assert report["latency"]["comparison"]["ratio"] > 0
    assert report["candidates"] and any(c["chosen"] for c in report["candidates"])
    assert report["layers"] and "environment" in report
    assert "Latency vs fidelity" in (out / "report.html").read_text()


def test_existing_output_is_refused_without_force(example_run, env):
    out, _ = example_run
    result = run_cli("compress", "--example", "-o", out, *FAST, env=env)
    assert result.returncode == 2 and "already exists" in result.stderr and "--force" in result.stderr


def test_plan_replay_rebuilds_the_same_model(example_run, tmp_path, env):
    out, _ = example_run
    replay = tmp_path / "replay"
    result = run_cli("compress", "--example", "--plan", out / "deploy.toml", "-o", replay, *FAST, env=env)
    assert result.returncode == 0, result.stderr
    first = json.loads((out / "report.json").read_text())["decisions"]
    again = json.loads((replay / "report.json").read_text())["decisions"]
    assert first["precision"] == again["precision"] and first["prune"] == again["prune"]
    x = np.random.default_rng(0).normal(size=(4, 1, 32, 32)).astype(np.float32)
    np.testing.assert_allclose(_ort(out / "model.onnx", x), _ort(replay / "model.onnx", x), atol=1e-4)


def test_infeasible_budget_fails_fast_and_leaves_nothing(tmp_path, env):
    out = tmp_path / "never"
    result = run_cli("compress", "--example", "--budget-ms", "0.00001", "-o", out, *FAST, env=env)
    assert result.returncode == 2
    assert "fastest achievable" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".never")]


@pytest.mark.parametrize("flags, message", [
    (("--budget-ms", "1", "--speedup", "2"), "one budget flag"),
    (("--speedup", "0.5"), "--speedup must be at least 1"),
    (("--target", "jetsn"), "did you mean 'jetson'"),
])
def test_bad_flags_are_one_line_exit_2(tmp_path, env, flags, message):
    result = run_cli("compress", "--example", "-o", tmp_path / "x", *flags, *FAST, env=env)
    assert result.returncode == 2 and message in result.stderr
    assert not (tmp_path / "x").exists()


def test_compress_needs_calibration_data(tmp_path, model_files, env):
    result = run_cli("compress", model_files["state_dict"], "--arch", "deploy.examples.digits_cnn:digits_cnn",
                     "--input-shape", "image:batchx1x32x32", "-o", tmp_path / "x", env=env)
    assert result.returncode == 2 and "--calib" in result.stderr


def test_tiny_transformer_with_text_calibration(tmp_path, env):
    import torch

    from deploy.examples.docstring_corpus import write_corpus
    from deploy.examples.tiny_bert import build_tokenizer, tiny_bert

    build_tokenizer(tmp_path / "tok")
    write_corpus(tmp_path / "corpus.txt", 96)
    model = tiny_bert()
    torch.save(model.state_dict(), tmp_path / "bert.pt")
    out = tmp_path / "out"
    result = run_cli("compress", tmp_path / "bert.pt", "--arch", "deploy.examples.tiny_bert:tiny_bert",
                     "--input-shape", "input_ids:batchx32:int64", "--input-shape", "attention_mask:batchx32:int64",
                     "--calib", tmp_path / "corpus.txt", "--tokenizer", tmp_path / "tok", "--max-drop", "0.05",
                     "-o", out, *FAST, env=env)
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["fidelity_metric"] == "pooled_cosine"
    assert report["result"]["fidelity"] >= 0.95


def test_device_not_at_hand_gets_predicted_latency_with_a_band(tmp_path, env):
    out = tmp_path / "jetson"
    result = run_cli("compress", "--example", "--target", "jetson", "-o", out, *FAST, "--json", env=env)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["target"]["name"] == "jetson-orin-nano" and "resolved" in report["target"]["note"]
    assert report["latency_source"] == "predicted"
    low, high = report["result"]["band_ms"]
    assert low < report["result"]["latency_ms"] < high
    assert report["result"]["verified"] is False
    assert "not yet verified" in report["latency"]["result"]["label"]
