"""Recovery by distillation from the original model: no labels needed, only unlabeled calibration inputs.

PELA's intermediate training: the frozen original is the teacher; the student (pruned, factorised or fake-quantised)
matches the teacher's block outputs (feature MSE per block) and final outputs (soft-target KL for logits, as in
MEAL V2; MSE for embeddings), optionally with PELA's weight-perturbation regulariser that keeps each low-rank
product near the weight it replaced. Bounded by a step budget AND a time budget; stops early when held-out fidelity
stops improving and returns the best student seen.
"""
from __future__ import annotations

import copy
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from deploy.compress.lowrank.factor import LowRankConv2d, LowRankLinear
from deploy.core.metrics import fidelity, first_tensor, primary_metric
from deploy.core.data import CalibrationSet


@dataclass(frozen=True)
class DistillConfig:
    steps: int = 300
    recover_minutes: float = 2.0
    lr: float = 1e-3
    batch_size: int = 32
    feature_weight: float = 1.0
    output_weight: float = 1.0
    temperature: float = 2.0
    perturbation_weight: float = 0.0  # PELA's regulariser on low-rank products; 0 turns it off
    blocks: tuple[str, ...] = ()  # modules whose outputs are matched; empty: the top-level children
    eval_every: int = 25
    patience: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.eval_every < 1 or self.patience < 1:
            raise ValueError("steps, batch_size, eval_every and patience must be >= 1")
        if self.recover_minutes <= 0 or self.lr <= 0 or self.temperature <= 0:
            raise ValueError("recover_minutes, lr and temperature must be positive")


@dataclass
class DistillResult:
    steps: int
    seconds: float
    stopped: str  # "steps" | "time" | "early-stop"
    metric: str
    before: float
    after: float
    before_sqnr_db: float
    after_sqnr_db: float
    history: list[dict[str, float]] = field(default_factory=list)
    matched_blocks: list[str] = field(default_factory=list)
    kept_step: int = 0  # the step whose weights were kept (the best validation score; 0: the starting weights)
    scored_on: str = "validation"  # before/after/history: the split early stopping looked at (not the held-out one)


def _batch(samples: list[tuple[torch.Tensor, ...]], gen: torch.Generator, size: int) -> tuple[torch.Tensor, ...]:
    idx = torch.randint(len(samples), (min(size, len(samples)),), generator=gen).tolist()
    return tuple(torch.cat([samples[i][k] for i in idx]) for k in range(len(samples[0])))




class _Features:
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


def _matched_blocks(student: nn.Module, teacher: nn.Module, config: DistillConfig,
                    example: tuple[torch.Tensor, ...]) -> list[str]:
    """Blocks present in both models whose outputs have the same shape (pruned widths can differ)."""
    names = list(config.blocks) or [n for n, m in teacher.named_children() if any(True for _ in m.parameters())]
    names = [n for n in names if has_module(student, n) and has_module(teacher, n)]
    s_feat, t_feat = _Features(student, names), _Features(teacher, names)
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


def _output_loss(student_out: torch.Tensor, teacher_out: torch.Tensor, temperature: float) -> torch.Tensor:
    if student_out.dim() == 2 and student_out.shape[1] > 1:  # logits: soft targets
        t = temperature
        return F.kl_div(F.log_softmax(student_out / t, 1), F.log_softmax(teacher_out / t, 1),
                        log_target=True, reduction="batchmean") * t * t
    return F.mse_loss(student_out, teacher_out)


def _perturbation(student: nn.Module, teacher: nn.Module) -> torch.Tensor:
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


def evaluate(model: nn.Module, teacher_outputs: list[torch.Tensor], calibration: CalibrationSet, batch_size: int = 64,
             split: str = "validation") -> dict[str, Any]:
    """Fidelity of `model` against precomputed teacher outputs on `split` (validation: what early stopping may
    look at; the held-out split is left to the report)."""
    batches = calibration.batches(split, batch_size)
    with torch.no_grad():
        outs = [first_tensor(model(*b)) for b in batches]
    masks = [_mask(b) for b in batches]
    mask = torch.cat(masks) if masks and masks[0] is not None else None
    labels = calibration.held_out_labels if split == "held_out" else None
    return fidelity(teacher_outputs, outs, labels=labels, attention_mask=mask)


