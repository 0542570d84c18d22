"""Fidelity of a compressed model against the original, on held-out data.

Classification outputs ([N, classes]) get top-1 agreement, accuracy when labels exist, KL and SQNR. Sequence
outputs ([N, tokens, hidden]) get the cosine of mean-pooled embeddings (masked by the attention mask when given),
per-token cosine and SQNR. The primary number for a budget or a fidelity floor is `primary_metric(...)`.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F

PRIMARY = {"classification": "top1_agreement", "embedding": "pooled_cosine", "regression": "cosine"}


def first_tensor(output: Any) -> torch.Tensor:
    """The tensor a model's output means for fidelity: itself, `last_hidden_state` of a transformers output, or the
    first tensor in a tuple, list or dict. One definition for every pass that reads model outputs."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "last_hidden_state") and isinstance(output.last_hidden_state, torch.Tensor):
        return output.last_hidden_state
    values = output.values() if isinstance(output, dict) else output
    if isinstance(values, (tuple, list)) or isinstance(output, dict):
        for value in values:
            try:
                return first_tensor(value)
            except TypeError:
                continue
    raise TypeError(f"cannot take a tensor from {type(output).__name__}")


def _cat(outputs: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
    if isinstance(outputs, torch.Tensor):
        return outputs.detach().float()
    return torch.cat([torch.as_tensor(o).detach().float() for o in outputs])


def task_of(reference: torch.Tensor) -> str:
    if reference.dim() == 2 and reference.shape[1] > 1:
        return "classification"
    if reference.dim() == 3:
        return "embedding"
    return "regression"


def sqnr_db(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (inf when identical)."""
    noise = (reference - candidate).pow(2).sum().item()
    signal = reference.pow(2).sum().item()
    if noise == 0.0:
        return math.inf
    return 10.0 * math.log10(max(signal, 1e-30) / noise)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return hidden.mean(dim=1)
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


def fidelity(reference: Sequence[torch.Tensor] | torch.Tensor, candidate: Sequence[torch.Tensor] | torch.Tensor,
             labels: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None) -> dict[str, float | str]:
    """Compare outputs of the original (reference) and compressed (candidate) model on the same inputs."""
    ref, cand = _cat(reference), _cat(candidate)
    if ref.shape != cand.shape:
        raise ValueError(f"output shapes differ: reference {tuple(ref.shape)} vs candidate {tuple(cand.shape)}")
    task = task_of(ref)
    # A sample whose output holds NaN or infinity agrees with nothing: it scores as a miss in every metric (an
    # all-NaN column would otherwise give top-1 agreement 1.0, argmax being 0 on both sides).
    ok = torch.isfinite(cand.reshape(cand.shape[0], -1)).all(1)
    bad = int((~ok).sum())
    cand = torch.where(torch.isfinite(cand), cand, torch.zeros_like(cand))
    result: dict[str, float | str] = {"task": task, "samples": int(ref.shape[0]), "non_finite_samples": bad,
                                      "sqnr_db": sqnr_db(ref, cand) if not bad else -math.inf,
                                      "mse": F.mse_loss(cand, ref).item() if not bad else math.inf}
    flat_ref, flat_cand = ref.reshape(ref.shape[0], -1), cand.reshape(cand.shape[0], -1)
    result["cosine"] = _mean_where(F.cosine_similarity(flat_ref, flat_cand, dim=1, eps=1e-12), ok)
    if task == "classification":
        result["top1_agreement"] = _mean_where((ref.argmax(1) == cand.argmax(1)).float(), ok)
        log_p, log_q = F.log_softmax(ref, 1), F.log_softmax(cand, 1)
        result["kl"] = F.kl_div(log_q, log_p, log_target=True, reduction="batchmean").item() if not bad else math.inf
        if labels is not None:
            labels = torch.as_tensor(labels).long().reshape(-1)
            result["accuracy"] = _mean_where((cand.argmax(1) == labels).float(), ok)
            result["reference_accuracy"] = (ref.argmax(1) == labels).float().mean().item()
    elif task == "embedding":
        mask = None if attention_mask is None else torch.as_tensor(attention_mask)
        pooled_ref, pooled_cand = mean_pool(ref, mask), mean_pool(cand, mask)
        result["pooled_cosine"] = _mean_where(F.cosine_similarity(pooled_ref, pooled_cand, dim=1, eps=1e-12), ok)
        token_ok = ok.reshape(-1, 1).expand(ref.shape[0], ref.shape[1])
        result["token_cosine"] = _mean_where(F.cosine_similarity(ref, cand, dim=-1, eps=1e-12), token_ok)
        result["nn_agreement"] = nearest_neighbour_agreement(pooled_ref, pooled_cand) * (1 - bad / ref.shape[0])
    return result


def _mean_where(values: torch.Tensor, ok: torch.Tensor) -> float:
    """The mean with samples that are not `ok` counted as 0 (a miss)."""
    return torch.where(ok, values, torch.zeros_like(values)).float().mean().item()


def nearest_neighbour_agreement(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    """Share of samples whose nearest other sample (by cosine) is the same for both models' embeddings."""
    return nearest_neighbour_hits(reference, candidate).float().mean().item()


def nearest_neighbour_hits(reference: torch.Tensor, candidate: torch.Tensor) -> torch.Tensor:
    """Per sample, whether its nearest other sample (by cosine) is the same for both models' embeddings: the
    per-sample values a paired interval on the agreement is drawn from."""
    if reference.shape[0] < 3:
        return torch.ones(reference.shape[0], dtype=torch.bool)

    def nearest(x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(x, dim=1)
        sim = x @ x.T
        sim.fill_diagonal_(-math.inf)
        return sim.argmax(1)

    return nearest(reference) == nearest(candidate)


def primary_metric(result: dict[str, float | str]) -> tuple[str, float]:
    """The one number a fidelity floor is checked against, by task."""
    name = PRIMARY[str(result["task"])]
    return name, float(result[name])
