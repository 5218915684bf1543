"""Property: on random small CNNs, trace + analyze + random pruning keeps the model valid and
exact on zeroed channels."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from graphprune import trace
from graphprune.analysis import build_channel_graph
from graphprune.passes import prune_channels
from graphprune.passes.runner import verify
from graphprune.testing.exactness import random_plan, randomize_, zero_dropped_channels

SIZE = 8  # input is N x 3 x 8 x 8
CLASSES = 5

width = st.integers(2, 10)
step = st.one_of(
    st.tuples(st.just("cbr"), width, st.sampled_from([1, 3]), st.booleans()),
    st.tuples(st.just("res")),
    st.tuples(st.just("cat"), width, width),
    st.tuples(st.just("dense"), width),
    st.tuples(st.just("dw")),
    st.tuples(st.just("pool")),
)
recipes = st.tuples(
    st.lists(step, min_size=1, max_size=6),
    st.sampled_from([1, 2]),  # head: pool to 1x1 or 2x2 before flatten -> linear
)


def cbr(cin: int, cout: int, k: int = 3, groups: int = 1, bias: bool = False) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=bias),
        nn.BatchNorm2d(cout),
        nn.ReLU(),
    )


class RandomNet(nn.Module):
    """Built from a recipe; forward replays it (fx unrolls the Python loop)."""

    def __init__(self, steps: list[tuple], head_hw: int) -> None:
        super().__init__()
        self.kinds: list[str] = []
        self.layers = nn.ModuleList()
        c, hw = 3, SIZE
        for s in steps:
            kind = s[0]
            if kind == "pool":
                if hw < 2:
                    continue
                layer: nn.Module = nn.MaxPool2d(2)
                hw //= 2
            elif kind == "cbr":
                layer = cbr(c, s[1], s[2], bias=s[3])
                c = s[1]
            elif kind == "res":
                layer = nn.Sequential(cbr(c, c), nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c))
            elif kind == "cat":
                layer = nn.ModuleList([cbr(c, s[1], 1), cbr(c, s[2])])
                c = s[1] + s[2]
            elif kind == "dense":
                layer = cbr(c, s[1])
                c += s[1]
            else:  # depthwise
                layer = cbr(c, c, 3, groups=c)
            self.kinds.append(kind)
            self.layers.append(layer)
        self.pool = nn.AdaptiveAvgPool2d(min(head_hw, hw))
        self.fc = nn.Linear(c * min(head_hw, hw) ** 2, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for kind, layer in zip(self.kinds, self.layers, strict=True):
            if kind == "res":
                x = F.relu(x + layer(x))
            elif kind == "cat":
                x = torch.cat([layer[0](x), layer[1](x)], dim=1)
            elif kind == "dense":
                x = torch.cat([x, layer(x)], dim=1)
            else:
                x = layer(x)
        return self.fc(torch.flatten(self.pool(x), 1))


@settings(max_examples=25, deadline=None)
@given(
    recipe=recipes,
    seed=st.integers(0, 2**16),
    fraction=st.floats(0.1, 0.9),
)
def test_random_pruning_of_random_cnns_is_valid_and_exact(recipe, seed: int, fraction: float):
    steps, head_hw = recipe
    torch.manual_seed(seed)
    model = randomize_(RandomNet(steps, head_hw), seed=seed).eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    gm = trace(model, (x[:1],))
    graph = build_channel_graph(gm)
    (placeholder,) = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for gid in set(graph.atom_group[graph.values[placeholder].all_atoms()].tolist()):
        assert not graph.groups[gid].prunable  # the network input
    plan = random_plan(graph, np.random.default_rng(seed), fraction=fraction)

    zero_dropped_channels(gm, graph, plan)
    with torch.no_grad():
        before = gm(x)
        result = prune_channels(gm, plan=plan, round_to=1)
        verify(gm)
        after = gm(x)
    dropped = sum(graph.groups[g].channels - len(k) for g, k in plan.items())
    assert result.modified == (dropped > 0)
    assert after.shape == (2, CLASSES)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    # Re-analysis of the pruned model sees the planned width for every producer. (A depthwise
    # conv pruned to one channel becomes an ordinary 1->1 conv, so match groups by producer.)
    regrouped = build_channel_graph(gm).groups
    for g in graph.groups:
        if g.producers:
            (new,) = [n for n in regrouped if g.producers[0] in n.producers]
            assert new.channels == len(plan.get(g.id, range(g.channels))), g.producers
