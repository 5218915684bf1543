"""prune_channels over the model zoo: structure, numerics, no-op, rounding and bad plans."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from graphprune import trace
from graphprune.analysis import ChannelGraph, analyze, build_channel_graph
from graphprune.errors import GraphpruneError, PlanError
from graphprune.passes import prune_channels
from graphprune.passes.runner import verify
from graphprune.testing.exactness import random_plan, randomize_, zero_dropped_channels
from graphprune.testing.zoo import ZOO, ZOO_INPUT_SHAPE

NAMES = sorted(ZOO)
BATCH = (2, *ZOO_INPUT_SHAPE[1:])


def _zoo(name: str) -> tuple[nn.Module, fx.GraphModule, ChannelGraph, torch.Tensor]:
    torch.manual_seed(0)
    model = randomize_(ZOO[name]()).eval()
    gm = trace(model, (torch.randn(ZOO_INPUT_SHAPE),))
    return model, gm, build_channel_graph(gm), torch.randn(BATCH)


def _plan(graph: ChannelGraph, seed: int = 0) -> dict[int, list[int]]:
    plan = random_plan(graph, np.random.default_rng(seed))
    assert plan, "every zoo model has a prunable exact group"
    return plan


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _assert_state_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


def expected_state(
    gm: fx.GraphModule, graph: ChannelGraph, plan: dict[int, list[int]]
) -> dict[str, torch.Tensor]:
    """The state_dict pruning must produce, computed here from the sites and the plan alone.

    A channel atom is dropped when its position in its group is not kept; every site (one
    axis of one tensor) loses the indices whose atom is dropped; everything else is untouched.
    """
    dropped = np.zeros(len(graph.atom_group), dtype=bool)
    for gid, keep in plan.items():
        in_group = np.nonzero(graph.atom_group == gid)[0]
        dropped[in_group] = ~np.isin(graph.atom_pos[in_group], np.asarray(keep))
    state = _state(gm)
    for s in graph.sites:
        keep_idx = np.nonzero(~dropped[s.atoms.reshape(-1)])[0]
        state[s.path] = state[s.path].index_select(s.axis, torch.as_tensor(keep_idx))
    return state


# --- over the zoo --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_random_plan_gives_expected_shapes_values_and_param_count(name: str) -> None:
    _, gm, graph, x = _zoo(name)
    plan = _plan(graph)
    want = expected_state(gm, graph, plan)
    param_names = {n for n, _ in gm.named_parameters()}
    want_params = sum(math.prod(t.shape) for n, t in want.items() if n in param_names)
    dense_params = sum(p.numel() for p in gm.parameters())

    result = prune_channels(gm, plan=plan, round_to=1)
    assert result.modified and result.gm is gm
    verify(gm)
    _assert_state_equal(_state(gm), want)
    assert sum(p.numel() for p in gm.parameters()) == want_params < dense_params
    with torch.no_grad():
        y = gm(x)
    assert y.shape == (2, 10) and torch.isfinite(y).all()

    # Analysis of the pruned model from scratch sees the planned widths.
    widths = {g.producers: g.channels for g in graph.groups if g.producers}
    for gid, keep in plan.items():
        widths[graph.groups[gid].producers] = len(keep)
    assert {g.producers: g.channels for g in analyze(gm) if g.producers} == widths


@pytest.mark.parametrize("name", NAMES)
def test_pruning_zeroed_channels_leaves_outputs_unchanged(name: str) -> None:
    model, gm, graph, x = _zoo(name)
    before = _state(model)
    plan = _plan(graph)
    untouched = copy.deepcopy(gm)
    zero_dropped_channels(gm, graph, plan)
    with torch.no_grad():
        zeroed = gm(x)
        prune_channels(gm, plan=plan, round_to=1)
        pruned = gm(x)
        # Not vacuous: the same channels pruned without zeroing do change the output.
        prune_channels(untouched, plan=plan, round_to=1)
        assert not torch.allclose(untouched(x), model(x), atol=1e-4)
    torch.testing.assert_close(pruned, zeroed, atol=1e-5, rtol=1e-5)
    _assert_state_equal(before, _state(model))


@pytest.mark.parametrize("name", NAMES)
def test_pruned_state_dict_round_trips(name: str, tmp_path) -> None:
    model, gm, graph, x = _zoo(name)
    plan = _plan(graph)
    prune_channels(gm, plan=plan, round_to=1)
    torch.save(gm.state_dict(), tmp_path / "pruned.pt")

    # A fresh trace pruned with the same plan has the same architecture; scramble its weights
    # so that only loading can make it agree.
    fresh = trace(model, (torch.randn(ZOO_INPUT_SHAPE),))
    prune_channels(fresh, plan=plan, round_to=1)
    with torch.no_grad():
        for p in fresh.parameters():
            p.normal_()
        assert not torch.allclose(fresh(x), gm(x))
    fresh.load_state_dict(torch.load(tmp_path / "pruned.pt"), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), gm(x), atol=0, rtol=0)
    _assert_state_equal(_state(fresh), _state(gm))


@pytest.mark.parametrize("name", NAMES)
def test_empty_or_full_plan_is_a_no_op(name: str) -> None:
    _, gm, graph, x = _zoo(name)
    before = _state(gm)
    with torch.no_grad():
        y = gm(x)
    full = {g.id: list(range(g.channels)) for g in graph.groups}
    for options in ({"plan": {}, "round_to": 1}, {}, {"plan": full}):
        result = prune_channels(gm, **options)
        assert result.modified is False and result.gm is gm
    _assert_state_equal(before, _state(gm))
    with torch.no_grad():
        torch.testing.assert_close(gm(x), y, atol=0, rtol=0)


def _untied_wide(graph: ChannelGraph, gid: int) -> bool:
    """A group of >= 8 channels in which every producer has exactly one row per channel."""
    g = graph.groups[gid]
    sizes = {m.name: m.size for m in g.members}
    return g.channels >= 8 and all(sizes.get(f"{p}.weight[0]") == g.channels for p in g.producers)


@pytest.mark.parametrize("name", NAMES)
def test_round_to_8_rounds_kept_widths_up(name: str) -> None:
    _, gm, graph, _ = _zoo(name)
    plan = {k: v for k, v in _plan(graph, seed=1).items() if _untied_wide(graph, k)}
    if not plan:
        pytest.skip(f"{name} has no untied group of >= 8 channels")
    # Documented rounding: up to a multiple of 8 (at most the group's size), adding back the
    # lowest-index dropped channels when no scores are given.
    rounded = {}
    for gid, keep in plan.items():
        n = graph.groups[gid].channels
        want = min(n, -(-len(keep) // 8) * 8)
        back = [c for c in range(n) if c not in keep][: want - len(keep)]
        rounded[gid] = sorted([*keep, *back])
    expected = expected_state(gm, graph, rounded)
    prune_channels(gm, plan=plan, round_to=8)
    for gid, keep in rounded.items():
        width = len(keep)
        assert width % 8 == 0 or width == graph.groups[gid].channels
        assert width >= len(plan[gid])
        for p in graph.groups[gid].producers:
            assert gm.get_submodule(p).weight.shape[0] == width, p
    _assert_state_equal(_state(gm), expected)


# --- bad plans -----------------------------------------------------------------------------------
class SplitNet(nn.Module):
    """c1 (8) -> chunk: a = c1[0:4] goes straight to the cat, b = c1[4:8] feeds branch."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.branch = nn.Conv2d(4, 4, 3, padding=1)
        self.c3 = nn.Conv2d(8, 6, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        a, b = F.relu(self.c1(x)).chunk(2, dim=1)
        x = F.relu(self.c3(torch.cat([a, F.relu(self.branch(b))], dim=1)))
        return self.fc(torch.flatten(self.pool(x), 1))


@pytest.fixture
def split_net() -> tuple[fx.GraphModule, ChannelGraph, int, np.ndarray]:
    torch.manual_seed(0)
    gm = trace(SplitNet().eval(), (torch.randn(1, 3, 8, 8),))
    graph = build_channel_graph(gm)
    (site,) = [s for s in graph.sites if s.path == "c1.weight" and s.axis == 0]
    (gid,) = set(graph.atom_group[site.atoms].tolist())
    return gm, graph, gid, graph.atom_pos[site.atoms]


BAD_PLANS = [
    "unknown-id",
    "negative-id",
    "str-id",
    "unprunable",
    "keeps-none",
    "out-of-range",
    "negative-index",
    "duplicates",
    "empties-branch",
]


def _bad_plan(label: str, graph: ChannelGraph, gid: int, pos: np.ndarray):
    """(plan, pattern the PlanError message must match)."""
    n, count = graph.groups[gid].channels, len(graph.groups)
    input_gid = next(g.id for g in graph.groups if any("input" in r for r in g.reasons))
    return {
        "unknown-id": ({count: [0]}, rf"group {count}\b"),
        "negative-id": ({-1: [0]}, r"group -1\b"),
        "str-id": ({str(gid): [0]}, f"group '{gid}'"),
        "unprunable": ({input_gid: [0, 1]}, rf"group {input_gid} cannot be pruned.*network input"),
        "keeps-none": ({gid: []}, rf"keeps no channel of group {gid}"),
        "out-of-range": ({gid: [0, n]}, rf"group {gid} has channels 0\.\.{n - 1}"),
        "negative-index": ({gid: [-1, 0]}, rf"group {gid} has channels 0\.\.{n - 1}"),
        "duplicates": ({gid: [0, 0, 1]}, rf"group {gid} more than once"),
        # Every channel the branch reads (c1 4..7, chunk's half b) dropped: it has no input.
        "empties-branch": ({gid: sorted(pos[:4].tolist())}, r"every channel .* branch\.weight"),
    }[label]


@pytest.mark.parametrize("label", BAD_PLANS)
def test_bad_plans_raise_plan_error_and_leave_the_model_alone(split_net, label: str) -> None:
    gm, graph, gid, pos = split_net
    plan, pattern = _bad_plan(label, graph, gid, pos)
    before = _state(gm)
    with pytest.raises(PlanError, match=pattern) as info:
        prune_channels(gm, plan=plan, round_to=1)
    assert isinstance(info.value, ValueError) and isinstance(info.value, GraphpruneError)
    _assert_state_equal(before, _state(gm))


def test_dropping_the_half_nobody_else_reads_is_allowed(split_net) -> None:
    gm, graph, gid, pos = split_net
    torch.manual_seed(1)
    x = torch.randn(2, 3, 8, 8)
    plan = {gid: sorted(pos[4:].tolist())}  # a (c1 0..3) goes entirely; branch keeps b
    zero_dropped_channels(gm, graph, plan)
    with torch.no_grad():
        y = gm(x)
        prune_channels(gm, plan=plan, round_to=1)
        torch.testing.assert_close(gm(x), y, atol=1e-5, rtol=1e-5)
    assert gm.get_submodule("c1").out_channels == 4
    assert gm.get_submodule("c3").in_channels == 4
    assert gm.get_submodule("branch").in_channels == 4


# --- ops that map a zero channel to non-zero ---------------------------------------------
class Chain(nn.Module):
    def __init__(self, act, affine: bool = True) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8, affine=affine)
        self.act = act
        self.c2 = nn.Conv2d(8, 4, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.c2(self.act(self.bn(self.c1(x))))), 1))


