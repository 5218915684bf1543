"""Convs and linears written as F.conv2d/F.linear on parameters, or on weights computed from
parameters (weight standardization: timm's ScaledStdConv2d, NF-ResNets), become modules and
are pruned like any other layer; anything that is not a function of parameters alone stays."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphprune as gp
from graphprune.analysis import build_channel_graph
from graphprune.testing.exactness import check_random_plan_exact, randomize_

X = torch.randn(2, 3, 12, 12)


class ScaledStdConv(nn.Conv2d):
    """Weight standardization as timm's ScaledStdConv2d computes it in its forward."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.gain = nn.Parameter(torch.rand(self.out_channels, 1, 1, 1) + 0.5)
        self.scale = self.weight[0].numel() ** -0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = F.batch_norm(
            self.weight.reshape(1, self.out_channels, -1),
            None,
            None,
            weight=(self.gain * self.scale).view(-1),
            training=True,
            momentum=0.0,
            eps=1e-6,
        ).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class NFNet(nn.Module):
    """Residual blocks of standardized convs and no normalization layer, as an NF-ResNet."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = ScaledStdConv(3, 16, 3, padding=1)
        self.c1 = ScaledStdConv(16, 32, 3, padding=1)
        self.c2 = ScaledStdConv(32, 16, 1)
        self.head = nn.Parameter(torch.randn(10, 16) * 0.1)  # a functional linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.stem(x))
        x = x + self.c2(F.gelu(self.c1(x)))
        return F.linear(x.mean((2, 3)), self.head)


def test_standardized_convs_become_modules_with_the_same_outputs() -> None:
    model = randomize_(NFNet().eval(), 0)
    gm = gp.trace(model, (X,))
    layers = gm.meta["graphprune.functional_layers"]
    assert set(layers) == {"stem.conv", "c1.conv", "c2.conv", "linear"}
    assert "computed from parameters" in layers["c1.conv"]
    assert "on parameters became a module" in layers["linear"]
    assert isinstance(gm.get_submodule("c1.conv"), nn.Conv2d)
    names = {n for n, _ in gm.named_parameters()}
    assert "c1.weight" not in names and "c1.gain" not in names  # the raw tensors are gone
    with torch.no_grad():
        for mode in (False, True):  # the standardization does not depend on the mode
            torch.testing.assert_close(gm.train(mode)(X), model.train(mode)(X))
    graph = build_channel_graph(gm)
    assert sum(g.prunable for g in graph.groups) >= 2
    check_random_plan_exact(gm, (X,))


def test_compress_prunes_a_standardized_net_and_reports_the_layers() -> None:
    torch.manual_seed(0)
    model = NFNet().eval()
    result = gp.compress(model, "magnitude", example_inputs=(X,), flops_target=0.5, round_to=1)
    assert 0.47 <= result.report.macs_ratio <= 0.5  # a small net: a channel is ~2% of its MACs
    assert set(result.report.functional_layers) == {"stem.conv", "c1.conv", "c2.conv", "linear"}
    assert "functional layer made a module: c1.conv" in result.report.format()
    assert isinstance(model.c1.gain, nn.Parameter)  # the user's model keeps its own form


class Tied(nn.Module):
    """One weight read by two functional linears: it must stay one tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.relu(F.linear(x, self.w)), self.w)


class Dynamic(nn.Module):
    """A conv whose weight is computed from the input: not a layer of the model."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = x.mean(0, keepdim=True).mean((2, 3), keepdim=True).transpose(0, 1)
        return F.conv2d(x, w.expand(3, 3, 1, 1).contiguous())


@pytest.mark.parametrize(("model", "x"), [(Tied(), torch.randn(2, 8)), (Dynamic(), X)])
def test_shared_or_input_dependent_weights_stay_functional(model, x) -> None:
    gm = gp.trace(model.eval(), (x,))
    assert "graphprune.functional_layers" not in gm.meta
    assert not any(isinstance(m, (nn.Conv2d, nn.Linear)) for m in gm.modules())
    torch.testing.assert_close(gm(x), model(x))
