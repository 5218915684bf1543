"""Built-in models for demos and benchmarks, plus a name -> (model, example inputs) registry.

Written from the papers' descriptions (no torchvision dependency) and kept torch.fx-traceable:
plain ``out + shortcut`` adds, ``nn.ReLU`` modules and ``torch.flatten(x, 1)``, so graphprune
can trace every one of them without leaf-module special cases.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable

import torch
from torch import Tensor, nn

from graphprune.frontend.trace import as_inputs
from graphprune.testing import zoo

ModelFactory = Callable[..., tuple[nn.Module, tuple[Tensor, ...]]]


def _init_weights(model: nn.Module) -> None:
    """He init for convs (fan_out), as the ResNet/MobileNet papers train from; BN starts at 1/0."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]


# --- CIFAR ResNet (ResNet-20/56 as in He et al. 2016, projection shortcuts as in ResRep) ---


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN + shortcut; 1x1 conv+BN projection when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(cin, cout, 3, stride)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2, self.bn2 = _conv_bn(cout, cout, 3)
        self.shortcut = (
            nn.Sequential(*_conv_bn(cin, cout, 1, stride))
            if stride != 1 or cin != cout
            else nn.Identity()
        )
        self.relu2 = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """Three stages of BasicBlocks (16/32/64 wide) for 32x32 inputs."""

    def __init__(self, depth: int, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1, got {depth}")
        n = (depth - 2) // 6
        self.conv1, self.bn1 = _conv_bn(in_channels, 16, 3)
        self.relu = nn.ReLU(inplace=True)
        blocks: list[nn.Module] = []
        cin = 16
        for stage, width in enumerate((16, 32, 64)):
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(BasicBlock(cin, width, stride))
                cin = width
        self.layers = nn.Sequential(*blocks)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layers(self.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def cifar_resnet(depth: int, num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """CIFAR ResNet of depth 6n+2 (20, 32, 44, 56, 110, ...)."""
    return CifarResNet(depth, num_classes, in_channels)


def resnet20(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    return CifarResNet(20, num_classes, in_channels)


def resnet56(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    return CifarResNet(56, num_classes, in_channels)


# --- ImageNet ResNet with Bottleneck blocks (stride on the 3x3 conv, "ResNet v1.5") ---


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (strided) -> 1x1 expand (x4) + shortcut."""

    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1) -> None:
        super().__init__()
        cout = width * self.expansion
        self.conv1, self.bn1 = _conv_bn(cin, width, 1)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2, self.bn2 = _conv_bn(width, width, 3, stride)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3, self.bn3 = _conv_bn(width, cout, 1)
        self.shortcut = (
            nn.Sequential(*_conv_bn(cin, cout, 1, stride))
            if stride != 1 or cin != cout
            else nn.Identity()
        )
        self.relu3 = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu3(out + self.shortcut(x))


class ResNet(nn.Module):
    """ImageNet-shaped ResNet: 7x7 stem, max pool, four Bottleneck stages, 2048-d classifier."""

    def __init__(self, layers: tuple[int, int, int, int], num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = 64
        stages: list[nn.Module] = []
        for i, (n, width) in enumerate(zip(layers, (64, 128, 256, 512), strict=True)):
            blocks: list[nn.Module] = []
            for j in range(n):
                blocks.append(Bottleneck(cin, width, 2 if i > 0 and j == 0 else 1))
                cin = width * Bottleneck.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet50(num_classes: int = 1000) -> ResNet:
    return ResNet((3, 4, 6, 3), num_classes)


def resnet101(num_classes: int = 1000) -> ResNet:
    return ResNet((3, 4, 23, 3), num_classes)


def resnet152(num_classes: int = 1000) -> ResNet:
    return ResNet((3, 8, 36, 3), num_classes)


# --- MobileNetV2 (Sandler et al. 2018) ---


def _make_divisible(v: float, divisor: int = 8) -> int:
    """Round widths to a multiple of 8 (never dropping more than 10%), as the paper's code does."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


def _conv_bn_relu6(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(*_conv_bn(cin, cout, k, stride, groups), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    """1x1 expand -> 3x3 depthwise -> 1x1 linear project; residual when shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = int(round(cin * expand_ratio))
        self.use_residual = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(_conv_bn_relu6(cin, hidden, 1))
        layers += [
            _conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden),
            *_conv_bn(hidden, cout, 1),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        # use_residual is fixed at construction, so fx sees a static branch.
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(nn.Module):
    """ImageNet MobileNetV2: 17 inverted residual blocks, 1280-wide last conv, dropout, linear."""

    # expansion t, output channels c, repeats n, first stride s
    SETTINGS: tuple[tuple[int, int, int, int], ...] = (
        (1, 16, 1, 1),
        (6, 24, 2, 2),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    )

    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0) -> None:
        super().__init__()
        cin = _make_divisible(32 * width_mult)
        last = _make_divisible(1280 * max(1.0, width_mult))
        layers: list[nn.Module] = [_conv_bn_relu6(3, cin, 3, 2)]
        for t, c, n, s in self.SETTINGS:
            cout = _make_divisible(c * width_mult)
            for i in range(n):
                layers.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        layers.append(_conv_bn_relu6(cin, last, 1))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, num_classes))
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def mobilenet_v2(num_classes: int = 1000, width_mult: float = 1.0) -> MobileNetV2:
    return MobileNetV2(num_classes, width_mult)


# --- Registry ---


def _factory(build: Callable[..., nn.Module], shape: tuple[int, ...]) -> ModelFactory:
    """Seeded so every call yields the same weights and the same example input.

    ``in_channels`` / ``num_classes`` build the model for other data, when ``build`` takes
    them (the example input follows ``in_channels``); None keeps the default."""
    takes = set(inspect.signature(build).parameters)

    def make(
        *, in_channels: int | None = None, num_classes: int | None = None
    ) -> tuple[nn.Module, tuple[Tensor, ...]]:
        wanted = {"in_channels": in_channels, "num_classes": num_classes}
        kwargs = {k: v for k, v in wanted.items() if v is not None and k in takes}
        torch.manual_seed(0)
        model = build(**kwargs).eval()
        channels = kwargs.get("in_channels", shape[1])
        return model, (torch.randn(shape[0], channels, *shape[2:]),)

    return make


_CIFAR = (1, 3, 32, 32)
_IMAGENET = (1, 3, 224, 224)

BUILTIN_MODELS: dict[str, ModelFactory] = {
    "resnet20": _factory(resnet20, _CIFAR),
    "resnet56": _factory(resnet56, _CIFAR),
    "resnet50": _factory(resnet50, _IMAGENET),
    "resnet101": _factory(resnet101, _IMAGENET),
    "resnet152": _factory(resnet152, _IMAGENET),
    "mobilenet_v2": _factory(mobilenet_v2, _IMAGENET),
    **{name: _factory(cls, zoo.ZOO_INPUT_SHAPE) for name, cls in zoo.ZOO.items()},
}


def get_model(
    name: str, *, in_channels: int | None = None, num_classes: int | None = None
) -> tuple[nn.Module, tuple[Tensor, ...]]:
    """Resolve a built-in name or ``"package.module:factory"`` to (model, example_inputs).

    A user factory must return ``(model, example_inputs)``: graphprune traces with real shapes
    and cannot guess an input for an arbitrary module. ``in_channels``/``num_classes`` build a
    built-in model for other data where its builder takes them; a factory's model is as given.
    """
    if name in BUILTIN_MODELS:
        return BUILTIN_MODELS[name](in_channels=in_channels, num_classes=num_classes)
    if ":" not in name:
        known = ", ".join(sorted(BUILTIN_MODELS))
        raise ValueError(
            f"unknown model {name!r}; known names: {known}; "
            "or pass 'package.module:factory' for your own model"
        )
    module_name, _, attr = name.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"cannot load model factory {name!r}: {exc}") from exc
    if not callable(factory):
        raise ValueError(f"{name!r} is a {type(factory).__name__}, not a callable factory")
    required = _required_params(factory)
    if required:
        raise ValueError(
            f"factory {name!r} needs arguments ({', '.join(required)}) but is called with "
            "none; give it defaults, or point at a function without parameters that returns "
            "(model, example_inputs)"
        )
    result = factory()
    if isinstance(result, nn.Module):
        raise ValueError(
            f"factory {name!r} returned a bare nn.Module; return (model, example_inputs) "
            "so graphprune knows the input shape"
        )
    shape_error = ValueError(
        f"factory {name!r} must return (nn.Module, tuple of example input tensors), "
        f"got {type(result).__name__}"
    )
    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], nn.Module)):
        raise shape_error
    try:
        return result[0], as_inputs(result[1])  # a lone example tensor is unambiguous
    except TypeError:
        raise shape_error from None


def _required_params(factory: object) -> list[str]:
    try:
        params = inspect.signature(factory).parameters.values()  # type: ignore[arg-type]
    except (TypeError, ValueError):  # builtins: no signature to read, just call it
        return []
    return [
        p.name
        for p in params
        if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
