"""Recovery by distillation from the original model: no labels needed, only unlabeled calibration inputs.

PELA's intermediate training: the frozen original is the teacher; the student (pruned, factorised or fake-quantised)
matches the teacher's block outputs (feature MSE per block) and final outputs (soft-target KL for logits, as in MEAL
V2; MSE for embeddings), optionally with PELA's weight-perturbation regulariser that keeps each low-rank product
near the weight it replaced. Bounded by a time budget (and a step budget where one is given); stops early when
fidelity on the validation split stops improving and returns the best student seen. The learning rate warms up over
the first steps and then decays (cosine) over the planned steps: the step budget, or the steps the time budget
allows at the step time measured before training; text batches are grouped by length and cut to their longest real
sequence (`distill_batches`). The peak rate is probed where the run is long enough: the first steps at each of
RATES, the best on validation goes on (the losers' steps come out of the minutes): on the distorted-digits ResNet
pruned to 0.4x NNCF's latency, 2 minutes at 1e-3 left KL 0.074 to the original on held-out digits, at 1e-4 0.176.
Where every input is a float tensor (images, audio, features; token ids cannot be blended) half of each batch is
mixup of two calibration inputs, run through teacher and student alike: the student learns the teacher's function
between the samples too, not only at the few hundred it is shown (Beyer et al., "Knowledge distillation: a good
teacher is patient and consistent"; the digits ResNet pruned to 0.68 of its channels, 450 steps: held-out top-1
agreement 0.917 -> 0.928, KL 0.076 -> 0.059). Text gets the same in its own terms: in half of each batch 15% of the
inner tokens are swapped for tokens drawn from the batch (MiniLM with every other block dropped, 260 steps: held-out
pooled cosine 0.673 -> 0.709). Where asked (`bf16`: a CPU that runs bf16 in hardware), the training passes run in
bf16 autocast: on an AMX Xeon the same 2 minutes ran 317 and 287 steps instead of 192 and 165 on that MiniLM (two
seeds; held-out pooled cosine 0.732 and 0.725 instead of 0.705 and 0.703); weights, optimizer state, losses and the
validation score stay in f32.
"""
from __future__ import annotations

import copy
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from deploy.compress.distill_augment import augmentation_of, mixed, swapped
from deploy.compress.distill_batches import draw, text_lengths, trimmed, trims
from deploy.compress.distill_loss import Features, matched_blocks, step_loss, text_mask
from deploy.core.data import CalibrationSet
from deploy.core.metrics import fidelity, first_tensor, primary_metric


RATES = (1e-4, 3e-4, 1e-3)  # a fine-tuned transformer wants about 1e-4, a CNN trained from scratch 1e-3
RATE_PROBE_SHARE = 0.06  # of the steps the minutes allow, each rate's probe (the winner goes on, the rest are lost)
MIN_RATE_PROBE = 10  # a shorter probe shows nothing (the warm-up): the run keeps config.lr


@dataclass(frozen=True)
class DistillConfig:
    # None: as many steps as `recover_minutes` allow (or early stop); the schedule then spans the steps the
    # minutes allow at the step time measured before training (`_steps_allowed`)
    steps: int | None = 300
    recover_minutes: float = 2.0
    lr: float = 3e-4  # the peak learning rate where `rates` are not probed (one rate, or too few steps)
    rates: tuple[float, ...] = RATES  # peak rates probed on the first steps; the best on validation goes on
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
    augment: float = 0.5  # share of each batch augmented: mixup where every input is a float tensor, else token swap
    # text: the share of the inner tokens swapped in an augmented sample (0: text left as is); 0.3 over 0.15: all-MiniLM-L6-v2
    # with 3 blocks dropped and width-pruned, 2 minutes, 2 seeds: held-out cosine +0.004 and +0.005 (0.799 -> 0.803,
    # 0.797 -> 0.802), out-of-domain +0.005 and +0.004; 0.5 gave held-out 0.806 but out-of-domain 0.676 (0.699 at 0.15)
    token_swap: float = 0.3
    bf16: bool = False  # the training passes (teacher's and student's forward, backward) in bf16 autocast

    def __post_init__(self) -> None:
        if (self.steps is not None and self.steps < 1) or self.batch_size < 1 or self.eval_every < 1 \
                or self.patience < 1:
            raise ValueError("steps, batch_size, eval_every and patience must be >= 1")
        if not (0.0 <= self.warmup < 1.0 and 0.0 < self.final_lr <= 1.0 and self.horizon >= 0):
            raise ValueError("warmup must be in [0, 1), final_lr in (0, 1], horizon >= 0")
        if not (0.0 <= self.augment <= 1.0 and 0.0 <= self.token_swap <= 1.0):
            raise ValueError("augment and token_swap must be in [0, 1]")
        if self.recover_minutes <= 0 or self.lr <= 0 or self.temperature <= 0 or any(r <= 0 for r in self.rates):
            raise ValueError("recover_minutes, lr, rates and temperature must be positive")


