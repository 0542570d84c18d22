"""Recovery's pieces: the learning-rate schedule (and its replay), trimmed text batches (and which models take
them), the default time budget, the embedding loss, and the blocks whose features are matched."""
from __future__ import annotations

import copy

import pytest
import torch

from deploy.compress.distill import DistillConfig, lr_factor
from deploy.compress.distill_batches import trimmed
from deploy.compress.distill_loss import matched_blocks, output_loss
from deploy.compress.recover import default_minutes, replay_config


def test_learning_rate_warms_up_then_decays_and_a_replay_keeps_the_schedule():
    config = DistillConfig(steps=200, warmup=0.05, final_lr=0.05)
    factors = [lr_factor(s, config) for s in range(1, 201)]
    peak = factors.index(max(factors)) + 1
    assert peak == 10 and factors[0] < 0.2 and max(factors) == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[peak - 1:], factors[peak:]))  # decays after the warm-up
    assert factors[-1] == pytest.approx(0.05)
    replay = replay_config(config, kept_step=75)
    assert replay.steps == 75 and replay.horizon == 200
    assert [lr_factor(s, replay) for s in range(1, 76)] == factors[:75]  # the same weights come back


def test_the_learning_rate_is_probed_only_where_the_run_is_long_enough_to_show_a_difference():
    from deploy.compress.distill import MIN_RATE_PROBE, RATE_PROBE_SHARE, probe_steps

    long_run = round(10 * MIN_RATE_PROBE / RATE_PROBE_SHARE)
    assert probe_steps(DistillConfig(), long_run) == round(RATE_PROBE_SHARE * long_run)
    assert probe_steps(DistillConfig(), round(0.5 * MIN_RATE_PROBE / RATE_PROBE_SHARE)) == 0  # the warm-up alone
    assert probe_steps(DistillConfig(rates=(1e-3,)), long_run) == 0  # nothing to choose
    with pytest.raises(ValueError, match="rates"):
        DistillConfig(rates=(1e-3, 0.0))


def test_text_batches_are_cut_to_their_longest_sequence():
    ids = torch.arange(24).reshape(2, 12)
    mask = torch.tensor([[1] * 5 + [0] * 7, [1] * 8 + [0] * 4])
    cut = trimmed((ids, mask))
    assert cut[0].shape == (2, 8) and cut[1].shape == (2, 8) and torch.equal(cut[0], ids[:, :8])
    image = (torch.randn(2, 1, 8, 8),)
    assert trimmed(image) is image
    full = (ids, torch.ones(2, 12, dtype=torch.int64))
    assert trimmed(full) is full


def test_padding_is_cut_only_for_text_a_model_takes_shorter():
    from deploy.compress.distill_batches import trims

    class AnyLength(torch.nn.Module):
        def forward(self, ids, mask):
            return (ids * mask).float().sum(1, keepdim=True)

    class FixedLength(AnyLength):
        def forward(self, ids, mask):
            if ids.shape[1] != 12:
                raise RuntimeError("expected 12 tokens")
            return super().forward(ids, mask)

    padded = [(torch.arange(12).reshape(1, 12), torch.tensor([[1] * 6 + [0] * 6]))] * 4
    full = [(torch.arange(12).reshape(1, 12), torch.ones(1, 12, dtype=torch.int64))] * 4
    assert trims(AnyLength(), padded, 4, 0) and trims(AnyLength(), full, 4, 0)
    assert not trims(FixedLength(), padded, 4, 0)
    assert not trims(FixedLength(), full, 4, 0)  # no padding in the batch tried: tried one position shorter
    images = [(torch.randn(1, 1, 4, 4),)] * 4
    assert not trims(torch.nn.Flatten(), images, 4, 0)  # nothing to cut: the report must not say it was


def test_text_is_drawn_grouped_by_length_with_every_sample_as_likely_as_before():
    from deploy.compress.distill_batches import GROUP, draw, text_lengths

    lengths = [2 + (7 * i) % 60 for i in range(64)]  # lengths in a scrambled order, as real text comes
    samples = [(torch.full((1, 64), i), torch.tensor([[1] * n + [0] * (64 - n)])) for i, n in enumerate(lengths)]
    real = text_lengths(samples)
    assert real.tolist() == lengths and text_lengths([(torch.randn(1, 3),)]) is None
    gen, drawn = torch.Generator().manual_seed(0), torch.zeros(64)
    random_max, grouped_max = [], []
    for _ in range(1000):
        plain = draw(samples, gen, 8)
        random_max.append(int(plain[1].sum(1).max()))
        batch = draw(samples, gen, 8, real)
        grouped_max.append(int(batch[1].sum(1).max()))
        drawn += torch.bincount(batch[0][:, 0], minlength=64)
    assert sum(grouped_max) < 0.8 * sum(random_max)  # fewer padded positions to run
    expected = 1000 * 8 / 64
    assert drawn.min() > 0.6 * expected and drawn.max() < 1.4 * expected  # no sample starved or favoured
    parts = [int(draw(samples, torch.Generator().manual_seed(1), 8, real, part=p)[1].sum(1).max())
             for p in range(GROUP)]
    assert parts == sorted(parts) and parts[0] < parts[-1]  # the same pool, shortest slice first


