"""planning.ranking: fair group scores, MAC costs, the layer-collapse guard, rounding that never
forbids a reachable target, and landing within 0.01 of the target.

References are independent of the code under test: costs and floors by hand, MACs measured by
FlopCounterMode on the physically pruned model, rank correlations by hand arithmetic.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from graphprune import count_macs, trace
from graphprune.analysis import build_channel_graph
from graphprune.apps.models import cifar_resnet
from graphprune.errors import PlanError
from graphprune.passes import insert_compactors, prune_channels
from graphprune.passes.compactor import Compactor
from graphprune.passes.insert_compactors import compactable_groups
from graphprune.planning.plan import rounded_width
from graphprune.planning.ranking import (
    Rounding,
    channel_costs,
    choose_rounding,
    guard_floors,
    normalized_prior,
    per_mac,
    producer_mean,
    rank_correlation,
    rounding_ladder,
    select_kept,
    taylor_saliency,
)
from graphprune.planning.selection import step_keys, walk
from graphprune.testing.method_runs import assert_lands
from graphprune.testing.zoo import ZOO, ZOO_INPUT_SHAPE, tiny_cnn

pytestmark = pytest.mark.usefixtures("one_thread")
DIGITS = (1, 1, 8, 8)


def resnet20():
    torch.manual_seed(0)
    x = torch.randn(1, 1, 16, 16)
    model = cifar_resnet(20, num_classes=10, in_channels=1).eval()
    gm = trace(model, (x,))
    graph = build_channel_graph(gm)
    gids = [gid for gid, _ in compactable_groups(gm, graph)]
    return model, x, gm, graph, gids


def measured_ratio(gm, graph, x, kept) -> float:
    """Prune ``gm`` by the plan (exact widths) and count MACs with FlopCounterMode."""
    dense = count_macs(gm, (x,)).macs
    plan = {g: k for g, k in kept.items() if len(k) < graph.groups[g].channels}
    pruned = prune_channels(gm, plan=plan, round_to=1).gm
    return count_macs(pruned, (x,)).macs / dense


def test_residual_and_internal_groups_with_identical_rows_score_the_same() -> None:
    _, x, gm, graph, _ = resnet20()
    insert_compactors(gm)
    comps = [m for m in gm.modules() if isinstance(m, Compactor)]
    by_group: dict[int, int] = {}
    for c in comps:
        by_group[c.group] = by_group.get(c.group, 0) + 1
    residual = next(g for g, k in by_group.items() if k > 1 and graph.groups[g].channels == 16)
    internal = next(g for g, k in by_group.items() if k == 1 and graph.groups[g].channels == 16)
    assert by_group[residual] >= 3  # stem + three block outputs share the stage-1 stream
    rows = torch.rand(16, 16, generator=torch.Generator().manual_seed(0)) + 0.1
    with torch.no_grad():
        for c in comps:
            if c.out_channels == 16:
                c.weight.copy_(rows[c.channel_index].view_as(c.weight))
    channels = {g: graph.groups[g].channels for g in by_group}
    scores = producer_mean(
        (
            (
                c.group,
                c.channel_index.numpy(),
                torch.linalg.vector_norm(c.matrix.detach(), dim=1).numpy(),
            )
            for c in comps
        ),
        channels,
    )
    want = torch.linalg.vector_norm(rows, dim=1).numpy()
    np.testing.assert_allclose(scores[internal], want, rtol=1e-6)
    np.testing.assert_allclose(scores[residual], want, rtol=1e-6)


def test_channel_costs_match_hand_counts() -> None:
    # 8x8 input: conv1 64*16*1*9 = 9216, conv2 64*32*16*9 = 294912, linear 32*10 = 320.
    gm = trace(tiny_cnn(), (torch.randn(DIGITS),))
    graph = build_channel_graph(gm)
    macs = count_macs(gm, (torch.randn(DIGITS),)).per_layer
    g1, g2 = (gid for gid, _ in compactable_groups(gm, graph))
    costs = channel_costs(graph, macs, [g1, g2])
    assert costs[g1] == pytest.approx(9216 / 16 + 294912 / 16)
    assert costs[g2] == pytest.approx(294912 / 32 + 10)
    scaled = per_mac({g1: np.array([2.0]), g2: np.array([2.0])}, costs)
    mean = (costs[g1] + costs[g2]) / 2
    assert scaled[g1][0] == pytest.approx(2.0 * mean / costs[g1])
    assert scaled[g1][0] < scaled[g2][0]  # the expensive channel is worth less per MAC
    # cost ** power: halfway weighs the cost ratio by its square root, 0 leaves scores alone
    half = per_mac({g1: np.array([2.0]), g2: np.array([2.0])}, costs, power=0.5)
    assert half[g1][0] == pytest.approx(2.0 * (mean / costs[g1]) ** 0.5)
    assert half[g2][0] == pytest.approx(2.0 * (mean / costs[g2]) ** 0.5)
    assert scaled[g1][0] < half[g1][0] < 2.0
    none = per_mac({g1: np.array([2.0]), g2: np.array([3.0])}, costs, power=0.0)
    assert (none[g1][0], none[g2][0]) == (2.0, 3.0)
    for bad in (-0.5, 1.5):
        with pytest.raises(ValueError, match="cost_power"):
            per_mac({g1: np.array([2.0])}, costs, power=bad)


def test_guard_floors_and_rounded_widths_by_hand() -> None:
    assert guard_floors({0: 16, 1: 64, 2: 4, 3: 10}, 0.1) == {0: 2, 1: 7, 2: 1, 3: 1}
    assert guard_floors({0: 16}, 0.0) == {0: 1}
    with pytest.raises(ValueError, match="min_keep_fraction"):
        guard_floors({0: 16}, 1.0)
    # multiples of 8 from 8 up, multiples of 4 below; never decreasing in kept
    assert [rounded_width(k, 64, 8, fine=4) for k in (1, 3, 4, 5, 8, 9, 63)] == [
        4,
        4,
        4,
        8,
        8,
        16,
        64,
    ]
    assert [rounded_width(k, 64, 8, fine=1) for k in (1, 3, 7, 9)] == [1, 3, 7, 16]
    assert rounding_ladder(8) == [
        Rounding(8, 8),
        Rounding(8, 4),
        Rounding(8, 2),
        Rounding(8, 1),
        Rounding(1, 1),
    ]


class TwoBranches(nn.Module):
    """Two 16-channel convs of equal cost, concatenated into a linear head: two groups whose
    channels all cost the same (9216 / 16 conv MACs + 320 / 32 head MACs each)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 16, 3, padding=1, bias=False)
        self.b = nn.Conv2d(1, 16, 3, padding=1, bias=False)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.a(x), self.b(x)], 1).mean((2, 3)))


