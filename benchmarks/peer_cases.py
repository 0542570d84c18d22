"""One benchmark case per model: the module, its inputs, and the data every tool gets alike.

Every tool calibrates on the same batch-1 feeds and is judged on the same held-out batches, so the differences in
the table are the tools', not the data's. Real models get real data (digits: the held-out split with labels;
MiniLM: English docstrings, calibration texts disjoint from evaluation texts); the random-init reference
architectures get random inputs and latency rows only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from deploy.core.spec import InputSpec

import models

SEQ_LEN = 128
IMAGE = (1, 3, 224, 224)
LATENCY_ONLY = ("resnet18", "resnet50", "mobilenetv2", "vit_tiny")
ALL_MODELS = ("digits_cnn", "minilm") + LATENCY_ONLY

Feeds = dict[str, np.ndarray]
FFN_SCOPE = "FFN neurons only (heads and hidden width kept)"


@dataclass(frozen=True)
class Sizes:
    """How much data: calibration samples, evaluation samples, evaluation batch."""

    calib: int
    eval: int
    eval_batch: int


FULL = Sizes(calib=128, eval=256, eval_batch=16)
QUICK = Sizes(calib=16, eval=48, eval_batch=16)


@dataclass
class EvalSet:
    """Held-out batches, the fp32 model's outputs on them, and what the metric needs besides (labels, mask)."""

    batches: list[Feeds]
    reference: torch.Tensor
    labels: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    source: str = ""


@dataclass
class Case:
    name: str
    title: str
    module: nn.Module
    inputs: tuple[InputSpec, ...]  # batch dynamic; other dims fixed
    timing_feeds: Feeds  # batch 1
    calib: list[Feeds]  # batch-1 samples
    calib_source: str
    transformer: bool
    prune_roots: Callable[[nn.Module], list[nn.Module]]  # the layers Torch-Pruning may shrink; all others ignored
    eval: EvalSet | None = None
    output_name: str = "output"
    prune_scope: str = "every conv's channels (the classifier's outputs kept)"


def _batches(arrays: dict[str, np.ndarray], batch: int) -> list[Feeds]:
    n = len(next(iter(arrays.values())))
    return [{k: np.ascontiguousarray(v[i:i + batch]) for k, v in arrays.items()} for i in range(0, n, batch)]


@torch.no_grad()
def _reference(module: nn.Module, batches: list[Feeds], names: tuple[str, ...]) -> torch.Tensor:
    return torch.cat([module(*(torch.from_numpy(b[n]) for n in names)).float() for b in batches])


def _all_but_final(final: str) -> Callable[[nn.Module], list[nn.Module]]:
    """Conv nets: every conv may be pruned (Torch-Pruning follows residual couplings); the classifier keeps its
    outputs."""
    def roots(module: nn.Module) -> list[nn.Module]:
        head = module.get_submodule(final)
        return [m for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and m is not head]
    return roots


def _ffn_layers(suffix: str) -> Callable[[nn.Module], list[nn.Module]]:
    """Transformers: FFN neurons only (the first FFN Linear's outputs), which Torch-Pruning handles; its head
    pruning fails on transformers 5 (DESIGN section 8) and the hidden width is tied to every residual."""
    def roots(module: nn.Module) -> list[nn.Module]:
        return [m for name, m in module.named_modules() if isinstance(m, nn.Linear) and name.endswith(suffix)]
    return roots


