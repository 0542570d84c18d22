"""Recovery's augmentation of its training batches, fed to the original and the student alike: mixup where every
input is a float tensor (images, audio, features), token swap in text (token ids cannot be blended). The student
then learns the original's function around the few hundred calibration samples, not only at them."""
from __future__ import annotations

from typing import Any

import torch

from deploy.compress.distill_loss import text_mask


def mixed(batch: tuple[torch.Tensor, ...], gen: torch.Generator, share: float) -> tuple[torch.Tensor, ...]:
    """`batch` with its first `share` of samples each blended with another sample of the batch (every input
    tensor with the same partner and weight)."""
    size = batch[0].shape[0]
    count = round(share * size)
    if count < 1 or size < 2:
        return batch
    partner = torch.randperm(size, generator=gen)[:count]
    weight = torch.rand(count, generator=gen)
    out = []
    for t in batch:
        w = weight.to(t.dtype).reshape(-1, *([1] * (t.dim() - 1)))
        out.append(torch.cat([w * t[:count] + (1 - w) * t[partner], t[count:]]))
    return tuple(out)


def swapped(batch: tuple[torch.Tensor, ...], gen: torch.Generator, share: float, rate: float
            ) -> tuple[torch.Tensor, ...]:
    """A text batch (input_ids, attention_mask, ...) whose first `share` of samples have `rate` of their inner
    tokens (real ones, neither the first nor the last: [CLS], [SEP]) replaced by inner tokens drawn from the batch."""
    mask, ids = text_mask(batch), batch[0]
    count = round(share * ids.shape[0])
    if mask is None or count < 1 or rate <= 0:
        return batch
    position = torch.arange(ids.shape[1])
    inner = (position >= 1) & (position < (mask.sum(1, keepdim=True) - 1))
    pool = ids[inner]
    pick = inner.clone()
    pick[count:] = False
    pick &= torch.rand(pick.shape, generator=gen) < rate
    if not pick.any():  # (no inner token at all: nothing picked, nothing to draw from)
        return batch
    out = ids.clone()
    out[pick] = pool[torch.randint(len(pool), (int(pick.sum()),), generator=gen)]
    return (out, *batch[1:])


def augmentation_of(samples: list[tuple[torch.Tensor, ...]], config: Any) -> str:
    """How a run augments its batches: mixup where every input is a float tensor, token swap for text, else not."""
    if not samples or not config.augment:
        return ""
    if all(t.is_floating_point() for t in samples[0]):
        return "mixup"
    return "token swap" if text_mask(samples[0]) is not None and config.token_swap else ""
