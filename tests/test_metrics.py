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


def test_nearest_neighbour_hits_mark_the_samples_whose_neighbour_moved():
    from deploy.core.metrics import nearest_neighbour_agreement, nearest_neighbour_hits

    def at(*degrees: float) -> torch.Tensor:
        rad = torch.tensor(degrees) * math.pi / 180
        return torch.stack([rad.cos(), rad.sin()], dim=1)

    ref = at(0, 10, 90, 80)  # neighbours: 0 <-> 1, 2 <-> 3
    cand = at(0, 60, 90, 80)  # sample 1 moves towards 3: its neighbour changes, 0's (still 1) and 3's (2) do not
    hits = nearest_neighbour_hits(ref, cand)
    assert hits.tolist() == [True, False, True, True]
    assert nearest_neighbour_agreement(ref, cand) == 0.75
    assert nearest_neighbour_hits(ref[:2], cand[:2]).tolist() == [True, True]  # too few samples to have neighbours
