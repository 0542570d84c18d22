"""A small ResNet-style CNN for scikit-learn's digits, the bundled example model.

Built only from plain nn modules (no functional tricks) so that Torch-Pruning,
torch.export, TorchScript tracing and ONNX export all handle it unchanged.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

INPUT_NAME = "image"
INPUT_SHAPE = (1, 1, 32, 32)
NUM_CLASSES = 10
# Mean/std of the [0, 1]-scaled, 32x32-upsampled train split (seed 0), fixed so
# that every consumer normalizes the same way; checked by tests/test_examples.py.
PIXEL_MEAN = 0.3054
PIXEL_STD = 0.3237
WEIGHTS_PATH = Path(__file__).parent / "digits_cnn.pt"


class BasicBlock(nn.Module):
    """conv-bn-relu-conv-bn plus a residual; 1x1 conv+bn downsample on shape change."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.relu2 = nn.ReLU()
        self.downsample = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + identity)


class DigitsCNN(nn.Module):
    """Stem + 3 BasicBlock stages (strides 1/2/2) + global average pool + Linear."""

    def __init__(self, num_classes: int = NUM_CLASSES, width: int = 16):
        super().__init__()
        w1, w2, w3 = width, 2 * width, 4 * width
        self.stem = nn.Sequential(
            nn.Conv2d(1, w1, 3, 1, 1, bias=False), nn.BatchNorm2d(w1), nn.ReLU()
        )
        self.layer1 = BasicBlock(w1, w1, 1)
        self.layer2 = BasicBlock(w1, w2, 2)
        self.layer3 = BasicBlock(w2, w3, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(w3, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(self.flatten(self.pool(x)))


def digits_cnn(num_classes: int = NUM_CLASSES, width: int = 16) -> nn.Module:
    """Factory for `--arch deploy.examples.digits_cnn:digits_cnn` (untrained)."""
    return DigitsCNN(num_classes=num_classes, width=width)


def load_example_model() -> nn.Module:
    """The architecture with the committed weights `digits_cnn.pt`, in eval mode."""
    model = digits_cnn()
    state = torch.load(WEIGHTS_PATH, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.eval()


def load_digits_split(seed: int = 0):
    """Deterministic stratified 80/20 split as (train_x, train_y, test_x, test_y).

    x is float32 N x 1 x 32 x 32: pixels 0..16 scaled to [0, 1], bilinearly
    upsampled from 8x8, then normalized with PIXEL_MEAN/PIXEL_STD; y is int64.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(
        data.images, data.target, test_size=0.2, random_state=seed, stratify=data.target
    )
    return _prep_x(x_tr), _prep_y(y_tr), _prep_x(x_te), _prep_y(y_te)


def upsample(images) -> torch.Tensor:
    """8x8 digits (pixel values 0..16) -> float32 N x 1 x 32 x 32 in [0, 1], unnormalized."""
    x = torch.as_tensor(images, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    return nn.functional.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)


def _prep_x(images) -> torch.Tensor:
    return (upsample(images) - PIXEL_MEAN) / PIXEL_STD


def _prep_y(labels) -> torch.Tensor:
    return torch.as_tensor(labels, dtype=torch.int64)


DEMO_WIDTH = 64  # ResNet's base width: the demo model, big enough that compute (not call overhead) is timed
DEMO_WEIGHTS_PATH = Path(__file__).parent / "digits_resnet64.pt"


def digits_resnet64(num_classes: int = NUM_CLASSES) -> nn.Module:
    """Factory for the demo model (`--arch deploy.examples.digits_cnn:digits_resnet64`, weights
    `digits_resnet64.pt`): the same three BasicBlock stages at ResNet's widths 64/128/256."""
    return DigitsCNN(num_classes=num_classes, width=DEMO_WIDTH)
