"""What recovery matches and how far apart it is: the blocks whose outputs the student matches to the teacher's,
their feature MSE, the output loss (soft targets for logits, MSE and pooled cosine for embeddings) and PELA's
weight-perturbation regulariser on low-rank products."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from deploy.compress.lowrank.factor import LowRankConv2d, LowRankLinear
from deploy.core.metrics import first_tensor


class Features:
    """Collects block outputs through forward hooks."""

    def __init__(self, model: nn.Module, names: list[str]):
        self.values: dict[str, torch.Tensor] = {}
        self.handles = [model.get_submodule(n).register_forward_hook(self._hook(n)) for n in names]

    def _hook(self, name: str):
        def hook(module, args, output):
            self.values[name] = first_tensor(output)
        return hook

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def matched_blocks(student: nn.Module, teacher: nn.Module, config: Any,
                    example: tuple[torch.Tensor, ...]) -> list[str]:
    """Blocks present in both models whose outputs have the same shape (pruned widths can differ). By default the
    top-level children and the repeated blocks (the longest ModuleList: a transformer's layers), whose outputs
    keep their width when heads and FFN channels are pruned. A dropped block is not matched: the student's next
    block learns to stand in for it, matched to the teacher's block of the same name."""
    names = list(config.blocks) or [n for n, m in teacher.named_children() if any(True for _ in m.parameters())]
    if not config.blocks:
        lists = [(n, m) for n, m in teacher.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 1]
        if lists:
            prefix, longest = max(lists, key=lambda item: len(item[1]))
            names += [f"{prefix}.{i}" for i in range(len(longest))]
    names = [n for n in names if has_module(student, n) and has_module(teacher, n)
             and any(True for _ in student.get_submodule(n).parameters())]  # a dropped block (Skip) has none
    s_feat, t_feat = Features(student, names), Features(teacher, names)
    try:
        with torch.no_grad():
            student(*example)
            teacher(*example)
    finally:
        s_feat.close()
        t_feat.close()
    return [n for n in names if n in s_feat.values and n in t_feat.values
            and s_feat.values[n].shape == t_feat.values[n].shape]


def has_module(model: nn.Module, name: str) -> bool:
    """`model` has a submodule at `name`."""
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False


def output_loss(student_out: torch.Tensor, teacher_out: torch.Tensor, temperature: float,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
    """Soft targets for logits; MSE for other outputs, plus for token outputs (with an attention mask) the cosine
    distance of the mean-pooled embeddings, the quantity an embedding model is used (and judged) by."""
    if student_out.dim() == 2 and student_out.shape[1] > 1:  # logits: soft targets
        t = temperature
        return F.kl_div(F.log_softmax(student_out / t, 1), F.log_softmax(teacher_out / t, 1),
                        log_target=True, reduction="batchmean") * t * t
    loss = F.mse_loss(student_out, teacher_out)
    if student_out.dim() == 3 and mask is not None and tuple(mask.shape) == tuple(student_out.shape[:2]):
        weights = mask.unsqueeze(-1).to(student_out.dtype)
        count = weights.sum(1).clamp(min=1.0)
        pooled_s, pooled_t = (student_out * weights).sum(1) / count, (teacher_out * weights).sum(1) / count
        loss = loss + (1.0 - F.cosine_similarity(pooled_s, pooled_t, dim=-1)).mean()
    return loss


def perturbation(student: nn.Module, teacher: nn.Module) -> torch.Tensor:
    """Relative distance of each low-rank product from the teacher weight it replaced."""
    terms = []
    for name, module in student.named_modules():
        if not isinstance(module, (LowRankLinear, LowRankConv2d)) or not has_module(teacher, name):
            continue
        original = teacher.get_submodule(name)
        if isinstance(original, nn.Linear):
            product = module.up.weight @ module.down.weight
        elif isinstance(module, LowRankConv2d) and module.up.kernel_size == (1, 1):
            product = (module.up.weight.flatten(1) @ module.down.weight.flatten(1)).reshape(original.weight.shape)
        else:
            continue
        terms.append((product - original.weight).pow(2).sum() / original.weight.pow(2).sum().clamp(min=1e-12))
    return torch.stack(terms).mean() if terms else torch.zeros(())


def step_loss(student: nn.Module, teacher: nn.Module, batch: tuple[torch.Tensor, ...], t_out: torch.Tensor,
          config: Any, blocks: list[str], feats: tuple[Any, Any]) -> torch.Tensor:
    """One step's loss: outputs (and matched block features) against the teacher's, plus PELA's regulariser."""
    s_feat, t_feat = feats
    s_out = first_tensor(student(*batch)).float()  # losses in f32, also where the passes ran in bf16 autocast
    loss = config.output_weight * output_loss(s_out, t_out.float(), config.temperature, text_mask(batch))
    if blocks and config.feature_weight:
        matched = [F.mse_loss(s_feat.values[n].float(), t_feat.values[n].float()) for n in blocks]
        loss = loss + config.feature_weight * torch.stack(matched).mean()
    if config.perturbation_weight:
        with torch.autocast("cpu", enabled=False):  # the products compared in f32, also under bf16 passes
            loss = loss + config.perturbation_weight * perturbation(student, teacher)
    return loss


def text_mask(batch: tuple[torch.Tensor, ...]) -> torch.Tensor | None:
    """The attention mask of a (input_ids, attention_mask, ...) batch, None for other inputs."""
    if len(batch) >= 2 and batch[1].dtype in (torch.int64, torch.int32) and batch[1].dim() == 2:
        return batch[1]
    return None
