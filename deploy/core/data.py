"""Calibration and held-out evaluation data, from a folder of images, .npy/.npz arrays, a text file plus a local
tokenizer, a `module:function` hook, or (only when asked) random tensors.

The split into calibration and held-out parts is deterministic, so two runs on the same data see the same samples.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from deploy.core.errors import DataError
from deploy.core.spec import InputSpec, torch_dtype

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
RANDOM_WARNING = "calibration data is random (--calib random): fidelity numbers in this report mean nothing"


@dataclass(frozen=True)
class DataConfig:
    """How to read and split the data. Image options apply to image folders only."""

    held_out_fraction: float = 0.25  # scored only: what a report says about the result
    validation_fraction: float = 0.2  # of the rest: early stopping and the plan's choices, never reported as held-out
    max_samples: int = 512
    seed: int = 0
    image_mean: tuple[float, ...] = (0.0,)
    image_std: tuple[float, ...] = (1.0,)
    image_scale: float = 1.0 / 255.0
    random_samples: int = 32

    def __post_init__(self) -> None:
        if not 0.0 < self.held_out_fraction < 1.0:
            raise DataError(f"held-out fraction must be between 0 and 1, got {self.held_out_fraction}")
        if self.max_samples < 2:
            raise DataError(f"max_samples must be at least 2, got {self.max_samples}")


def concatenated(samples: Sequence[tuple[torch.Tensor, ...]], size: int) -> list[tuple[torch.Tensor, ...]]:
    """Consecutive samples (batch 1 each) concatenated along the batch axis, at most `size` to a batch; a sample
    whose shapes differ from its batch's (text trimmed to another length) starts the next batch. One rule for every
    pass that batches samples: the calibration splits, the pruning probes and the refit's moments."""
    out: list[tuple[torch.Tensor, ...]] = []
    group: list[tuple[torch.Tensor, ...]] = []
    for sample in samples:
        if group and (len(group) == size or [t.shape[1:] for t in sample] != [t.shape[1:] for t in group[0]]):
            out.append(tuple(torch.cat(parts) for parts in zip(*group)))
            group = []
        group.append(sample)
    if group:
        out.append(tuple(torch.cat(parts) for parts in zip(*group)))
    return out


@dataclass
class CalibrationSet:
    """Samples (each a tuple of tensors with batch 1, in input-spec order), split three ways: calibration
    (sensitivities, distillation steps), validation (recovery's early stop and the planner's choices between
    candidates) and held-out (only the numbers a report gives; nothing is tuned on it). Where the data are too few
    for a validation split, validation is the calibration part. "statistics" is calibration and validation
    together: the quantizer's activation ranges, SmoothQuant, GPTQ and bias correction are statistics, and more
    samples make them better (all-MiniLM-L6-v2's int8 on 205 of 256 docstrings, four draws: out-of-domain pooled
    cosine 0.9965-0.9973; on all 256: 0.9973-0.9976, NNCF int8's 0.9971; which samples, and in which order, moves
    nearest-neighbour agreement on 139 sentences by +-0.03). The planner's choices on validation then see quantized
    outputs whose ranges those samples helped set; the report's held-out numbers stay unbiased."""

    calibration: list[tuple[torch.Tensor, ...]]
    held_out: list[tuple[torch.Tensor, ...]]
    held_out_labels: torch.Tensor | None
    source: str
    data_hash: str
    is_random: bool = False
    warnings: list[str] = field(default_factory=list)
    fixed_batch: int | None = None  # the model's batch axis is fixed at this size: every batch has exactly it
    validation: list[tuple[torch.Tensor, ...]] = field(default_factory=list)
    # the torch module runs any batch though the exported model's is fixed (checked once, `torch_takes_any_batch`)
    torch_any_batch: bool = False

    def batches(self, which: str = "calibration", batch_size: int = 16, torch_only: bool = False
                ) -> list[tuple[torch.Tensor, ...]]:
        """Concatenate samples into batches (the model's batch axis is dimension 0). A model with a fixed batch
        size gets batches of exactly that size (the split holds a multiple of it, so none is short), unless the
        batches only go through the torch module and it runs any batch (`torch_only` and `torch_any_batch`)."""
        if which not in ("calibration", "validation", "held_out", "statistics"):
            raise ValueError(f"no split named {which!r}")
        samples = {"calibration": self.calibration, "held_out": self.held_out,
                   "validation": self.validation or self.calibration,
                   "statistics": self.calibration + self.validation}[which]
        if self.fixed_batch and not (torch_only and self.torch_any_batch):
            batch_size = self.fixed_batch
        return concatenated(samples, batch_size)

    def leading(self, which: str, batch_size: int, count: int) -> list[tuple[torch.Tensor, ...]]:
        """The first `count` batches of `batch_size` samples, counted in samples, for the torch-only passes
        (calibration, sensitivities, the depth drop order): a model whose batch is fixed at a smaller size gets as
        many of its batches as hold the same samples (taking `count` batches of a fixed batch of 1 calibrated a
        16 x 16-sample preset on 16 samples), or batches of `batch_size` where its torch module runs any batch
        (256 samples through MiniLM one at a time took minutes per precision problem)."""
        out, taken = [], 0
        for batch in self.batches(which, batch_size, torch_only=True):
            if taken >= count * batch_size:
                break
            out.append(batch)
            taken += int(batch[0].shape[0])
        return out


