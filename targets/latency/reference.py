"""Reference models a device's latency model is fitted on: small ResNet-style CNNs and BERT-style encoders over a
grid of widths and input sizes, in fp32 and int8. The validation benchmark predicts models OUTSIDE this set.

Weights are random but fixed; BatchNorm and LayerNorm statistics are randomised too, so exported biases differ
(identical ones are deduplicated by the exporter, which keeps ORT from forming its fused int8 kernels).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from deploy.core.spec import InputSpec


class Block(nn.Module):
    """conv-bn-relu-conv-bn + residual; `mid` is the inner width (pruned blocks have mid < out)."""

    def __init__(self, cin: int, mid: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, mid, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(mid, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU()
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu2(self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x))))) + identity)


class ResNetish(nn.Module):
    """Stem + `depth` blocks per stage (stride 2 between stages) + pool + linear head; `keep` < 1 prunes the inner
    conv of every block to that share of its channels."""

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64), depth: int = 1, keep: float = 1.0, in_ch: int = 3,
                 classes: int = 10):
        super().__init__()
        w0 = widths[0]
        self.stem = nn.Sequential(nn.Conv2d(in_ch, w0, 3, 1, 1, bias=False), nn.BatchNorm2d(w0), nn.ReLU())
        blocks, cin = [], w0
        for i, width in enumerate(widths):
            for d in range(depth):
                stride = 2 if i > 0 and d == 0 else 1
                blocks.append(Block(cin, max(4, int(round(width * keep))), width, stride))
                cin = width
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.pool(self.blocks(self.stem(x)))))


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
                m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=gen))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=gen))
                m.running_var.copy_(1 + 0.1 * torch.rand(m.running_var.shape, generator=gen))
    return model.eval()


def bert_encoder(hidden: int, layers: int, heads: int, ffn: int | None = None, vocab: int = 2000) -> nn.Module:
    """A BERT encoder (transformers) of the given size, eager attention, wrapped to take (ids, mask)."""
    from transformers import BertConfig, BertModel

    from deploy.examples.tiny_bert import EncoderWrapper

    config = BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=ffn or 4 * hidden, max_position_embeddings=512,
                        attn_implementation="eager")
    torch.manual_seed(0)
    return randomize_norms(EncoderWrapper(BertModel(config, add_pooling_layer=False)))


@dataclass(frozen=True)
class ReferenceModel:
    """A buildable model: kind cnn (widths, depth, keep) or bert (hidden, layers, heads, ffn), its input size
    (image side or sequence length) and the precision it runs in."""

    name: str
    kind: str
    params: tuple
    size: int
    precision: str = "fp32"

    def build(self) -> nn.Module:
        """The model with fixed weights: the same file (and cache key) every time it is exported."""
        torch.manual_seed(0)
        if self.kind == "cnn":
            widths, depth, keep = self.params
            return randomize_norms(ResNetish(tuple(widths), depth, keep))
        hidden, layers, heads, ffn = self.params
        return bert_encoder(hidden, layers, heads, ffn)

    def inputs(self) -> list[InputSpec]:
        if self.kind == "cnn":
            return [InputSpec("image", (1, 3, self.size, self.size))]
        return [InputSpec("input_ids", (1, self.size), "int64"),
                InputSpec("attention_mask", (1, self.size), "int64")]

    def at(self, precision: str) -> "ReferenceModel":
        suffix = "" if precision == "fp32" else f"-{precision}"
        return ReferenceModel(self.name + suffix, self.kind, self.params, self.size, precision)


def cnn(widths: tuple[int, ...], depth: int, size: int, keep: float = 1.0) -> ReferenceModel:
    pruned = f"-p{keep:g}" if keep < 1 else ""
    return ReferenceModel(f"cnn{widths[0]}-d{depth}{pruned}-s{size}", "cnn", (widths, depth, keep), size)


def bert(hidden: int, layers: int, seq: int, heads: int = 4, ffn: int | None = None) -> ReferenceModel:
    pruned = f"-f{ffn}" if ffn else ""
    return ReferenceModel(f"bert{hidden}-L{layers}{pruned}-s{seq}", "bert", (hidden, layers, heads, ffn), seq)


def reference_set(quick: bool = False) -> list[ReferenceModel]:
    """The fitting set: CNN widths 8/16/32/48 at 32 and 64 pixels and two pruned ones, BERT 64..384 wide, and
    int8 twins of most."""
    if quick:
        base = [cnn((8, 16, 32), 1, 32), cnn((16, 32, 64), 1, 32), bert(64, 1, 32)]
        return base + [base[1].at("int8")]
    cnns = [cnn((w, 2 * w, 4 * w), 1, s) for w in (8, 16, 32, 48) for s in (32, 64)]
    cnns += [cnn((16, 32, 64), 1, 64, keep=0.5), cnn((32, 64, 128), 1, 32, keep=0.7)]
    berts = [bert(64, 2, 32), bert(128, 2, 64), bert(256, 2, 64), bert(384, 1, 128, heads=6), bert(128, 4, 128)]
    int8 = [cnns[i].at("int8") for i in (0, 2, 3, 4, 5, 6, 8)] + [cnn((8, 16, 32), 2, 64).at("int8")]
    int8 += [berts[i].at("int8") for i in (0, 2, 3, 4)]
    return cnns + berts + int8