def _mask(batch: tuple[torch.Tensor, ...]) -> torch.Tensor | None:
    """The attention mask of a (input_ids, attention_mask, ...) batch, None for other inputs."""
    if len(batch) >= 2 and batch[1].dtype in (torch.int64, torch.int32) and batch[1].dim() == 2:
        return batch[1]
    return None


def distill(student: nn.Module, teacher: nn.Module, calibration: CalibrationSet, config: DistillConfig = DistillConfig(),
            progress: bool = False) -> DistillResult:
    """Train `student` in place towards `teacher` on calibration inputs; returns what happened, with numbers."""
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    teacher = teacher.eval()  # only ever run under no_grad below; its parameters are left as they were
    with torch.no_grad():
        teacher_held = [first_tensor(teacher(*b)) for b in calibration.batches("validation", 64)]
    student.eval()
    first = evaluate(student, teacher_held, calibration)
    metric, before = primary_metric(first)
    before_sqnr = float(first["sqnr_db"])
    blocks = _matched_blocks(student, teacher, config, _batch(calibration.calibration, gen, 2))
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    best_score, best_state, bad_evals = _score(first), copy.deepcopy(student.state_dict()), 0
    best_value, best_sqnr, kept_step = before, before_sqnr, 0
    history = [{"step": 0, metric: before, "sqnr_db": before_sqnr}]
    start, stopped, step = time.monotonic(), "steps", 0
    s_feat, t_feat = _Features(student, blocks), _Features(teacher, blocks)
    with ExitStack() as stack:
        stack.callback(s_feat.close)
        stack.callback(t_feat.close)
        bar = _progress_bar(stack, progress, config.steps)
        for step in range(1, config.steps + 1):
            student.train()
            batch = _batch(calibration.calibration, gen, config.batch_size)
            with torch.no_grad():
                t_out = first_tensor(teacher(*batch))
            s_out = first_tensor(student(*batch))
            loss = config.output_weight * _output_loss(s_out, t_out, config.temperature)
            if blocks and config.feature_weight:
                feats = [F.mse_loss(s_feat.values[n], t_feat.values[n]) for n in blocks]
                loss = loss + config.feature_weight * torch.stack(feats).mean()
            if config.perturbation_weight:
                loss = loss + config.perturbation_weight * _perturbation(student, teacher)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if bar is not None:
                bar[0].update(bar[1], advance=1)
            if step % config.eval_every == 0 or step == config.steps:
                student.eval()
                result = evaluate(student, teacher_held, calibration)
                value = primary_metric(result)[1]
                history.append({"step": step, metric: value, "sqnr_db": float(result["sqnr_db"]),
                                "loss": float(loss.detach())})
                if _score(result) > best_score:
                    best_score, best_state, bad_evals = _score(result), copy.deepcopy(student.state_dict()), 0
                    best_value, best_sqnr, kept_step = value, float(result["sqnr_db"]), step
                else:
                    bad_evals += 1
                if bad_evals >= config.patience:
                    stopped = "early-stop"
                    break
            if time.monotonic() - start > config.recover_minutes * 60:
                stopped = "time"
                break
    student.load_state_dict(best_state)
    student.eval()
    return DistillResult(step, round(time.monotonic() - start, 3), stopped, metric, before, best_value,
                         before_sqnr, best_sqnr, history, blocks, kept_step)


def _score(result: dict[str, Any]) -> tuple[float, float]:
    """Held-out primary metric first; SQNR breaks ties, so saturated agreement still lets training improve."""
    return round(primary_metric(result)[1], 4), float(result["sqnr_db"])


def _progress_bar(stack: ExitStack, enabled: bool, total: int):
    if not enabled:
        return None
    from rich.progress import Progress

    progress = stack.enter_context(Progress(transient=True))
    return progress, progress.add_task("distilling", total=total)
