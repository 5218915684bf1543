"""Dependency analysis: channel groups of small models, checked against groups written by hand.

Every expected group below is derived on paper from the model next to it: which layers create
channels (producers), which ops force them to be pruned together, and how many entries of each
parameter axis carry them (member sizes). Roles follow one rule: a conv/linear ``weight[1]``
reads channels ("in"); everything else that carries them is producer-side or a statistic.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from graphprune import trace
from graphprune.analysis import ChannelGraph, ChannelGroup, analyze, build_channel_graph
from graphprune.analysis.atoms import TensorChannels
from graphprune.errors import TraceError, UnsupportedOpError
from graphprune.passes import prune_channels
from graphprune.passes.runner import verify
from graphprune.testing.exactness import randomize_, zero_dropped_channels
from graphprune.testing.zoo import ZOO, ZOO_INPUT_SHAPE, ConvNeXt, UnknownOp

X = (2, 3, 8, 8)


# --- expected groups, by hand -----------------------------------------------------------------
@dataclass(frozen=True)
class G:
    channels: int
    producers: frozenset[str]
    members: dict[str, int] = field(hash=False)
    prunable: bool = True


def bn(name: str, c: int) -> dict[str, int]:
    return {f"{name}.{p}[0]": c for p in ("weight", "bias", "running_mean", "running_var")}


def conv_in(name: str, c: int) -> dict[str, int]:
    return {f"{name}.weight[1]": c}


def conv_out(name: str, c: int, bias: bool = False) -> dict[str, int]:
    return {f"{name}.weight[0]": c} | ({f"{name}.bias[0]": c} if bias else {})


def merged(*parts: dict[str, int]) -> dict[str, int]:
    return {name: size for part in parts for name, size in part.items()}


def _canon(channels: int, producers, members: dict[str, int], prunable: bool):
    return (channels, frozenset(producers), frozenset(members.items()), prunable)


def assert_groups(groups: list[ChannelGroup], expected: list[G]) -> None:
    got = {
        _canon(g.channels, g.producers, {m.name: m.size for m in g.members}, g.prunable)
        for g in groups
    }
    want = {_canon(e.channels, e.producers, e.members, e.prunable) for e in expected}
    assert len(groups) == len(expected)
    assert got == want
    for g in groups:
        assert len({m.name for m in g.members}) == len(g.members), "a member listed twice"
        for m in g.members:
            if m.name.endswith(".weight[1]"):
                assert m.role == "in", m
            elif "running_" not in m.name:
                assert m.role == "out", m


def group_of(groups: list[ChannelGroup], producer: str) -> ChannelGroup:
    (g,) = [g for g in groups if producer in g.producers]
    return g


def site_positions(graph: ChannelGraph, path: str, axis: int) -> tuple[int, np.ndarray]:
    """(group id, channel position in the group) for every index of one parameter axis."""
    (site,) = [s for s in graph.sites if s.path == path and s.axis == axis]
    gids = set(graph.atom_group[site.atoms].tolist())
    assert len(gids) == 1
    return gids.pop(), graph.atom_pos[site.atoms]


def _traced(model: nn.Module, shape: tuple[int, ...] = X) -> fx.GraphModule:
    torch.manual_seed(0)
    return trace(randomize_(model).eval(), (torch.randn(shape),))


def _assert_zeroed_prune_is_exact(gm: fx.GraphModule, plan: dict[int, list[int]]) -> None:
    graph = build_channel_graph(gm)
    zero_dropped_channels(gm, graph, plan)
    x = torch.randn(X)
    with torch.no_grad():
        before = gm(x)
        result = prune_channels(gm, plan=plan, round_to=1)
        verify(gm)
        after = gm(x)
    assert result.modified
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


INPUT = G(3, frozenset(), conv_in("stem", 3), prunable=False)


def fc_out(n: int = 5) -> G:
    return G(n, frozenset({"fc"}), conv_out("fc", n, bias=True), prunable=False)


# --- (a) ResNet basic block, identity shortcut ---------------------------------------------------
class BasicBlockNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv1, self.bn1 = nn.Conv2d(8, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.conv2, self.bn2 = nn.Conv2d(6, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        x = F.relu(x + y)
        return self.fc(torch.flatten(self.pool(x), 1))


def test_basic_block_identity_shortcut_couples_stem_and_conv2() -> None:
    groups = analyze(_traced(BasicBlockNet()))
    main = G(
        8,
        frozenset({"stem", "conv2"}),
        merged(
            conv_out("stem", 8),
            bn("bn0", 8),
            conv_in("conv1", 8),
            conv_out("conv2", 8),
            bn("bn2", 8),
            conv_in("fc", 8),
        ),
    )
    inner = G(
        6, frozenset({"conv1"}), merged(conv_out("conv1", 6), bn("bn1", 6), conv_in("conv2", 6))
    )
    assert_groups(groups, [INPUT, main, inner, fc_out()])
    by_producers = {g.producers: g for g in groups}
    assert any("network input" in r for r in by_producers[()].reasons)
    assert any("output" in r for r in by_producers[("fc",)].reasons)


# --- (b) bottleneck, 1x1 projection shortcut ------------------------------------------------------
class BottleneckNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv1, self.bn1 = nn.Conv2d(8, 4, 1, bias=False), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.conv3, self.bn3 = nn.Conv2d(4, 16, 1, bias=False), nn.BatchNorm2d(16)
        self.proj, self.bnp = nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        x = F.relu(y + self.bnp(self.proj(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def test_bottleneck_projection_couples_proj_and_conv3_only() -> None:
    groups = analyze(_traced(BottleneckNet()))
    stem = G(
        8,
        frozenset({"stem"}),
        merged(conv_out("stem", 8), bn("bn0", 8), conv_in("conv1", 8), conv_in("proj", 8)),
    )
    g1 = G(4, frozenset({"conv1"}), merged(conv_out("conv1", 4), bn("bn1", 4), conv_in("conv2", 4)))
    g2 = G(4, frozenset({"conv2"}), merged(conv_out("conv2", 4), bn("bn2", 4), conv_in("conv3", 4)))
    out = G(
        16,
        frozenset({"conv3", "proj"}),
        merged(
            conv_out("conv3", 16),
            bn("bn3", 16),
            conv_out("proj", 16),
            bn("bnp", 16),
            conv_in("fc", 16),
        ),
    )
    assert_groups(groups, [INPUT, stem, g1, g2, out, fc_out()])


# --- (c) DenseNet concat ------------------------------------------------------------------------
class DenseNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.grow, self.bn1 = nn.Conv2d(8, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.trans, self.bn2 = nn.Conv2d(12, 6, 1, bias=False), nn.BatchNorm2d(6)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        x = torch.cat([x, F.relu(self.bn1(self.grow(x)))], dim=1)
        x = F.relu(self.bn2(self.trans(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def test_densenet_concat_consumer_is_member_of_both_parts() -> None:
    gm = _traced(DenseNet())
    groups = analyze(gm)
    stem = G(
        8,
        frozenset({"stem"}),
        merged(conv_out("stem", 8), bn("bn0", 8), conv_in("grow", 8), conv_in("trans", 8)),
    )
    grow = G(4, frozenset({"grow"}), merged(conv_out("grow", 4), bn("bn1", 4), conv_in("trans", 4)))
    trans = G(6, frozenset({"trans"}), merged(conv_out("trans", 6), bn("bn2", 6), conv_in("fc", 6)))
    assert_groups(groups, [INPUT, stem, grow, trans, fc_out()])
    # The consumer's in-weight: indices 0..7 are the stem group, 8..11 the grow group.
    graph = build_channel_graph(gm)
    (site,) = [s for s in graph.sites if s.path == "trans.weight" and s.axis == 1]
    gid = graph.atom_group[site.atoms]
    assert len(set(gid[:8].tolist())) == 1 and len(set(gid[8:].tolist())) == 1
    assert gid[0] == group_of(groups, "stem").id and gid[8] == group_of(groups, "grow").id


# --- (d) MobileNetV2 inverted residual -----------------------------------------------------------
class InvertedResidualNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.expand, self.bn1 = nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.project, self.bn3 = nn.Conv2d(16, 8, 1, bias=False), nn.BatchNorm2d(8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = F.relu6(self.bn0(self.stem(x)))
        y = F.relu6(self.bn1(self.expand(x)))
        y = F.relu6(self.bn2(self.dw(y)))
        x = x + self.bn3(self.project(y))
        return self.fc(torch.flatten(self.pool(x), 1))


def test_mobilenet_v2_depthwise_shares_the_expand_group() -> None:
    groups = analyze(_traced(InvertedResidualNet()))
    main = G(
        8,
        frozenset({"stem", "project"}),
        merged(
            conv_out("stem", 8),
            bn("bn0", 8),
            conv_in("expand", 8),
            conv_out("project", 8),
            bn("bn3", 8),
            conv_in("fc", 8),
        ),
    )
    # Depthwise: one filter per channel, so its rows follow the expand channels; its in-axis
    # has size 1 and is not a member. It creates no channels of its own (not a producer).
    hidden = G(
        16,
        frozenset({"expand"}),
        merged(
            conv_out("expand", 16),
            bn("bn1", 16),
            conv_out("dw", 16),
            bn("bn2", 16),
            conv_in("project", 16),
        ),
    )
    assert_groups(groups, [INPUT, main, hidden, fc_out()])


# --- (e) squeeze-excitation ---------------------------------------------------------------------
class SENet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.body, self.bn1 = nn.Conv2d(8, 12, 3, padding=1, bias=False), nn.BatchNorm2d(12)
        self.se_reduce = nn.Conv2d(12, 3, 1)
        self.se_expand = nn.Conv2d(3, 12, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        x = self.bn1(self.body(x))
        s = torch.sigmoid(self.se_expand(F.relu(self.se_reduce(x.mean((2, 3), keepdim=True)))))
        return self.fc(torch.flatten(self.pool(x * s), 1))


def test_se_expand_conv_is_coupled_with_the_gated_channels() -> None:
    groups = analyze(_traced(SENet()))
    stem = G(8, frozenset({"stem"}), merged(conv_out("stem", 8), bn("bn0", 8), conv_in("body", 8)))
    gated = G(
        12,
        frozenset({"body", "se_expand"}),
        merged(
            conv_out("body", 12),
            bn("bn1", 12),
            conv_in("se_reduce", 12),
            conv_out("se_expand", 12, bias=True),
            conv_in("fc", 12),
        ),
    )
    squeeze = G(
        3,
        frozenset({"se_reduce"}),
        merged(conv_out("se_reduce", 3, bias=True), conv_in("se_expand", 3)),
    )
    assert_groups(groups, [INPUT, stem, gated, squeeze, fc_out()])


# --- (f) channel shuffle -------------------------------------------------------------------------
class ShuffleNet(nn.Module):
    """stem (8) -> chunk into a (stem 0..3) and b (stem 4..7) -> branch(b) (4) -> cat [a, branch]
    -> shuffle with 2 groups: the output interleaves a[j], branch[j] for j = 0..3."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.branch, self.bn1 = nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        a, b = x.chunk(2, dim=1)
        x = torch.cat([a, F.relu(self.bn1(self.branch(b)))], dim=1)
        n, c, h, w = x.size()
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, c, h, w)
        return self.fc(torch.flatten(self.pool(x), 1))


