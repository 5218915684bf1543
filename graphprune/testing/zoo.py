"""Small models, one per channel-coupling pattern of a real architecture family.

Each is tiny (3x32x32 input, milliseconds on CPU) and torch.fx-traceable, so tests can run every
pass over every pattern: residual adds, flatten->linear, depthwise convs, concat, split/chunk,
channel shuffle, SE broadcasting muls, channels-last LayerNorm/Linear, grouped convs, GroupNorm,
and upsample+add. ``Untraceable`` and ``UnknownOp`` exist for the error paths.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ZOO_INPUT_SHAPE: tuple[int, int, int, int] = (1, 3, 32, 32)


def cbr(
    cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, act: type = nn.ReLU
) -> nn.Sequential:
    """conv-BN-activation, the unit most patterns are built from."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        act(),
    )


def cb(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    """conv-BN without activation: the last conv of a residual branch."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)
    )


class Head(nn.Module):
    """Global average pool -> flatten -> linear."""

    def __init__(self, cin: int, num_classes: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.pool(x), 1))


class Basic(nn.Module):
    """ResNet basic block; projection shortcut when stride or width changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(cbr(cin, cout, 3, stride), cb(cout, cout))
        self.short = cb(cin, cout, 1, stride) if stride != 1 or cin != cout else nn.Identity()
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.body(x) + self.short(x))


class ResNetBasic(nn.Module):
    """Stem, two identity-shortcut blocks (one coupled group), one strided projection block."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = cbr(3, 16)
        self.blocks = nn.Sequential(Basic(16, 16), Basic(16, 16), Basic(16, 32, stride=2))
        self.head = Head(32, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(self.stem(x)))


class BottleneckBlock(nn.Module):
    """1x1 reduce -> 3x3 -> 1x1 expand + shortcut."""

    def __init__(self, cin: int, mid: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(cbr(cin, mid, 1), cbr(mid, mid, 3, stride), cb(mid, cout, 1))
        self.short = cb(cin, cout, 1, stride) if stride != 1 or cin != cout else nn.Identity()
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.body(x) + self.short(x))


class ResNetBottleneck(nn.Module):
    """A projection bottleneck followed by an identity one (ResNet-50 stage pattern)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = cbr(3, 16)
        self.blocks = nn.Sequential(BottleneckBlock(16, 8, 32, 2), BottleneckBlock(32, 8, 32))
        self.head = Head(32, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(self.stem(x)))