BACKOFF = 0.3  # the rate's cut when an evaluation is no better than the best: it was too high for these weights
TIMED_STEPS = 8  # a run bound by its minutes times these training passes (after one untimed) to plan its schedule


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
    lr: float = 0.0  # the peak learning rate in use at the end (`rate` x BACKOFF per backoff)
    scored_on: str = "validation"  # before/after/history: the split early stopping looked at (not the held-out one)
    horizon: int = 0  # the steps the learning-rate schedule spanned (a replay keeps it)
    rate: float = 0.0  # the peak learning rate the kept run started at (the probes' winner, else config.lr)
    probes: list[dict[str, float]] = field(default_factory=list)  # each probed rate's validation score
    augmentation: str = ""  # "mixup", "token swap" or "" (none)
    augmented: float = 0.0  # the share of each batch augmented
    precision: str = "fp32"  # what the training passes ran in: "bf16" (autocast) or "fp32"


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


def evaluate(model: nn.Module, teacher_outputs: list[torch.Tensor], calibration: CalibrationSet, batch_size: int = 64,
             split: str = "validation") -> dict[str, Any]:
    """Fidelity of `model` against precomputed teacher outputs on `split` (validation: what early stopping may
    look at; the held-out split is left to the report)."""
    batches = calibration.batches(split, batch_size)
    with torch.no_grad():
        outs = [first_tensor(model(*b)) for b in batches]
    masks = [text_mask(b) for b in batches]
    mask = torch.cat(masks) if masks and masks[0] is not None else None
    labels = calibration.held_out_labels if split == "held_out" else None
    return fidelity(teacher_outputs, outs, labels=labels, attention_mask=mask)


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
    blocks = matched_blocks(student, teacher, config, draw(calibration.calibration, gen, 2))
    feats = Features(student, blocks), Features(teacher, blocks)
    with ExitStack() as stack:
        for hooks in feats:
            stack.callback(hooks.close)
        trainer = _Trainer(student, teacher, calibration, config, blocks, feats, teacher_held, gen, metric)
        allowed = config.horizon or config.steps or _steps_allowed(trainer, config.recover_minutes * 60)
        probe = probe_steps(config, allowed)
        lost = (len(config.rates) - 1) * probe  # the probes that lose: their steps come out of the minutes
        trainer.horizon = allowed - lost if not (config.horizon or config.steps) else allowed
        trainer.bar = _progress_bar(stack, progress, trainer.horizon + lost)
        run = trainer.probe(config.rates, probe, first) if probe else trainer.new_run(config.lr, first)
        trainer.advance(run, config.steps or sys.maxsize)
    student.load_state_dict(run.best_state)
    student.eval()
    return DistillResult(run.step, round(time.monotonic() - trainer.start, 3), run.stopped, metric, before,
                         run.best_value, float(first["sqnr_db"]), run.best_sqnr, run.history, blocks, run.kept_step,
                         trimmed_padding=trainer.trim, lr=run.rate, horizon=trainer.horizon, rate=run.start_rate,
                         probes=trainer.probes, augmentation=trainer.augmentation,
                         augmented=config.augment if trainer.augmentation else 0.0,
                         precision="bf16" if config.bf16 else "fp32")


def probe_steps(config: DistillConfig, allowed: int) -> int:
    """Each learning-rate probe's steps for a run of `allowed` steps; 0 where there is nothing to choose or the
    probes would be too short to show anything (the run then starts at config.lr)."""
    steps = round(RATE_PROBE_SHARE * allowed)
    return steps if len(config.rates) > 1 and steps >= MIN_RATE_PROBE else 0


