"""The op registry: a new op is one entry holding how it moves channels and how it shrinks."""

from __future__ import annotations

import pytest
import torch
from torch import fx, nn

import graphprune as gp
from graphprune.analysis import build_channel_graph
from graphprune.analysis.builder import Builder
from graphprune.analysis.rules import RULES, Shrink, _tc, register
from graphprune.passes import prune_channels
from graphprune.testing.exactness import randomize_, zero_dropped_channels


class ChannelScale(nn.Module):
    """A user's op: y = x * scale[c], with a channel count it must keep in sync."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels
        self.scale = nn.Parameter(torch.linspace(0.5, 2.0, channels))

    def forward(self, x):
        assert x.shape[1] == self.channels, "channel count out of sync"
        return x * self.scale.view(1, -1, 1, 1)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.s, self.c2 = ChannelScale(8), nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        return self.c2(torch.relu(self.s(self.b1(self.c1(x)))))


def _analyze_scale(b: Builder, node: fx.Node, m: ChannelScale):
    x = _tc(b, node.args[0])
    b.site(f"{node.target}.scale", 0, x.along(1), "out")  # zero scale -> zero channel
    return x


def _shrink_scale(s: Shrink, node: fx.Node, m: ChannelScale) -> None:
    m.channels = m.scale.numel()


@pytest.fixture
def scale_rule():
    register(ChannelScale, shrink=_shrink_scale)(_analyze_scale)
    yield
    RULES.pop(ChannelScale)


X = torch.randn(2, 3, 8, 8)


def _traced():
    torch.manual_seed(0)
    model = randomize_(Net()).eval()
    return model, gp.trace(model, (X,), leaf_modules=[ChannelScale])


def test_without_an_entry_the_op_blocks_its_channels() -> None:
    _, gm = _traced()
    (group,) = [g for g in build_channel_graph(gm).groups if "c1" in g.producers]
    assert not group.prunable and any(
        "s (call_module s): no channel rule" in r for r in group.reasons
    )


def test_one_entry_makes_a_new_op_prunable_exactly(scale_rule) -> None:
    model, gm = _traced()
    graph = build_channel_graph(gm)
    (group,) = [g for g in graph.groups if "c1" in g.producers]
    assert group.prunable and "s.scale[0]" in {m.name for m in group.members}
    plan = {group.id: [1, 4, 6]}
    zero_dropped_channels(gm, graph, plan)
    with torch.no_grad():
        expected = gm(X)
    prune_channels(gm, plan=plan, round_to=1)
    assert gm.s.channels == 3 and gm.s.scale.shape == (3,) and gm.c2.in_channels == 3
    torch.testing.assert_close(gm.s.scale.detach(), model.s.scale.detach()[[1, 4, 6]])
    with torch.no_grad():
        torch.testing.assert_close(gm(X), expected, atol=1e-5, rtol=1e-5)
