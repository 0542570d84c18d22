"""How recovery draws its training batches: samples at random with replacement; text (input_ids, attention_mask,
...) grouped by length and cut to the batch's longest real sequence, where the student takes shorter sequences.

Padding costs as much compute as text and teaches nothing, and a random batch is as long as its longest member: the
frontier benchmark's 256 calibration docstrings for all-MiniLM-L6-v2 (seq 128) are 23 tokens at the median, yet a
random batch of 32 of them reaches 96 positions on average. A grouped draw takes a random pool of GROUP batches,
sorts it by length and keeps one batch-sized slice of it, chosen at random: every sample is as likely to be drawn as
before, and the batches average 57 positions. MiniLM with every other block dropped, 2 minutes of recovery, two
seeds: 193 steps instead of 116 / 121, held-out pooled cosine 0.674 / 0.695 instead of 0.653 / 0.653, out-of-domain
sentences unchanged (0.496 / 0.495); with 95% of its FFN neurons pruned instead: 178 steps instead of 108, held-out
0.757 instead of 0.720, out-of-domain 0.592 instead of 0.637: more steps on a few hundred samples also fit their
domain (early stopping sees only that domain).
"""
from __future__ import annotations

import torch
from torch import nn

from deploy.compress.distill_loss import text_mask

GROUP = 4  # a grouped draw sorts a pool of this many batches by length and keeps one slice


def text_lengths(samples: list[tuple[torch.Tensor, ...]]) -> torch.Tensor | None:
    """Each sample's real length (its attention mask's sum); None where the samples are not text."""
    masks = [text_mask(s) for s in samples]
    if not masks or any(m is None for m in masks):
        return None
    return torch.tensor([int(m.sum()) for m in masks])


def draw(samples: list[tuple[torch.Tensor, ...]], gen: torch.Generator, size: int,
         lengths: torch.Tensor | None = None, part: int | None = None) -> tuple[torch.Tensor, ...]:
    """A batch of `size` samples drawn at random; with `lengths`, one slice of a length-sorted pool of GROUP
    batches: the `part`-th (shortest first), else one at random."""
    size = min(size, len(samples))
    if lengths is None:
        idx = torch.randint(len(samples), (size,), generator=gen)
    else:
        pool = torch.randint(len(samples), (size * GROUP,), generator=gen)
        pool = pool[torch.argsort(lengths[pool], stable=True)]
        part = int(torch.randint(GROUP, (1,), generator=gen)) if part is None else part % GROUP
        idx = pool[part * size:(part + 1) * size]
    return tuple(torch.cat([samples[i][k] for i in idx.tolist()]) for k in range(len(samples[0])))


def trimmed(batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """A text batch cut to its longest real sequence (other batches as they are)."""
    mask = text_mask(batch)
    if mask is None:
        return batch
    length = int(mask.sum(1).max())
    if length <= 0 or length >= mask.shape[1]:
        return batch
    return _cut(batch, mask.shape[1], length)


def _cut(batch: tuple[torch.Tensor, ...], width: int, length: int) -> tuple[torch.Tensor, ...]:
    """The batch's token tensors (integer, [batch, width]) cut to their first `length` positions."""
    return tuple(t[:, :length] if t.dim() == 2 and t.shape[1] == width and not t.is_floating_point() else t
                 for t in batch)


def trims(student: nn.Module, samples: list[tuple[torch.Tensor, ...]], size: int, seed: int) -> bool:
    """Whether text batches can be cut to their longest sequence: only text has padding to cut, and a model with a
    fixed sequence length cannot take a shorter one (tried on a batch drawn apart from the training stream, cut
    by one position where it has no padding)."""
    batch = draw(samples, torch.Generator().manual_seed(seed), size)
    mask = text_mask(batch)
    if mask is None or mask.shape[1] < 2:
        return False
    width = mask.shape[1]
    return _runs_trimmed(student, _cut(batch, width, min(max(int(mask.sum(1).max()), 1), width - 1)))


def _runs_trimmed(student: nn.Module, batch: tuple[torch.Tensor, ...]) -> bool:
    """Whether the student takes a shorter sequence than it was given (a model with a fixed length raises)."""
    try:
        with torch.no_grad():
            student.eval()
            student(*batch)
        return True
    except (RuntimeError, ValueError, IndexError):
        return False
    finally:
        student.train()