def digits_case(sizes: Sizes) -> Case:
    from deploy.examples.digits_cnn import INPUT_NAME, load_digits_split

    module = models.load_digits_cnn()
    train_x, _, test_x, test_y = load_digits_split()
    test_x, test_y = test_x[: sizes.eval], test_y[: sizes.eval]
    batches = _batches({INPUT_NAME: test_x.numpy()}, sizes.eval_batch)
    calib = [{INPUT_NAME: train_x[i:i + 1].numpy()} for i in range(sizes.calib)]
    return Case(
        name="digits_cnn", title="digits CNN (bundled, trained), 1x1x32x32", module=module,
        inputs=(InputSpec(INPUT_NAME, ("batch", 1, 32, 32)),),
        timing_feeds={INPUT_NAME: np.ascontiguousarray(test_x[:1].numpy())},
        calib=calib, calib_source=f"{sizes.calib} images of the digits train split", transformer=False,
        prune_roots=_all_but_final("fc"),
        eval=EvalSet(batches, _reference(module, batches, (INPUT_NAME,)), labels=test_y,
                     source=f"{len(test_y)} held-out digits (scikit-learn digits, stratified 80/20 split, seed 0)"),
    )


def minilm_case(sizes: Sizes) -> Case:
    from deploy.examples.docstring_corpus import docstring_corpus

    module, tokenizer = models.load_minilm()
    texts = docstring_corpus()
    eval_texts, calib_texts = texts[: sizes.eval], texts[-sizes.calib:]  # disjoint ends of a 2500-text corpus

    def encode(batch: list[str]) -> dict[str, np.ndarray]:
        enc = tokenizer(batch, padding="max_length", truncation=True, max_length=SEQ_LEN, return_tensors="np")
        return {"input_ids": enc["input_ids"].astype(np.int64),
                "attention_mask": enc["attention_mask"].astype(np.int64)}

    arrays = encode(eval_texts)
    batches = _batches(arrays, sizes.eval_batch)
    calib = _batches(encode(calib_texts), 1)
    names = ("input_ids", "attention_mask")
    return Case(
        name="minilm", title=f"all-MiniLM-L6-v2 (pretrained), seq {SEQ_LEN}", module=module,
        inputs=(InputSpec("input_ids", ("batch", SEQ_LEN), "int64"),
                InputSpec("attention_mask", ("batch", SEQ_LEN), "int64")),
        timing_feeds={k: np.ascontiguousarray(v[:1]) for k, v in arrays.items()},
        calib=calib, calib_source=f"{sizes.calib} English docstrings (disjoint from the evaluation texts)",
        transformer=True, prune_roots=_ffn_layers("intermediate.dense"), output_name="last_hidden_state",
        prune_scope=FFN_SCOPE,
        eval=EvalSet(batches, _reference(module, batches, names),
                     attention_mask=torch.from_numpy(arrays["attention_mask"]),
                     source=f"{len(eval_texts)} English docstrings from the Python standard library, padded to "
                            f"{SEQ_LEN} tokens"),
    )


def latency_case(name: str, sizes: Sizes) -> Case:
    module = models.ARCHITECTURES[name]()
    rng = np.random.default_rng(0)
    calib = [{"image": rng.standard_normal(IMAGE).astype(np.float32)} for _ in range(max(4, sizes.calib // 4))]
    transformer = name.startswith("vit")
    titles = {"resnet18": "ResNet-18", "resnet50": "ResNet-50", "mobilenetv2": "MobileNetV2 1.0",
              "vit_tiny": "ViT-Tiny/16-like"}
    return Case(
        name=name, title=f"{titles[name]} (random init, latency only), 1x3x224x224", module=module,
        inputs=(InputSpec("image", ("batch", 3, 224, 224)),), timing_feeds={"image": calib[0]["image"]},
        calib=calib, calib_source=f"{len(calib)} random images (random weights: only latency is meaningful)",
        transformer=transformer,
        prune_roots=_ffn_layers("mlp.fc1") if transformer else
        _all_but_final("classifier" if name == "mobilenetv2" else "fc"),
        **({"prune_scope": FFN_SCOPE} if transformer else {}),
    )


def build_case(name: str, sizes: Sizes) -> Case:
    if name == "digits_cnn":
        return digits_case(sizes)
    if name == "minilm":
        return minilm_case(sizes)
    if name in LATENCY_ONLY:
        return latency_case(name, sizes)
    raise SystemExit(f"unknown model '{name}'; known: {', '.join(ALL_MODELS)}")
