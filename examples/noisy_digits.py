"""A harder CNN case: a ResNet-18-width network (stem + four stages of two BasicBlocks, 64/128/256/512 channels)
trained on scikit-learn's digits at 32x32, and judged on digits seen through noise and affine distortion, so that
its fp32 accuracy is well below 100% and compression errors show up in the numbers (on clean digits every
compressed model scores 100%).

Training (fixed seed, about 3 minutes on 2 cores) uses the same kind of distortion, milder; the weights are cached
outside git (`deploy cache` folder, `models/`), so a benchmark trains once per machine. Every image set here is
deterministic: calibration = distorted training images, evaluation = distorted held-out images (never trained on).

The test-time strength is set per trained model (`held_out_scale`), not fixed: the same seed trained on another CPU's
float arithmetic gives another model, and accuracy falls steeply with strength (one model: 0.94 at 0.8x, 0.80 at
1x), so a fixed strength tuned on one machine lands outside 85-95% on another.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from torch import nn

from deploy.examples.digits_cnn import PIXEL_MEAN, PIXEL_STD, BasicBlock, load_digits_split

VERSION = 1  # part of the cache file name: bump when training or the architecture changes
WIDTHS = (64, 128, 256, 512)
TRAIN_DISTORTION = (0.8, 0.15, 2.0, 0.5)  # rotation (rad) ... see `distort`: max rotation, scale, shift px, noise
TEST_DISTORTION = (0.55, 0.2, 3.0, 1.1)  # the shape of the test-time distortion; `held_out_scale` sets its strength
TARGET_ACCURACY = 0.90  # fp32 accuracy the test-time strength is set for (the frontier wants 85-95%)
EPOCHS = 6
BATCH = 64


class DigitsResNet18(nn.Module):
    """ResNet-18's stage layout and widths for 1 x 32 x 32 inputs (3x3 stem, no max-pool)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, WIDTHS[0], 3, 1, 1, bias=False), nn.BatchNorm2d(WIDTHS[0]), nn.ReLU())
        stages, width = [], WIDTHS[0]
        for i, out in enumerate(WIDTHS):
            stages.append(nn.Sequential(BasicBlock(width, out, 1 if i == 0 else 2), BasicBlock(out, out, 1)))
            width = out
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(WIDTHS[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        return self.fc(self.flatten(self.pool(x)))


def resnet18_digits(num_classes: int = 10) -> nn.Module:
    """`--arch deploy.examples.noisy_digits:resnet18_digits` (untrained)."""
    return DigitsResNet18(num_classes)


def distort(x: torch.Tensor, strength: tuple[float, float, float, float], gen: torch.Generator) -> torch.Tensor:
    """Each image rotated by up to +-rotation, scaled by 1 +- scale, shifted by up to `shift` pixels (background
    fill), then Gaussian noise of std `noise` (in normalised pixel units) added."""
    rotation, scale, shift, noise = strength
    n = x.shape[0]
    angle = (torch.rand(n, generator=gen) * 2 - 1) * rotation
    factor = 1 + (torch.rand(n, generator=gen) * 2 - 1) * scale
    offset = (torch.rand(n, 2, generator=gen) * 2 - 1) * (2 * shift / x.shape[-1])
    cos, sin = torch.cos(angle) / factor, torch.sin(angle) / factor
    theta = torch.stack([torch.stack([cos, -sin, offset[:, 0]], 1), torch.stack([sin, cos, offset[:, 1]], 1)], 1)
    grid = nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    background = -PIXEL_MEAN / PIXEL_STD
    warped = nn.functional.grid_sample(x - background, grid, align_corners=False, padding_mode="zeros") + background
    return warped + noise * torch.randn(x.shape, generator=gen)


def images(split: str, copies: int = 1, seed: int = 0, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Distorted images and labels: "calibration" from the training images (train-time strength), "held_out"
    from the held-out ones (test-time strength times `scale`); `copies` distorted versions of each image."""
    train_x, train_y, test_x, test_y = load_digits_split(0)
    x, y, strength = (train_x, train_y, TRAIN_DISTORTION) if split == "calibration" else (
        test_x, test_y, tuple(scale * v for v in TEST_DISTORTION))
    gen = torch.Generator().manual_seed(1000 + seed + (0 if split == "calibration" else 1))
    return torch.cat([distort(x, strength, gen) for _ in range(copies)]), y.repeat(copies)


SETTING_SEED = 7_000  # the draw `held_out_scale` looks at: same held-out images, other distortions than the scored ones


def held_out_scale(model: nn.Module, target: float = TARGET_ACCURACY, low: float = 0.4, high: float = 1.6,
                   steps: int = 7, copies: int = 3) -> float:
    """The test-time strength multiple at which `model`'s accuracy is `target`, bisected on a draw of the held-out
    images that is not scored (`SETTING_SEED`; the distortions' random draws stay fixed while only their size
    changes, so accuracy falls smoothly with the multiple). About `low` or `high` where the target lies outside."""
    for _ in range(steps):
        middle = (low + high) / 2
        x, y = images("held_out", copies=copies, seed=SETTING_SEED, scale=middle)
        low, high = (middle, high) if accuracy(model, x, y) > target else (low, middle)
    return (low + high) / 2


def cached_held_out_scale(model: nn.Module, cache: Path | None = None) -> float:
    """`held_out_scale(model)`, kept in the cache folder under a digest of the model's weights and the setting (the
    bisection is 7 passes over 1,080 images: about a minute of a frontier run on 2 cores); a model with other
    weights, or another target, strength or draw, gets its own."""
    import hashlib
    import json

    from deploy.core.atomic_io import atomic_write_json
    from deploy.core.cache import cache_dir, model_hash

    setting = hashlib.sha256(repr((TARGET_ACCURACY, TEST_DISTORTION, SETTING_SEED)).encode()).hexdigest()[:8]
    path = (cache or cache_dir() / "models") / f"noisy_digits_scale_{model_hash(model)}_{setting}.json"
    if path.exists():
        return float(json.loads(path.read_text())["scale"])
    scale = held_out_scale(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {"scale": scale})
    return scale


def train(epochs: int = EPOCHS, seed: int = 0, log=print) -> nn.Module:
    """SGD-free recipe: AdamW + one-cycle, distortion drawn afresh every batch."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    train_x, train_y, _, _ = load_digits_split(0)
    model = resnet18_digits()
    steps = epochs * math.ceil(len(train_x) / BATCH)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.05)
    started = time.monotonic()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(train_x), generator=gen)
        for i in range(0, len(perm), BATCH):
            idx = perm[i:i + BATCH]
            loss = loss_fn(model(distort(train_x[idx], TRAIN_DISTORTION, gen)), train_y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        log(f"epoch {epoch + 1}/{epochs}: loss {loss.item():.3f}, {time.monotonic() - started:.0f} s")
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((torch.cat([model(x[i:i + 256]) for i in range(0, len(x), 256)]).argmax(1) == y).float().mean())


def load_or_train(cache: Path | None = None, log=print) -> nn.Module:
    """The trained model from the cache, or trained now (and cached)."""
    from deploy.core.cache import cache_dir

    path = (cache or cache_dir() / "models") / f"digits_resnet18_noisy_v{VERSION}.pt"
    model = resnet18_digits()
    if path.exists():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model.eval()
    model = train(log=log)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    tmp.replace(path)
    return model


if __name__ == "__main__":
    torch.set_num_threads(2)
    trained = load_or_train()
    scale = held_out_scale(trained)
    x, y = images("held_out", copies=3, scale=scale)
    print(f"test-time strength {scale:.3f}x; fp32 accuracy on {len(y)} distorted held-out digits: "
          f"{accuracy(trained, x, y):.3f}")
