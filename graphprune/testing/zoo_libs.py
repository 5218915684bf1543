"""Small models mirroring how model libraries (timm, torchvision) write their layers.

Real libraries often call functional ops from their own modules rather than using torch.nn
modules: timm's BatchNormAct2d calls ``F.batch_norm`` on its own parameters, LayerNorm2d
permutes and calls ``F.layer_norm``, attention blocks reshape one qkv Linear into heads.
Each pattern here is one the real zoos showed; ``zoo.ZOO`` includes them all.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from graphprune.testing.zoo import Head


class BatchNormAct2d(nn.BatchNorm2d):
    """timm-style: a BatchNorm2d subclass whose forward calls F.batch_norm, then an act."""

    def __init__(self, c: int, act: type = nn.ReLU) -> None:
        super().__init__(c)
        self.act = act()

    def forward(self, x: Tensor) -> Tensor:
        x = F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.1, self.eps
        )
        return self.act(x)


class GroupNormAct(nn.GroupNorm):
    """timm-style GroupNorm + activation through F.group_norm."""

    def __init__(self, groups: int, c: int, act: type = nn.ReLU) -> None:
        super().__init__(groups, c)
        self.act = act()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps))


class LayerNorm2d(nn.LayerNorm):
    """timm/ConvNeXt-style channels-first LayerNorm: permute, F.layer_norm, permute back."""

    def forward(self, x: Tensor) -> Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias)
        return x.permute(0, 3, 1, 2)


class _ChannelsFirst(nn.Module):
    """torch.nn LayerNorm over dim 1, the module form of LayerNorm2d (same parameter names)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(c)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class FunctionalNorms(nn.Module):
    """BatchNormAct2d stem, GroupNormAct and LayerNorm2d inside a residual block, BN head.

    ``functional=False`` is the same network built from torch.nn modules (same outputs for
    the same weights; ``state_dict`` keys differ only by the reference LayerNorm's ``.norm``),
    the reference the functional rules must match.
    """

    def __init__(self, num_classes: int = 10, functional: bool = True) -> None:
        super().__init__()
        f = functional
        self.stem = nn.Conv2d(3, 16, 3, 2, 1, bias=False)
        self.bn1 = BatchNormAct2d(16, nn.Identity) if f else nn.BatchNorm2d(16)
        self.conv1 = nn.Conv2d(16, 32, 1, bias=False)
        self.gn = GroupNormAct(4, 32, nn.Identity) if f else nn.GroupNorm(4, 32)
        self.conv2 = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.ln = LayerNorm2d(32) if f else _ChannelsFirst(32)
        self.conv3 = nn.Conv2d(32, 16, 1, bias=False)
        self.bn3 = BatchNormAct2d(16, nn.Identity) if f else nn.BatchNorm2d(16)
        self.head = Head(16, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.bn1(self.stem(x)))
        y = self.ln(self.conv2(torch.relu(self.gn(self.conv1(x)))))
        return self.head(torch.relu(x + self.bn3(self.conv3(y))))


LIB_ZOO = {
    "functional_norms": FunctionalNorms,
}