def test_image_batches_are_half_mixup_and_token_ids_are_never_blended():
    from deploy.compress.distill_augment import augmentation_of, mixed

    gen = torch.Generator().manual_seed(0)
    images = torch.randn(8, 1, 4, 4)
    features = torch.randn(8, 3)
    out = mixed((images, features), gen, 0.5)
    assert torch.equal(out[0][4:], images[4:]) and torch.equal(out[1][4:], features[4:])  # the other half clean
    assert not torch.equal(out[0][:4], images[:4])
    # every blended sample is a convex mix of two batch samples, with the same partner and weight in each input
    for row in range(4):
        fits = [(j, w) for j in range(8) for w in [_weight(images[row], images[j], out[0][row])]
                if w is not None and torch.allclose(w * features[row] + (1 - w) * features[j], out[1][row], atol=1e-5)]
        assert fits, f"sample {row} is not a mix of two inputs"
    assert augmentation_of([(images[:1],)], DistillConfig()) == "mixup"
    text = [(torch.ones(1, 12, dtype=torch.int64), torch.ones(1, 12, dtype=torch.int64))]
    assert augmentation_of(text, DistillConfig()) == "token swap"
    assert augmentation_of(text, DistillConfig(token_swap=0.0)) == augmentation_of(text, DistillConfig(augment=0.0)) == ""
    one = (images[:1],)
    assert mixed(one, gen, 0.5) is one  # one sample: nothing to blend it with
    with pytest.raises(ValueError, match="augment"):
        DistillConfig(augment=1.5)


def test_token_swap_replaces_inner_tokens_of_the_first_share_with_tokens_of_the_batch():
    from deploy.compress.distill_augment import swapped

    gen = torch.Generator().manual_seed(0)
    ids = torch.arange(100, 100 + 8 * 20).reshape(8, 20)
    mask = torch.ones(8, 20, dtype=torch.int64)
    mask[:, 15:] = 0
    ids[mask == 0] = 0
    out, out_mask = swapped((ids, mask), gen, 0.5, 0.5)
    assert out_mask is mask and torch.equal(out[4:], ids[4:])  # the other half as it was
    assert torch.equal(out[:, [0, 14]], ids[:, [0, 14]]) and torch.equal(out[:, 15:], ids[:, 15:])  # [CLS], [SEP], pad
    changed = out[:4] != ids[:4]
    assert 10 < int(changed.sum()) < 46  # about half of the 4 x 13 inner tokens
    inner = set(ids[:, 1:14].flatten().tolist())
    assert set(out[:4][changed].tolist()) <= inner  # drawn from the batch's own inner tokens
    assert swapped((ids, mask), gen, 0.5, 0.0)[0] is ids
    image = (torch.randn(4, 1, 8, 8),)
    assert swapped(image, gen, 0.5, 0.5) is image


