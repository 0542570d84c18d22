"""Recovery by distillation from the original model: no labels needed, only unlabeled calibration inputs.

PELA's intermediate training: the frozen original is the teacher; the student (pruned, factorised or fake-quantised)
matches the teacher's block outputs (feature MSE per block) and final outputs (soft-target KL for logits, as in
MEAL V2; MSE for embeddings), optionally with PELA's weight-perturbation regulariser that keeps each low-rank
product near the weight it replaced. Bounded by a time budget (and a step budget where one is given); stops early
when fidelity on the validation split stops improving and returns the best student seen. The learning rate warms up
over the first steps and then decays (cosine) over the planned steps: the step budget, or the steps the time budget
allows at the step time measured before training; text batches are cut to their longest unpadded sequence.
"""
from __future__ import annotations

import copy
import sys
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
    # None: as many steps as `recover_minutes` allow (or early stop); the schedule then spans the steps the
    # minutes allow at the step time measured before training (`_steps_allowed`)
    steps: int | None = 300
    recover_minutes: float = 2.0
    lr: float = 1e-4
    batch_size: int = 32
    feature_weight: float = 1.0
    output_weight: float = 1.0
    temperature: float = 2.0
    perturbation_weight: float = 0.0  # PELA's regulariser on low-rank products; 0 turns it off
    blocks: tuple[str, ...] = ()  # modules whose outputs are matched; empty: the top-level children
    eval_every: int = 25
    patience: int = 4
    seed: int = 0
    warmup: float = 0.05  # share of the horizon over which the learning rate rises from 10% to lr
    final_lr: float = 0.05  # the cosine decay ends at this share of lr
    horizon: int = 0  # steps the schedule spans (0: `steps`, else measured); a replay runs fewer on the same one
    trim_padding: bool = True  # cut (input_ids, attention_mask, ...) batches to their longest real sequence
    backoffs: int = 2  # times the rate is cut (x BACKOFF, from the best weights) when an evaluation did not improve

    def __post_init__(self) -> None:
        if (self.steps is not None and self.steps < 1) or self.batch_size < 1 or self.eval_every < 1 \
                or self.patience < 1:
            raise ValueError("steps, batch_size, eval_every and patience must be >= 1")
        if not (0.0 <= self.warmup < 1.0 and 0.0 < self.final_lr <= 1.0 and self.horizon >= 0):
            raise ValueError("warmup must be in [0, 1), final_lr in (0, 1], horizon >= 0")
        if self.recover_minutes <= 0 or self.lr <= 0 or self.temperature <= 0:
            raise ValueError("recover_minutes, lr and temperature must be positive")


BACKOFF = 0.3  # the rate's cut when an evaluation is no better than the best: it was too high for these weights
PROBE_STEPS = 8  # a run bound by its minutes times these training passes (after one untimed) to plan its schedule
EVAL_SHARE = 0.85  # of the minutes, what the training steps get (the rest: evaluations every eval_every steps)


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
    trimmed_padding: bool = False  # whether text batches were cut to their longest real sequence
    lr: float = 0.0  # the peak learning rate in use at the end (config.lr x BACKOFF per backoff)
    scored_on: str = "validation"  # before/after/history: the split early stopping looked at (not the held-out one)
    horizon: int = 0  # the steps the learning-rate schedule spanned (a replay keeps it)