def test_step_keys_are_the_mean_score_of_each_rounded_step_by_hand() -> None:
    scores = np.array([5.0, 0.1, 0.2, 0.3, 0.4, 9, 9, 9, 9, 9, 9, 9, 0.6, 0.7, 0.8, 0.9])
    # 16 channels in steps of 8: the 8 lowest go together (mean 0.5), then 5 with the 9s
    keys = step_keys(scores, 16, 8)
    assert keys[[1, 2, 3, 4, 12, 13, 14, 15]] == pytest.approx([0.5] * 8)
    assert keys[[0, 5, 6, 7, 8, 9, 10, 11]] == pytest.approx([(5 + 7 * 9) / 8] * 8)
    # steps of 4 below 8: 16 -> 8 -> 4 -> 0. Tied 9s leave in reverse index order (the
    # keep order keeps the lower index), so 5 goes with channels 9-11
    fine = step_keys(scores, 16, 8, fine=4)
    assert fine[[1, 2, 3, 4, 12, 13, 14, 15]] == pytest.approx([0.5] * 8)
    assert fine[[0, 9, 10, 11]] == pytest.approx([(5 + 27) / 4] * 4)
    assert fine[[5, 6, 7, 8]] == pytest.approx([9.0] * 4)
    assert step_keys(scores, 16, 1) == pytest.approx(scores)
    assert step_keys(scores, 16, 8, tied=True) == pytest.approx(scores)