class _Seen(torch.nn.Module):
    """A teacher that records the inputs of every training step (batches larger than one validation sample)."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner, self.seen = inner, []

    def forward(self, *inputs):
        if inputs[0].shape[0] == 8:
            self.seen.append(inputs[0].clone())
        return self.inner(*inputs)


class _Bag(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.head = torch.nn.Embedding(50, 8), torch.nn.Linear(8, 3)

    def forward(self, ids, mask):
        return self.head((self.embed(ids) * mask.unsqueeze(-1)).sum(1))


@pytest.mark.parametrize("kind", ["features", "text"])
def test_training_batches_are_augmented_as_configured(kind):
    """The wiring: what recovery trains on is blended (features) or has tokens swapped (text) by default where
    configured, and is the calibration samples as they are with both off."""
    from deploy.compress.distill import distill
    from deploy.core.data import CalibrationSet

    torch.manual_seed(0)
    if kind == "features":
        inner = torch.nn.Sequential(torch.nn.Linear(6, 4))
        samples = [(torch.randn(1, 6),) for _ in range(48)]
        on, off = DistillConfig(steps=4, batch_size=8, rates=()), DistillConfig(steps=4, batch_size=8, augment=0.0)
    else:
        inner = _Bag()
        samples = [(torch.randint(1, 50, (1, 10)), torch.ones(1, 10, dtype=torch.int64)) for _ in range(48)]
        on = DistillConfig(steps=4, batch_size=8, rates=())
        off = DistillConfig(steps=4, batch_size=8, rates=(), token_swap=0.0)
    data = CalibrationSet(samples[:32], [], None, "test", "x", validation=samples[32:])
    rows = torch.cat([s[0] for s in samples[:32]])
    for config, augmented in ((on, True), (off, False)):
        teacher = _Seen(copy.deepcopy(inner))
        result = distill(copy.deepcopy(inner), teacher, data, config)
        assert result.augmented == (0.5 if augmented else 0.0)
        assert result.augmentation == ("" if not augmented else "mixup" if kind == "features" else "token swap")
        seen = torch.cat(teacher.seen)
        known = [any(torch.equal(row, r) for r in rows) for row in seen]
        assert (not all(known)) == augmented, (kind, augmented)


def _weight(a: torch.Tensor, b: torch.Tensor, got: torch.Tensor) -> torch.Tensor | None:
    """w with w * a + (1 - w) * b == got (least squares), where one in [0, 1] fits."""
    diff = (a - b).flatten()
    if diff.norm() < 1e-6:
        return None
    w = torch.dot((got - b).flatten(), diff) / torch.dot(diff, diff)
    return w if 0 <= w <= 1 and torch.allclose(w * a + (1 - w) * b, got, atol=1e-5) else None


def test_default_recovery_minutes_grow_with_the_work_of_one_sample():
    assert default_minutes(8_000_000) == 1.0  # the digits CNN
    assert default_minutes(2_800_000_000) == pytest.approx(5.6)  # about all-MiniLM-L6-v2 at 128 tokens
    assert default_minutes(40_000_000_000) == 10.0


def test_embedding_loss_counts_the_pooled_direction():
    teacher = torch.randn(2, 6, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    assert output_loss(teacher.clone(), teacher, 2.0, mask) == pytest.approx(0.0, abs=1e-6)
    flipped = teacher.clone()
    flipped[0, :3] = -flipped[0, :3]  # the same MSE as a flipped padding position would give, but a new direction
    padded = teacher.clone()
    padded[0, 3:] = -padded[0, 3:]
    assert output_loss(flipped, teacher, 2.0, mask) > output_loss(padded, teacher, 2.0, mask)


def test_transformer_layers_are_matched_block_by_block():
    from deploy.examples.tiny_bert import example_inputs, tiny_bert

    teacher = tiny_bert().eval()
    student = copy.deepcopy(teacher)
    blocks = matched_blocks(student, teacher, DistillConfig(), example_inputs())
    layers = [b for b in blocks if b.rsplit(".", 1)[-1].isdigit()]
    assert len(layers) >= 2 and all(b.rsplit(".", 1)[0] == layers[0].rsplit(".", 1)[0] for b in layers)


def test_recovery_bound_by_minutes_runs_until_them_and_its_replay_gets_the_same_weights():
    """Without a step count, recovery trains until its minutes are spent (or early stop): a default of 200 steps
    left 74 of 120 seconds unused on the digits ResNet. The schedule spans the steps the minutes allow at the step
    time measured before training; the first steps probe each peak rate and the best goes on, and a replay of the
    kept step on that schedule, at that rate alone, gets the same weights."""
    from torch import nn

    from deploy.compress.distill import distill
    from deploy.core.data import CalibrationSet

    warm = nn.Linear(1, 1)  # a process's first AdamW step costs over a second (imports): not this 1.8-s run's time
    warm(torch.ones(1)).sum().backward()
    torch.optim.AdamW(warm.parameters()).step()
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 4)).eval()
    start = copy.deepcopy(teacher)
    with torch.no_grad():
        start[0].weight.add_(0.3 * torch.randn_like(start[0].weight))
    samples = [(torch.randn(1, 16),) for _ in range(96)]
    data = CalibrationSet(samples[:64], samples[64:80], None, "test", "x", validation=samples[80:])
    config = DistillConfig(steps=None, recover_minutes=0.03, eval_every=10, patience=1000, backoffs=0)
    student = copy.deepcopy(start)
    result = distill(student, teacher, data, config)
    assert result.stopped == "time" and result.seconds >= 0.03 * 60 and result.kept_step > 0
    assert 0.25 < result.steps / result.horizon < 4  # the schedule spans about what ran (not 200, not a million)
    assert [p["rate"] for p in result.probes] == list(config.rates)  # long enough to probe each rate first
    assert result.rate == max(result.probes, key=lambda p: (p["top1_agreement"], p["sqnr_db"]))["rate"]
    replay = replay_config(config, result.kept_step, result.horizon, result.rate)
    assert replay.steps == result.kept_step and replay.horizon == result.horizon and replay.rates == ()
    again = copy.deepcopy(start)
    distill(again, teacher, data, replay)
    for name, value in student.state_dict().items():
        assert torch.equal(value, again.state_dict()[name]), name


def _perturbed_mlp():
    """A small MLP (the teacher), a copy of it with its first layer's weights disturbed (the student's start), and
    data split into calibration, held-out and validation."""
    from torch import nn

    from deploy.core.data import CalibrationSet

    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    start = copy.deepcopy(teacher)
    with torch.no_grad():
        start[0].weight.add_(0.3 * torch.randn_like(start[0].weight))
    samples = [(torch.randn(1, 16),) for _ in range(96)]
    return teacher, start, CalibrationSet(samples[:64], samples[64:80], None, "test", "x", validation=samples[80:])


def test_a_run_stopped_by_its_minutes_judges_the_steps_since_its_last_evaluation():
    """The minutes can run out between two evaluations: the last steps are scored and kept where better, not thrown
    away (a trial recovery of all-MiniLM-L6-v2 had time for about 10 steps at an evaluation every 10, so its second
    round kept its starting weights on every structure); a replay of that step gets the same weights."""
    from deploy.compress.distill import distill

    teacher, start, data = _perturbed_mlp()
    config = DistillConfig(steps=None, recover_minutes=0.02, eval_every=10**6, rates=(), lr=1e-3, backoffs=0)
    student = copy.deepcopy(start)
    result = distill(student, teacher, data, config)
    assert result.stopped == "time" and [h["step"] for h in result.history] == [0, result.steps]
    assert result.kept_step == result.steps > 0 and result.after_sqnr_db > result.before_sqnr_db
    again = copy.deepcopy(start)
    distill(again, teacher, data, replay_config(config, result.kept_step, result.horizon, result.rate))
    for name, value in student.state_dict().items():
        assert torch.equal(value, again.state_dict()[name]), name


@pytest.mark.parametrize("bf16", [True, False])
def test_recovery_trains_in_bf16_where_asked_and_judges_and_keeps_f32(bf16, monkeypatch):
    """bf16 autocast is recovery's speed on a CPU with AMX (all-MiniLM-L6-v2 with every other block dropped, 2
    minutes: about 1.7x the steps, held-out pooled cosine +0.02): the training passes run in bf16, while the
    weights, the losses and the validation score that early stopping and the kept step go by stay in f32; a replay
    of the kept step with the same config gets the same weights."""
    from deploy.compress import distill_loss
    from deploy.compress.distill import distill

    teacher, start, data = _perturbed_mlp()
    config = DistillConfig(steps=30, eval_every=10, rates=(), lr=1e-3, bf16=bf16)
    student = copy.deepcopy(start)
    seen: dict[bool, set] = {True: set(), False: set()}  # output dtypes of the first layer, training or not
    student[0].register_forward_hook(lambda m, args, out: seen[m.training].add(out.dtype))
    taught: set = set()  # the teacher's: its outputs on the validation split (f32), and in each training step
    teacher[0].register_forward_hook(lambda m, args, out: taught.add(out.dtype))
    losses: set = set()  # what reaches the output loss
    real = distill_loss.output_loss
    monkeypatch.setattr(distill_loss, "output_loss",
                        lambda s, t, *a: losses.update({s.dtype, t.dtype}) or real(s, t, *a))
    result = distill(student, teacher, data, config)
    assert seen[True] == {torch.bfloat16 if bf16 else torch.float32} and seen[False] == {torch.float32}
    assert taught == ({torch.bfloat16, torch.float32} if bf16 else {torch.float32}) and losses == {torch.float32}
    assert result.precision == ("bf16" if bf16 else "fp32")
    assert all(p.dtype == torch.float32 for p in student.parameters())
    assert result.kept_step > 0 and result.after_sqnr_db > result.before_sqnr_db
    again = copy.deepcopy(start)
    distill(again, teacher, data, replay_config(config, result.kept_step, result.horizon, result.rate))
    for name, value in student.state_dict().items():
        assert torch.equal(value, again.state_dict()[name]), name