@dataclass
class _Run:
    """One training run's state between steps: what a winning learning-rate probe hands on to the rest."""
    start_rate: float
    rate: float  # the peak rate now (start_rate x BACKOFF per backoff)
    optimizer: torch.optim.Optimizer
    best: tuple[float, float]
    best_state: dict[str, torch.Tensor]
    best_value: float
    best_sqnr: float
    history: list[dict[str, float]]
    kept_step: int = 0
    step: int = 0
    bad_evals: int = 0
    backoffs: int = 0
    stopped: str = "steps"


class _Trainer:
    """The training loop over one student, teacher and data: runs advance step by step, and short probes at
    several peak learning rates pick the one the run goes on with (the rate a model wants differs by a decade:
    1e-3 for a CNN trained from scratch, 1e-4 or less for a fine-tuned transformer)."""

    def __init__(self, student: nn.Module, teacher: nn.Module, calibration: CalibrationSet, config: DistillConfig,
                 blocks: list[str], feats: tuple[Any, Any], teacher_held: list[torch.Tensor],
                 gen: torch.Generator, metric: str):
        self.student, self.teacher, self.calibration, self.config = student, teacher, calibration, config
        self.blocks, self.feats, self.teacher_held, self.gen, self.metric = blocks, feats, teacher_held, gen, metric
        self.params = [p for p in student.parameters() if p.requires_grad]
        self.trim = config.trim_padding and trims(student, calibration.calibration, config.batch_size,
                                                  config.seed + 2)
        self.lengths = text_lengths(calibration.calibration) if self.trim else None  # batches grouped by length
        self.augmentation = augmentation_of(calibration.calibration, config)
        self.horizon, self.bar = 0, None
        self.probes: list[dict[str, float]] = []
        self.start = time.monotonic()

    def batch_loss(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """One training batch's loss (the teacher's outputs, then the student's), its passes in bf16 autocast where
        the config asks for it (the loss itself in f32: `step_loss`)."""
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.config.bf16):
            with torch.no_grad():
                t_out = first_tensor(self.teacher(*batch))
            return step_loss(self.student, self.teacher, batch, t_out, self.config, self.blocks, self.feats)

    def new_run(self, rate: float, first: dict[str, Any]) -> _Run:
        """A run from the student's weights as they are now, scored `first` on the validation split."""
        value, sqnr = primary_metric(first)[1], float(first["sqnr_db"])
        return _Run(rate, rate, torch.optim.AdamW(self.params, lr=rate, weight_decay=0.0), _score(first),
                    copy.deepcopy(self.student.state_dict()), value, sqnr,
                    [{"step": 0, self.metric: value, "sqnr_db": sqnr}])

    def probe(self, rates: tuple[float, ...], steps: int, first: dict[str, Any]) -> _Run:
        """The run at the rate whose first `steps` steps score best on the validation split, left where its probe
        ended (weights, optimizer, random streams): it goes on as if it had been the only one."""
        start = self._snapshot(None)
        best: tuple[tuple[float, float], _Run, dict[str, Any]] | None = None
        for rate in rates:
            self._restore(start, None)
            run = self.new_run(rate, first)
            self.advance(run, steps)
            last = run.history[-1]  # the probe's last step was evaluated already where it fell on eval_every
            if last["step"] == run.step:
                score = (round(last[self.metric], 4), last["sqnr_db"])
            else:
                self.student.eval()
                score = _score(evaluate(self.student, self.teacher_held, self.calibration))
            self.probes.append({"rate": rate, "steps": run.step, self.metric: score[0], "sqnr_db": score[1]})
            if best is None or score > best[0]:
                best = (score, run, self._snapshot(run))
            if run.stopped != "steps":  # out of time (or stopped early): the rest cannot be tried
                break
        self._restore(best[2], best[1])
        return best[1]

    def _snapshot(self, run: _Run | None) -> dict[str, Any]:
        return {"weights": copy.deepcopy(self.student.state_dict()), "gen": self.gen.get_state(),
                "rng": torch.get_rng_state(),
                "optimizer": copy.deepcopy(run.optimizer.state_dict()) if run is not None else None}

    def _restore(self, snapshot: dict[str, Any], run: _Run | None) -> None:
        self.student.load_state_dict(snapshot["weights"])
        self.gen.set_state(snapshot["gen"])
        torch.set_rng_state(snapshot["rng"])
        if run is not None:
            run.optimizer.load_state_dict(snapshot["optimizer"])

    def advance(self, run: _Run, until: int) -> None:
        """Train `run` up to step `until`, evaluating every eval_every steps (back to the best weights at a lower
        rate when one is no better, stopping after `patience` more) and stopping when the minutes are spent."""
        config, student = self.config, self.student
        while run.step < until and run.stopped == "steps":
            run.step += 1
            student.train()
            batch = draw(self.calibration.calibration, self.gen, config.batch_size, self.lengths)
            if self.trim:
                batch = trimmed(batch)
            if self.augmentation == "mixup":
                batch = mixed(batch, self.gen, config.augment)
            elif self.augmentation == "token swap":
                batch = swapped(batch, self.gen, config.augment, config.token_swap)
            loss = self.batch_loss(batch)
            run.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for group in run.optimizer.param_groups:
                group["lr"] = run.rate * lr_factor(run.step, config, self.horizon)
            run.optimizer.step()
            if self.bar is not None:
                self.bar[0].update(self.bar[1], advance=1)
            if run.step % config.eval_every == 0 or run.step == config.steps:
                self._evaluate(run, float(loss.detach()))
            if run.stopped == "steps" and time.monotonic() - self.start > config.recover_minutes * 60:
                if run.history[-1]["step"] != run.step:  # the steps since the last evaluation are judged, not lost
                    self._evaluate(run, float(loss.detach()))
                run.stopped = "time"

    def _evaluate(self, run: _Run, loss: float) -> None:
        config = self.config
        self.student.eval()
        result = evaluate(self.student, self.teacher_held, self.calibration)
        value = primary_metric(result)[1]
        run.history.append({"step": run.step, self.metric: value, "sqnr_db": float(result["sqnr_db"]),
                            "loss": loss, "lr": run.rate})
        if _score(result) > run.best:
            run.best, run.best_state, run.bad_evals = _score(result), copy.deepcopy(self.student.state_dict()), 0
            run.best_value, run.best_sqnr, run.kept_step = value, float(result["sqnr_db"]), run.step
        elif run.backoffs < config.backoffs:  # no better than the best: back to the best weights, at a lower rate
            self.student.load_state_dict(run.best_state)
            run.optimizer = torch.optim.AdamW(self.params, lr=run.rate * BACKOFF, weight_decay=0.0)
            run.rate, run.backoffs, run.bad_evals = run.rate * BACKOFF, run.backoffs + 1, 0
        else:
            run.bad_evals += 1
        if run.bad_evals >= config.patience:
            run.stopped = "early-stop"


