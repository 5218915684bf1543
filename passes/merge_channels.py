"""merge_channels: fold clusters of identical channels into one channel each (C-SGD's end).

When the channels of a cluster are identical producer-wise (every "out" entry: conv/linear
rows, biases, norm scales and shifts, layer scales; and every "stat" entry: norm running
statistics), they carry identical values everywhere, provided nothing between the producers
and the dense consumers mixes channels. A dense consumer is linear in its input channels,
so reading c identical copies through c weight slices equals reading one copy through their
sum. This pass adds the members' consumer slices ("in" sites) into the kept channel's and
zeroes theirs: the outputs do not change, and the other members, read by nobody any more,
are then removed exactly by prune_channels (plan = the kept channels).

What "nothing mixes channels" means, precisely (``mergeable_groups``): every op that reads one
of the group's channels either is a dense consumer (a conv with ``groups == 1`` or a linear:
its output is another group, its weight slice an "in" site) or keeps every channel position it
reads in its output (elementwise ops, norms with per-channel statistics, pooling, resizing,
concat/split/reshape/shuffle, depthwise and grouped convs, broadcast products with per-channel
or channel-free tensors) or selects all of the group's channels or none of them (getitem,
narrow: a split that sends some channels of the group one way and others another way would let
a cluster's members reach different consumers). Each such op computes a channel's output from
that channel alone and from per-channel entries that are "out"/"stat" sites, so identical
channels stay identical through it. An op that reduces, contracts or normalizes over the
channels (``x.sum(1)``, attention scores, softmax or LayerNorm over channels) reads the
channels without keeping them: such a group is not mergeable (summing copies is not the same as
reading one). Groups must also be exact (graph.groups[i].exact).
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import fx, nn

from graphprune.analysis import ChannelGraph, build_channel_graph
from graphprune.analysis.atoms import TensorChannels
from graphprune.errors import PlanError
from graphprune.frontend import meta
from graphprune.frontend.params import get_tensor
from graphprune.passes.runner import PassResult, graph_pass, shapes_recorded

# Members of a cluster count as identical when their entries differ by at most this fraction
# of the largest magnitude in that tensor (float32 averaging leaves exact copies; a user's
# "identical" channels computed another way may differ by rounding).
IDENTICAL_RTOL = 1e-6


def mergeable_groups(gm: fx.GraphModule, graph: ChannelGraph) -> dict[int, str | None]:
    """Prunable, exact group id -> None when merging its channels is exact, else the reason
    (the first node that reads its channels without keeping them; see the module docstring)."""
    out: dict[int, str | None] = {
        g.id: None if g.exact else "inexact group" for g in graph.groups if g.prunable
    }
    for node in gm.graph.nodes:
        if node.op == "output":
            read = _positions(graph, [graph.values.get(a) for a in node.all_input_nodes])
            for g in read:
                if g in out and out[g] is None:
                    out[g] = f"{node.name}: reaches the network output"
            continue
        if node.op not in ("call_module", "call_function", "call_method"):
            continue
        read = _positions(graph, [graph.values.get(a) for a in node.all_input_nodes])
        if not read or _dense_consumer(gm, node):
            continue
        if meta.shape(node) is None and meta.output_shapes(node) is None:
            continue  # reads sizes, not values
        kept = _positions(graph, [graph.values.get(node)])
        select = node.target in _SELECTIONS
        for g, pos in read.items():
            if g not in out or out[g] is not None:
                continue
            got = pos & kept.get(g, set())
            if select and got and got != pos:
                out[g] = f"{node.name} ({_name(node)}) sends the channels down different paths"
            elif not select and (got != pos or node.target in _MIXERS):
                out[g] = f"{node.name} ({node.op} {_name(node)}) mixes or drops the channels"
    return out


@graph_pass(requires=(shapes_recorded,), preserves_outputs=True)
def merge_channels(
    gm: fx.GraphModule, *, clusters: Mapping[int, Sequence[Sequence[int]]]
) -> PassResult:
    """Fold each cluster of identical channels into its first member.

    ``clusters``: group id -> clusters, each a sequence of channel indices (the first is
    kept); channels in no cluster are left alone. Raises PlanError when a group is not
    mergeable (``mergeable_groups``) or a cluster's members are not identical at every
    "out" and "stat" site.
    Before: consumers read channels a, b (identical) through slices W[:, a], W[:, b].
    After: W[:, a] = W[:, a] + W[:, b], W[:, b] = 0; outputs unchanged; then
    ``prune_channels(plan={g: first members and unclustered channels})`` removes b exactly.
    """
    graph = build_channel_graph(gm)
    ok = mergeable_groups(gm, graph)
    pairs: dict[int, list[tuple[int, int]]] = {}  # group -> (kept channel, merged channel)
    for g, cl in clusters.items():
        if ok.get(g, "not prunable") is not None:
            raise PlanError(
                f"group {g} cannot be merged exactly: {ok.get(g, 'not prunable')} "
                "(leave it out of clusters)"
            )
        seen: set[int] = set()
        for members in cl:
            members = [int(c) for c in members]
            if (
                not members
                or seen & set(members)
                or not all(0 <= c < graph.groups[g].channels for c in members)
            ):
                raise PlanError(f"group {g}: clusters must be disjoint, non-empty, in range")
            seen |= set(members)
            pairs.setdefault(g, []).extend((members[0], c) for c in members[1:])
    _check_identical(gm, graph, pairs)
    merged = 0
    with torch.no_grad():
        for s in graph.sites:
            if s.role != "in":
                continue
            gids, pos = graph.positions(s.atoms.reshape(-1))
            t = get_tensor(gm, s.path)
            for g, ps in pairs.items():
                for keep, gone in ps:
                    a = torch.from_numpy(np.nonzero((gids == g) & (pos == keep))[0])
                    b = torch.from_numpy(np.nonzero((gids == g) & (pos == gone))[0])
                    if len(a) != len(b):
                        raise PlanError(f"group {g}: channels {keep} and {gone} differ at {s.path}")
                    if len(b):
                        t.index_add_(s.axis, a, t.index_select(s.axis, b))
                        t.index_fill_(s.axis, b, 0.0)
    merged = sum(len(ps) for ps in pairs.values())
    return PassResult(gm, merged > 0, {"merged_channels": merged})


def _check_identical(gm, graph: ChannelGraph, pairs: Mapping[int, list[tuple[int, int]]]):
    for s in graph.sites:
        if s.role not in ("out", "stat"):
            continue
        gids, pos = graph.positions(s.atoms.reshape(-1))
        t = get_tensor(gm, s.path).detach()
        scale = float(t.abs().max()) if t.numel() else 0.0
        for g, ps in pairs.items():
            for keep, gone in ps:
                a = np.nonzero((gids == g) & (pos == keep))[0]
                b = np.nonzero((gids == g) & (pos == gone))[0]
                if len(a) != len(b):
                    raise PlanError(f"group {g}: channels {keep} and {gone} differ at {s.path}")
                if not len(a):
                    continue
                diff = t.index_select(s.axis, torch.from_numpy(a)) - t.index_select(
                    s.axis, torch.from_numpy(b)
                )
                if float(diff.abs().max()) > IDENTICAL_RTOL * scale:
                    raise PlanError(
                        f"group {g}: channels {keep} and {gone} are not identical at {s.path} "
                        f"(max difference {float(diff.abs().max()):.3g}); make each cluster "
                        "identical first (C-SGD averages them at finalize)"
                    )


def _positions(graph: ChannelGraph, values: list[object]) -> dict[int, set[int]]:
    """Group id -> channel indices present in the values (tensors, or lists of them)."""
    found: dict[int, set[int]] = {}
    stack = list(values)
    while stack:
        v = stack.pop()
        if isinstance(v, (list, tuple)):
            stack.extend(v)
        elif isinstance(v, TensorChannels) and v.dims:
            gids, pos = graph.positions(np.asarray(v.all_atoms()).reshape(-1))
            for g in np.unique(gids).tolist():
                found.setdefault(g, set()).update(pos[gids == g].tolist())
    return found


# Ops whose every output element is one input element (a split's part, a slice): they may
# drop channel positions without mixing any.
_SELECTIONS = (operator.getitem, "narrow", torch.narrow)
# Ops that keep the channel positions of one input but mix channels across inputs: attention
# takes the dot product of query and key channels (and scales it by their count), so two equal
# channels are not one channel counted twice.
_MIXERS = (torch.nn.functional.scaled_dot_product_attention,)


def _dense_consumer(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A conv with groups == 1 or a linear: linear in its input channels ("in" sites)."""
    if node.op != "call_module":
        return False
    m = gm.get_submodule(node.target)
    if isinstance(m, nn.Linear):
        return True
    return isinstance(m, nn.modules.conv._ConvNd) and m.groups == 1


def _name(node: fx.Node) -> str:
    t = node.target
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))
