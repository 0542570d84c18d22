"""The peer benchmark's pieces work without the bench extra: reference architectures have the published sizes,
the shared artifacts build and score on the digits CNN, the deploy rows degrade to "not yet available", and the
markdown is generated from the JSON alone."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import models  # noqa: E402
import peer_report  # noqa: E402


@pytest.mark.parametrize("name, params", [("resnet18", 11_689_512), ("resnet50", 25_557_032),
                                          ("mobilenetv2", 3_504_872), ("vit_tiny", 5_717_416)])
def test_reference_architectures_have_published_sizes(name, params):
    module = models.ARCHITECTURES[name]()
    assert sum(p.numel() for p in module.parameters()) == params


def test_reference_architectures_run():
    with torch.no_grad():
        assert models.ARCHITECTURES["mobilenetv2"]()(torch.randn(1, 3, 96, 96)).shape == (1, 1000)
        assert models.ARCHITECTURES["vit_tiny"]()(torch.randn(1, 3, 224, 224)).shape == (1, 1000)


@pytest.fixture(scope="module")
def digits_case():
    from peer_cases import Sizes, build_case

    return build_case("digits_cnn", Sizes(calib=8, eval=32, eval_batch=16))


def test_digits_artifacts_build_and_score(digits_case, tmp_path):
    from peer_eval import score
    from peers import Workspace, artifact_bytes, ort_static

    ws = Workspace(digits_case, tmp_path)
    fp32 = score(ws.fp32, "onnxruntime", None, digits_case.eval, 2)
    assert fp32["top1_agreement"] == 1.0 and fp32["accuracy"] == fp32["reference_accuracy"]
    quantized = ws.get("ort_static", ort_static)
    assert artifact_bytes(quantized) < artifact_bytes(ws.fp32)
    assert artifact_bytes(ws.pruned) < artifact_bytes(ws.fp32)  # Torch-Pruning 50%, exported
    assert 0.0 <= score(ws.pruned, "openvino", "f32", digits_case.eval, 2)["accuracy"] <= 1.0


def test_deploy_rows_say_not_available_without_an_api(digits_case, tmp_path, monkeypatch):
    import peer_deploy

    monkeypatch.setattr(peer_deploy, "find_api", lambda: None)
    outcome = peer_deploy.compress_for_budget(digits_case, 1.0, tmp_path, 2, quick=True, timeout_s=10)
    assert outcome.status == peer_deploy.NOT_AVAILABLE and outcome.onnx is None and outcome.report == {}


def _row(key, tool, status="ok", **extra):
    row = {"key": key, "label": key, "tool": tool, "runtime": "onnxruntime", "precision": "as-exported",
           "note": "", "status": status, **extra}
    if status == "ok":
        row.update(latency={"p50": 2.0, "median_ci": [1.9, 2.1], "cov": 0.02},
                   comparison={"ratio": 0.5, "ci_low": 0.48, "ci_high": 0.52}, size_bytes=1_234_567,
                   fidelity={"pooled_cosine": 0.99, "nn_agreement": 0.95})
    return row


def test_markdown_is_generated_from_json_alone(tmp_path):
    import run

    data = {
        "command": ".venv/bin/python benchmarks/run.py --quick", "quick": True, "created": "2026-01-01T00:00:00",
        "elapsed_s": 90.0, "threads": 2, "batch": 1, "versions": {"nncf": "3.4.0"},
        "fingerprint": {"cpu": "Test CPU", "machine": "x86_64", "usable_cores": 2, "cpu_flags": ["avx2"],
                        "os": "Linux", "python": "3.11", "versions": {"onnxruntime": "1.32"}},
        "measure_config": {"min_samples": 24, "min_seconds": 0.5, "cov_warn": 0.1},
        "models": [{"name": "minilm", "title": "MiniLM", "task": "embedding", "calibration": "c", "evaluation": "e",
                    "rows": [_row("nncf_int8", "nncf"),
                             _row("ort_static", "onnxruntime", status="error", error="boom"),
                             _row("deploy_x1", "deploy", budget_ms=2.0, budget_factor=1.0, hit=True),
                             _row("deploy_x0.5", "deploy", status="not yet available", budget_ms=1.0,
                                  note="not yet available: deploy.compiler.job.compress is not importable")]}],
    }
    (tmp_path / "peers.json").write_text(json.dumps(data))
    assert run.main(["--render-only", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "peers.md").read_text()
    assert text.startswith("## Peers side by side")
    assert "`.venv/bin/python benchmarks/run.py --quick`" in text and "Test CPU" in text and "QUICK" in text
    assert "| nncf_int8 | ORT | 2.00 [1.90, 2.10] | 0.50x [0.48, 0.52] | cos 0.9900 · NN 95.0% | 1.23 MB | – |" in text
    assert "error: boom" in text
    # hit in ms (2.00 <= 2.00) and by ratio (0.50 <= NNCF's 0.50 x 1); the whole budget used
    assert "| minilm | 2.00 ms | 2.00 [1.90, 2.10] | 0.50x [0.48, 0.52] | hit / hit | 1.00 |" in text
    assert "| minilm | 1.00 ms | – | – | – | – | – | – | – | not yet available" in text
    assert peer_report.markdown(data) == text
