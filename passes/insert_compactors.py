"""insert_compactors: put an identity ResRep compactor behind each prunable group's producers."""

from __future__ import annotations

import numpy as np
import torch
from torch import fx, nn

from graphprune.analysis import ChannelGraph, build_channel_graph
from graphprune.frontend.params import canonical_paths
from graphprune.passes.compactor import Compactor
from graphprune.passes.runner import PassResult, graph_pass, shapes_recorded


def compactable_groups(gm: fx.GraphModule, graph: ChannelGraph, internal_only: bool = False):
    """Groups ResRep can prune losslessly: every channel source is a dense Conv2d called once.

    Groups with depthwise/grouped convs, linear layers or inexact norms are left out: a
    compactor cannot be folded into them. ``internal_only`` keeps the paper's choice of
    single-producer groups (no residual-coupled ones).
    """
    calls: dict[str, list[fx.Node]] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            calls.setdefault(str(n.target), []).append(n)
    out_atoms = {
        s.path[: -len(".weight")]: s.atoms
        for s in graph.sites
        if s.role == "out" and s.axis == 0 and s.path.endswith(".weight")
    }
    aliases = canonical_paths(gm)  # a tied producer's weight is recorded under its first path
    result = []
    for g in graph.groups:
        if not (g.prunable and g.exact and g.producers) or (internal_only and len(g.producers) > 1):
            continue
        kinds = {graph.sources[i] for i in np.unique(graph.atom_source[graph.atom_group == g.id])}
        if any(kind != "producer" for _, kind in kinds):
            continue
        ok = all(
            type(gm.get_submodule(p)) is nn.Conv2d
            and gm.get_submodule(p).groups == 1
            and len(calls.get(p, [])) == 1
            for p in g.producers
        )
        if ok and not _foreign_out_members(gm, graph, g.id, set(g.producers), calls):
            result.append(
                (
                    g.id,
                    [
                        (calls[p][0], graph.atom_pos[out_atoms[_owner(aliases, p)]])
                        for p in g.producers
                    ],
                )
            )
    return result


def _owner(aliases: dict[str, str], producer: str) -> str:
    return aliases.get(f"{producer}.weight", f"{producer}.weight")[: -len(".weight")]


def _foreign_out_members(gm, graph: ChannelGraph, gid: int, producers: set[str], calls) -> bool:
    """True if a channel of the group is shaped by anything but its producers and the
    BatchNorms right behind them (a GroupNorm, a layer scale, a BN after an add): zeroing a
    compactor row would not make such a channel zero, so it could not be removed."""
    for s in graph.sites:
        if s.role != "out" or not (graph.atom_group[s.atoms.reshape(-1)] == gid).any():
            continue
        owner = s.path.rpartition(".")[0]
        if owner in producers:
            continue
        module = gm.get_submodule(owner) if owner else None
        node = calls.get(owner, [None])[0]
        follows_producer = (
            isinstance(module, nn.modules.batchnorm._BatchNorm)
            and node is not None
            and node.args[0].op == "call_module"
            and str(node.args[0].target) in producers
            and len(node.args[0].users) == 1
        )
        if not follows_producer:
            return True
    return False


@graph_pass(requires=(shapes_recorded,), preserves_outputs=True)
def insert_compactors(gm: fx.GraphModule, *, internal_only: bool = False) -> PassResult:
    """Insert an identity 1x1 compactor after the norm (before the activation) of each producer.

    Before: conv -> BN -> act      After: conv -> BN -> compactor(I) -> act; outputs unchanged.
    ``internal_only`` keeps the paper's choice of single-producer groups. A residual-coupled
    group gets one compactor per producer; their ``channel_index`` buffers map rows to the
    group's channels so one shared mask can be applied.
    """
    graph = build_channel_graph(gm)
    inserted = 0
    for gid, producers in compactable_groups(gm, graph, internal_only):
        for node, positions in producers:
            after = node
            users = list(node.users)
            if (
                len(users) == 1
                and users[0].op == "call_module"
                and isinstance(gm.get_submodule(users[0].target), nn.modules.batchnorm._BatchNorm)
            ):
                after = users[0]
            conv = gm.get_submodule(node.target)
            name = f"{node.target}_compactor"
            compactor = Compactor(conv.out_channels, gid, torch.as_tensor(positions))
            gm.add_submodule(name, compactor.to(conv.weight.device, conv.weight.dtype))
            with gm.graph.inserting_after(after):
                new = gm.graph.call_module(name, (after,))
            after.replace_all_uses_with(new, delete_user_cb=lambda user, new=new: user is not new)
            inserted += 1
    return PassResult(gm, inserted > 0, {"compactors": inserted})