def test_rounded_walk_cuts_the_step_worth_least_in_total() -> None:
    x = torch.randn(1, 1, 8, 8)
    gm = trace(TwoBranches(), (x,))
    graph = build_channel_graph(gm)
    macs = count_macs(gm, (x,)).per_layer
    a, b = (g.id for g in graph.groups if g.prunable)
    # a: seven near-zero channels and one at 5 (step of 8 worth 5.7); b: eight at 1 (worth 8)
    scores = {a: np.array([0.1] * 7 + [5.0] + [10.0] * 8), b: np.array([1.0] * 8 + [10.0] * 8)}
    # 0.75 of the MACs is exactly one step of 8 channels of either group
    plan, reached = walk(graph, scores, macs, 0.75, round_to=8)
    assert reached
    assert set(plan) == {a}  # walking channel by channel would wait for a's 5 and cut b
    assert plan[a].tolist() == list(range(8, 16))
    assert measured_ratio(gm, graph, x, plan) == pytest.approx(0.75)


def test_rank_correlation_by_hand() -> None:
    assert rank_correlation(np.array([1, 2, 3, 4]), np.array([1, 3, 2, 4])) == pytest.approx(0.8)
    # ties get average ranks: [0.5, 0.5, 2] vs [0, 1, 2] -> 1.5 / sqrt(1.5 * 2)
    assert rank_correlation(np.array([1, 1, 2]), np.array([1, 2, 3])) == pytest.approx(
        1.5 / np.sqrt(3.0)
    )
    assert rank_correlation(np.ones(4), np.arange(4)) is None


def test_rounding_falls_back_where_round_to_8_cannot_reach_the_target() -> None:
    x = torch.randn(DIGITS)
    gm = trace(tiny_cnn(16, 16), (x,))
    graph = build_channel_graph(gm)
    macs = count_macs(gm, (x,)).per_layer
    gids = [gid for gid, _ in compactable_groups(gm, graph)]
    scores = {g: np.random.default_rng(g).random(16) for g in gids}
    floors = guard_floors({g: 16 for g in gids}, 0.1)
    # With every width a multiple of 8 the least reachable is (4608 + 36864 + 80) / 156832.
    _, reached = walk(graph, scores, macs, 0.2, round_to=8, min_keep=floors)
    assert not reached
    rounding = choose_rounding(graph, macs, floors, 0.2, 8)
    assert rounding.round_to == 8 and rounding.fine < 8
    sel = select_kept(graph, scores, macs, 0.2, rounding=rounding, floors=floors)
    assert sel.reached
    ratio = measured_ratio(gm, graph, x, sel.kept)
    assert 0.2 - 0.01 <= ratio <= 0.2 + 1e-6
    assert ratio == pytest.approx(sel.macs_fraction, abs=1e-6)
    # Where 8 suffices with room to spare, widths stay multiples of 8.
    assert choose_rounding(graph, macs, floors, 0.7, 8) == Rounding(8, 8)
    with pytest.raises(PlanError, match="out of reach"):
        choose_rounding(graph, macs, guard_floors({g: 16 for g in gids}, 0.5), 0.1, 8)


def test_deep_target_on_resnet20_prunes_residual_groups_and_keeps_the_guard() -> None:
    _, x, gm, graph, gids = resnet20()
    macs = count_macs(gm, (x,)).per_layer
    channels = {g: graph.groups[g].channels for g in gids}
    floors = guard_floors(channels, 0.1)
    # Identity compactors: every row norm is 1, so only the costs tell groups apart.
    scores = per_mac({g: np.ones(n) for g, n in channels.items()}, channel_costs(graph, macs, gids))
    rounding = choose_rounding(graph, macs, floors, 0.1, 8)
    sel = select_kept(graph, scores, macs, 0.1, rounding=rounding, floors=floors)
    residual = [g for g in gids if len(graph.groups[g].producers) > 1]
    assert len(residual) == 3
    assert all(len(sel.kept[g]) < channels[g] for g in residual), {
        g: len(sel.kept[g]) for g in residual
    }
    assert all(len(sel.kept[g]) >= floors[g] for g in gids)
    ratio = measured_ratio(gm, graph, x, sel.kept)
    assert 0.09 <= ratio <= 0.1 + 1e-6