def test_channel_shuffle_ties_each_pair_it_interleaves() -> None:
    gm = _traced(ShuffleNet())
    groups = analyze(gm)
    # The view (n, 2, c/2) needs both halves equally wide, and the interleave pairs a[j] with
    # branch[j]: they can only go together. Stem channels 4..7 (b) are read by the branch
    # only, so each is free on its own. One group: 4 pairs + 4 singles = 8 channels.
    shuffled = G(
        8,
        frozenset({"stem", "branch"}),
        merged(
            conv_out("stem", 8),
            bn("bn0", 8),
            conv_in("branch", 4),
            conv_out("branch", 4),
            bn("bn1", 4),
            conv_in("fc", 8),
        ),
    )
    assert_groups(groups, [INPUT, shuffled, fc_out()])

    graph = build_channel_graph(gm)
    _, stem = site_positions(graph, "stem.weight", 0)
    _, branch = site_positions(graph, "branch.weight", 0)
    _, fc = site_positions(graph, "fc.weight", 1)
    assert branch.tolist() == stem[:4].tolist()  # a[j] tied with branch[j]
    assert len(set(stem.tolist())) == 8  # no two stem channels tied to each other
    # The fc reads the shuffled order a0, br0, a1, br1, ...: pairs share a position.
    assert fc.tolist() == np.repeat(stem[:4], 2).tolist()


