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

from graphprune.testing.zoo import Head, cb, cbr


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


class Attention(nn.Module):
    """timm-style multi-head self-attention: one qkv Linear reshaped to (3, heads, head_dim),
    permuted and unbound; the explicit softmax(q kᵀ) v, F.scaled_dot_product_attention, or
    LeViT's per-head split of a (heads, q|k|v) view."""

    def __init__(self, dim: int, heads: int, kind: str = "explicit") -> None:
        super().__init__()
        self.heads, self.head_dim, self.kind = heads, dim // heads, kind
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        if self.kind == "split":  # LeViT: heads first, then q | k | v inside each head
            qkv = self.qkv(x).view(B, N, self.heads, -1)
            q, k, v = qkv.split([self.head_dim] * 3, dim=3)
            q, k, v = q.permute(0, 2, 1, 3), k.permute(0, 2, 3, 1), v.permute(0, 2, 1, 3)
            x = ((q @ k) * self.scale).softmax(dim=-1) @ v
        else:
            qkv = self.qkv(x).reshape(B, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
            if self.kind == "sdpa":
                x = F.scaled_dot_product_attention(q, k, v)
            else:
                x = (q * self.scale @ k.transpose(-2, -1)).softmax(dim=-1) @ v
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class ViT(nn.Module):
    """Patch embedding, class token, position embedding, two pre-norm transformer blocks, head
    on the class token. ``norm=False`` drops the LayerNorms (LeViT normalizes with BN, folded
    at inference), which makes the residual stream exactly prunable too: class token and
    position embedding are then checked by the zoo's zero-then-prune tests."""

    def __init__(
        self, num_classes: int = 10, dim: int = 32, kind: str = "explicit", norm: bool = True
    ) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 8, stride=8)  # 32x32 -> 16 tokens
        self.cls = nn.Parameter(torch.linspace(-1.0, 1.0, dim).reshape(1, 1, dim))
        self.pos = nn.Parameter(torch.linspace(-0.5, 0.5, 17 * dim).reshape(1, 17, dim))

        def ln() -> nn.Module:
            return nn.LayerNorm(dim) if norm else nn.Identity()

        self.blocks = nn.ModuleList(
            nn.ModuleDict(
                {
                    "norm1": ln(),
                    "attn": Attention(dim, 4, kind),
                    "norm2": ln(),
                    "fc1": nn.Linear(dim, 2 * dim),
                    "fc2": nn.Linear(2 * dim, dim),
                }
            )
            for _ in range(2)
        )
        self.norm = ln()
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        for blk in self.blocks:
            x = x + blk["attn"](blk["norm1"](x))
            x = x + blk["fc2"](F.gelu(blk["fc1"](blk["norm2"](x))))
        return self.head(self.norm(x)[:, 0])


class GRN(nn.Module):
    """ConvNeXt-V2 global response norm, written as timm writes it (norm, channel mean,
    parameters viewed to broadcast, addcmul)."""

    def __init__(self, c: int, channels_last: bool = True) -> None:
        super().__init__()
        self.spatial, self.channel = ((1, 2), -1) if channels_last else ((2, 3), 1)
        self.shape = (1, 1, 1, -1) if channels_last else (1, c, 1, 1)
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, c))
        self.bias = nn.Parameter(torch.linspace(-0.2, 0.2, c))

    def forward(self, x: Tensor) -> Tensor:
        g = x.norm(p=2, dim=self.spatial, keepdim=True)
        n = g / (g.mean(dim=self.channel, keepdim=True) + 1e-6)
        return x + torch.addcmul(self.bias.view(self.shape), self.weight.view(self.shape), x * n)