@pytest.mark.parametrize("target", [0.5, 0.3])
def test_final_selection_lands_within_001_of_the_target(target: float) -> None:
    _, x, gm, graph, gids = resnet20()
    macs = count_macs(gm, (x,)).per_layer
    channels = {g: graph.groups[g].channels for g in gids}
    floors = guard_floors(channels, 0.1)
    rng = np.random.default_rng(1)
    scores = {g: rng.random(n) for g, n in channels.items()}
    rounding = choose_rounding(graph, macs, floors, target, 8)
    sel = select_kept(graph, scores, macs, target, rounding=rounding, floors=floors)
    ratio = measured_ratio(gm, graph, x, sel.kept)
    assert target - 0.01 <= ratio <= target + 1e-6
    # the plain walk stops at the first point under the target, often further below it
    plan, _ = walk(graph, scores, macs, target, round_to=8, min_keep=floors)
    walked = measured_ratio(
        trace(cifar_resnet(20, 10, 1), (x,)),
        graph,
        x,
        {g: plan.get(g, np.arange(n)) for g, n in channels.items()},
    )
    assert ratio >= walked


def test_taylor_saliency_matches_a_hand_computed_example() -> None:
    # one pixel: a = W x (2 channels), y = Q a (the compactor), out = L y, loss = v . out.
    # dL/dy = L^T v = g, dL/dQ_ij = g_i a_j, so Q_i . dL/dQ_i = g_i y_i.
    model = nn.Sequential(nn.Conv2d(1, 2, 1, bias=False), nn.Flatten(), nn.Linear(2, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([1.0, -2.0]).view(2, 1, 1, 1))
        model[2].weight.copy_(torch.tensor([[1.0, 0.0], [2.0, 3.0]]))
        model[2].bias.zero_()
    gm = trace(model, (torch.ones(1, 1, 1, 1),))
    graph = build_channel_graph(gm)
    insert_compactors(gm)
    (comp,) = [m for m in gm.modules() if isinstance(m, Compactor)]
    q = torch.tensor([[0.5, 1.0], [0.0, 2.0]])
    with torch.no_grad():
        comp.weight.copy_(q.view(2, 2, 1, 1))
    v = torch.tensor([1.0, -1.0])
    g = torch.tensor([[1.0, 0.0], [2.0, 3.0]]).T @ v  # [-1, -3]
    total = np.zeros(2)
    want = np.zeros(2)
    for x in (1.0, -3.0):
        gm.zero_grad()
        (gm(torch.full((1, 1, 1, 1), x)) @ v).sum().backward()
        dots = (comp.matrix * comp.weight.grad.view(2, 2)).sum(1).detach().numpy()
        sal = taylor_saliency([(comp.group, comp.channel_index.numpy(), dots)], {comp.group: 2})
        total += sal[comp.group]
        y = q @ (torch.tensor([1.0, -2.0]) * x)
        want += (g * y).abs().numpy()
    assert graph.groups[comp.group].channels == 2
    # x = 1: y = [-1.5, -4], g*y = [1.5, 12]; x = -3: y = [4.5, 12], g*y = [-4.5, -36]
    np.testing.assert_allclose(want, [6.0, 48.0])
    np.testing.assert_allclose(total, want, rtol=1e-6)
    prior = normalized_prior({comp.group: total, 99: np.array([0.0, 0.0])})
    np.testing.assert_allclose(prior[comp.group], [6.0 / 13.5, 48.0 / 13.5], rtol=1e-6)
    np.testing.assert_allclose(prior[99], [0.0, 0.0])
    assert normalized_prior({1: np.zeros(3)})[1].tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("scores_kind", ["tied", "random"])
@pytest.mark.parametrize("name", list(ZOO))
def test_final_selection_predicts_and_lands_on_every_zoo_model(name: str, scores_kind: str):
    # Tied scores (identity compactors, untrained norms) and random ones; groups that layers
    # read only in part (a split's halves, shuffle branches, C2f) must be predicted channel by
    # channel, and the result must land under the target as closely as channel steps allow.
    torch.manual_seed(0)
    x = torch.randn(ZOO_INPUT_SHAPE)
    gm = trace(ZOO[name]().eval(), (x,))
    graph = build_channel_graph(gm)
    macs = count_macs(gm, (x,)).per_layer
    gids = [g.id for g in graph.groups if g.prunable and g.exact]
    rng = np.random.default_rng(0)
    n = {g: graph.groups[g].channels for g in gids}
    scores = {g: np.ones(n[g]) if scores_kind == "tied" else rng.random(n[g]) for g in gids}
    floors = guard_floors(n, 0.1)
    for target in (0.5, 0.4):
        rounding = choose_rounding(graph, macs, floors, target, 8)
        sel = select_kept(graph, scores, macs, target, rounding=rounding, floors=floors)
        ratio = measured_ratio(copy.deepcopy(gm), graph, x, sel.kept)
        assert ratio == pytest.approx(sel.macs_fraction, abs=1e-6)
        assert all(len(sel.kept[g]) >= floors[g] for g in gids)
        assert_lands(graph, macs, sel.kept, ratio, target)


class _Res2NetUnit(nn.Module):
    """Res2Net's first unit of a stage: 1x1 conv, split into four; three parts through 3x3
    convs, the fourth only through average pooling into the concatenation, then 1x1 conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 1)
        self.convs = nn.ModuleList(nn.Conv2d(4, 4, 3, padding=1) for _ in range(3))
        self.pool = nn.AvgPool2d(3, stride=1, padding=1)
        self.conv3 = nn.Conv2d(16, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = torch.split(torch.relu(self.conv1(x)), 4, 1)
        out = [torch.relu(conv(parts[i])) for i, conv in enumerate(self.convs)]
        return self.conv3(torch.cat([*out, self.pool(parts[-1])], 1))


def test_a_split_part_read_by_no_parameter_is_never_emptied() -> None:
    # The pooled part has no parameter of its own (no "site"), yet emptying it leaves a
    # zero-channel tensor. The selection keeps one of its channels however low they score,
    # and a plan that empties it is refused naming the tensor.
    x = torch.randn(1, 3, 8, 8)
    gm = trace(_Res2NetUnit().eval(), (x,))
    graph = build_channel_graph(gm)
    (g,) = [grp.id for grp in graph.groups if grp.producers == ("conv1",)]
    scores = {grp.id: np.ones(grp.channels) for grp in graph.groups if grp.prunable}
    scores[g] = np.array([9.0] * 12 + [0.1] * 4)  # the pooled part scores lowest
    macs = count_macs(gm, (x,)).per_layer
    sel = select_kept(graph, scores, macs, 0.4, rounding=Rounding(1, 1), floors={})
    assert np.isin(sel.kept[g], np.arange(12, 16)).any()
    with pytest.raises(PlanError, match="every channel of the output of node"):
        prune_channels(copy.deepcopy(gm), plan={g: np.arange(12)}, round_to=1)


def test_a_channel_kept_for_a_parameterless_tensor_does_not_overshoot() -> None:
    # The walk drops the pooled part's channels first (lowest scores); keeping one of them
    # alive costs MACs, which the selection takes back elsewhere: it still lands under.
    x = torch.randn(1, 3, 8, 8)
    gm = trace(_Res2NetUnit().eval(), (x,))
    graph = build_channel_graph(gm)
    (g,) = [grp.id for grp in graph.groups if grp.producers == ("conv1",)]
    macs = count_macs(gm, (x,)).per_layer
    rng = np.random.default_rng(0)
    for _ in range(4):
        scores = {grp.id: rng.random(grp.channels) for grp in graph.groups if grp.prunable}
        scores[g][12:] *= 0.01
        for target in (0.2, 0.3, 0.45, 0.6, 0.75):
            sel = select_kept(graph, scores, macs, target, rounding=Rounding(1, 1), floors={})
            assert sel.reached and sel.macs_fraction <= target + 1e-9
            assert np.isin(sel.kept[g], np.arange(12, 16)).any()
            ratio = measured_ratio(copy.deepcopy(gm), graph, x, sel.kept)
            assert_lands(graph, macs, sel.kept, ratio, target)