def _add_one(t: torch.Tensor) -> torch.Tensor:
    return t + 1.0


def _clamp_min(t: torch.Tensor) -> torch.Tensor:
    return torch.clamp(t, min=0.5)


NON_ZERO_PRESERVING = {
    "bn-affine-false": lambda: Chain(nn.ReLU(), affine=False),
    "sigmoid": lambda: Chain(nn.Sigmoid()),
    "hardsigmoid": lambda: Chain(nn.Hardsigmoid()),
    "softplus": lambda: Chain(nn.Softplus()),
    "add-scalar": lambda: Chain(_add_one),
    "clamp-min": lambda: Chain(_clamp_min),
}


def test_chain_control_with_relu_is_exact() -> None:
    """The control for the xfail below: the same check passes with a zero-preserving op."""
    _check_exact_groups_prune_exactly(Chain(nn.ReLU()))


@pytest.mark.parametrize("case", sorted(NON_ZERO_PRESERVING))
def test_non_zero_preserving_ops_make_their_groups_inexact(case: str) -> None:
    """Zeroing c1's channels no longer zeroes what c2 reads (non-affine BN gives -mean/std,
    sigmoid(0) = 0.5, ...), so removing them is not exact and the group must say so."""
    gm = trace(NON_ZERO_PRESERVING[case]().eval(), (torch.randn(1, 3, 8, 8),))
    (c1,) = [g for g in analyze(gm) if g.producers == ("c1",)]
    assert c1.prunable and not c1.exact
    assert any("c2" in r for r in c1.inexact_reasons)
    # and the exact-only check then has nothing to remove, so it holds trivially
    _check_exact_groups_prune_exactly(NON_ZERO_PRESERVING[case]())


