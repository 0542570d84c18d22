"""Calibration data from every source, split deterministically, with clear errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from deploy.core.data import RANDOM_WARNING, DataConfig, from_tensors, load_calibration
from deploy.core.errors import DataError
from deploy.core.spec import InputSpec

IMAGE = [InputSpec("image", ("batch", 1, 32, 32))]
TEXT = [InputSpec("input_ids", ("batch", 16), "int64"), InputSpec("attention_mask", ("batch", 16), "int64")]


def test_npz_with_labels_splits_deterministically(tmp_path):
    x = np.random.default_rng(0).normal(size=(40, 1, 32, 32)).astype(np.float32)
    np.savez(tmp_path / "d.npz", image=x, labels=np.arange(40) % 10)
    a = load_calibration(tmp_path / "d.npz", IMAGE)
    b = load_calibration(tmp_path / "d.npz", IMAGE)
    # 25% held out; of the rest 20% validation (early stopping, the planner's choices), the remainder calibration
    assert len(a.calibration) == 24 and len(a.validation) == 6 and len(a.held_out) == 10
    assert not {id(s) for s in a.validation} & ({id(s) for s in a.calibration} | {id(s) for s in a.held_out})
    assert len(a.batches("validation", 4)) == 2
    assert a.data_hash == b.data_hash and torch.equal(a.held_out_labels, b.held_out_labels)
    assert all(torch.equal(p[0], q[0]) for p, q in zip(a.held_out, b.held_out))
    held = {tuple(s[0].flatten()[:3].tolist()) for s in a.held_out}
    calib = {tuple(s[0].flatten()[:3].tolist()) for s in a.calibration}
    assert not held & calib
    batches = a.batches("held_out", batch_size=4)
    assert [b[0].shape[0] for b in batches] == [4, 4, 2]
    assert not a.is_random and not a.warnings


def test_npy_single_input(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((8, 1, 32, 32), np.float32))
    data = load_calibration(tmp_path / "x.npy", IMAGE)
    assert data.calibration[0][0].shape == (1, 1, 32, 32)


def test_wrong_shape_names_the_input(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((8, 3, 32, 32), np.float32))
    with pytest.raises(DataError, match="input 'image' wants batchx1x32x32"):
        load_calibration(tmp_path / "x.npy", IMAGE)


def test_image_folder_with_class_subfolders(tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    data = load_calibration(tmp_path, IMAGE, DataConfig(image_mean=(0.5,), image_std=(0.25,)))
    assert data.calibration[0][0].shape == (1, 1, 32, 32)
    assert set(data.held_out_labels.tolist()) <= {0, 1}
    (tmp_path / "dog" / "bad.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match="cannot read image"):
        load_calibration(tmp_path, IMAGE)


def test_text_with_a_local_tokenizer(tmp_path):
    from deploy.examples.docstring_corpus import docstring_corpus
    from deploy.examples.tiny_bert import build_tokenizer

    build_tokenizer(tmp_path / "tok")
    (tmp_path / "corpus.txt").write_text("\n".join(docstring_corpus()[:20]))
    data = load_calibration(tmp_path / "corpus.txt", TEXT, tokenizer=tmp_path / "tok")
    ids, mask = data.calibration[0]
    assert ids.shape == (1, 16) and ids.dtype == torch.int64 and mask.sum() > 0
    with pytest.raises(DataError, match="needs a tokenizer"):
        load_calibration(tmp_path / "corpus.txt", TEXT)


def _hook():
    return [torch.full((1, 1, 32, 32), float(i)) for i in range(6)]


def test_module_function_hook():
    data = load_calibration("test_data:_hook", IMAGE)
    assert len(data.calibration) + len(data.held_out) == 6


def test_random_only_when_asked_and_flagged():
    data = load_calibration("random", IMAGE)
    assert data.is_random and RANDOM_WARNING in data.warnings


def test_random_samples_fill_a_fixed_batch_one_sample_a_row():
    """A model whose batch is fixed at 2 (a .pt2 exported with static shapes) gets batches of exactly 2 rows."""
    data = load_calibration("random", [InputSpec("image", (2, 1, 8, 8))])
    assert data.fixed_batch == 2 and all(s[0].shape == (1, 1, 8, 8) for s in data.calibration)
    assert {b[0].shape for b in data.batches("held_out", 32)} == {(2, 1, 8, 8)}


@pytest.mark.parametrize("source, message", [("missing_dir/", "does not exist"), ("x.csv", "cannot read")])
def test_bad_sources(tmp_path, source, message):
    if source.endswith(".csv"):
        (tmp_path / source).write_text("1,2,3")
    with pytest.raises(DataError, match=message):
        load_calibration(tmp_path / source, IMAGE)


def test_from_tensors():
    data = from_tensors([(torch.randn(1, 1, 32, 32),) for _ in range(8)], labels=list(range(8)))
    assert len(data.held_out) == 2 and data.held_out_labels.shape == (2,)


def test_leading_batches_count_samples_when_the_batch_is_fixed():
    """A model exported with its batch fixed at 1 (`--input-shape ids:1x128:int64`) got the first 16 batches of
    one sample where the quantization preset asks for 16 batches of 16: 16 calibration samples instead of 256."""
    import torch

    from deploy.core.data import CalibrationSet

    samples = [(torch.full((1, 3), float(i)),) for i in range(300)]
    free = CalibrationSet(samples, [], None, "test", "x")
    fixed = CalibrationSet(samples, [], None, "test", "x", fixed_batch=1)
    assert [b[0].shape[0] for b in free.leading("calibration", 16, 4)] == [16] * 4
    got = fixed.leading("calibration", 16, 4)
    assert len(got) == 64 and all(b[0].shape[0] == 1 for b in got)
    assert [float(b[0][0, 0]) for b in got] == [float(i) for i in range(64)]  # the same samples, in order
    assert sum(b[0].shape[0] for b in fixed.leading("calibration", 16, 100)) == 300  # no more than there are


def test_torch_passes_batch_freely_only_where_the_module_runs_any_batch():
    """With `--input-shape x:1x...` the exported model takes one sample at a time; calibration, sensitivities and
    the drop order run the torch module only, so where it computes the same on a bigger batch they batch freely.
    A module that reshapes by a hard-coded batch keeps the fixed batches."""
    import torch

    from deploy.core.data import CalibrationSet, torch_takes_any_batch

    class AnyBatch(torch.nn.Module):
        def forward(self, x):
            return x.flatten(1) * 2.0

    class BatchOfOne(torch.nn.Module):
        def forward(self, x):
            return x.reshape(1, -1) * 2.0  # batch 2 gives a (1, 6) output: not the samples apart

    samples = [(torch.full((1, 3), float(i)),) for i in range(64)]
    data = CalibrationSet(samples, samples[:4], None, "test", "x", fixed_batch=1)
    assert torch_takes_any_batch(AnyBatch(), data) and not torch_takes_any_batch(BatchOfOne(), data)
    assert not torch_takes_any_batch(AnyBatch(), CalibrationSet(samples, [], None, "t", "x"))  # not fixed: moot
    data.torch_any_batch = True
    got = data.leading("calibration", 16, 2)
    assert [b[0].shape[0] for b in got] == [16, 16]
    assert [float(v) for v in torch.cat([b[0][:, 0] for b in got])] == [float(i) for i in range(32)]
    assert all(b[0].shape[0] == 1 for b in data.batches("held_out", 16))  # what the runtime sees stays fixed


def test_held_out_data_of_its_own_leaves_all_of_the_calibration_data_to_calibrate(tmp_path):
    """With --held-out the report is scored on that data; every --calib sample calibrates or validates."""
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "calib.npz", image=rng.normal(size=(40, 1, 32, 32)).astype(np.float32))
    held_x = rng.normal(size=(12, 1, 32, 32)).astype(np.float32)
    np.savez(tmp_path / "held.npz", image=held_x, labels=np.arange(12) % 10)
    alone = load_calibration(tmp_path / "calib.npz", IMAGE)
    data = load_calibration(tmp_path / "calib.npz", IMAGE, held_out=tmp_path / "held.npz")
    assert len(data.calibration) == 32 and len(data.validation) == 8  # 20% of all 40 validate, none held out
    assert len(data.held_out) == 12 and torch.equal(data.held_out_labels, torch.arange(12) % 10)
    assert all(torch.equal(s[0], torch.from_numpy(held_x[i:i + 1])) for i, s in enumerate(data.held_out))
    assert len(alone.held_out) == 10 and alone.data_hash != data.data_hash  # caches keyed by the data see both
    assert "held.npz" in data.source


def test_held_out_data_is_checked_like_calibration_data(tmp_path):
    np.savez(tmp_path / "calib.npz", image=np.zeros((8, 1, 32, 32), np.float32))
    np.savez(tmp_path / "wrong.npz", image=np.zeros((8, 3, 32, 32), np.float32))
    with pytest.raises(DataError, match="held-out data .*wrong.npz.*shape"):
        load_calibration(tmp_path / "calib.npz", IMAGE, held_out=tmp_path / "wrong.npz")
    with pytest.raises(DataError, match="held-out data .*missing.npz does not exist") as missing:
        load_calibration(tmp_path / "calib.npz", IMAGE, held_out=tmp_path / "missing.npz")
    assert "random" not in str(missing.value)  # held-out data may not be random: the hint does not offer it
    with pytest.raises(DataError, match="cannot be random"):
        load_calibration(tmp_path / "calib.npz", IMAGE, held_out="random")