def load_calibration(source: str | Path, inputs: Sequence[InputSpec], config: DataConfig = DataConfig(),
                     tokenizer: str | Path | None = None, held_out: str | Path | None = None) -> CalibrationSet:
    """Read `source` into samples that fit `inputs`; a mismatch is one line naming the input and shapes. With
    `held_out` (data of the same kinds, not 'random'), the report is scored on it and all of `source` goes to
    calibration and validation; else a share of `source` is held out."""
    samples, labels, warnings = _read(str(source), inputs, config, tokenizer, "calibration")
    held = None
    if held_out is not None:
        if str(held_out) == "random":
            raise DataError("held-out data cannot be random: the report's fidelity would mean nothing",
                            "give held-out data of your own, or leave --held-out out (a share of --calib is kept)")
        try:
            held_samples, held_labels, held_warnings = _read(str(held_out), inputs, config, tokenizer, "held-out")
        except DataError as error:  # say which of the two sources it was
            if "held-out" in error.message:
                raise
            raise DataError(f"held-out data {held_out}: {error.message}", error.hint) from None
        held, warnings = (held_samples, held_labels, str(held_out)), warnings + held_warnings
    split = _split(samples, labels, str(source), config, warnings, str(source) == "random", held)
    return with_fixed_batch(split, fixed_batch(inputs))


def _read(text: str, inputs: Sequence[InputSpec], config: DataConfig, tokenizer: str | Path | None, role: str
          ) -> tuple[list[tuple[torch.Tensor, ...]], np.ndarray | None, list[str]]:
    """The samples (at most config.max_samples where unlabelled), labels and warnings of one data source."""
    labels: np.ndarray | None = None
    warnings: list[str] = []
    if text == "random":
        samples = _random_samples(inputs, config)
        warnings.append(RANDOM_WARNING)
    elif ":" in text and not Path(text).exists():
        samples = _hook_samples(text, inputs)
    else:
        path = Path(text)
        if not path.exists():
            kinds = "a folder of images, .npy/.npz, a .txt with --tokenizer, module:function"
            raise DataError(f"{role} data {path} does not exist",
                            f"give {kinds}" + (", or 'random'" if role == "calibration" else ""))
        if path.is_dir():
            samples, labels = _image_samples(path, inputs, config)
        elif path.suffix == ".npy":
            samples, labels = _array_samples({inputs[0].name: _np_load(path)}, inputs), None
        elif path.suffix == ".npz":
            with _np_load(path) as archive:
                arrays = {k: archive[k] for k in archive.files}
            labels = arrays.pop("labels", None)
            samples = _array_samples(arrays, inputs)
        elif path.suffix == ".txt":
            samples = _text_samples(path, inputs, tokenizer, config)
        else:
            raise DataError(f"cannot read {role} data '{path.name}'",
                            "give a folder of images, .npy, .npz, a .txt with --tokenizer, or module:function")
    if len(samples) < 2:
        raise DataError(f"{role} data {text} has {len(samples)} sample(s)", "give at least 2 (more is better)")
    return (samples[: config.max_samples] if labels is None else samples), labels, warnings


def fixed_batch(inputs: Sequence[InputSpec]) -> int | None:
    """The batch size every input fixes (e.g. `--input-shape image:4x3x32x32`), or None when it is dynamic."""
    firsts = {s.shape[0] for s in inputs if s.shape}
    if len(firsts) == 1 and isinstance(next(iter(firsts)), int):
        return int(next(iter(firsts)))
    return None


def torch_takes_any_batch(module: torch.nn.Module, calibration: CalibrationSet) -> bool:
    """Whether the torch module, given two of the model's fixed batches as one, computes what it computes for them
    apart (a model that reshapes by a hard-coded batch size fails or mixes samples: it keeps the fixed batches)."""
    from deploy.core.metrics import first_tensor

    if not calibration.fixed_batch:
        return False
    pair = calibration.batches("calibration")[:2]
    if len(pair) < 2:
        return False
    together = tuple(torch.cat(parts) for parts in zip(*pair))
    try:
        with torch.no_grad():
            joint = first_tensor(module(*together)).float()
            apart = torch.cat([first_tensor(module(*b)).float() for b in pair])
    except Exception:  # noqa: BLE001 - any failure means "not batch-agnostic": the fixed batches are kept
        return False
    scale = float(apart.abs().max()) if apart.numel() else 0.0
    return joint.shape == apart.shape and bool(torch.allclose(joint, apart, rtol=1e-3, atol=1e-4 * max(scale, 1e-6)))


