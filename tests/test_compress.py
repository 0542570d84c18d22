"""`deploy compress` end to end, as a user runs it: outputs, budgets, errors (replaying a plan: test_replay)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import FAST, run_cli
from deploy.profiles import local_cpu_flags


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return {"DEPLOY_CACHE_DIR": str(cache), "DEPLOY_MEASURE_LOCK": str(cache / "measure.lock")}


@pytest.fixture
def example_run(example_runs):
    """conftest's run of the example with no budget flag (the default floor), on this CPU."""
    run = example_runs["floor"]
    assert run.returncode == 0, run.stderr
    return run.out, run


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
    data = report["data"]  # a quarter of the example's 256 digits held out, a fifth of the rest validates
    assert (data["held_out"], data["validation"], data["calibration"]) == (64, 38, 154)
    assert report["layers"] and "environment" in report
    assert "<h2>Candidates</h2>" in (out / "report.html").read_text()


def test_existing_output_is_refused_without_force(example_run, env):
    out, _ = example_run
    result = run_cli("compress", "--example", "-o", out, *FAST, env=env)
    assert result.returncode == 2 and "already exists" in result.stderr and "--force" in result.stderr


def test_infeasible_budget_fails_fast_and_leaves_nothing(tmp_path, env):
    out = tmp_path / "never"
    result = run_cli("compress", "--example", "--budget-ms", "0.00001", "-o", out, *FAST, env=env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()  # progress lines may come first (stderr is not a terminal)
    assert "fastest achievable" in lines[-1] and [line for line in lines if "error" in line] == lines[-1:]
    assert all(line.startswith("compress: ") for line in lines[:-1])
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
                     "--no-prune", "-o", out, *FAST, env=env)  # pruning a transformer: test_depth
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["fidelity_metric"] == "pooled_cosine"
    assert report["result"]["fidelity"] >= 0.95


def test_device_not_at_hand_gets_predicted_latency_with_a_band(example_runs):
    run = example_runs["predicted"]  # --target jetson, not at hand here
    assert run.returncode == 0, run.stderr
    report = run.report()
    assert report["target"]["name"] == "jetson-orin-nano" and "resolved" in report["target"]["note"]
    assert report["latency_source"] == "predicted"
    low, high = report["result"]["band_ms"]
    assert low < report["result"]["latency_ms"] < high
    assert report["result"]["verified"] is False
    assert "published latencies" in report["latency"]["result"]["label"]  # fitted, yet not verified here
    assert any("is predicted" in w for w in report["warnings"])
    hand_off = next(w for w in report["warnings"] if "trtexec" in w)  # no TensorRT here: the device's command
    assert "--onnx=model.onnx --saveEngine=model.plan" in hand_off and "--runner ssh://" in hand_off
    if report["decisions"].get("quantize"):  # a per-layer plan is priced layer by layer
        assert report["latency"]["result"]["precision"] == "mixed"
        assert report["quantization"]["policy"] == "tensorrt"


def test_a_predicted_budget_is_planned_on_the_upper_end_of_the_band(example_runs, tmp_path, env):
    """For a device not at hand, "met" must hold wherever in its band the device lands: a budget just above the
    dense model's upper end is met as it is; one at its point estimate cannot be promised."""
    first = example_runs["predicted"].report()  # the same example on jetson: the original's prediction and band
    dense, band = first["original"], first["latency"]["original"]["band_ms"]
    roomy = run_cli("compress", "--example", "--target", "jetson", "--precision", "fp32", "--no-prune",
                    "--no-lowrank", "--budget-ms", f"{band[1] * 1.1:.6g}", "-o", tmp_path / "b", *FAST, "--json",
                    env=env)
    assert roomy.returncode == 0, roomy.stderr
    report = json.loads(roomy.stdout)
    assert report["verdict"] == "met" and report["result"]["band_ms"][1] <= band[1] * 1.1
    tight = run_cli("compress", "--example", "--target", "jetson", "--precision", "fp32", "--no-prune",
                    "--no-lowrank", "--budget-ms", f"{dense['latency_ms'] * 1.01:.6g}", "-o", tmp_path / "c", *FAST,
                    env=env)
    assert tight.returncode == 2, tight.stderr
    assert "upper end" in tight.stderr and "raise the budget to at least" in tight.stderr
    assert not (tmp_path / "c").exists()