def test_channel_shuffle_prunes_exactly() -> None:
    gm = _traced(ShuffleNet())
    gid, stem = site_positions(build_channel_graph(gm), "stem.weight", 0)
    # Drop one tied pair (stem 1 with branch 1) and one free channel (stem 6).
    drop = {int(stem[1]), int(stem[6])}
    _assert_zeroed_prune_is_exact(gm, {gid: [p for p in range(8) if p not in drop]})
    assert gm.get_submodule("stem").out_channels == 6
    assert gm.get_submodule("branch").in_channels == 3
    assert gm.get_submodule("branch").out_channels == 3
    assert gm.get_submodule("fc").in_features == 6


def test_zoo_shufflenet_groups_counted_by_hand() -> None:
    gm = trace(ZOO["shufflenet"]().eval(), (torch.randn(ZOO_INPUT_SHAPE),))
    groups = analyze(gm)
    # stem makes s0..s15. Unit 0: branch reads s8..s15, makes u0..u7; shuffle ties s_j~u_j
    # (j<8) and outputs s0,u0,...,s7,u7. Unit 1: a' = s0,u0,..,s3,u3; its branch output v
    # ties v_2j, v_2j+1 with {s_j,u_j}. Classes: 4 x {s,u,v,v} + 4 x {s,u} + s8..s15 singly = 16.
    shuffled = group_of(groups, "stem.0")
    assert shuffled.channels == 16
    assert set(shuffled.producers) == {"stem.0", "units.0.branch.2.0", "units.1.branch.2.0"}
    # Each unit's first 1x1 conv and its depthwise conv: 8 channels of their own.
    for unit in (0, 1):
        inner = group_of(groups, f"units.{unit}.branch.0.0")
        assert inner.channels == 8 and inner.producers == (f"units.{unit}.branch.0.0",)
    assert len(groups) == 5  # plus input and logits


