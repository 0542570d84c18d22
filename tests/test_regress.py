"""The latency regression gate: the decision on synthetic samples, and `deploy regress` as CI runs it (exit codes,
baseline file, fingerprint warning, markdown, JUnit). Real measurements use the quick budget on tiny ONNX graphs."""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli
from deploy.core.errors import UserInputError
from deploy.targets.regress.decide import INCONCLUSIVE, PASS, REGRESSION, GateConfig, decide

# --- the decision on synthetic samples ------------------------------------------------------------------------------


def _samples(median: float, n: int = 200, spread: float = 0.02, seed: int = 0) -> np.ndarray:
    """Log-normal latencies around `median` ms (CoV about `spread`)."""
    return median * np.exp(np.random.default_rng(seed).normal(0.0, spread, n))


def test_same_distribution_passes():
    verdict = decide(_samples(1.0, seed=1), _samples(1.0, seed=2))
    assert verdict.outcome == PASS and verdict.exit_code == 0 and not verdict.improvement
    assert abs(verdict.ratio - 1.0) < 0.01


def test_clear_slowdown_is_a_regression():
    verdict = decide(_samples(1.0, seed=1), _samples(1.10, seed=2))
    assert verdict.outcome == REGRESSION and verdict.exit_code == 1
    assert verdict.p_value < 0.01 and verdict.ratio == pytest.approx(1.10, rel=0.01)
    assert "slower by" in verdict.reasons[0]


def test_slowdown_inside_threshold_passes_even_when_significant():
    verdict = decide(_samples(1.0, seed=1), _samples(1.03, seed=2))
    assert verdict.outcome == PASS and verdict.p_value < 0.01 and "within the threshold" in verdict.reasons[0]


def test_improvement_is_reported_symmetrically():
    verdict = decide(_samples(1.10, seed=1), _samples(1.0, seed=2))
    assert verdict.outcome == PASS and verdict.improvement and verdict.exit_code == 0
    assert verdict.headline().startswith("PASS (IMPROVEMENT)")


def test_large_but_insignificant_slowdown_is_inconclusive():
    # medians 8% apart, but 21 samples spread over +-20% cannot tell at alpha 0.01
    old = np.linspace(0.8, 1.2, 21)
    verdict = decide(old, old * 1.08, GateConfig(max_cov=0.5))
    assert verdict.ratio > 1.05 and verdict.p_value >= 0.01
    assert verdict.outcome == INCONCLUSIVE and verdict.exit_code == 3 and "not significant" in verdict.reasons[0]


def test_too_noisy_is_inconclusive_with_a_rerun_hint():
    verdict = decide(_samples(1.0, spread=0.3, seed=1), _samples(1.5, seed=2))
    assert verdict.outcome == INCONCLUSIVE and verdict.ratio is None
    assert "too noisy: baseline robust CoV" in verdict.reasons[0] and "rerun" in verdict.hint


def test_a_few_stalls_do_not_make_it_too_noisy():
    old, new = _samples(1.0, seed=1), _samples(1.10, seed=2)
    old[::50] = 80.0  # four preempted samples: std / mean explodes, the body is as tight as before
    verdict = decide(old, new)
    assert np.std(old) / np.mean(old) > 1.0 and verdict.noise_old < 0.05
    assert verdict.outcome == REGRESSION


def test_too_few_samples_is_inconclusive():
    verdict = decide(_samples(1.0, n=10), _samples(2.0, n=200))
    assert verdict.outcome == INCONCLUSIVE and "too few samples: baseline has 10" in verdict.reasons[0]


@pytest.mark.parametrize("field, value", [("threshold", 0.0), ("alpha", 1.5), ("max_cov", -1.0), ("min_samples", 1)])
def test_gate_config_is_validated(field, value):
    with pytest.raises(UserInputError):
        GateConfig(**{field: value})


def test_verdict_json_round_trips():
    data = decide(_samples(1.0, seed=1), _samples(1.10, seed=2)).to_dict()
    again = json.loads(json.dumps(data))
    assert again["outcome"] == "regression" and again["exit_code"] == 1 and len(again["ci"]) == 2


# --- reports --------------------------------------------------------------------------------------------------------

def _fake_result(outcome: str) -> dict:
    old, new = _samples(1.0, seed=1), _samples(1.10 if outcome == "regression" else 1.0, seed=2)
    gate = GateConfig(max_cov=0.0001) if outcome == "inconclusive" else GateConfig()
    verdict = decide(old, new, gate)
    assert verdict.outcome == outcome
    side = {"summary": {"n": 200, "p50": 1.0, "p90": 1.1, "cov": 0.02}}
    return {"outcome": outcome, "mode": "baseline", "model": {"path": "out/model.onnx"}, "baseline": "b.json",
            "gate": gate.to_dict(), "verdict": verdict.to_dict(), "warnings": ["environment differs (cpu)"],
            "seconds": 1.5, "old": side, "new": side}


