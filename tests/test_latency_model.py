"""Predicted latency: every number has a band; devices never measured are labelled unverified; a calibration
fitted from measured nodes recovers per-op-kind factors and gives a verified band."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from deploy.core.spec import InputSpec
from deploy.profiles import load_builtin
from deploy.targets.latency.fit import FitConfig, TrainingModel, fit_calibration
from deploy.targets.latency.model import UNVERIFIED, predict_latency, predict_nodes
from deploy.targets.latency.nodes import NodeRecord
from deploy.targets.latency.roofline import narrowness, roofline

IMAGE = [InputSpec("image", (1, 1, 32, 32))]


@pytest.fixture(scope="module")
def digits():
    from deploy.examples.digits_cnn import digits_cnn

    return digits_cnn()


def test_jetson_prediction_is_banded_and_unverified(digits):
    """Orin Nano is fitted on published latencies: a band from their leave-one-model-out errors, still not
    verified here; H100 has no published batch-1 figures and keeps x/÷3 with the unverified label."""
    fp32 = predict_latency(digits, IMAGE, "jetson")
    fit = load_builtin("jetson-orin-nano").published_fit
    assert not fp32.verified and "published latencies" in fp32.label and fp32.profile == "jetson-orin-nano"
    assert fp32.low_ms < fp32.ms < fp32.high_ms
    assert fp32.high_ms / fp32.ms == pytest.approx(math.exp(fit.band))
    h100 = predict_latency(digits, IMAGE, "nvidia-h100")
    assert UNVERIFIED in h100.label and h100.high_ms / h100.low_ms >= 8.9
    assert sum(layer.ms for layer in fp32.per_layer) == pytest.approx(fp32.ms)
    assert {"layer1.conv1", "fc"} <= {layer.module for layer in fp32.per_layer}
    int8 = predict_latency(digits, IMAGE, "jetson", precision_map="int8")
    assert int8.ms < fp32.ms and not int8.verified
    mixed = predict_latency(digits, IMAGE, "jetson", precision_map={"layer3": "int8"})
    assert int8.ms < mixed.ms < fp32.ms


def test_every_unmeasured_device_is_unverified(digits):
    from deploy.core.analysis import analyze
    from deploy.core.model.load import from_module
    from deploy.targets.latency.graph import graph_nodes

    nodes = graph_nodes(digits, IMAGE, level="extended")
    for name in ("jetson-agx-orin", "nvidia-a100", "nvidia-h100", "rpi5"):
        prediction = predict_nodes(nodes, load_builtin(name), threads=4)
        assert not prediction.verified and prediction.low_ms < prediction.ms < prediction.high_ms
    coarse = predict_latency(analyze(from_module(digits, IMAGE)), profile="rpi5", threads=4)
    assert coarse.ms > 0 and not coarse.verified


def _synthetic(profile, seed: int, scale: float) -> TrainingModel:
    """Nodes whose 'measured' time follows a known law over their roofline: conv 3x slower, matmul 2x."""
    import random

    rng = random.Random(seed)
    nodes = []
    for i in range(12):
        family = ("Conv", "MatMul")[i % 2]
        macs = int(rng.uniform(1e5, 5e7) * scale)
        node = NodeRecord(f"n{i}", family, f"layer{i}", "fp32", macs, macs // 50,
                          variant="kxk" if family == "Conv" else "2d", channels=(64, 64))
        factor = 3.0 if family == "Conv" else 2.0
        nodes.append(NodeRecord(**{**node.to_dict(), "ms": factor * roofline(node, profile, 1).ms}))
    return TrainingModel(f"m{seed}", tuple(nodes), sum(n.ms for n in nodes) * 1.1)


def test_fit_recovers_factors_and_gives_a_verified_band():
    profile = load_builtin("cpu-avx512-vnni")
    models = [_synthetic(profile, seed, scale) for seed, scale in enumerate((0.5, 1, 2, 4, 8))]
    calibration = fit_calibration(models, profile, threads=1, runtime="onnxruntime", env="test",
                                  config=FitConfig(min_band=0.05))
    conv = next(n for n in models[0].nodes if n.op_type == "Conv")
    assert calibration.node_ms(conv, profile) == pytest.approx(conv.ms, rel=0.05)
    assert len(calibration.residuals) == len(models) and calibration.band == pytest.approx(0.05, abs=0.05)
    held = _synthetic(profile, 99, 3)
    prediction = predict_nodes(held.nodes, profile, 1, calibration)
    assert prediction.verified and "calibrated" in prediction.label
    assert prediction.low_ms <= held.e2e_ms <= prediction.high_ms
    assert abs(prediction.ms / held.e2e_ms - 1) < 0.1
    assert calibration.from_dict(calibration.to_dict()) == calibration


def test_roofline_scales_with_threads_on_cpus_only():
    node = NodeRecord("conv", "Conv", "c", "fp32", 10**8, 10**6, channels=(128, 256))
    cpu, gpu = load_builtin("cpu-avx512-vnni"), load_builtin("nvidia-a100")
    assert roofline(node, cpu, 2).compute_ms == pytest.approx(roofline(node, cpu, 1).compute_ms / 2)
    assert roofline(node, gpu, 8).compute_ms == roofline(node, gpu, 1).compute_ms
    assert roofline(node, cpu, 1, "int8").compute_ms < roofline(node, cpu, 1).compute_ms
    narrow = NodeRecord("conv", "Conv", "c", "fp32", 10**8, 10**6, channels=(12, 12))
    assert narrow.padded_macs(16) == pytest.approx(10**8 * (16 / 12) ** 2)
    step, below2, below8 = narrowness(narrow, cpu)
    assert step == 1.0 and math.isclose(below2, math.log(32 / 12)) and math.isclose(below8, math.log(128 / 12))
    assert narrowness(node, cpu) == (0.0, 0.0, 0.0)


def test_latency_modules_import_no_runtime():
    code = ("import sys, deploy.targets.latency.layer_table, deploy.targets.latency.model, "
            "deploy.targets.latency.calibrate, deploy.targets.latency.graph; "
            "print([m for m in ('onnxruntime', 'openvino', 'tensorrt') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_calibrate_quick_fits_and_refuses_a_device_not_at_hand(tmp_path):
    """`profiles calibrate` fits this machine's latency model (the quick reference set here) and saves it where
    predictions find it; a device not at hand is refused in one line."""
    from conftest import run_cli

    env = {"DEPLOY_CACHE_DIR": str(tmp_path / "cache")}
    done = run_cli("profiles", "calibrate", "cpu", "--quick", "--threads", "1", "--json", env=env)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["threads"] == 1 and result["model"]["models"] == 4 and result["model"]["band"] > 0
    assert Path(result["model"]["path"]).is_file()
    refused = run_cli("profiles", "calibrate", "jetson", "--quick", env=env)
    assert refused.returncode == 2 and "not measurable here" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
