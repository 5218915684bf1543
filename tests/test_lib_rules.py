"""Rules for how model libraries write their layers: functional norms, attention, GRN, ...

Each check compares against something independent of the rule under test: the same network
through torch.nn modules (whose rules the zoo tests cover), or outputs of the unpruned model.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from graphprune import trace
from graphprune.analysis import build_channel_graph, prune_whole_heads
from graphprune.passes import prune_channels
from graphprune.passes.runner import verify
from graphprune.testing.exactness import random_plan, randomize_, zero_dropped_channels
from graphprune.testing.zoo import ZOO_INPUT_SHAPE
from graphprune.testing.zoo_libs import ConvNeXtV2, FunctionalNorms, ResNeSt, ViT


def _traced(model: nn.Module):
    torch.manual_seed(0)
    gm = trace(model.eval(), (torch.randn(ZOO_INPUT_SHAPE),))
    return gm, build_channel_graph(gm)


def _summary(graph, rename: tuple[str, str] = ("", "")):
    def members(g):
        return sorted((m.name.replace(*rename), m.role, m.size) for m in g.members)

    return [(g.channels, members(g), g.producers, g.prunable, g.exact) for g in graph.groups]


def test_functional_norms_group_and_prune_like_the_torch_nn_modules() -> None:
    """F.batch_norm / F.group_norm / F.layer_norm on a module's own parameters couple and
    shrink exactly as BatchNorm2d / GroupNorm / LayerNorm modules do, inexact groups included
    (a LayerNorm group pruned changes the output, but both forms must change it alike)."""
    torch.manual_seed(0)
    functional = randomize_(FunctionalNorms(functional=True))
    modules = FunctionalNorms(functional=False)
    state = {k.replace("ln.", "ln.norm."): v for k, v in functional.state_dict().items()}
    modules.load_state_dict(state)
    gm_f, graph_f = _traced(functional)
    gm_m, graph_m = _traced(modules)
    assert _summary(graph_f) == _summary(graph_m, rename=("ln.norm.", "ln."))
    ln = [g for g in graph_f.groups if any(m.name == "ln.weight[0]" for m in g.members)]
    gn = [g for g in graph_f.groups if any(m.name == "gn.weight[0]" for m in g.members)]
    assert len(ln) == 1 and ln[0].prunable and not ln[0].exact
    # conv1 -> gn -> depthwise conv2 -> ln: one group whose unit is a whole norm group of 8
    assert gn == ln and gn[0].channels == 4

    plan = random_plan(graph_f, np.random.default_rng(3), exact_only=False)
    assert ln[0].id in plan and len(plan[ln[0].id]) < 4
    x = torch.randn(2, *ZOO_INPUT_SHAPE[1:])
    prune_channels(gm_f, plan=plan, round_to=1)
    prune_channels(gm_m, plan=plan, round_to=1)
    verify(gm_f)
    with torch.no_grad():
        torch.testing.assert_close(gm_f(x), gm_m(x), atol=1e-5, rtol=1e-5)
    # The functional calls' baked-in widths follow (the module form's attributes are
    # covered by the module rules).
    (gn_node,) = [n for n in gm_f.graph.nodes if n.target is F.group_norm]
    assert gn_node.args[1] == len(plan[gn[0].id])
    (ln_node,) = [n for n in gm_f.graph.nodes if n.target is F.layer_norm]
    assert tuple(ln_node.args[1]) == (8 * len(plan[ln[0].id]),)


def test_grn_groups_are_inexact_and_prune_like_a_narrower_model() -> None:
    """GRN divides by the channel mean, so its groups are inexact; pruned, the model must
    equal the same architecture built narrower with the kept channels' weights."""
    torch.manual_seed(0)
    model = ConvNeXtV2().eval()
    gm, graph = _traced(model)
    grn0 = _group_with(graph, "grn0.weight[0]")
    grn = _group_with(graph, "grn.weight[0]")
    assert grn0.prunable and not grn0.exact and any("mean" in r for r in grn0.inexact_reasons)
    assert grn.prunable and not grn.exact
    assert {"grn0.bias[0]", "stem.1.weight[0]", "fc2.weight[0]"} <= _names(grn0)
    assert {"grn.bias[0]", "fc1.weight[0]", "fc2.weight[1]"} <= _names(grn)
    keep0, keep = [0, 3, 4, 9, 10, 15], list(range(0, 32, 3))
    prune_channels(gm, plan={grn0.id: keep0, grn.id: keep}, round_to=1)
    verify(gm)

    narrow = _narrow_copy(model, ConvNeXtV2(c=len(keep0), hidden=len(keep)), {16: keep0, 32: keep})
    x = torch.randn(2, *ZOO_INPUT_SHAPE[1:])
    with torch.no_grad():
        torch.testing.assert_close(gm(x), narrow(x), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(gm(x), model(x), atol=1e-3)  # pruning did change it


def _narrow_copy(model: nn.Module, narrow: nn.Module, keep: dict[int, list[int]]) -> nn.Module:
    """``narrow`` (the same architecture, built narrower) with ``model``'s weights of the
    kept channels: along each axis whose size differs, the indices ``keep[old size]``."""
    state = {}
    for name, t in model.state_dict().items():
        want = narrow.state_dict()[name].shape
        for axis in range(t.dim()):
            if t.shape[axis] != want[axis]:
                t = t.index_select(axis, torch.tensor(keep[t.shape[axis]]))
        state[name] = t
    narrow.load_state_dict(state)
    return narrow.eval()


def _group_with(graph, member: str):
    (group,) = [g for g in graph.groups if member in _names(g)]
    return group


def _names(group) -> set[str]:
    return {m.name for m in group.members}


@pytest.mark.parametrize("kind", ["explicit", "sdpa", "split"])
def test_whole_heads_prune_q_k_v_rows_and_projection_columns_of_a_head_together(
    kind: str,
) -> None:
    """prune_whole_heads: a channel is one head (its 24 qkv rows, its 8 proj inputs). Removing
    heads 1 and 2 keeps exactly the rows of heads 0 and 3, the reshapes' heads count follows,
    and the outputs equal the dense model's with those heads zeroed."""
    torch.manual_seed(0)
    model = randomize_(ViT(kind=kind)).eval()
    x = torch.randn(2, *ZOO_INPUT_SHAPE[1:])
    gm = prune_whole_heads(trace(model, (x,)))
    graph = build_channel_graph(gm)
    qkv = _group_with(graph, "blocks.0.attn.qkv.weight[0]")
    sizes = {m.name: m.size for m in qkv.members}
    assert qkv.prunable and qkv.exact and qkv.channels == 4  # heads, not head dims
    assert sizes == {
        "blocks.0.attn.qkv.weight[0]": 96,
        "blocks.0.attn.qkv.bias[0]": 96,
        "blocks.0.attn.proj.weight[1]": 32,
    }
    dense_qkv = model.blocks[0]["attn"].qkv.weight.detach().clone()
    plan = {qkv.id: [0, 3]}
    zero_dropped_channels(gm, graph, plan)
    with torch.no_grad():
        zeroed = gm(x)
        prune_channels(gm, plan=plan, round_to=1)
        torch.testing.assert_close(gm(x), zeroed, atol=1e-5, rtol=1e-5)
    # Rows of heads 0 and 3: (3, heads, head_dim) for the qkv layout, (heads, q|k|v) for split.
    if kind == "split":
        rows = [h * 24 + j for h in (0, 3) for j in range(24)]
    else:
        rows = [s * 32 + h * 8 + d for s in range(3) for h in (0, 3) for d in range(8)]
    torch.testing.assert_close(gm.get_submodule("blocks.0.attn.qkv").weight, dense_qkv[rows])
    assert gm.get_submodule("blocks.0.attn.proj").in_features == 16
    assert gm.get_submodule("blocks.1.attn.qkv").out_features == 96  # the other block: whole


def test_a_batched_matmul_whose_heads_meet_channels_on_one_side_only_is_refused() -> None:
    """Whole heads: q's heads against a key tensor that carries no channels would drop slices
    of one operand only, so the heads stay (blocked), never guessed."""

    class QueryOnly(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q = nn.Linear(8, 8)

        def forward(self, x):
            q = self.q(x.transpose(1, 2)).reshape(x.shape[0], 3, 4, 2).transpose(1, 2)
            return (q @ torch.ones(4, 2, 5, device=x.device)).sum()  # no channels

    gm = prune_whole_heads(trace(QueryOnly().eval(), (torch.randn(2, 8, 3),)))
    (group,) = [g for g in build_channel_graph(gm).groups if "q" in g.producers]
    assert not group.prunable
    assert any("one side only" in r for r in group.reasons)


@pytest.mark.parametrize("kind", ["explicit", "sdpa", "split"])
def test_attention_prunes_head_dims_in_every_head_and_q_k_v_alike(kind: str) -> None:
    """A channel of a qkv group is one head-dim position, in every head (4) and, for the
    (3, heads, head_dim) layout, in q, k and v: 12 qkv rows and 4 proj inputs per channel."""
    torch.manual_seed(0)
    gm, graph = _traced(ViT(kind=kind))
    qkv = _group_with(graph, "blocks.0.attn.qkv.weight[0]")
    sizes = {m.name: m.size for m in qkv.members}
    assert qkv.prunable and qkv.exact and qkv.producers == ("blocks.0.attn.qkv",)
    if kind == "split":  # LeViT: q/k positions tie (their dot product), v positions apart
        assert qkv.channels == 16
    else:
        assert qkv.channels == 8 and sizes["blocks.0.attn.qkv.weight[0]"] == 96
    assert sizes["blocks.0.attn.proj.weight[1]"] == 32
    x = torch.randn(2, *ZOO_INPUT_SHAPE[1:])
    plan = {qkv.id: [0, 2, 3, 5, 6, 7] + ([] if kind != "split" else list(range(8, 16)))}
    zero_dropped_channels(gm, graph, plan)
    with torch.no_grad():
        zeroed = gm(x)
        prune_channels(gm, plan=plan, round_to=1)
        torch.testing.assert_close(gm(x), zeroed, atol=1e-5, rtol=1e-5)
    if kind == "split":  # q/k positions 1 and 4 went (from every head); v kept whole
        assert gm.get_submodule("blocks.0.attn.proj").in_features == 32
        assert gm.get_submodule("blocks.0.attn.qkv").out_features == 96 - 2 * 2 * 4
    else:
        assert gm.get_submodule("blocks.0.attn.proj").in_features == 24
        assert gm.get_submodule("blocks.0.attn.qkv").out_features == 72


def test_split_attention_prunes_the_same_positions_in_every_radix_split() -> None:
    """ResNeSt's grouped conv (groups = radix) feeds a (radix, c) view: a channel is position
    j of every split (and input position i of every conv group), so the block stays prunable
    (whole groups would collapse it into one channel) and the conv keeps its groups."""
    torch.manual_seed(0)
    gm, graph = _traced(randomize_(ResNeSt()))
    splits = _group_with(graph, "splat.conv.weight[0]")
    reduce = _group_with(graph, "reduce.0.weight[0]")
    assert splits.prunable and splits.exact and splits.channels == 8
    assert {m.name: m.size for m in splits.members}["splat.conv.weight[0]"] == 16
    assert reduce.prunable and reduce.exact and reduce.channels == 4  # 8 inputs / 2 groups
    assert {m.name: m.size for m in reduce.members}["splat.conv.weight[1]"] == 4
    x = torch.randn(2, *ZOO_INPUT_SHAPE[1:])
    plan = {splits.id: [1, 2, 4, 7], reduce.id: [0, 3]}
    zero_dropped_channels(gm, graph, plan)
    with torch.no_grad():
        zeroed = gm(x)
        prune_channels(gm, plan=plan, round_to=1)
        verify(gm)
        torch.testing.assert_close(gm(x), zeroed, atol=1e-5, rtol=1e-5)
    conv = gm.get_submodule("splat.conv")
    assert (conv.groups, conv.in_channels, conv.out_channels) == (2, 4, 8)
    assert tuple(conv.weight.shape) == (8, 2, 3, 3)
    assert gm.get_submodule("splat.fc2").out_channels == 8


class _Shift(nn.Module):
    """scale * x + bias with learnable parameters: one value shared by every channel
    (timm's LearnableAffineBlock, after the activations of HGNet), or one per channel."""

    def __init__(self, channels: int = 1) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.full((channels, 1, 1), 1.3))
        self.bias = nn.Parameter(torch.full((channels, 1, 1), 0.2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * x + self.bias


def _shifted_net(shift_channels: int) -> nn.Module:
    return randomize_(
        nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            _Shift(shift_channels),
            nn.Conv2d(8, 4, 3, padding=1),
        )
    )


def test_a_shift_shared_by_every_channel_makes_the_group_inexact() -> None:
    # A zeroed channel comes out of the shared shift as the constant 0.2, which the 3x3
    # padded consumer sees; removing the channel loses it. The group must say so (masking
    # methods and ResRep then leave it alone), and the difference must be real.
    gm, graph = _traced(_shifted_net(1))
    (group,) = [g for g in graph.groups if g.producers == ("0",)]
    assert group.prunable and not group.exact
    assert any("non-zero even when zeroed" in r for r in group.inexact_reasons)
    x = torch.randn(ZOO_INPUT_SHAPE)
    plan = {group.id: np.arange(1, 8)}
    with torch.no_grad():
        zero_dropped_channels(gm, graph, plan)
        zeroed = gm(x)
        pruned = prune_channels(gm, plan=plan, round_to=1).gm(x)
    assert not torch.allclose(pruned, zeroed, atol=1e-3)
    # With a shift per channel, its entries are the channel's own: zeroed with it, exact.
    gm, graph = _traced(_shifted_net(8))
    (group,) = [g for g in graph.groups if g.producers == ("0",)]
    assert group.prunable and group.exact
    with torch.no_grad():
        zero_dropped_channels(gm, graph, plan)
        zeroed = gm(x)
        pruned = prune_channels(gm, plan=plan, round_to=1).gm(x)
    torch.testing.assert_close(pruned, zeroed, atol=1e-5, rtol=1e-5)


class _SharedDepthwise(nn.Module):
    """Two blocks that call one depthwise conv (timm's CoaT shares its ConvRelPosEnc convs
    between the serial blocks of a stage)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 12, 1)
        self.b = nn.Conv2d(3, 12, 1)
        self.dw = nn.Conv2d(12, 12, 3, padding=1, groups=12)
        self.head = nn.Conv2d(12, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dw(self.a(x)) * self.dw(self.b(x)))


def test_a_module_called_twice_shrinks_once_and_stays_exact() -> None:
    # Shrinking at the second call read the attributes the first call had already changed
    # (12 channels as 7 groups) and failed. Both calls share the sliced weights.
    gm, graph = _traced(randomize_(_SharedDepthwise()))
    (group,) = [g for g in graph.groups if "dw.weight[0]" in {m.name for m in g.members}]
    assert group.prunable and group.exact and set(group.producers) >= {"a", "b"}
    plan = {group.id: [0, 2, 3, 5, 8, 9, 11]}
    x = torch.randn(2, *ZOO_INPUT_SHAPE[1:])
    with torch.no_grad():
        zero_dropped_channels(gm, graph, plan)
        zeroed = gm(x)
        prune_channels(gm, plan=plan, round_to=1)
        verify(gm)
        torch.testing.assert_close(gm(x), zeroed, atol=1e-5, rtol=1e-5)
    dw = gm.get_submodule("dw")
    assert (dw.in_channels, dw.out_channels, dw.groups) == (7, 7, 7)


class _RowLSTM(nn.Module):
    """A bidirectional LSTM over the rows of a feature map, added back to it (timm's
    Sequencer2d: BiLSTM2D between channel MLPs)."""

    def __init__(self, layers: int = 1) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 12, 3, padding=1)
        self.rnn = nn.LSTM(12, 5, num_layers=layers, batch_first=True, bidirectional=True)
        self.fc = nn.Linear(10, 12)
        self.head = nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x).permute(0, 2, 3, 1)
        b, h, w, c = x.shape
        rows, _ = self.rnn(x.reshape(b * h, w, c))
        x = x + self.fc(rows.reshape(b, h, w, -1))
        return self.head(x.mean((1, 2)))


@pytest.mark.parametrize("layers", [1, 2])
def test_a_recurrent_layer_prunes_its_input_features_exactly(layers: int) -> None:
    """The features an LSTM reads are columns of its first layer's input weights (both
    directions); its hidden units stay. Removing zeroed features leaves the outputs as they
    were, the module runs on its new weights, and the MAC model predicts what is counted."""
    from graphprune import count_macs
    from graphprune.planning.selection import MacsModel

    torch.manual_seed(0)
    model = _RowLSTM(layers).eval()
    gm, graph = _traced(model)
    (stream,) = [g for g in graph.groups if "rnn.weight_ih_l0[1]" in {m.name for m in g.members}]
    assert stream.prunable and stream.exact
    assert "rnn.weight_ih_l0_reverse[1]" in {m.name for m in stream.members}
    hidden = [g for g in graph.groups if "rnn" in g.producers]
    assert hidden and not any(g.prunable for g in hidden)
    plan = {stream.id: [0, 1, 4, 6, 7, 10, 11]}
    x = torch.randn(2, *ZOO_INPUT_SHAPE[1:])
    dense = count_macs(gm, (torch.randn(ZOO_INPUT_SHAPE),))
    assert dense.per_layer["fc"] > 0  # a Linear on a reshaped LSTM output runs as bmm
    predicted = MacsModel(graph, dense.per_layer)
    predicted.set_kept(stream.id, np.asarray(plan[stream.id]))
    with torch.no_grad():
        zero_dropped_channels(gm, graph, plan)
        zeroed = gm(x)
        prune_channels(gm, plan=plan, round_to=1)
        verify(gm)
        torch.testing.assert_close(gm(x), zeroed, atol=1e-5, rtol=1e-5)
    rnn = gm.get_submodule("rnn")
    assert rnn.input_size == 7 and rnn.weight_ih_l0_reverse.shape == (20, 7)
    counted = count_macs(gm, (torch.randn(ZOO_INPUT_SHAPE),))
    assert counted.per_layer["rnn"] < dense.per_layer["rnn"]
    assert counted.macs == pytest.approx(predicted.macs)


class _PoolFormerV2(nn.Module):
    """timm's PoolFormerV2 block, small: GroupNorm with one group (a LayerNorm over C, H, W),
    pooling token mixer, and an MLP whose StarReLU squares a ReLU (``x ** 2``)."""

    def __init__(self, c: int = 16, hidden: int = 32) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.norm1, self.norm2 = nn.GroupNorm(1, c), nn.GroupNorm(1, c)
        self.pool = nn.AvgPool2d(3, 1, 1, count_include_pad=False)
        self.fc1, self.fc2 = nn.Conv2d(c, hidden, 1), nn.Conv2d(hidden, c, 1)
        self.head = nn.Linear(c, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = self.norm1(x)
        x = x + self.pool(y) - y
        x = x + self.fc2(0.8 * F.relu(self.fc1(self.norm2(x))) ** 2)
        return self.head(x.mean((2, 3)))


def test_one_group_groupnorm_and_a_square_prune_like_a_narrower_model() -> None:
    """A one-group GroupNorm lets any channel go (its statistics change: inexact), as
    LayerNorm does, instead of tying every channel into one; ``x ** 2`` passes channels
    through. Pruned, the model equals the same architecture built narrower."""
    torch.manual_seed(0)
    model = randomize_(_PoolFormerV2()).eval()
    gm, graph = _traced(model)
    stream = _group_with(graph, "norm1.weight[0]")
    hidden = _group_with(graph, "fc1.weight[0]")
    assert stream.prunable and stream.channels == 16 and not stream.exact
    assert {"stem.weight[0]", "norm2.weight[0]", "fc2.weight[0]"} <= _names(stream)
    assert hidden.prunable and hidden.exact and hidden.channels == 32
    keep_c, keep_h = [0, 2, 3, 7, 8, 13, 14], list(range(1, 32, 3))
    prune_channels(gm, plan={stream.id: keep_c, hidden.id: keep_h}, round_to=1)
    verify(gm)
    assert gm.get_submodule("norm1").num_groups == 1

    narrow = _narrow_copy(model, _PoolFormerV2(len(keep_c), len(keep_h)), {16: keep_c, 32: keep_h})
    x = torch.randn(2, *ZOO_INPUT_SHAPE[1:])
    with torch.no_grad():
        torch.testing.assert_close(gm(x), narrow(x), atol=1e-5, rtol=1e-5)


class CatOfSplit(nn.Module):
    """timm's BAT (non_local_attn.py): ``torch.cat(torch.split(x, 1, dim=1), dim=3)`` passes
    split's output to cat as one traced value, not a list."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)
        self.c = nn.Conv2d(4, 6, 1)

    def forward(self, x):
        y = self.b(torch.relu(self.a(x)))
        z = torch.cat(torch.split(y, 1, dim=1), dim=3)  # (B, 1, H, 4W)
        return self.c(y) + z.mean()


def test_cat_of_a_traced_sequence_leaves_its_channels_unpruned_and_the_rest_prunable() -> None:
    gm, graph = _traced(CatOfSplit())
    by_producer = {g.producers: g for g in graph.groups}
    assert not by_producer[("b",)].prunable
    assert any("traced sequence" in r for r in by_producer[("b",)].reasons)
    assert by_producer[("a",)].prunable and by_producer[("a",)].exact
    plan = {by_producer[("a",)].id: [0, 2, 5]}
    x = torch.randn(2, *ZOO_INPUT_SHAPE[1:])
    zero_dropped_channels(gm, graph, plan)
    with torch.no_grad():
        zeroed = gm(x)
        prune_channels(gm, plan=plan, round_to=1)
        torch.testing.assert_close(gm(x), zeroed, atol=1e-5, rtol=1e-5)