@pytest.mark.parametrize("outcome, failures, skipped", [("pass", 0, 0), ("regression", 1, 0), ("inconclusive", 0, 1)])
def test_junit_is_valid_xml_with_one_testcase(outcome, failures, skipped):
    from deploy.targets.regress.report import to_junit

    root = ET.fromstring(to_junit(_fake_result(outcome)))
    cases = root.findall("./testsuite/testcase")
    assert root.tag == "testsuites" and len(cases) == 1 and cases[0].get("name") == "latency model.onnx"
    assert len(cases[0].findall("failure")) == failures and root.get("failures") == str(failures)
    assert len(cases[0].findall("skipped")) == skipped and root.get("skipped") == str(skipped)
    if failures:
        assert cases[0].find("failure").get("message").startswith("REGRESSION model.onnx")


def test_markdown_summary_and_github_step_summary(tmp_path, monkeypatch):
    from deploy.targets.regress.report import append_step_summary, to_markdown

    text = to_markdown(_fake_result("regression"))
    assert text.startswith("### Latency gate: REGRESSION model.onnx: median +")
    assert "| median (ms) | 1.000 | 1.000 |" in text and "warning: environment differs" in text
    summary = tmp_path / "summary.md"
    summary.write_text("earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    append_step_summary(text)
    assert summary.read_text() == "earlier step\n" + text
    monkeypatch.delenv("GITHUB_STEP_SUMMARY")
    assert append_step_summary(text) is None


# --- the command, on tiny ONNX graphs -------------------------------------------------------------------------------

def _matmul_chain(path: Path, depth: int) -> Path:
    """x[16,384] through `depth` MatMuls with 384x384 weights: the deeper, the slower (~0.1 ms per MatMul)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array((rng.standard_normal((384, 384)) / 20).astype(np.float32), f"w{i}")
               for i in range(depth)]
    nodes = [helper.make_node("MatMul", ["x" if i == 0 else f"h{i}", f"w{i}"], [f"h{i + 1}" if i < depth - 1 else "y"])
             for i in range(depth)]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [16, 384])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [16, 384])], initializer=weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def chains(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("regress")
    return {"fast": _matmul_chain(folder / "fast.onnx", 1), "slow": _matmul_chain(folder / "slow.onnx", 3)}


QUICK = ("--quick", "--threads", "1")
LENIENT = ("--max-cov", "1")  # these tests check the plumbing, not this shared machine's noise


def test_missing_baseline_is_a_one_line_exit_2(chains, tmp_path):
    result = run_cli("regress", chains["fast"], "--baseline", tmp_path / "ci" / "latency.json", *QUICK)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "does not exist" in result.stderr and "--update" in result.stderr and "Traceback" not in result.stderr


def test_update_writes_a_readable_baseline(chains, tmp_path):
    from deploy.targets.measure.loop import MeasureConfig
    from deploy.targets.regress.gate import RegressRequest, regress

    baseline = tmp_path / "ci" / "latency.json"
    result = regress(RegressRequest(chains["fast"], baseline=baseline, update=True, threads=1,
                                    measure=MeasureConfig.quick(min_samples=20)))
    assert result.outcome == "updated" and result.exit_code == 0 and result.verdict is None
    text = baseline.read_text()
    data = json.loads(text)
    assert data["schema"] == "deploy.measurement" and data["schema_version"] == 1
    assert len(data["samples_ms"]) >= 20 and data["model"]["sha256"] and data["fingerprint"]["cpu"]
    assert text.startswith('{\n  "config"') and text.endswith("}\n")  # indent 2, sorted keys
    assert not list(baseline.parent.glob(".*"))  # the atomic write left no temporary file


def test_interleaved_same_model_passes_with_reports(chains, tmp_path):
    junit, markdown, summary = tmp_path / "gate.xml", tmp_path / "gate.md", tmp_path / "step.md"
    result = run_cli("regress", chains["fast"], "--baseline-model", chains["fast"], *QUICK, *LENIENT,
                     "--threshold", "0.5", "--junit", junit, "--markdown", markdown, "--json",
                     env={"GITHUB_STEP_SUMMARY": str(summary)})
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["outcome"] == "pass" and data["mode"] == "interleaved" and data["exit_code"] == 0
    assert data["verdict"]["n_old"] >= 20 and data["verdict"]["n_new"] >= 20
    assert ET.parse(junit).getroot().find("./testsuite/testcase/failure") is None
    assert markdown.read_text().startswith("### Latency gate: PASS fast.onnx") and summary.read_text() == markdown.read_text()


def test_slower_model_is_exit_1(chains):
    result = run_cli("regress", chains["slow"], "--baseline-model", chains["fast"], *QUICK, *LENIENT, "--json")
    assert result.returncode == 1, result.stderr
    data = json.loads(result.stdout)
    assert data["outcome"] == "regression" and data["verdict"]["ratio"] > 1.5


def test_blocks_and_the_cpu_clock_reach_the_verdict(chains, tmp_path):
    """The slower model in 8 blocks on the cpu clock: a regression whose ratio, CI and p come from the blocks, with
    the clock recorded, and a baseline file that remembers the clock for the next run. Fewer blocks than the sign
    test needs to reach --alpha are refused."""
    result = run_cli("regress", chains["slow"], "--baseline-model", chains["fast"], "--threads", "1",
                     "--clock", "cpu", "--blocks", "8", "--min-seconds", "0.8", *LENIENT, "--json")
    assert result.returncode == 1, result.stderr
    data = json.loads(result.stdout)
    assert data["outcome"] == "regression" and data["new"]["runtime"]["clock"] == "cpu"
    assert len(data["new"]["structure"]["blocks"]) == 8 and data["verdict"]["ci"][0] > 1.5
    few = run_cli("regress", chains["slow"], "--baseline-model", chains["fast"], "--blocks", "3", "--quick")
    assert few.returncode == 2 and "--blocks" in few.stderr and "at least 8" in few.stderr
    baseline = tmp_path / "latency.json"
    run_cli("regress", chains["fast"], "--baseline", baseline, "--update", "--threads", "1", "--clock", "cpu", "--quick")
    again = run_cli("regress", chains["fast"], "--baseline", baseline, "--quick", *LENIENT, "--json")
    assert json.loads(again.stdout)["new"]["runtime"]["clock"] == "cpu"


def test_too_noisy_is_exit_3(chains):
    result = run_cli("regress", chains["fast"], "--baseline-model", chains["fast"], *QUICK, "--max-cov", "0.00001")
    assert result.returncode == 3, result.stderr
    assert "INCONCLUSIVE" in result.stdout and "rerun" in result.stdout


def test_fingerprint_difference_is_warned(chains, tmp_path):
    from deploy.targets.measure.loop import MeasureConfig
    from deploy.targets.regress.gate import RegressRequest, regress

    baseline = tmp_path / "latency.json"
    quick = MeasureConfig.quick(min_samples=20)
    regress(RegressRequest(chains["fast"], baseline=baseline, update=True, measure=quick, threads=1))
    data = json.loads(baseline.read_text())
    data["fingerprint"]["cpu"] = "Some Other CPU"
    data["fingerprint"]["versions"]["onnxruntime"] = "0.0.1"
    baseline.write_text(json.dumps(data))
    result = regress(RegressRequest(chains["fast"], baseline=baseline, measure=quick,
                                    gate=GateConfig(max_cov=1, threshold=0.5))).to_dict()
    assert result["mode"] == "baseline" and result["fingerprint_diff"] == ["cpu", "versions.onnxruntime"]
    assert result["warnings"][0].startswith("environment differs from the baseline's (cpu, versions.onnxruntime)")


@pytest.mark.parametrize("content, message", [
    ("{not json", "is not valid JSON"),
    ('{"schema": "deploy.measurement", "schema_version": 99}', "schema_version 99 is not supported"),
    ('{"schema": "something.else"}', "not a deploy.measurement document"),
])
def test_bad_baseline_is_a_one_line_user_error(tmp_path, content, message):
    from deploy.targets.regress.baseline import read_baseline

    path = tmp_path / "latency.json"
    path.write_text(content)
    with pytest.raises(UserInputError) as info:
        read_baseline(path)
    line = info.value.one_line()
    assert message in line and "--update" in line and "\n" not in line


def test_usage_errors_are_exit_2(chains, tmp_path):
    result = run_cli("regress", chains["fast"])
    assert result.returncode == 2 and "--baseline" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_comparison_already_made_is_reused():
    from deploy.targets.measure.stats import compare

    old, new = _samples(1.0, seed=1), _samples(1.10, seed=2)
    made = compare(old, new)
    fake = type(made)(**{**made.to_dict(), "p_value": 0.5})  # only reuse can make it insignificant
    assert decide(old, new, comparison=fake).outcome == INCONCLUSIVE
    assert decide(old, new[:-1], comparison=fake).outcome == REGRESSION  # other samples: recomputed
