"""Builders for the models named in `reference_latency.toml`, in plain torch (no torchvision, timm or downloads).

Weights are random: these modules are only priced by the latency model, so what matters is that their layer shapes
follow each model's public definition (the NetsPresso Trainer configs for MobileNetV3, the MLPerf reference code for
SSD-MobileNet and RetinaNet, the Ultralytics YAMLs for YOLOv8 and YOLO11, the BERT paper sizes).
`build(name, input_shape)` returns the module and its input specs; `FAMILIES` names each model's architecture family,
which the fitting rule counts.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import BasicBlock, Bottleneck, ResNet, ViT  # noqa: E402

from deploy.core.spec import InputSpec  # noqa: E402


def _cbr(cin: int, cout: int, k: int, s: int = 1, g: int = 1, act: nn.Module | None = None) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, s, k // 2, groups=g, bias=False), nn.BatchNorm2d(cout),
                         *([act] if act is not None else []))


# --- MobileNetV3 (settings of the NetsPresso Trainer mobilenetv3-{small,large}-classification configs) ----------
# (kernel, expanded, out, squeeze-excite, hard-swish, stride)
_MBV3 = {
    "small": ([(3, 16, 16, 1, 0, 2), (3, 72, 24, 0, 0, 2), (3, 88, 24, 0, 0, 1), (5, 96, 40, 1, 1, 2),
               (5, 240, 40, 1, 1, 1), (5, 240, 40, 1, 1, 1), (5, 120, 48, 1, 1, 1), (5, 144, 48, 1, 1, 1),
               (5, 288, 96, 1, 1, 2), (5, 576, 96, 1, 1, 1), (5, 576, 96, 1, 1, 1)], 1024),
    "large": ([(3, 16, 16, 0, 0, 1), (3, 64, 24, 0, 0, 2), (3, 72, 24, 0, 0, 1), (5, 72, 40, 1, 0, 2),
               (5, 120, 40, 1, 0, 1), (5, 120, 40, 1, 0, 1), (3, 240, 80, 0, 1, 2), (3, 200, 80, 0, 1, 1),
               (3, 184, 80, 0, 1, 1), (3, 184, 80, 0, 1, 1), (3, 480, 112, 1, 1, 1), (3, 672, 112, 1, 1, 1),
               (5, 672, 160, 1, 1, 2), (5, 960, 160, 1, 1, 1), (5, 960, 160, 1, 1, 1)], 1280),
}


class SqueezeExcite(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        v = c // 4
        mid = max(8, int(v + 4) // 8 * 8)
        mid += 8 if mid < 0.9 * v else 0
        self.fc1, self.fc2 = nn.Conv2d(c, mid, 1), nn.Conv2d(mid, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.relu(self.fc1(x.mean((2, 3), keepdim=True)))
        return x * nn.functional.hardsigmoid(self.fc2(s))


class MBConv3(nn.Module):
    def __init__(self, cin: int, k: int, exp: int, cout: int, se: int, hs: int, stride: int):
        super().__init__()
        act = nn.Hardswish if hs else nn.ReLU
        layers = [] if exp == cin else [_cbr(cin, exp, 1, act=act())]
        layers += [_cbr(exp, exp, k, stride, exp, act())] + ([SqueezeExcite(exp)] if se else [])
        self.body = nn.Sequential(*layers, _cbr(exp, cout, 1))
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) if self.residual else self.body(x)


class MobileNetV3(nn.Module):
    def __init__(self, size: str, num_classes: int = 1000):
        super().__init__()
        blocks, hidden = _MBV3[size]
        layers, cin = [_cbr(3, 16, 3, 2, act=nn.Hardswish())], 16
        for k, exp, cout, se, hs, s in blocks:
            layers.append(MBConv3(cin, k, exp, cout, se, hs, s))
            cin = cout
        layers.append(_cbr(cin, 6 * cin, 1, act=nn.Hardswish()))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Linear(6 * cin, hidden), nn.Hardswish(), nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean((2, 3)))


# --- SSD-MobileNet-v1, 300x300, 91 classes (MLPerf reference: python/models/ssd_mobilenet_v1.py) --------------
class SSDMobileNetV1(nn.Module):
    WIDTHS = ((32, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2), (256, 256, 1), (256, 512, 2)) + \
        ((512, 512, 1),) * 5 + ((512, 1024, 2), (1024, 1024, 1))

    def __init__(self, num_classes: int = 91):
        super().__init__()
        layers = [_cbr(3, 32, 3, 2, act=nn.ReLU6())]
        for cin, cout, s in self.WIDTHS:
            layers.append(nn.Sequential(_cbr(cin, cin, 3, s, cin, nn.ReLU6()), _cbr(cin, cout, 1, act=nn.ReLU6())))
        self.backbone = nn.ModuleList(layers)
        self.extras = nn.ModuleList(nn.Sequential(nn.Conv2d(cin, mid, 1), nn.ReLU6(), nn.Conv2d(mid, cout, 3, 2, 1),
                                                  nn.ReLU6())
                                    for cin, mid, cout in ((1024, 256, 512), (512, 128, 256), (256, 128, 256),
                                                           (256, 64, 128)))
        chans, anchors = (512, 1024, 512, 256, 256, 128), (3, 6, 6, 6, 6, 6)
        self.cls = nn.ModuleList(nn.Conv2d(c, a * num_classes, 1) for c, a in zip(chans, anchors))
        self.box = nn.ModuleList(nn.Conv2d(c, a * 4, 1) for c, a in zip(chans, anchors))
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps = []
        for i, layer in enumerate(self.backbone):
            x = layer(x)
            if i in (11, 13):
                maps.append(x)
        for layer in self.extras:
            maps.append(layer(maps[-1]))
        flat = lambda t, n: t.permute(0, 2, 3, 1).reshape(1, -1, n)  # noqa: E731
        scores = torch.cat([flat(c(m), self.num_classes) for c, m in zip(self.cls, maps)], 1)
        boxes = torch.cat([flat(b(m), 4) for b, m in zip(self.box, maps)], 1)
        return torch.sigmoid(scores), boxes


# --- RetinaNet ResNeXt50-32x4d FPN, 800x800, 264 classes (MLPerf: torchvision retinanet layout) ---------------
class ResNeXtBlock(nn.Module):
    def __init__(self, cin: int, planes: int, stride: int):
        super().__init__()
        width, cout = planes * 2, planes * 4  # 32 groups x 4 channels per 64 planes
        self.body = nn.Sequential(_cbr(cin, width, 1, act=nn.ReLU()), _cbr(width, width, 3, stride, 32, nn.ReLU()),
                                  _cbr(width, cout, 1))
        self.down = _cbr(cin, cout, 1, stride) if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + (x if self.down is None else self.down(x)))


class RetinaNet(nn.Module):
    def __init__(self, num_classes: int = 264, anchors: int = 9):
        super().__init__()
        self.stem = nn.Sequential(_cbr(3, 64, 7, 2, act=nn.ReLU()), nn.MaxPool2d(3, 2, 1))
        stages, cin = [], 64
        for i, (planes, count) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3))):
            blocks = []
            for j in range(count):
                blocks.append(ResNeXtBlock(cin, planes, 2 if j == 0 and i > 0 else 1))
                cin = planes * 4
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)
        self.lateral = nn.ModuleList(nn.Conv2d(c, 256, 1) for c in (512, 1024, 2048))
        self.smooth = nn.ModuleList(nn.Conv2d(256, 256, 3, 1, 1) for _ in range(3))
        self.p6, self.p7 = nn.Conv2d(256, 256, 3, 2, 1), nn.Conv2d(256, 256, 3, 2, 1)
        self.cls_tower, self.box_tower = (nn.Sequential(*[m for _ in range(4) for m in (nn.Conv2d(256, 256, 3, 1, 1),
                                                                                         nn.ReLU())])
                                          for _ in range(2))
        self.cls = nn.Conv2d(256, anchors * num_classes, 3, 1, 1)
        self.box = nn.Conv2d(256, anchors * 4, 3, 1, 1)
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, feats = self.stem(x), []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        lat = [conv(f) for conv, f in zip(self.lateral, feats[1:])]
        for i in (1, 0):
            lat[i] = lat[i] + nn.functional.interpolate(lat[i + 1], size=lat[i].shape[-2:], mode="nearest")
        maps = [conv(f) for conv, f in zip(self.smooth, lat)]
        maps += [self.p6(maps[-1])]
        maps += [self.p7(torch.relu(maps[-1]))]
        scores = torch.cat([self.cls(self.cls_tower(m)).permute(0, 2, 3, 1).reshape(1, -1, self.num_classes)
                            for m in maps], 1)
        boxes = torch.cat([self.box(self.box_tower(m)).permute(0, 2, 3, 1).reshape(1, -1, 4) for m in maps], 1)
        return scores, boxes


# --- YOLOv8 / YOLO11 detection, 80 classes (Ultralytics cfg/models/v8/yolov8.yaml, cfg/models/11/yolo11.yaml) --
def _c(c1: int, c2: int, k: int = 1, s: int = 1, g: int = 1, act: bool = True) -> nn.Sequential:
    return _cbr(c1, c2, k, s, g, nn.SiLU() if act else None)


class YBottleneck(nn.Module):
    def __init__(self, c1: int, c2: int, shortcut: bool = True, k: tuple[int, int] = (3, 3), e: float = 0.5):
        super().__init__()
        c_ = int(c2 * e)
        self.cv1, self.cv2 = _c(c1, c_, k[0]), _c(c_, c2, k[1])
        self.add = shortcut and c1 == c2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C3k(nn.Module):
    def __init__(self, c1: int, c2: int, n: int = 2, shortcut: bool = True):
        super().__init__()
        c_ = c2 // 2
        self.cv1, self.cv2, self.cv3 = _c(c1, c_), _c(c1, c_), _c(2 * c_, c2)
        self.m = nn.Sequential(*(YBottleneck(c_, c_, shortcut, (3, 3), 1.0) for _ in range(n)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), 1))


class C2f(nn.Module):
    """C2f (YOLOv8); with `kind` 'c3k2' / 'c3k2-c3k' the YOLO11 C3k2 block (Bottleneck or C3k inner blocks)."""

    def __init__(self, c1: int, c2: int, n: int, shortcut: bool, e: float = 0.5, kind: str = "c2f"):
        super().__init__()
        self.c = int(c2 * e)
        self.cv1, self.cv2 = _c(c1, 2 * self.c), _c((2 + n) * self.c, c2)
        inner = {"c2f": lambda: YBottleneck(self.c, self.c, shortcut, (3, 3), 1.0),
                 "c3k2": lambda: YBottleneck(self.c, self.c, shortcut),
                 "c3k2-c3k": lambda: C3k(self.c, self.c, 2, shortcut)}[kind]
        self.m = nn.ModuleList(inner() for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = list(self.cv1(x).chunk(2, 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class SPPF(nn.Module):
    def __init__(self, c1: int, c2: int):
        super().__init__()
        self.cv1, self.cv2, self.m = _c(c1, c1 // 2), _c(c1 // 2 * 4, c2), nn.MaxPool2d(5, 1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = [self.cv1(x)]
        y.extend(self.m(y[-1]) for _ in range(3))
        return self.cv2(torch.cat(y, 1))


class PSABlock(nn.Module):
    """Attention (num_heads = c // 64, key dim = half the head dim, 3x3 depthwise positional term) + conv FFN."""

    def __init__(self, c: int):
        super().__init__()
        self.heads = max(c // 64, 1)
        self.hd = c // self.heads
        self.kd = self.hd // 2
        self.qkv, self.proj = _c(c, c + 2 * self.kd * self.heads, act=False), _c(c, c, act=False)
        self.pe = _c(c, c, 3, g=c, act=False)
        self.ffn = nn.Sequential(_c(c, 2 * c), _c(2 * c, c, act=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(x).view(b, self.heads, 2 * self.kd + self.hd, h * w).split([self.kd, self.kd, self.hd], 2)
        attn = ((q.transpose(-2, -1) @ k) * self.kd ** -0.5).softmax(-1)
        y = (v @ attn.transpose(-2, -1)).view(b, c, h, w) + self.pe(v.reshape(b, c, h, w))
        x = x + self.proj(y)
        return x + self.ffn(x)


class C2PSA(nn.Module):
    def __init__(self, c: int, n: int):
        super().__init__()
        self.c = c // 2
        self.cv1, self.cv2 = _c(c, 2 * self.c), _c(2 * self.c, c)
        self.m = nn.Sequential(*(PSABlock(self.c) for _ in range(n)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.cv1(x).split((self.c, self.c), 1)
        return self.cv2(torch.cat((a, self.m(b)), 1))


class Detect(nn.Module):
    """Three-level decoupled head with DFL box decoding (reg_max 16); YOLO11 uses depthwise convs in its class
    branch."""

    def __init__(self, ch: tuple[int, ...], nc: int = 80, dw_cls: bool = False):
        super().__init__()
        c2, c3 = max(16, ch[0] // 4, 64), max(ch[0], min(nc, 100))
        self.box = nn.ModuleList(nn.Sequential(_c(x, c2, 3), _c(c2, c2, 3), nn.Conv2d(c2, 64, 1)) for x in ch)
        cls = (lambda x: nn.Sequential(_c(x, x, 3, g=x), _c(x, c3), _c(c3, c3, 3, g=c3), _c(c3, c3),
                                       nn.Conv2d(c3, nc, 1))) if dw_cls else \
            (lambda x: nn.Sequential(_c(x, c3, 3), _c(c3, c3, 3), nn.Conv2d(c3, nc, 1)))
        self.cls = nn.ModuleList(cls(x) for x in ch)
        self.register_buffer("bins", torch.arange(16, dtype=torch.float32).view(1, 16, 1, 1))

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        out = []
        for f, box, cls in zip(feats, self.box, self.cls):
            d = box(f).view(1, 4, 16, -1).transpose(1, 2).softmax(1)
            dist = (d * self.bins.view(1, 16, 1, 1)).sum(1)
            out.append(torch.cat((dist, cls(f).view(1, -1, dist.shape[-1]).sigmoid()), 1))
        return torch.cat(out, 2)


_YOLO_SCALES = {"v8": {"n": (0.33, 0.25, 1024), "s": (0.33, 0.50, 1024), "m": (0.67, 0.75, 768),
                       "l": (1.00, 1.00, 512), "x": (1.00, 1.25, 512)},
                "11": {"n": (0.50, 0.25, 1024), "s": (0.50, 0.50, 1024), "m": (0.50, 1.00, 512),
                       "l": (1.00, 1.00, 512), "x": (1.00, 1.50, 512)}}


class YOLO(nn.Module):
    def __init__(self, version: str, scale: str):
        super().__init__()
        depth, width, max_ch = _YOLO_SCALES[version][scale]
        ch = lambda c: int(math.ceil(min(c, max_ch) * width / 8) * 8)  # noqa: E731
        n = lambda r: max(round(r * depth), 1) if r > 1 else r  # noqa: E731
        v8, deep = version == "v8", scale in "mlx"

        def block(c1: int, c2: int, reps: int, shortcut: bool, e: float = 0.5, c3k: bool = False) -> nn.Module:
            if v8:
                return C2f(c1, c2, n(reps), shortcut)
            return C2f(c1, c2, n(reps), True, e, "c3k2-c3k" if (c3k or deep) else "c3k2")

        r1, r2 = (3, 6) if v8 else (2, 2)  # repeats of the outer / inner backbone blocks before depth scaling
        c64, c128, c256, c512, c1024 = ch(64), ch(128), ch(256), ch(512), ch(1024)
        p2, p3 = (c128, c256) if v8 else (c256, c512)  # YOLO11 widens its first two blocks to 256 / 512
        self.b0 = nn.Sequential(_c(3, c64, 3, 2), _c(c64, c128, 3, 2), block(c128, p2, r1, True, 0.25))
        self.b1 = nn.Sequential(_c(p2, c256, 3, 2), block(c256, p3, r2, True, 0.25))
        self.b2 = nn.Sequential(_c(p3, c512, 3, 2), block(c512, c512, r2, True, c3k=True))
        self.b3 = nn.Sequential(_c(c512, c1024, 3, 2), block(c1024, c1024, r1 if v8 else r2, True, c3k=True),
                                SPPF(c1024, c1024), *([] if v8 else [C2PSA(c1024, n(2))]))
        rh = r1 if v8 else r2
        self.h1 = block(c1024 + c512, c512, rh, False)
        self.h2 = block(c512 + p3, c256, rh, False)
        self.d1 = _c(c256, c256, 3, 2)
        self.h3 = block(c256 + c512, c512, rh, False)
        self.d2 = _c(c512, c512, 3, 2)
        self.h4 = block(c512 + c1024, c1024, rh, False, c3k=True)
        self.detect = Detect((c256, c512, c1024), dw_cls=not v8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up = lambda t: nn.functional.interpolate(t, scale_factor=2.0, mode="nearest")  # noqa: E731
        p3 = self.b1(self.b0(x))
        p4 = self.b2(p3)
        p5 = self.b3(p4)
        h4 = self.h1(torch.cat((up(p5), p4), 1))
        out3 = self.h2(torch.cat((up(h4), p3), 1))
        out4 = self.h3(torch.cat((self.d1(out3), h4), 1))
        out5 = self.h4(torch.cat((self.d2(out4), p5), 1))
        return self.detect([out3, out4, out5])


class BertQA(nn.Module):
    """BERT encoder + the SQuAD span head (start/end logits), as in NVIDIA's TensorRT BERT demo."""

    def __init__(self, hidden: int, layers: int, heads: int):
        super().__init__()
        from deploy.targets.latency.reference import bert_encoder

        self.encoder = bert_encoder(hidden, layers, heads, 4 * hidden, vocab=30522)
        self.qa = nn.Linear(hidden, 2)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.qa(self.encoder(input_ids, attention_mask))


_BUILDERS = {
    "resnet18": lambda: ResNet(BasicBlock, (2, 2, 2, 2)),
    "resnet34": lambda: ResNet(BasicBlock, (3, 4, 6, 3)),
    "resnet50": lambda: ResNet(Bottleneck, (3, 4, 6, 3)),
    "mobilenetv3_small": lambda: MobileNetV3("small"),
    "mobilenetv3_large": lambda: MobileNetV3("large"),
    "vit_tiny": ViT,
    "ssd_mobilenet_v1": SSDMobileNetV1,
    "retinanet_resnext50": RetinaNet,
    "bert_base": lambda: BertQA(768, 12, 12),
    "bert_large": lambda: BertQA(1024, 24, 16),
    **{f"yolov8{s}": (lambda s=s: YOLO("v8", s)) for s in "nsmlx"},
    **{f"yolo11{s}": (lambda s=s: YOLO("11", s)) for s in "nsmlx"},
}

FAMILIES = {"resnet18": "resnet", "resnet34": "resnet", "resnet50": "resnet", "mobilenetv3_small": "mobilenet",
            "mobilenetv3_large": "mobilenet", "vit_tiny": "vit", "ssd_mobilenet_v1": "ssd",
            "retinanet_resnext50": "retinanet", "bert_base": "bert", "bert_large": "bert",
            **{f"yolov8{s}": "yolo" for s in "nsmlx"}, **{f"yolo11{s}": "yolo" for s in "nsmlx"}}


def build(name: str, input_shape: tuple[int, ...]) -> tuple[nn.Module, list[InputSpec]]:
    """(module in eval mode with fixed random weights, its input specs) for a model name of the TOML."""
    if name not in _BUILDERS:
        raise KeyError(f"no builder for reference model {name!r}; known: {', '.join(sorted(_BUILDERS))}")
    torch.manual_seed(0)
    module = _BUILDERS[name]().eval()
    if name.startswith("bert"):
        return module, [InputSpec("input_ids", tuple(input_shape), "int64"),
                        InputSpec("attention_mask", tuple(input_shape), "int64")]
    return module, [InputSpec("image", tuple(input_shape))]
