"""Fidelity metrics on outputs with known answers."""
from __future__ import annotations

import math

import torch

from deploy.core.metrics import fidelity, primary_metric, sqnr_db


def test_identical_outputs_are_perfect():
    logits = torch.randn(20, 5, generator=torch.Generator().manual_seed(0))
    result = fidelity(logits, logits.clone(), labels=logits.argmax(1))
    assert result["top1_agreement"] == 1.0 and result["accuracy"] == 1.0
    assert math.isinf(result["sqnr_db"]) and abs(result["kl"]) < 1e-6 and abs(result["cosine"] - 1) < 1e-6
    assert primary_metric(result) == ("top1_agreement", 1.0)


def test_known_disagreement_and_accuracy():
    ref = torch.tensor([[2.0, 0.0], [2.0, 0.0], [0.0, 2.0], [0.0, 2.0]])
    cand = torch.tensor([[2.0, 0.0], [0.0, 2.0], [0.0, 2.0], [0.0, 2.0]])
    result = fidelity([ref[:2], ref[2:]], [cand[:2], cand[2:]], labels=torch.tensor([0, 0, 1, 0]))
    assert result["top1_agreement"] == 0.75
    assert result["accuracy"] == 0.5 and result["reference_accuracy"] == 0.75
    assert result["kl"] > 0


def test_sqnr_of_a_known_noise_level():
    ref = torch.ones(1000)
    assert abs(sqnr_db(ref, ref + 0.1) - 20.0) < 1e-4  # signal 1, noise 0.01 per element: 20 dB


def test_embedding_cosine_respects_the_mask():
    ref = torch.zeros(2, 4, 3)
    ref[:, :2] = 1.0
    cand = ref.clone()
    cand[:, 2:] = torch.tensor([5.0, -5.0, 0.0])  # padding tokens differ wildly
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0]])
    masked = fidelity(ref, cand, attention_mask=mask)
    unmasked = fidelity(ref, cand)
    assert masked["task"] == "embedding" and abs(masked["pooled_cosine"] - 1.0) < 1e-6
    assert unmasked["pooled_cosine"] < 0.99
    assert primary_metric(masked)[0] == "pooled_cosine"