def test_latency_budget_is_met_with_a_per_layer_precision_plan(example_runs):
    """A speed-up budget on the local CPU (conftest's 'budget' run, one thread): the report's final p50 (measured
    interleaved) fits, the plan names each layer's precision, and the exported model is what was planned: Q/DQ
    around exactly the layers planned in integers. Whether int8 or pruning wins is this CPU's to say (without VNNI,
    int8 convolutions of this tiny model may be no faster than fp32), so neither is asserted."""
    run = example_runs["budget"]
    # On a loaded machine the final interleaved comparison of a 0.1 ms model can straddle 1.25x: deploy then says
    # "uncertain" (exit 3) and still writes the model; or land under it even after the re-plan a miss starts (a
    # fresh-clone CI run measured 1.23x, the next run of this test met it): "missed" (exit 4), the re-plan on
    # record. Whether the speed-up holds is the benchmarks' to show, not a timed test's; anything else fails.
    assert run.returncode in (0, 3, 4), run.stderr
    report = run.report()
    low, high = report["result"]["speedup_ci"]
    if run.returncode == 3:
        assert report["verdict"] == "uncertain" and low < 1.25 <= high
    elif run.returncode == 4:
        assert report["verdict"] == "missed" and high < 1.25 and "retried_after_miss" in report["decisions"]
    else:
        assert report["verdict"] == "met" and low >= 1.25
    target = report["budget"]["target_ms"]
    assert target == pytest.approx(report["decisions"]["dense_latency_ms"] / 1.25)
    search = report["search"]  # the limit asked, far from reached: nothing skipped
    assert search["minutes_limit"] == 30 and 0 < search["seconds"] < 30 * 60 and search["skipped"] == []
    chosen = [c for c in report["candidates"] if c["chosen"]]
    assert len(chosen) == 1 and chosen[0]["latency_ms"] <= target
    labels = report["decisions"]["quantize"]["labels"]
    assert set(labels) == {"stem.0", "layer1.conv1", "layer1.conv2", "layer2.conv1", "layer2.conv2",
                           "layer2.downsample.0", "layer3.conv1", "layer3.conv2", "layer3.downsample.0", "fc"}
    assert report["quantization"]["labels"] == labels  # what was exported is what was planned
    import onnx

    graph = onnx.load(str(run.out / "model.onnx")).graph
    dequantized = {out: node.input[0] for node in graph.node if node.op_type == "DequantizeLinear"
                   for out in node.output}  # the writer names integer weights LAYER.weight_q
    integer_layers = {dequantized[node.input[1]].rsplit(".weight", 1)[0] for node in graph.node
                      if node.op_type in ("Conv", "Gemm") and node.input[1] in dequantized}
    assert integer_layers == {name for name, label in labels.items() if label.startswith("w")}  # w8a8, w7a8, w4-g


@pytest.mark.skipif(not {"avx2", "fma"} <= local_cpu_flags(),
                    reason="the OpenVINO CPU profiles need AVX2 (cpu-avx2-openvino) or AVX-512 VNNI")
def test_openvino_target_writes_ir_and_measures_in_openvino(tmp_path, env):
    out = tmp_path / "ov"
    # int8 everywhere (no budget to race against measurement noise on a 0.1 ms model): IR written, timed in OpenVINO
    result = run_cli("compress", "--example", "--target", "cpu-openvino", "--precision", "int8", "--no-prune",
                     "--threads", "1", "-o", out, *FAST, "--json", env=env)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["target"]["runtime"] == "openvino"
    assert report["latency"]["runtime"]["runtime"] == "openvino"
    assert report["result"]["fidelity_detail"]["runtime"] == "openvino"
    assert {"model.onnx", "model.xml", "model.bin"} <= {p.name for p in out.iterdir()}
    assert set(report["files"]) >= {"model.onnx", "model.xml", "model.bin", "report.json", "deploy.toml"}


def test_batch_sets_the_measured_shape(tmp_path, env):
    out = tmp_path / "b4"
    result = run_cli("compress", "--example", "--target", "cpu", "--batch", "4", "--no-prune", "--precision", "fp32",
                     "--threads", "1", "-o", out, *FAST, "--json", env=env)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["latency"]["shapes"] == {"image": [4, 1, 32, 32]}


def test_batch_needs_a_dynamic_batch_axis(tmp_path, model_files, env):
    result = run_cli("compress", model_files["state_dict"], "--arch", "deploy.examples.digits_cnn:digits_cnn",
                     "--input-shape", "image:1x1x32x32", "--calib", "random", "--batch", "8", "-o", tmp_path / "x",
                     *FAST, env=env)
    assert result.returncode == 2 and "dynamic batch axis" in result.stderr
    assert not (tmp_path / "x").exists()


def test_held_out_data_of_its_own_leaves_every_calibration_sample_to_the_run(tmp_path):
    """--held-out: the report is scored on that data, and all of --calib calibrates, validates and recovers."""
    from deploy.compiler.job import CompressRequest, _setup

    held = tmp_path / "held.npz"
    np.savez(held, image=np.random.default_rng(0).normal(size=(40, 1, 32, 32)).astype(np.float32))
    request = CompressRequest(example=True, target="cpu", held_out=str(held), out=str(tmp_path / "out"))
    calibration = _setup(request, tmp_path / "work").calibration
    assert len(calibration.held_out) == 40 and len(calibration.calibration) + len(calibration.validation) == 256