def with_fixed_batch(split: CalibrationSet, batch: int | None) -> CalibrationSet:
    """Calibrate and evaluate in batches of the model's fixed size: each part is cut to a multiple of it."""
    if not batch:
        return split
    if len(split.held_out) < batch or len(split.calibration) < batch:
        raise DataError(f"the model's batch size is fixed at {batch}, but the data gives only "
                        f"{len(split.calibration)} calibration and {len(split.held_out)} held-out samples",
                        f"give at least {4 * batch} samples, or a dynamic batch axis (--input-shape NAME:batchx...)")
    held = len(split.held_out) // batch * batch
    split.calibration = split.calibration[: len(split.calibration) // batch * batch]
    split.validation = split.validation[: len(split.validation) // batch * batch]
    split.held_out = split.held_out[:held]
    if split.held_out_labels is not None:
        split.held_out_labels = split.held_out_labels[:held]
    split.fixed_batch = batch
    return split


def _split(samples: list[tuple[torch.Tensor, ...]], labels: np.ndarray | None, source: str, config: DataConfig,
           warnings: list[str], is_random: bool, held: tuple[list, np.ndarray | None, str] | None = None
           ) -> CalibrationSet:
    """Held-out (a share of `samples`, or `held`: samples, labels, source of their own), validation (a share of
    the rest) and calibration, in a seeded order."""
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(config.seed)).tolist()
    order = order[: config.max_samples]
    n_held = 0 if held is not None else max(1, int(round(len(order) * config.held_out_fraction)))
    held_idx, rest = order[:n_held], order[n_held:]
    n_val = int(round(len(rest) * config.validation_fraction)) if len(rest) >= 5 else 0
    val_idx, calib_idx = rest[:n_val], rest[n_val:]
    held_labels = None
    if labels is not None:
        if len(labels) != len(samples):
            raise DataError(f"{source}: {len(labels)} labels for {len(samples)} samples", "give one label per sample")
        held_labels = torch.as_tensor(np.asarray(labels)[held_idx]).long()
    held_samples = [samples[i] for i in held_idx]
    if held is not None:
        held_samples, given, source = held[0], held[1], f"{source} (held out: {held[2]})"
        if given is not None and len(given) != len(held_samples):
            raise DataError(f"{held[2]}: {len(given)} labels for {len(held_samples)} samples",
                            "give one label per sample")
        held_labels = None if given is None else torch.as_tensor(np.asarray(given)).long()
    digest = hashlib.sha256()
    for sample in samples + (held_samples if held is not None else []):
        for tensor in sample:
            digest.update(tensor.contiguous().numpy().tobytes())
    return CalibrationSet([samples[i] for i in calib_idx], held_samples, held_labels, source,
                          digest.hexdigest()[:16], is_random, warnings, validation=[samples[i] for i in val_idx])


def _np_load(path: Path) -> Any:
    try:
        return np.load(path, allow_pickle=False)
    except Exception as exc:
        raise DataError(f"cannot read {path.name} as numpy data ({exc})", "save it with numpy.save / numpy.savez") from None


def _fit(array: np.ndarray | torch.Tensor, spec: InputSpec, where: str) -> torch.Tensor:
    """One sample with batch 1, checked against the spec's fixed dimensions."""
    tensor = torch.as_tensor(np.asarray(array)).to(torch_dtype(spec.dtype))
    want = spec.shape[1:]
    if tensor.dim() == len(want):
        tensor = tensor.unsqueeze(0)
    got = tuple(tensor.shape[1:])
    if len(got) != len(want) or any(isinstance(w, int) and w != g for w, g in zip(want, got)):
        raise DataError(f"{where}: a sample has shape {tuple(tensor.shape)}, input '{spec.name}' wants "
                        f"{'x'.join(map(str, spec.shape))}", "check the data or --input-shape")
    return tensor[:1]


def _array_samples(arrays: dict[str, np.ndarray], inputs: Sequence[InputSpec]) -> list[tuple[torch.Tensor, ...]]:
    if len(inputs) == 1 and inputs[0].name not in arrays and len(arrays) == 1:
        arrays = {inputs[0].name: next(iter(arrays.values()))}
    missing = [s.name for s in inputs if s.name not in arrays]
    if missing:
        raise DataError(f"the data has no array for input '{missing[0]}' (arrays: {', '.join(arrays) or 'none'})",
                        "name each array after its input (numpy.savez(path, NAME=array))")
    count = len(arrays[inputs[0].name])
    if any(len(arrays[s.name]) != count for s in inputs):
        raise DataError("the input arrays have different sample counts", "give every input the same number of samples")
    return [tuple(_fit(arrays[s.name][i], s, s.name) for s in inputs) for i in range(count)]


def _image_samples(folder: Path, inputs: Sequence[InputSpec], config: DataConfig
                   ) -> tuple[list[tuple[torch.Tensor, ...]], np.ndarray | None]:
    from PIL import Image, UnidentifiedImageError

    if len(inputs) != 1 or len(inputs[0].shape) != 4:
        raise DataError(f"image folder {folder} needs a model with one NCHW image input", "use .npz for other inputs")
    spec = inputs[0]
    channels, height, width = (d if isinstance(d, int) else None for d in spec.shape[1:])
    if height is None or width is None:
        raise DataError("the image input has dynamic height/width", "pass --input-shape NAME:1x3xHxW")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"image folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})", "check the folder")
    classes = sorted({p.parent.name for p in files if p.parent != folder})
    labelled = bool(classes) and all(p.parent != folder for p in files)
    mean = np.array(config.image_mean, dtype=np.float32).reshape(-1, 1, 1)
    std = np.array(config.image_std, dtype=np.float32).reshape(-1, 1, 1)
    samples, labels = [], []
    for path in files:
        try:
            image = Image.open(path)
            image = image.convert("L" if channels == 1 else "RGB").resize((width, height), Image.BILINEAR)
        except (UnidentifiedImageError, OSError) as exc:
            raise DataError(f"cannot read image {path} ({exc})", "remove or replace the file") from None
        array = np.asarray(image, dtype=np.float32) * config.image_scale
        array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
        samples.append((_fit((array - mean) / std, spec, str(path)),))
        if labelled:
            labels.append(classes.index(path.parent.name))
    return samples, (np.array(labels) if labelled else None)