def test_zeroing_a_non_zero_preserving_chain_really_changes_the_output() -> None:
    """Why the groups above must be inexact: pruning them anyway changes the output."""
    torch.manual_seed(0)
    gm = trace(randomize_(Chain(nn.Sigmoid())).eval(), (torch.randn(1, 3, 8, 8),))
    graph = build_channel_graph(gm)
    (c1,) = [g for g in graph.groups if g.producers == ("c1",)]
    plan = {c1.id: [0, 1, 2, 3, 4]}
    zero_dropped_channels(gm, graph, plan)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        y = gm(x)
        prune_channels(gm, plan=plan, round_to=1)
        assert (gm(x) - y).abs().max() > 1e-3


def _check_exact_groups_prune_exactly(model: nn.Module) -> None:
    torch.manual_seed(0)
    gm = trace(randomize_(model).eval(), (torch.randn(1, 3, 8, 8),))
    graph = build_channel_graph(gm)
    (c1,) = [g for g in graph.groups if g.producers == ("c1",)]
    assert c1.prunable
    plan = {c1.id: [0, 1, 2, 3, 4]} if c1.exact else {}
    zero_dropped_channels(gm, graph, plan)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        y = gm(x)
        prune_channels(gm, plan=plan, round_to=1)
        torch.testing.assert_close(gm(x), y, atol=1e-5, rtol=1e-5)