def _steps_allowed(trainer: "_Trainer", seconds: float) -> int:
    """The steps `seconds` allow, with an evaluation every eval_every of them, timed on TIMED_STEPS training passes
    (forward and backward, after one untimed) and one evaluation that leave no trace: the weights, buffers
    (BatchNorm statistics) and random state come back as they were and no optimizer step is taken, so a replay
    that runs a fixed number of steps on the same schedule gets the same weights. Text grouped by length is timed
    on each slice of its pools alike (the shortest and the longest slices differ several-fold)."""
    config, student = trainer.config, trainer.student
    began = time.monotonic()
    gen = torch.Generator().manual_seed(config.seed + 1)
    saved = copy.deepcopy(student.state_dict())
    with torch.random.fork_rng(devices=[]):
        student.train()
        timed = began
        for index in range(TIMED_STEPS + 1):
            if index == 1:
                timed = time.monotonic()
            batch = draw(trainer.calibration.calibration, gen, config.batch_size, trainer.lengths, part=index - 1)
            batch = trimmed(batch) if trainer.trim else batch
            trainer.batch_loss(batch).backward()
        per_step = max((time.monotonic() - timed) / TIMED_STEPS, 1e-6)
    student.zero_grad(set_to_none=True)
    student.load_state_dict(saved)
    student.eval()
    timed = time.monotonic()
    evaluate(student, trainer.teacher_held, trainer.calibration)
    per_step += (time.monotonic() - timed) / config.eval_every
    left = seconds - (time.monotonic() - began)
    return max(1, int(left / per_step))


def _score(result: dict[str, Any]) -> tuple[float, float]:
    """Held-out primary metric first; SQNR breaks ties, so saturated agreement still lets training improve."""
    return round(primary_metric(result)[1], 4), float(result["sqnr_db"])


def _progress_bar(stack: ExitStack, enabled: bool, total: int):
    if not enabled:
        return None
    from rich.progress import Progress

    progress = stack.enter_context(Progress(transient=True))
    return progress, progress.add_task("distilling", total=total)