def _text_samples(path: Path, inputs: Sequence[InputSpec], tokenizer_dir: str | Path | None,
                  config: DataConfig) -> list[tuple[torch.Tensor, ...]]:
    if tokenizer_dir is None:
        raise DataError(f"text data {path.name} needs a tokenizer", "pass --tokenizer FOLDER (a saved Hugging Face tokenizer)")
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    except Exception as exc:
        raise DataError(f"cannot load a tokenizer from {tokenizer_dir} ({str(exc).splitlines()[0][:120]})",
                        "give a folder written by tokenizer.save_pretrained") from None
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    seq = next((d for d in inputs[0].shape[1:] if isinstance(d, int)), 128)
    samples = []
    for line in lines[: config.max_samples]:
        encoded = tokenizer(line, padding="max_length", truncation=True, max_length=seq, return_tensors="pt")
        missing = [s.name for s in inputs if s.name not in encoded]
        if missing:
            raise DataError(f"the tokenizer gives no '{missing[0]}' input", "name the model inputs as the tokenizer does")
        samples.append(tuple(_fit(encoded[s.name], s, s.name) for s in inputs))
    return samples


def _hook_samples(spec_text: str, inputs: Sequence[InputSpec]) -> list[tuple[torch.Tensor, ...]]:
    from deploy.core.user_code import call_user, import_object, iterate_user

    function = import_object(spec_text, "--calib", DataError)
    samples = []
    for item in iterate_user(call_user(function, "--calib", spec_text, error=DataError), "--calib", spec_text,
                             DataError):
        if isinstance(item, dict):
            samples.append(tuple(_fit(item[s.name], s, spec_text) for s in inputs))
        elif isinstance(item, (tuple, list)):
            samples.append(tuple(_fit(t, s, spec_text) for t, s in zip(item, inputs)))
        else:
            samples.append((_fit(item, inputs[0], spec_text),))
    return samples


def _random_samples(inputs: Sequence[InputSpec], config: DataConfig) -> list[tuple[torch.Tensor, ...]]:
    """One sample per row (batch axis 1, as every reader gives them): a batch fixed at 2 by the model is made of
    two samples, not of two samples of 2."""
    gen = torch.Generator().manual_seed(config.seed)
    first_row = lambda x: x[:1] if x.dim() else x  # noqa: E731
    return [tuple(first_row(spec.example(None, gen)) for spec in inputs) for _ in range(config.random_samples)]


def from_tensors(samples: Iterable[Sequence[torch.Tensor]], labels: Sequence[int] | None = None,
                 config: DataConfig = DataConfig(), source: str = "tensors") -> CalibrationSet:
    """The Python API's entry: samples already as tensors (each with batch 1)."""
    rows = [tuple(t if t.dim() and t.shape[0] == 1 else t.unsqueeze(0) for t in s) for s in samples]
    return _split(rows, None if labels is None else np.asarray(labels), source, config, [], is_random=False)
