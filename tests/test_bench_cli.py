"""`deploy bench` as a user runs it (the console entry point in a subprocess, for real exit codes and stderr), and
the library call behind it."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from conftest import run_cli
from deploy.core.errors import InputSpecError, RuntimeUnavailableError
from deploy.targets.bench import bench
from deploy.targets.measure.lock import LOCK_ENV
from deploy.targets.measure.loop import MeasureConfig, Measurement

SCHEMA_KEYS = {"schema", "schema_version", "model", "target", "runtime", "config", "samples_ms", "summary",
               "fingerprint", "lock", "warnings", "created"}
SUMMARY_KEYS = {"n", "p50", "p90", "p95", "p99", "mean", "std", "cov", "min", "max", "median_ci",
                "median_ci_confidence", "throughput_per_s"}


@pytest.fixture(autouse=True)
def private_lock(tmp_path, monkeypatch):
    monkeypatch.setenv(LOCK_ENV, str(tmp_path / "measure.lock"))


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)).eval()
    path = tmp_path_factory.mktemp("bench") / "mlp.onnx"
    torch.onnx.export(net, (torch.randn(1, 32),), str(path), dynamo=False, input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "batch"}})
    return path


def _one_line_error(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_bench_json_has_the_schema_and_output_file_matches(model, tmp_path):
    out = tmp_path / "result.json"
    result = run_cli("bench", model, "--target", "cpu", "--quick", "--input-shape", "batch=4", "--json",
                     "--output", out, env={LOCK_ENV: str(tmp_path / "cli.lock")})
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert set(data) == SCHEMA_KEYS and data["schema"] == "deploy.measurement" and data["schema_version"] == 1
    assert json.loads(out.read_text()) == data
    assert set(data["summary"]) == SUMMARY_KEYS
    assert data["summary"]["n"] == len(data["samples_ms"]) >= MeasureConfig.quick().min_samples
    assert data["model"]["sha256"] == hashlib.sha256(model.read_bytes()).hexdigest()
    assert data["model"]["inputs"] == [{"name": "x", "shape": [4, 32], "dtype": "float32"}]
    assert data["runtime"]["runtime"] == "onnxruntime" and data["runtime"]["threads"] >= 1
    assert data["target"] == data["fingerprint"]["profile"] and data["config"]["is_quick"] is True
    start, end = data["lock"]["window"]
    assert start < end and data["lock"]["waited_s"] >= 0
    assert "'cpu' resolved to" in result.stderr
    assert Measurement.from_dict(data).summary == data["summary"]  # a baseline file reads back


def test_bench_compare_prints_table_ratio_and_p_value(model, tmp_path):
    result = run_cli("bench", model, "--target", "cpu", "--runtime", "openvino", "--quick", "--compare", model,
                     "--threads", "1", env={LOCK_ENV: str(tmp_path / "cli.lock")})
    assert result.returncode == 0, result.stderr
    for text in ("p50", "p99", "CoV", "median CI", "throughput", "openvino", "f32", "B / A median ratio",
                 "Mann-Whitney p"):
        assert text in result.stdout, text


def test_zero_byte_model_exits_2_in_one_line(tmp_path):
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    result = run_cli("bench", empty, "--target", "cpu")
    assert result.returncode == 2
    assert "empty" in _one_line_error(result)


def test_unknown_target_exits_2_with_a_suggestion(model):
    result = run_cli("bench", model, "--target", "cpu-avx513")
    assert result.returncode == 2
    assert "did you mean 'cpu-avx2'" in _one_line_error(result)


def test_predicted_target_is_refused_in_one_line(model):
    result = run_cli("bench", model, "--target", "jetson")
    assert result.returncode == 2
    line = _one_line_error(result)
    assert "not measurable here" in line and "jetson-orin-nano" in line and "--target cpu" in line


def test_tensorrt_runtime_without_tensorrt_exits_2(model):
    try:
        import tensorrt  # noqa: F401

        pytest.skip("tensorrt imports here")
    except ImportError:
        pass
    result = run_cli("bench", model, "--target", "cpu", "--runtime", "tensorrt")
    assert result.returncode == 2
    assert "TensorRT is not available here" in _one_line_error(result)


def test_library_bench_compare_returns_the_comparison(model):
    data = bench(model, target="cpu", config=MeasureConfig.quick(), compare=model, input_shapes=["x:2x32"],
                 threads=1)
    assert data["schema"] == "deploy.comparison" and set(data["a"]) == SCHEMA_KEYS | {"structure"}
    assert data["a"]["lock"] == data["b"]["lock"]
    c = data["comparison"]
    assert c["ci_low"] <= c["ratio"] <= c["ci_high"] and 0 <= c["p_value"] <= 1


def test_bench_compare_runs_in_blocks_and_keeps_their_structure(model):
    """Blocks with fresh sessions, the order alternated, a >= 1 ms sample from an inner loop: all in the JSON."""
    result = run_cli("bench", model, "--compare", model, "--target", "cpu", "--threads", "1", "--blocks", "3",
                     "--min-seconds", "0.3", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    c, structure = data["comparison"], data["b"]["structure"]
    assert c["method"] == "blocks" and len(c["block_ratios"]) == 3
    assert [b["first"] for b in structure["blocks"]] == ["a", "b", "a"]
    p50 = data["a"]["summary"]["p50"]
    assert all(b["inner_loop"] * p50 >= 0.5 for b in structure["blocks"])  # a sample covers about 1 ms
    assert sum(b["n"] for b in structure["blocks"]) == len(data["b"]["samples_ms"])
    assert c["ci_low"] <= c["ratio"] <= c["ci_high"]


def test_cpu_clock_needs_one_thread_and_is_recorded(model):
    refused = run_cli("bench", model, "--compare", model, "--target", "cpu", "--threads", "2", "--clock", "cpu")
    assert refused.returncode == 2 and "threads=1" in _one_line_error(refused)
    result = run_cli("bench", model, "--compare", model, "--target", "cpu", "--threads", "1", "--clock", "cpu",
                     "--quick", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["a"]["runtime"]["clock"] == "cpu" and min(data["a"]["samples_ms"]) > 0


def test_library_bench_refuses_bad_input_shape_and_trt_target(model, tmp_path):
    with pytest.raises(InputSpecError, match="has 2 dimensions"):
        bench(model, target="cpu", config=MeasureConfig.quick(), input_shapes=["x:1x2x3"])
    profile = tmp_path / "local-trt.toml"
    profile.write_text("\n".join([
        'name = "local-trt"', 'description = "a GPU box"', 'kind = "gpu"', 'runtime = "tensorrt"',
        'measure = "local"', 'precisions = ["fp32", "fp16"]', 'weight_granularities = ["per-channel"]',
        'qdq_policy = "tensorrt"', 'channel_multiple = 8', 'memory_bandwidth_gbs = 900.0', 'op_overhead_us = 3.0',
        "[peak_tops]", "fp32 = 19.5", "fp16 = 312.0",
    ]))
    try:
        import tensorrt  # noqa: F401

        pytest.skip("tensorrt imports here")
    except ImportError:
        pass
    with pytest.raises(RuntimeUnavailableError, match="TensorRT is not available here"):
        bench(model, profile_path=profile, config=MeasureConfig.quick())


def test_library_bench_torch_runtime_on_an_exported_program(tmp_path):
    net = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU()).eval()
    path = tmp_path / "net.pt2"
    torch.export.save(torch.export.export(net, (torch.randn(2, 16),)), str(path))
    before = torch.get_num_threads()
    try:
        data = bench(path, target="cpu", runtime="torch", threads=1, config=MeasureConfig.quick())
    finally:
        torch.set_num_threads(before)  # the torch runner sets the process-wide thread count
    assert data["runtime"]["runtime"] == "torch" and data["runtime"]["precision"] == "f32"
    assert data["model"]["inputs"][0]["shape"] == [2, 16] and data["summary"]["n"] >= 16
