"""prune_channels: physically remove the channels a plan drops, from every group member."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import fx

from graphprune.analysis import ChannelGraph, build_channel_graph, rules
from graphprune.analysis.rules import Shrink
from graphprune.frontend import meta
from graphprune.frontend.params import get_tensor, set_tensor
from graphprune.passes.runner import PassResult, graph_pass, shapes_recorded
from graphprune.planning.plan import (
    check_nothing_emptied,
    dead_channel_plan,
    round_plan,
    validate_plan,
)


def _removes_only_zero_channels(options: Mapping[str, object]) -> bool:
    return options.get("plan") is None


@graph_pass(requires=(shapes_recorded,), preserves_outputs=_removes_only_zero_channels)
def prune_channels(
    gm: fx.GraphModule,
    *,
    plan: Mapping[int, Sequence[int]] | None = None,
    round_to: int = 8,
    scores: Mapping[int, Sequence[float]] | None = None,
) -> PassResult:
    """Remove the channels ``plan`` drops from every member of their groups.

    ``plan`` maps group id -> kept channel indices (``analyze(gm)`` numbering); None removes
    exactly the channels whose producer-side entries are all zero (outputs unchanged).
    Kept widths are rounded up to a multiple of ``round_to``, adding back the channels with
    the highest ``scores`` (group id -> score per channel), else the lowest indices.
    Before: W[..., c, ...] for every channel c.   After: dropped c gone along every channel
    axis; module attributes, split sizes, slice bounds and reshape constants follow.
    """
    graph = build_channel_graph(gm)
    plan = validate_plan(graph, plan) if plan is not None else dead_channel_plan(gm, graph)
    plan = round_plan(graph, plan, round_to, scores)
    removed = graph.removed_mask(plan)
    check_nothing_emptied(graph, removed)
    if not removed.any():
        return PassResult(gm, False, {"removed_channels": 0})
    old_shapes = {n: meta.output_shapes(n) for n in gm.graph.nodes}
    _slice_tensors(gm, graph, removed)
    _shrink_ops(gm, graph, removed, old_shapes)
    widths = {gid: len(keep) for gid, keep in plan.items()}
    return PassResult(gm, True, {"removed_channels": int(removed.sum()), "widths": widths})


def _slice_tensors(gm: fx.GraphModule, graph: ChannelGraph, removed: np.ndarray) -> None:
    by_path = defaultdict(list)
    for s in graph.sites:
        by_path[s.path].append(s)
    for path, sites in by_path.items():
        tensor = get_tensor(gm, path)
        new = tensor.detach()
        for s in sites:
            keep = torch.from_numpy(np.nonzero(~removed[s.atoms.reshape(-1)])[0])
            if len(keep) != s.atoms.size:
                new = new.index_select(s.axis, keep)
        if new.shape != tensor.shape:
            set_tensor(gm, path, new.contiguous())


def _shrink_ops(gm: fx.GraphModule, graph: ChannelGraph, removed: np.ndarray, old_shapes) -> None:
    """Let each op's registry entry make its attributes and arguments agree with the sliced
    tensors (module attributes, split sizes, slice bounds, view shapes).

    A module called more than once (timm's CoaT shares one set of depthwise convs between
    the blocks of a stage) has one set of attributes: they are set at its first call, from
    that call's channels (all calls share the sliced weights, so they agree). A second
    shrink would read the attributes it already changed as if they were the old ones."""
    ctx = Shrink(gm, graph.values, old_shapes, removed)
    shrunk: set[int] = set()
    for node in list(gm.graph.nodes):
        if node.op not in ("call_module", "call_function", "call_method"):
            continue
        module = gm.get_submodule(node.target) if node.op == "call_module" else None
        if module is not None:
            if id(module) in shrunk:
                continue
            shrunk.add(id(module))
        entry = rules.lookup(node, module)
        if entry is not None and entry.shrink is not None:
            entry.shrink(ctx, node, module)
