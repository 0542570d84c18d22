"""Runners run and say how they ran (threads, explicit precision); feeds follow the model's inputs; bad model
files fail in one line; the environment fingerprint names what differs."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from deploy.core.errors import InputSpecError, ModelLoadError, RuntimeUnavailableError, UserInputError
from deploy.core.spec import InputSpec
from deploy.targets.measure.feeds import make_feeds, parse_input_shape, resolve_inputs
from deploy.targets.measure.fingerprint import cpu_flags, diff_fingerprints, fingerprint
from deploy.targets.model_files import load_onnx
from deploy.targets.runners.registry import RUNNERS, RunnerConfig, canonical_runtime, get_runner, normalize_precision

TRT_SKIP = "TensorRT is not available here"


class SmallNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, image):
        return self.fc(torch.relu(self.conv(image)).mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def net() -> torch.nn.Module:
    torch.manual_seed(0)
    return SmallNet().eval()


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory, net) -> Path:
    path = tmp_path_factory.mktemp("runners") / "net.onnx"
    torch.onnx.export(net, (torch.randn(1, 3, 16, 16),), str(path), dynamo=False, input_names=["image"],
                      output_names=["logits"], dynamic_axes={"image": {0: "batch"}})
    return path


@pytest.fixture(scope="module")
def feeds(onnx_file) -> dict[str, np.ndarray]:
    return make_feeds(resolve_inputs(load_onnx(onnx_file).inputs, ["batch=2"]))


def tensorrt_usable() -> bool:
    try:
        import tensorrt  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available()


# --- registry ---------------------------------------------------------------------------------------------------------

def test_registry_and_aliases():
    assert canonical_runtime("ort") == canonical_runtime("onnxruntime") == "onnxruntime"
    assert {"onnxruntime", "openvino", "torch", "tensorrt"} <= set(RUNNERS)
    with pytest.raises(UserInputError, match="known runtimes: onnxruntime, openvino, tensorrt, torch"):
        get_runner("onnxruntim", 1)
    with pytest.raises(UserInputError):
        RunnerConfig(threads=0)
    assert normalize_precision("fp32") == normalize_precision("F32") == "f32"
    with pytest.raises(UserInputError, match="did you mean"):
        normalize_precision("bf61")


# --- runners ----------------------------------------------------------------------------------------------------------

def test_ort_runner_runs_and_describes(onnx_file, feeds):
    runner = get_runner("ort", 2)
    run = runner.prepare(onnx_file, feeds)
    run()
    info = runner.describe()
    assert info["runtime"] == "onnxruntime" and info["threads"] == 2 and info["inter_op_threads"] == 1
    assert info["execution_mode"] == "sequential" and info["io_binding"] is True and info["spinning"] is False
    assert info["precision"] == "as-exported" and info["version"]
    with pytest.raises(UserInputError, match="onnxruntime cannot be asked for precision bf16"):
        get_runner("ort", 1, "bf16")


def test_ort_session_agrees_with_torch(onnx_file, feeds, net):
    session = get_runner("ort", 1).session(onnx_file)
    got = session.run(None, feeds)[0]
    want = net(torch.from_numpy(feeds["image"])).detach().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_openvino_records_explicit_f32_by_default(onnx_file, feeds):
    runner = get_runner("openvino", 2)
    runner.prepare(onnx_file, feeds)()
    info = runner.describe()
    assert info["precision_hint"] == "f32" and info["inference_precision"] == "f32" and info["precision"] == "f32"
    assert info["threads"] == info["threads_read_back"] == 2
    assert info["num_streams_read_back"] == 1 and info["performance_hint"] == "LATENCY"


def test_openvino_bf16_when_the_cpu_has_it(onnx_file, feeds):
    if not {"avx512_bf16", "amx_bf16"} & cpu_flags():
        with pytest.raises(RuntimeUnavailableError):
            get_runner("openvino", 1, "bf16")
        return
    runner = get_runner("openvino", 1, "bf16")
    runner.prepare(onnx_file, feeds)()
    assert runner.describe()["inference_precision"] == "bf16"


def test_torch_runner_sets_threads_and_runs(net, feeds):
    before = torch.get_num_threads()
    try:
        runner = get_runner("torch", 1)
        out = runner.prepare(net, feeds)()
        assert torch.get_num_threads() == 1
        assert tuple(out.shape) == (2, 4)
        assert runner.describe()["precision"] == "f32" and runner.describe()["threads"] == 1
    finally:
        torch.set_num_threads(before)


def test_tensorrt_runner_is_unavailable_here(onnx_file, feeds):
    if tensorrt_usable():
        pytest.skip("TensorRT is available on this machine")
    with pytest.raises(RuntimeUnavailableError, match=TRT_SKIP):
        get_runner("tensorrt", 1).prepare(onnx_file, feeds)


def test_tensorrt_runner_measures(onnx_file, feeds):
    if not tensorrt_usable():
        pytest.skip(TRT_SKIP)
    from deploy.targets.measure.loop import MeasureConfig, measure

    runner = get_runner("tensorrt", 1, "f16")
    m = measure(runner.prepare(onnx_file, feeds), MeasureConfig.quick())
    assert m.summary["p50"] > 0 and "FP16" in runner.describe()["builder_flags"]


# --- feeds --------------------------------------------------------------------------------------------------------

def test_parse_input_shape():
    assert parse_input_shape("input_ids:1x128:int64") == InputSpec("input_ids", (1, 128), "int64")
    assert parse_input_shape("image:1x3x8x8").dtype == "float32"
    assert parse_input_shape("image:1x3x8x8", default_dtype="float16").dtype == "float16"
    assert parse_input_shape("1x3:int64", default_dtype="float32") == InputSpec("", (1, 3), "int64")
    for bad in ("image:1x0", "image:1x3:complex7", "::"):
        with pytest.raises(InputSpecError):
            parse_input_shape(bad)


def test_resolve_inputs_against_the_model():
    declared = [InputSpec("input_ids", ("batch", "sequence"), "int64"),
                InputSpec("attention_mask", ("batch", "sequence"), "int64")]
    assert [s.shape for s in resolve_inputs(declared)] == [(1, 1), (1, 1)]
    assert [s.shape for s in resolve_inputs(declared, ["sequence=128"])] == [(1, 128), (1, 128)]
    got = resolve_inputs(declared, ["input_ids:2x16", "attention_mask:2x16:int64"])
    assert got[0] == InputSpec("input_ids", (2, 16), "int64")
    with pytest.raises(InputSpecError, match="did you mean 'input_ids'"):
        resolve_inputs(declared, ["input_id:1x8"])
    with pytest.raises(InputSpecError, match="is int64 in the model"):
        resolve_inputs(declared, ["input_ids:1x8:float32"])
    with pytest.raises(InputSpecError, match="names no input"):
        resolve_inputs(declared, ["1x8"])
    with pytest.raises(InputSpecError, match="dimensions"):
        resolve_inputs([InputSpec("x", (1, 3), "float32")], ["x:1x4"])


def test_feeds_are_deterministic_and_valid():
    specs = [InputSpec("input_ids", (1, 32), "int64"), InputSpec("attention_mask", (1, 32), "int64"),
             InputSpec("token_type_ids", (1, 32), "int64"), InputSpec("x", (2, 3), "float32")]
    a, b = make_feeds(specs), make_feeds(specs)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert (a["attention_mask"] == 1).all() and (a["token_type_ids"] == 0).all()
    assert a["input_ids"].dtype == np.int64 and 0 <= a["input_ids"].min() and a["input_ids"].max() < 100
    assert a["x"].dtype == np.float32 and a["x"].shape == (2, 3)


# --- model files ------------------------------------------------------------------------------------------------------

def test_load_onnx_reads_inputs_and_hash(onnx_file):
    model = load_onnx(onnx_file)
    assert model.inputs == (InputSpec("image", ("batch", 3, 16, 16), "float32"),)
    assert model.sha256 == hashlib.sha256(onnx_file.read_bytes()).hexdigest()


@pytest.mark.parametrize("name, content, match", [
    ("missing.onnx", None, "does not exist"),
    ("empty.onnx", b"", "empty"),
    ("model.pt", b"not onnx", "not an ONNX file"),
    ("corrupt.onnx", b"\x00\xff garbage \x13\x37" * 10, "not a valid ONNX model"),
])
def test_bad_model_files_fail_in_one_line(tmp_path, name, content, match):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ModelLoadError, match=match) as info:
        load_onnx(path)
    assert "\n" not in info.value.one_line() and info.value.exit_code == 2


# --- fingerprint ------------------------------------------------------------------------------------------------------

def test_fingerprint_and_diff():
    fp = fingerprint(threads=2, profile="cpu-avx512-vnni")
    assert fp["threads"] == 2 and fp["profile"] == "cpu-avx512-vnni"
    assert fp["logical_cores"] >= fp["physical_cores"] >= 1
    assert set(fp["cpu_flags"]) <= cpu_flags() and fp["cpu"]
    assert fp["versions"]["onnxruntime"] and fp["versions"]["torch"] and fp["versions"]["openvino"]
    other = {**fp, "threads": 4, "versions": {**fp["versions"], "onnxruntime": "0.0"}}
    assert diff_fingerprints(fp, other) == ["threads", "versions.onnxruntime"]
    assert diff_fingerprints(fp, other, ignore=("threads",)) == ["versions.onnxruntime"]
    assert diff_fingerprints(fp, dict(fp)) == []
