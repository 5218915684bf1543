"""Dependency analysis: which channels of a traced model must be pruned together.

``build_channel_graph`` walks the fx graph once in topological order, applying each op's
channel rule (``graphprune.analysis.rules``) to a ``Builder``; the atom classes it ends with
are grouped into the connected components of the dependency graph. ``analyze`` returns the
``ChannelGroup`` values: pure, deterministic, cheap to recompute.
"""

from __future__ import annotations

from collections import defaultdict

import networkx as nx
import numpy as np
from torch import fx

from graphprune.analysis.atoms import unique_pairs
from graphprune.analysis.builder import PRUNE_HEADS, Builder, ChannelGraph, ChannelGroup, Member
from graphprune.analysis.rules import apply_rule
from graphprune.errors import TraceError
from graphprune.frontend import meta


def build_channel_graph(gm: fx.GraphModule, *, strict: bool = False) -> ChannelGraph:
    """Apply every node's channel rule and group the resulting atom classes."""
    b = Builder(gm, strict=strict, prune_heads=bool(gm.meta.get(PRUNE_HEADS, False)))
    for node in gm.graph.nodes:
        b.values[node] = apply_rule(b, node)
    return _group(b)


def prune_whole_heads(gm: fx.GraphModule, on: bool = True) -> fx.GraphModule:
    """Make every later analysis of ``gm`` prune attention by whole heads instead of head dims.

    A channel dim reshaped into a grid, such as a qkv Linear's (3, heads, head_dim) or a
    projection's (heads, head_dim), can lose positions along one dim of the grid only, so
    the kept channels stay a grid. By default that is the last dim (head dims: position j of
    every head). With this setting it is the second-to-last (heads: every q, k and v row of
    head h, and head h's input columns of the output projection). The setting is stored on
    ``gm`` so that the passes that analyze it again (prune_channels, insert_compactors) see
    the same groups. It applies to every such grid of the model, including a channel
    shuffle's (groups, channels per group), which then prunes whole shuffle groups.
    """
    gm.meta[PRUNE_HEADS] = bool(on)
    return gm


def analyze(gm: fx.GraphModule, *, strict: bool = False) -> list[ChannelGroup]:
    """The channel groups of a traced model (see ``graphprune.trace``)."""
    if not any(meta.SHAPE in n.meta for n in gm.graph.nodes):
        raise TraceError("analyze() needs a GraphModule from graphprune.trace() (with shapes)")
    return build_channel_graph(gm, strict=strict).groups


def _group(b: Builder) -> ChannelGraph:
    """Groups are the connected components of the dependency graph whose nodes are the ops
    that create channels (sources) and whose edges join two sources sharing a channel class.
    """
    roots = b.uf.roots()
    source_of = np.asarray(b.source_of, dtype=np.int64)
    classes, class_of_atom = np.unique(roots, return_inverse=True)
    pairs = unique_pairs(class_of_atom, source_of)  # sorted by class
    same_class = pairs[0, 1:] == pairs[0, :-1]
    deps = nx.Graph()
    deps.add_nodes_from(range(len(b.sources)))
    # Many classes join the same two sources (every channel of a conv and its depthwise conv).
    edges = unique_pairs(pairs[1, :-1][same_class], pairs[1, 1:][same_class])
    deps.add_edges_from(zip(edges[0].tolist(), edges[1].tolist(), strict=True))
    # Sources are numbered in graph order, so ordering by the first source is deterministic.
    components = list(nx.connected_components(deps))
    comps = sorted(min(c) for c in components)
    rank = {first: i for i, first in enumerate(comps)}
    source_group = np.empty(len(b.sources), dtype=np.int64)
    for comp in components:
        source_group[list(comp)] = rank[min(comp)]
    class_group = np.empty(len(classes), dtype=np.int64)
    class_group[pairs[0]] = source_group[pairs[1]]
    order = np.lexsort((np.arange(len(classes)), class_group))  # by group, then class age
    starts = np.concatenate([[0], np.cumsum(np.bincount(class_group, minlength=len(comps)))])
    class_pos = np.empty(len(classes), dtype=np.int64)
    class_pos[order] = np.arange(len(classes)) - starts[class_group[order]]
    atom_group, atom_pos = class_group[class_of_atom], class_pos[class_of_atom]
    channels_of = np.bincount(class_group, minlength=len(comps))

    members: dict[int, list[Member]] = {gid: [] for gid in range(len(comps))}
    for s in b.sites:
        for gid in sorted(set(atom_group[s.atoms.reshape(-1)].tolist())):
            size = int(np.sum(atom_group[s.atoms] == gid))
            members[gid].append(Member(f"{s.path}[{s.axis}]", s.role, size))

    atoms_of = np.split(
        np.argsort(atom_group, kind="stable"), np.cumsum(np.bincount(atom_group))[:-1]
    )
    blocked_by_group: dict[int, set[str]] = defaultdict(set)
    for a, reason in b.blocked.items():
        blocked_by_group[int(atom_group[a])].add(reason)
    inexact_by_group: dict[int, set[str]] = defaultdict(set)
    for a, reason in b.inexact.items():
        inexact_by_group[int(atom_group[a])].add(reason)
    groups = []
    for gid in range(len(comps)):
        kinds = {b.sources[s] for s in np.unique(source_of[atoms_of[gid]]).tolist()}
        producers = tuple(sorted({name for name, kind in kinds if kind == "producer"}))
        reasons = sorted(blocked_by_group[gid])
        if not reasons and not any(kind in ("producer", "grouped") for _, kind in kinds):
            reasons.append("no conv/linear produces these channels")
        inexact = sorted(inexact_by_group[gid])
        groups.append(
            ChannelGroup(
                id=gid,
                channels=int(channels_of[gid]),
                members=tuple(members[gid]),
                producers=producers,
                prunable=not reasons,
                reasons=tuple(reasons),
                exact=not inexact,
                inexact_reasons=tuple(inexact),
            )
        )
    return ChannelGraph(
        groups, b.sites, b.values, b.mac_layers, atom_group, atom_pos, source_of, b.sources
    )