class VGG(nn.Module):
    """Plain conv stack then flatten -> Linear: one conv channel feeds H*W linear inputs."""

    def __init__(self, num_classes: int = 10, hidden: int = 64) -> None:
        super().__init__()
        widths = (3, 16, 32, 32, 64)
        layers: list[nn.Module] = []
        for cin, cout in zip(widths, widths[1:], strict=False):
            layers += [cbr(cin, cout), nn.MaxPool2d(2)]
        self.features = nn.Sequential(*layers)  # 32x32 -> 2x2
        self.classifier = nn.Sequential(
            nn.Linear(64 * 2 * 2, hidden),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


class InvertedResidual(nn.Module):
    """1x1 expand -> depthwise 3x3 -> 1x1 linear project (+x when shapes match)."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hid = cin * expand
        self.residual = stride == 1 and cin == cout
        self.conv = nn.Sequential(
            cbr(cin, hid, 1, act=nn.ReLU6),
            cbr(hid, hid, 3, stride, groups=hid, act=nn.ReLU6),
            cb(hid, cout, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2Block(nn.Module):
    """Stem, a strided inverted residual, then one with a residual add."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = cbr(3, 16, act=nn.ReLU6)
        self.blocks = nn.Sequential(InvertedResidual(16, 24, 2, 4), InvertedResidual(24, 24, 1, 4))
        self.last = cbr(24, 64, 1, act=nn.ReLU6)
        self.head = Head(64, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.last(self.blocks(self.stem(x))))


class DenseNet(nn.Module):
    """Dense block: each layer's output is concatenated onto its input; then a transition."""

    def __init__(self, num_classes: int = 10, growth: int = 8, n_layers: int = 3) -> None:
        super().__init__()
        self.stem = cbr(3, 16)
        self.dense = nn.ModuleList(cbr(16 + i * growth, growth) for i in range(n_layers))
        self.transition = nn.Sequential(cbr(16 + n_layers * growth, 24, 1), nn.AvgPool2d(2))
        self.head = Head(24, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for layer in self.dense:
            x = torch.cat([x, layer(x)], dim=1)
        return self.head(self.transition(x))


class Inception(nn.Module):
    """Four parallel branches (1x1, 1x1->3x3, 1x1->3x3->3x3, pool->1x1) concatenated."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = cbr(3, 16)
        self.b1 = cbr(16, 8, 1)
        self.b2 = nn.Sequential(cbr(16, 8, 1), cbr(8, 12))
        self.b3 = nn.Sequential(cbr(16, 4, 1), cbr(4, 6), cbr(6, 6))
        self.b4 = nn.Sequential(nn.MaxPool2d(3, 1, 1), cbr(16, 6, 1))
        self.head = Head(8 + 12 + 6 + 6, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        return self.head(torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], dim=1))


class SE(nn.Module):
    """Squeeze-excitation: per-channel gate [N,C,1,1] multiplied onto x."""

    def __init__(self, c: int, reduced: int, act: type = nn.ReLU) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(c, reduced, 1)
        self.act = act()
        self.expand = nn.Conv2d(reduced, c, 1)

    def forward(self, x: Tensor) -> Tensor:
        s = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.expand(self.act(self.reduce(s))))


class SENet(nn.Module):
    """Residual block whose branch ends in SE before the add (SE-ResNet)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = cbr(3, 16)
        self.body = nn.Sequential(cbr(16, 16), cb(16, 16), SE(16, 4))
        self.relu = nn.ReLU()
        self.head = Head(16, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        return self.head(self.relu(self.body(x) + x))


class EfficientNet(nn.Module):
    """MBConv: expand 1x1 -> depthwise -> SE (SiLU) -> project 1x1, residual add."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = cbr(3, 16, stride=2, act=nn.SiLU)
        self.mbconv = nn.Sequential(
            cbr(16, 64, 1, act=nn.SiLU),
            cbr(64, 64, 3, groups=64, act=nn.SiLU),
            SE(64, 4, act=nn.SiLU),
            cb(64, 16, 1),
        )
        self.last = cbr(16, 48, 1, act=nn.SiLU)
        self.head = Head(48, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        return self.head(self.last(x + self.mbconv(x)))


class ShuffleUnit(nn.Module):
    """ShuffleNetV2 unit: split channels in half, transform one half, concat, shuffle."""

    def __init__(self, c: int) -> None:
        super().__init__()
        h = c // 2
        self.branch = nn.Sequential(cbr(h, h, 1), cb(h, h, 3, groups=h), cbr(h, h, 1))

    def forward(self, x: Tensor) -> Tensor:
        a, b = x.chunk(2, dim=1)
        x = torch.cat([a, self.branch(b)], dim=1)
        n, c, h, w = x.size()
        return x.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, c, h, w)


class ShuffleNet(nn.Module):
    """Two ShuffleNetV2 units: the shuffle interleaves the halves the next split separates."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = cbr(3, 16, stride=2)
        self.units = nn.Sequential(ShuffleUnit(16), ShuffleUnit(16))
        self.head = Head(16, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.units(self.stem(x)))


class ConvNeXtBlock(nn.Module):
    """Depthwise 7x7, then channels-last LayerNorm/MLP with layer scale, residual add."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c)
        self.fc1 = nn.Linear(c, 4 * c)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(4 * c, c)
        # Distinct per-channel scales so a mis-indexed prune changes the output.
        self.gamma = nn.Parameter(torch.linspace(0.25, 1.0, c))

    def forward(self, x: Tensor) -> Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.gamma * self.fc2(self.act(self.fc1(self.norm(y))))
        return x + y.permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    """Patchify stem, two ConvNeXt blocks, pooled LayerNorm head."""

    def __init__(self, num_classes: int = 10, c: int = 32) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 4, stride=4)
        self.blocks = nn.Sequential(ConvNeXtBlock(c), ConvNeXtBlock(c))
        self.norm = nn.LayerNorm(c)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.norm(self.blocks(self.stem(x)).mean((2, 3))))


class RegNet(nn.Module):
    """GroupNorm stem and a bottleneck whose 3x3 is a grouped conv (group width 8)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.GroupNorm(4, 16), nn.ReLU()
        )
        self.body = nn.Sequential(cbr(16, 32, 1), cbr(32, 32, 3, groups=32 // 8), cb(32, 16, 1))
        self.relu = nn.ReLU()
        self.head = Head(16, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        return self.head(self.relu(self.body(x) + x))


class YOLO(nn.Module):
    """CSP/C2f block: 1x1 conv, split [8, 24], bottleneck on one part, concat all, 1x1 conv."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = cbr(3, 32, stride=2, act=nn.SiLU)
        self.cv1 = cbr(32, 32, 1, act=nn.SiLU)
        self.m = nn.Sequential(cbr(24, 24, act=nn.SiLU), cbr(24, 24, act=nn.SiLU))
        self.cv2 = cbr(8 + 24 + 24, 32, 1, act=nn.SiLU)
        self.head = Head(32, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        a, b = torch.split(self.cv1(self.stem(x)), [8, 24], dim=1)
        return self.head(self.cv2(torch.cat([a, b, b + self.m(b)], dim=1)))


class FPN(nn.Module):
    """Two strided stages; top feature upsampled x2 and added to a lateral 1x1; smoothed."""

    def __init__(self, num_classes: int = 10, c: int = 24) -> None:
        super().__init__()
        self.stem = cbr(3, 16)
        self.c2 = cbr(16, 32, stride=2)
        self.c3 = cbr(32, 64, stride=2)
        self.lat2 = nn.Conv2d(32, c, 1)
        self.lat3 = nn.Conv2d(64, c, 1)
        self.smooth = cbr(c, c)
        self.head = Head(c, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        c2 = self.c2(self.stem(x))
        p3 = self.lat3(self.c3(c2))
        p2 = self.lat2(c2) + F.interpolate(p3, scale_factor=2, mode="nearest")
        return self.head(self.smooth(p2))


class Untraceable(nn.Module):
    """Branches on a tensor value, which torch.fx symbolic tracing cannot follow."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv = cbr(3, 8)
        self.head = Head(8, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        if x.sum() > 0:
            x = x * 2
        return self.head(x)


class UnknownOp(nn.Module):
    """cumsum over channels mixes them in a way no channel rule describes."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = cbr(3, 8)
        self.conv2 = cbr(8, 8)
        self.head = Head(8, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.conv2(torch.cumsum(self.conv1(x), dim=1)))


def tiny_cnn(
    c1: int = 16, c2: int = 32, *, in_channels: int = 1, classes: int = 10
) -> nn.Sequential:
    """Two conv-BN-ReLU layers pooled into a linear classifier (the tests' smallest trainable
    CNN; 1x8x8 digits by default)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, c1, 3, padding=1, bias=False),
        nn.BatchNorm2d(c1),
        nn.ReLU(),
        nn.Conv2d(c1, c2, 3, padding=1, bias=False),
        nn.BatchNorm2d(c2),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(c2, classes),
    )


ZOO: dict[str, Callable[[], nn.Module]] = {
    "resnet_basic": ResNetBasic,
    "resnet_bottleneck": ResNetBottleneck,
    "vgg": VGG,
    "mobilenet_v2_block": MobileNetV2Block,
    "densenet": DenseNet,
    "inception": Inception,
    "se": SENet,
    "efficientnet": EfficientNet,
    "shufflenet": ShuffleNet,
    "convnext": ConvNeXt,
    "regnet": RegNet,
    "yolo": YOLO,
    "fpn": FPN,
}

# Patterns of model libraries (functional norms, attention, ...) live in their own module.
from graphprune.testing.zoo_libs import LIB_ZOO  # noqa: E402

ZOO.update(LIB_ZOO)
