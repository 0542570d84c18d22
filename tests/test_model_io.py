"""Every loader, and every way a model file can be wrong."""
from __future__ import annotations

import pytest
import torch

from deploy.core.analysis import analyze
from deploy.core.errors import InputSpecError, ModelLoadError
from deploy.core.model.load import load_model, parse_input_shape

from conftest import ARCH, SHAPE


def _totals(loaded):
    summary = analyze(loaded)
    return summary.total_params, summary.total_macs, [(l.name, l.type, l.params, l.macs) for l in summary.layers]


def test_every_format_loads_and_gives_the_same_totals(model_files):
    loaded = {
        "torchscript": load_model(model_files["torchscript"], input_shapes=[SHAPE]),
        "exported": load_model(model_files["exported"]),
        "state_dict": load_model(model_files["state_dict"], arch=ARCH, input_shapes=[SHAPE]),
        "pickle": load_model(model_files["pickle"], trust_pickle=True, input_shapes=[SHAPE]),
    }
    for fmt, model in loaded.items():
        assert model.format == fmt
        assert len(model.sha256) == 64
    totals = {fmt: _totals(m) for fmt, m in loaded.items()}
    reference = totals["state_dict"]
    assert reference[0] > 10_000 and reference[1] > 100_000
    for fmt, value in totals.items():
        assert value == reference, fmt
    x = torch.randn(1, 1, 32, 32)  # the exported program was traced at batch 1
    expected = loaded["state_dict"].module(x)
    for fmt, model in loaded.items():
        torch.testing.assert_close(model.module(x), expected, rtol=1e-4, atol=1e-4)


def test_exported_program_carries_its_input_spec(model_files):
    model = load_model(model_files["exported"])
    assert [(s.name, s.shape, s.dtype) for s in model.inputs] == [("x", (1, 1, 32, 32), "float32")]
    assert not model.structural and model.notes


def test_structural_only_for_python_modules(model_files):
    assert load_model(model_files["state_dict"], arch=ARCH, input_shapes=[SHAPE]).structural
    assert not load_model(model_files["torchscript"], input_shapes=[SHAPE]).structural


@pytest.mark.parametrize("name, content, message", [
    ("zero.pt", b"", "empty (0 bytes)"),
    ("corrupt.pt", b"\x00\x01garbage that is not a pytorch file" * 10, "not a readable PyTorch file"),
    ("corrupt.pt2", b"not a zip archive at all", "not a valid torch.export .pt2 file"),
    ("corrupt.onnx", b"\x08\x07garbage", "not a valid ONNX model"),
    ("model.h5", b"something", "unknown model file extension '.h5'"),
])
def test_bad_files_give_one_clear_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ModelLoadError) as info:
        load_model(path, input_shapes=[SHAPE])
    assert message in info.value.one_line()
    assert "\n" not in info.value.one_line()
    assert info.value.exit_code == 2


def test_missing_file(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(tmp_path / "nope.pt")


def test_state_dict_without_arch_names_the_flag(model_files):
    with pytest.raises(ModelLoadError) as info:
        load_model(model_files["state_dict"], input_shapes=[SHAPE])
    assert "--arch" in info.value.one_line()


def test_state_dict_with_the_wrong_arch(model_files):
    with pytest.raises(ModelLoadError, match="do not fit --arch"):
        load_model(model_files["state_dict"], arch="deploy.examples.tiny_bert:tiny_bert", input_shapes=[SHAPE])


@pytest.mark.parametrize("arch, message", [
    ("no_colon_here", "module:function"),
    ("no_such_module_xyz:build", "cannot import"),
    ("deploy.examples.digits_cnn:no_such_factory", "has no attribute"),
])
def test_bad_arch(model_files, arch, message):
    with pytest.raises(ModelLoadError, match=message):
        load_model(model_files["state_dict"], arch=arch, input_shapes=[SHAPE])


def test_pickle_needs_the_flag_and_names_the_risk(model_files):
    with pytest.raises(ModelLoadError) as info:
        load_model(model_files["pickle"], input_shapes=[SHAPE])
    line = info.value.one_line()
    assert "a safe load of pickled.pt refused code in it" in line
    assert "DigitsCNN" in line and "--trust-pickle" in line and "--arch" in line


def test_unknown_input_shape_asks_for_the_flag(model_files):
    with pytest.raises(InputSpecError, match="--input-shape"):
        load_model(model_files["torchscript"])


def test_wrong_input_shape_is_caught_on_load(model_files):
    with pytest.raises(InputSpecError, match="does not run on input image:1x3x32x32"):
        load_model(model_files["state_dict"], arch=ARCH, input_shapes=["image:1x3x32x32"])


def test_parse_input_shape():
    spec = parse_input_shape("input_ids:batchx128:int64")
    assert (spec.name, spec.shape, spec.dtype) == ("input_ids", ("batch", 128), "int64")
    assert parse_input_shape("1x3x8x8").name == "input"
    for bad in ("", "1x0x3", "a:1x2:complex999", "::"):
        with pytest.raises(InputSpecError):
            parse_input_shape(bad)
