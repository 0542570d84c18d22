"""Fidelity of one artifact: run the held-out batches in the same runtime and precision that was timed, then compare
with the fp32 PyTorch model (deploy.core.metrics), and with the labels where the data has them."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from deploy.core.metrics import fidelity
from deploy.targets.runners.registry import get_runner

from peer_cases import EvalSet

KEEP = ("accuracy", "reference_accuracy", "top1_agreement", "kl", "pooled_cosine", "nn_agreement", "token_cosine",
        "cosine", "sqnr_db")


def run_outputs(path: Path, runtime: str, precision: str | None, batches: list[dict[str, np.ndarray]],
                threads: int) -> torch.Tensor:
    """The first output for every batch, concatenated (OpenVINO compiles once per distinct batch shape; a model
    exported with a fixed batch size is fed in pieces of that size)."""
    outs = []
    if runtime == "onnxruntime":
        sess = get_runner("onnxruntime", threads).session(path)
        fixed = sess.get_inputs()[0].shape[0]
        if isinstance(fixed, int):
            batches = [{k: v[i:i + fixed] for k, v in b.items()} for b in batches
                       for i in range(0, len(next(iter(b.values()))), fixed)]
        outs = [sess.run(None, batch)[0] for batch in batches]
    else:
        runner = get_runner("openvino", threads, precision)
        compiled: dict[tuple, object] = {}
        for batch in batches:
            key = tuple((k, v.shape) for k, v in sorted(batch.items()))
            if key not in compiled:
                compiled[key] = runner.compile(path, batch)
            outs.append(np.asarray(compiled[key](batch)[0]))
    return torch.from_numpy(np.concatenate(outs)).float()


def score(path: Path, runtime: str, precision: str | None, evalset: EvalSet, threads: int) -> dict[str, float]:
    """Accuracy (if labelled), agreement and cosine metrics against the fp32 model; non-finite values become None."""
    out = run_outputs(path, runtime, precision, evalset.batches, threads)
    result = fidelity(evalset.reference, out, labels=evalset.labels, attention_mask=evalset.attention_mask)
    kept = {k: float(result[k]) for k in KEEP if k in result}
    return {k: (v if math.isfinite(v) else None) for k, v in kept.items()}