def lr_factor(step: int, config: DistillConfig, horizon: int = 0) -> float:
    """The learning rate at `step` (1-based) as a share of config.lr: a linear warm-up from 10%, then a cosine decay
    to `final_lr` at the end of the horizon (`horizon`, else the config's, else its steps)."""
    import math

    horizon = horizon or config.horizon or config.steps
    if not horizon:
        raise ValueError("a schedule bound by minutes needs its horizon (distill measures it)")
    warm = max(1, round(config.warmup * horizon)) if config.warmup else 0
    if step <= warm:
        return 0.1 + 0.9 * step / warm
    progress = min(1.0, (step - warm) / max(1, horizon - warm))
    return config.final_lr + (1.0 - config.final_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def trimmed(batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """A text batch (input_ids, attention_mask, ...) cut to its longest real sequence: padding costs as much
    compute as text and teaches nothing."""
    mask = _mask(batch)
    if mask is None:
        return batch
    length = int(mask.sum(1).max())
    if length <= 0 or length >= mask.shape[1]:
        return batch
    width = mask.shape[1]
    return tuple(t[:, :length] if t.dim() == 2 and t.shape[1] == width and not t.is_floating_point() else t
                 for t in batch)


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


def _output_loss(student_out: torch.Tensor, teacher_out: torch.Tensor, temperature: float,
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
        horizon = config.horizon or config.steps or _steps_allowed(
            student, teacher, calibration, config, blocks, (s_feat, t_feat), config.recover_minutes * 60)
        bar = _progress_bar(stack, progress, horizon)
        trim, rate, backoffs = config.trim_padding, config.lr, 0
        for step in range(1, (config.steps or sys.maxsize) + 1):
            student.train()
            batch = _batch(calibration.calibration, gen, config.batch_size)
            if trim and step == 1 and trimmed(batch) is not batch:
                trim = _runs_trimmed(student, trimmed(batch))  # a model with a fixed sequence length cannot
            if trim:
                batch = trimmed(batch)
            with torch.no_grad():
                t_out = first_tensor(teacher(*batch))
            loss = _loss(student, teacher, batch, t_out, config, blocks, (s_feat, t_feat))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for group in optimizer.param_groups:
                group["lr"] = rate * lr_factor(step, config, horizon)
            optimizer.step()
            if bar is not None:
                bar[0].update(bar[1], advance=1)
            if step % config.eval_every == 0 or step == config.steps:
                student.eval()
                result = evaluate(student, teacher_held, calibration)
                value = primary_metric(result)[1]
                history.append({"step": step, metric: value, "sqnr_db": float(result["sqnr_db"]),
                                "loss": float(loss.detach()), "lr": rate})
                if _score(result) > best_score:
                    best_score, best_state, bad_evals = _score(result), copy.deepcopy(student.state_dict()), 0
                    best_value, best_sqnr, kept_step = value, float(result["sqnr_db"]), step
                elif backoffs < config.backoffs:  # no better than the best: back to the best weights, at a
                    student.load_state_dict(best_state)  # lower rate (a fine-tuned transformer wants ~1e-4)
                    optimizer = torch.optim.AdamW(params, lr=rate * BACKOFF, weight_decay=0.0)
                    rate, backoffs, bad_evals = rate * BACKOFF, backoffs + 1, 0
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
                         before_sqnr, best_sqnr, history, blocks, kept_step, trimmed_padding=trim, lr=rate,
                         horizon=horizon)


def _loss(student: nn.Module, teacher: nn.Module, batch: tuple[torch.Tensor, ...], t_out: torch.Tensor,
          config: DistillConfig, blocks: list[str], feats: tuple[Any, Any]) -> torch.Tensor:
    """One step's loss: outputs (and matched block features) against the teacher's, plus PELA's regulariser."""
    s_feat, t_feat = feats
    s_out = first_tensor(student(*batch))
    loss = config.output_weight * _output_loss(s_out, t_out, config.temperature, _mask(batch))
    if blocks and config.feature_weight:
        matched = [F.mse_loss(s_feat.values[n], t_feat.values[n]) for n in blocks]
        loss = loss + config.feature_weight * torch.stack(matched).mean()
    if config.perturbation_weight:
        loss = loss + config.perturbation_weight * _perturbation(student, teacher)
    return loss


def _steps_allowed(student: nn.Module, teacher: nn.Module, calibration: CalibrationSet, config: DistillConfig,
                   blocks: list[str], feats: tuple[Any, Any], seconds: float) -> int:
    """The steps `seconds` allow (EVAL_SHARE of them: evaluations take the rest), timed on PROBE_STEPS training
    passes (forward and backward, after one untimed) that leave no trace: the weights, buffers (BatchNorm
    statistics) and random state come back as they were and no optimizer step is taken, so a replay that runs a
    fixed number of steps on the same schedule gets the same weights."""
    began = time.monotonic()
    gen = torch.Generator().manual_seed(config.seed + 1)
    saved = copy.deepcopy(student.state_dict())
    with torch.random.fork_rng(devices=[]):
        batch = _batch(calibration.calibration, gen, config.batch_size)
        trim = config.trim_padding and trimmed(batch) is not batch and _runs_trimmed(student, trimmed(batch))
        student.train()
        timed = began
        for index in range(PROBE_STEPS + 1):
            if index == 1:
                timed = time.monotonic()
            batch = _batch(calibration.calibration, gen, config.batch_size)
            batch = trimmed(batch) if trim else batch
            with torch.no_grad():
                t_out = first_tensor(teacher(*batch))
            _loss(student, teacher, batch, t_out, config, blocks, feats).backward()
        per_step = max((time.monotonic() - timed) / PROBE_STEPS, 1e-6)
    student.zero_grad(set_to_none=True)
    student.load_state_dict(saved)
    student.eval()
    left = seconds - (time.monotonic() - began)
    return max(1, int(EVAL_SHARE * left / per_step))


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


def _score(result: dict[str, Any]) -> tuple[float, float]:
    """Held-out primary metric first; SQNR breaks ties, so saturated agreement still lets training improve."""
    return round(primary_metric(result)[1], 4), float(result["sqnr_db"])


def _progress_bar(stack: ExitStack, enabled: bool, total: int):
    if not enabled:
        return None
    from rich.progress import Progress

    progress = stack.enter_context(Progress(transient=True))
    return progress, progress.add_task("distilling", total=total)