class ConvNeXtV2(nn.Module):
    """A channels-first GRN after a conv, then a ConvNeXt-V2 block (GRN between fc1 and fc2).
    GRN's channel mean makes its groups inexact; the stem's 48 channels stay exact (enough
    MACs for 0.4 of the model's to be reachable by exact groups alone)."""

    def __init__(self, num_classes: int = 10, c: int = 16, hidden: int = 32) -> None:
        super().__init__()
        self.stem = nn.Sequential(cbr(3, 48, 4, 4), nn.Conv2d(48, c, 1))
        self.grn0 = GRN(c, channels_last=False)
        self.dwconv = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.fc1 = nn.Linear(c, hidden)
        self.grn = GRN(hidden)
        self.fc2 = nn.Linear(hidden, c)
        self.head = Head(c, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.grn0(self.stem(x))
        y = self.fc2(self.grn(F.gelu(self.fc1(self.dwconv(x).permute(0, 2, 3, 1)))))
        return self.head(x + y.permute(0, 3, 1, 2))


class SelectiveKernel(nn.Module):
    """SKNet/timm selective kernel: paths with different receptive fields are stacked, a
    softmax over the paths (per channel) weighs them, the weighted paths are summed."""

    def __init__(self, c: int, paths: int = 2, reduced: int = 8) -> None:
        super().__init__()
        self.paths = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(c, c, 3, padding=1 + i, dilation=1 + i, bias=False),
                nn.BatchNorm2d(c),
                nn.ReLU(),
            )
            for i in range(paths)
        )
        self.fc_reduce = nn.Conv2d(c, reduced, 1)
        self.fc_select = nn.Conv2d(reduced, c * paths, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.stack([p(x) for p in self.paths], dim=1)
        a = self.fc_select(torch.relu(self.fc_reduce(x.sum(1).mean((2, 3), keepdim=True))))
        B, C, H, W = a.shape
        a = torch.softmax(a.view(B, len(self.paths), C // len(self.paths), H, W), dim=1)
        return torch.sum(x * a, dim=1)


class SKNet(nn.Module):
    """Stem, a residual selective-kernel block, head."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = cbr(3, 16, stride=2)
        self.sk = SelectiveKernel(16)
        self.conv = cb(16, 16, 1)
        self.head = Head(16, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        return self.head(torch.relu(x + self.conv(self.sk(x))))


class SplitAttention(nn.Module):
    """ResNeSt/timm split attention: one conv with groups = radix makes ``radix`` splits of
    ``c`` channels, viewed as (B, radix, c, H, W); their sum is squeezed to per-split weights
    (a softmax over the radix, per channel) that mix the splits back into ``c`` channels."""

    def __init__(self, cin: int, c: int, radix: int = 2, reduced: int = 8) -> None:
        super().__init__()
        self.radix = radix
        self.conv = nn.Conv2d(cin, c * radix, 3, padding=1, groups=radix, bias=False)
        self.bn0 = nn.BatchNorm2d(c * radix)
        self.act0 = nn.ReLU()
        self.fc1 = nn.Conv2d(c, reduced, 1)
        self.bn1 = nn.BatchNorm2d(reduced)
        self.fc2 = nn.Conv2d(reduced, c * radix, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.act0(self.bn0(self.conv(x)))
        B, RC, H, W = x.shape
        x = x.reshape((B, self.radix, RC // self.radix, H, W))
        gap = x.sum(dim=1).mean((2, 3), keepdim=True)
        attn = self.fc2(F.relu(self.bn1(self.fc1(gap))))
        attn = attn.view(B, 1, self.radix, -1).transpose(1, 2)
        attn = F.softmax(attn, dim=1).reshape(B, -1).view(B, -1, 1, 1)
        return (x * attn.reshape((B, self.radix, RC // self.radix, 1, 1))).sum(dim=1)


class ResNeSt(nn.Module):
    """Stem, a bottleneck whose 3x3 is split attention (radix 2), a residual, head."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = cbr(3, 16, stride=2)
        self.reduce = cbr(16, 8, 1)
        self.splat = SplitAttention(8, 8)
        self.bn = nn.BatchNorm2d(8)
        self.expand = cb(8, 16, 1)
        self.head = Head(16, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        y = self.expand(torch.relu(self.bn(self.splat(self.reduce(x)))))
        return self.head(torch.relu(x + y))


LIB_ZOO = {
    "functional_norms": FunctionalNorms,
    "vit": ViT,
    "vit_sdpa": lambda: ViT(kind="sdpa"),
    "vit_levit_split": lambda: ViT(kind="split", norm=False),
    "convnextv2_grn": ConvNeXtV2,
    "selective_kernel": SKNet,
    "split_attention": ResNeSt,
}