# --- ops without a rule -------------------------------------------------------------------------
def test_op_without_rule_blocks_touched_groups_and_names_the_node() -> None:
    gm = trace(UnknownOp().eval(), (torch.randn(ZOO_INPUT_SHAPE),))
    groups = analyze(gm)
    conv1 = group_of(groups, "conv1.0")
    assert not conv1.prunable
    assert any("cumsum" in r for r in conv1.reasons), conv1.reasons
    # conv2 reads cumsum's output but creates its own channels.
    assert group_of(groups, "conv2.0").prunable
    with pytest.raises(UnsupportedOpError, match="cumsum"):
        analyze(gm, strict=True)


def test_strict_analysis_accepts_every_zoo_model() -> None:
    for name, factory in ZOO.items():
        gm = trace(factory().eval(), (torch.randn(ZOO_INPUT_SHAPE),))
        assert analyze(gm, strict=True) == analyze(gm), name


def test_analyze_needs_a_traced_graph_module() -> None:
    with pytest.raises(TraceError, match="trace"):
        analyze(fx.symbolic_trace(BasicBlockNet()))


# --- GroupNorm, grouped conv, LayerNorm -----------------------------------------------------------
class GroupNormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.gn = nn.GroupNorm(4, 16)
        self.conv2 = nn.Conv2d(16, 6, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        x = self.conv2(F.relu(self.gn(self.conv(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def test_groupnorm_prunes_whole_norm_groups() -> None:
    gm = _traced(GroupNormNet())
    groups = analyze(gm)
    gn = G(
        4,
        frozenset({"conv"}),
        merged(conv_out("conv", 16), {"gn.weight[0]": 16, "gn.bias[0]": 16}, conv_in("conv2", 16)),
    )
    c2 = G(6, frozenset({"conv2"}), merged(conv_out("conv2", 6, bias=True), conv_in("fc", 6)))
    assert_groups(groups, [G(3, frozenset(), conv_in("conv", 3), False), gn, c2, fc_out()])

    gid, pos = site_positions(build_channel_graph(gm), "conv.weight", 0)
    blocks = pos.reshape(4, 4)
    assert (blocks == blocks[:, :1]).all() and len(set(blocks[:, 0].tolist())) == 4
    w, w2 = gm.get_submodule("conv").weight.detach().clone(), gm.get_submodule("conv2").weight
    w2 = w2.detach().clone()
    kept_rows = [0, 1, 2, 3, 8, 9, 10, 11, 12, 13, 14, 15]  # GN group 1 (channels 4..7) goes
    _assert_zeroed_prune_is_exact(gm, {gid: sorted(set(pos.tolist()) - {int(pos[4])})})
    gnm = gm.get_submodule("gn")
    assert (gnm.num_groups, gnm.num_channels) == (3, 12)
    torch.testing.assert_close(gm.get_submodule("conv").weight, w[kept_rows])
    torch.testing.assert_close(gm.get_submodule("conv2").weight, w2[:, kept_rows])


class GroupedConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.gconv = nn.Conv2d(16, 16, 3, padding=1, groups=4, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.c3, self.bn3 = nn.Conv2d(16, 6, 1, bias=False), nn.BatchNorm2d(6)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        x = F.relu(self.bn1(self.c1(x)))
        x = F.relu(self.bn2(self.gconv(x)))
        x = F.relu(self.bn3(self.c3(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def test_grouped_conv_prunes_whole_conv_groups() -> None:
    gm = _traced(GroupedConvNet())
    groups = analyze(gm)
    # Conv group k reads c1 channels 4k..4k+3 and writes gconv channels 4k..4k+3: one unit.
    tied = G(
        4,
        frozenset({"c1"}),
        merged(
            conv_out("c1", 16),
            bn("bn1", 16),
            conv_out("gconv", 16),
            bn("bn2", 16),
            conv_in("c3", 16),
        ),
    )
    c3 = G(6, frozenset({"c3"}), merged(conv_out("c3", 6), bn("bn3", 6), conv_in("fc", 6)))
    assert_groups(groups, [G(3, frozenset(), conv_in("c1", 3), False), tied, c3, fc_out()])

    graph = build_channel_graph(gm)
    gid, pos = site_positions(graph, "c1.weight", 0)
    assert site_positions(graph, "gconv.weight", 0)[1].tolist() == pos.tolist()
    blocks = pos.reshape(4, 4)
    assert (blocks == blocks[:, :1]).all() and len(set(blocks[:, 0].tolist())) == 4
    wg = gm.get_submodule("gconv").weight.detach().clone()
    kept = [0, 1, 2, 3, 4, 5, 6, 7, 12, 13, 14, 15]  # conv group 2 (channels 8..11) goes
    _assert_zeroed_prune_is_exact(gm, {gid: sorted(set(pos.tolist()) - {int(pos[8])})})
    g = gm.get_submodule("gconv")
    assert (g.groups, g.in_channels, g.out_channels) == (3, 12, 12)
    assert g.weight.shape == (12, 4, 3, 3)
    torch.testing.assert_close(g.weight, wg[kept])


def test_convnext_layernorm_group_is_reported_inexact() -> None:
    groups = analyze(trace(ConvNeXt().eval(), (torch.randn(ZOO_INPUT_SHAPE),)))
    trunk = group_of(groups, "stem")
    assert trunk.prunable and not trunk.exact
    assert any("LayerNorm" in r and "norm" in r.split(":")[0] for r in trunk.inexact_reasons)
    # The MLP hidden channels see no LayerNorm: exact.
    for b in (0, 1):
        hidden = group_of(groups, f"blocks.{b}.fc1")
        assert hidden.exact and hidden.prunable and hidden.channels == 128


# --- network boundary ------------------------------------------------------------------------
def _boundary_groups(gm: fx.GraphModule) -> set[int]:
    graph = build_channel_graph(gm)
    atoms: list[np.ndarray] = []
    for node in gm.graph.nodes:
        inputs = node.all_input_nodes if node.op == "output" else [node]
        if node.op in ("placeholder", "output"):
            for n in inputs:
                v = graph.values[n]
                assert isinstance(v, TensorChannels)
                atoms.append(v.all_atoms())
    return set(graph.atom_group[np.concatenate(atoms)].tolist())


@pytest.mark.parametrize("name", sorted(ZOO))
def test_network_input_and_output_are_never_prunable(name: str) -> None:
    gm = trace(ZOO[name]().eval(), (torch.randn(ZOO_INPUT_SHAPE),))
    groups = analyze(gm)
    boundary = _boundary_groups(gm)
    assert len(boundary) >= 2
    for gid in boundary:
        assert not groups[gid].prunable, groups[gid]


class BoundaryNet(nn.Module):
    """The input is added to a conv's output; a mid feature map is returned too."""

    def __init__(self) -> None:
        super().__init__()
        self.res = nn.Conv2d(3, 3, 1)
        self.c1 = nn.Conv2d(3, 8, 1)
        self.c2 = nn.Conv2d(8, 4, 1)
        self.c3 = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        f = F.relu(self.c1(x + self.res(x)))
        return self.c3(F.relu(self.c2(f))), f


def test_input_coupled_by_residual_and_returned_features_are_unprunable() -> None:
    groups = analyze(_traced(BoundaryNet()))
    res = group_of(groups, "res")
    assert not res.prunable and any("input" in r for r in res.reasons)
    c1 = group_of(groups, "c1")
    assert not c1.prunable and any("output" in r for r in c1.reasons)
    assert group_of(groups, "c2").prunable
    assert not group_of(groups, "c3").prunable


# --- flatten -> linear ----------------------------------------------------------------------------
class FlattenNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.pool = nn.AdaptiveAvgPool2d((2, 3))
        self.fc = nn.Linear(4 * 2 * 3, 5)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(F.relu(self.bn(self.conv(x)))), 1))


def test_flatten_linear_member_has_c_times_hw_entries() -> None:
    gm = _traced(FlattenNet())
    groups = analyze(gm)
    conv = G(4, frozenset({"conv"}), merged(conv_out("conv", 4), bn("bn", 4), conv_in("fc", 24)))
    assert_groups(groups, [G(3, frozenset(), conv_in("conv", 3), False), conv, fc_out()])

    graph = build_channel_graph(gm)
    gid, pos = site_positions(graph, "conv.weight", 0)
    _, fc_pos = site_positions(graph, "fc.weight", 1)
    assert fc_pos.tolist() == np.repeat(pos, 6).tolist()  # flatten is channel-major
    w = gm.get_submodule("fc").weight.detach().clone()
    _assert_zeroed_prune_is_exact(gm, {gid: [int(pos[0]), int(pos[2])]})
    cols = [*range(0, 6), *range(12, 18)]  # conv channels 0 and 2 survive
    torch.testing.assert_close(gm.get_submodule("fc").weight, w[:, cols])


# --- determinism --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(ZOO))
def test_analysis_is_deterministic(name: str) -> None:
    x = torch.randn(ZOO_INPUT_SHAPE)
    gm = trace(ZOO[name]().eval(), (x,))
    first, second = build_channel_graph(gm), build_channel_graph(gm)
    assert first.groups == second.groups
    assert np.array_equal(first.atom_group, second.atom_group)
    assert np.array_equal(first.atom_pos, second.atom_pos)
    # A fresh trace of a fresh instance (different weights) gives the same groups.
    assert analyze(trace(ZOO[name]().eval(), (x,))) == first.groups
