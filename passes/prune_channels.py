"""prune_channels: physically remove the channels a plan drops, from every group member."""

from __future__ import annotations

import operator
from collections import defaultdict
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import fx, nn

from graphprune.analysis import ChannelGraph, build_channel_graph
from graphprune.analysis.atoms import TensorChannels
from graphprune.errors import GraphInvariantError
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
    old_shapes = {n: _node_shapes(n) for n in gm.graph.nodes}
    _slice_tensors(gm, graph, removed)
    _sync_modules(gm, graph, removed)
    _rewrite_args(gm, graph, removed, old_shapes)
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


def _kept(removed: np.ndarray, value: object, dim: int) -> int | None:
    if isinstance(value, TensorChannels) and value.dims == (dim,):
        return int(np.sum(~removed[value.atoms]))
    return None


def _sync_modules(gm: fx.GraphModule, graph: ChannelGraph, removed: np.ndarray) -> None:
    """Make module attributes agree with their new parameter shapes."""
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        m = gm.get_submodule(node.target)
        x = graph.values.get(node.args[0]) if node.args else None
        if isinstance(m, nn.modules.conv._ConvNd):
            w = m.weight.shape
            if m.transposed:
                m.groups = m.groups * w[0] // m.in_channels if m.groups > 1 else 1
                m.in_channels, m.out_channels = w[0], w[1] * m.groups
            else:
                m.groups = m.groups * w[0] // m.out_channels if m.groups > 1 else 1
                m.in_channels, m.out_channels = w[1] * m.groups, w[0]
        elif isinstance(m, nn.Linear):
            m.out_features, m.in_features = m.weight.shape
        elif isinstance(
            m, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)
        ):
            kept = _kept(removed, x, 1)
            if kept is not None:
                m.num_features = kept
        elif isinstance(m, nn.GroupNorm):
            kept = _kept(removed, x, 1)
            if kept is not None and kept != m.num_channels:
                m.num_groups = m.num_groups * kept // m.num_channels
                m.num_channels = kept
        elif isinstance(m, nn.LayerNorm) and m.weight is not None:
            m.normalized_shape = tuple(m.weight.shape)
        elif isinstance(m, nn.PReLU):
            m.num_parameters = m.weight.numel()


_SPLITS = {torch.split, torch.chunk, torch.tensor_split, "split", "chunk", "tensor_split"}
_VIEWS = {torch.reshape, "view", "reshape"}


def _rewrite_args(gm, graph: ChannelGraph, removed: np.ndarray, old_shapes) -> None:
    """Channel counts baked into node arguments: split sizes, slice bounds, view shapes."""
    for node in list(gm.graph.nodes):
        if node.op not in ("call_function", "call_method") or not node.args:
            continue
        src = node.args[0]
        x = graph.values.get(src) if isinstance(src, fx.Node) else None
        if not isinstance(x, TensorChannels) or not x.dims:
            continue
        if node.target in _SPLITS:
            _rewrite_split(node, x, removed, old_shapes)
        elif node.target in _VIEWS:
            _rewrite_view(node, graph.values.get(node), removed, old_shapes[node])
        elif node.target is operator.getitem:
            _rewrite_slice(node, x, removed)


def _rewrite_split(node: fx.Node, x: TensorChannels, removed, old_shapes) -> None:
    nd = len(old_shapes[node.args[0]])
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    dim = dim + nd if dim < 0 else dim
    if dim not in x.dims:
        return
    sizes, offset = [], 0
    for s in old_shapes[node]:
        part = x.sliced(dim, offset, offset + s[dim]).atoms
        sizes.append(int(np.sum(~removed[part.reshape(-1)])))
        offset += s[dim]
    node.op, node.target = "call_function", torch.split
    node.args, node.kwargs = (node.args[0], sizes, dim), {}


def _rewrite_view(node: fx.Node, out: object, removed, old_shape) -> None:
    if not isinstance(out, TensorChannels) or not out.dims:
        return
    packed = len(node.args) == 2 and isinstance(node.args[1], (list, tuple))
    shape = list(node.args[1] if packed else node.args[1:])
    kept = ~removed[out.atoms]
    for axis, d in enumerate(out.dims):
        size = int(np.sum(kept.any(axis=tuple(a for a in range(kept.ndim) if a != axis))))
        if isinstance(shape[d], int) and shape[d] != -1:
            shape[d] = size
    if int(kept.sum()) != int(
        np.prod(
            [
                kept.any(axis=tuple(a for a in range(kept.ndim) if a != ax)).sum()
                for ax in range(kept.ndim)
            ]
        )
    ):
        raise GraphInvariantError(f"{node.name}: pruning would leave a ragged {old_shape} view")
    node.args = (node.args[0], tuple(shape)) if packed else (node.args[0], *shape)


def _rewrite_slice(node: fx.Node, x: TensorChannels, removed) -> None:
    index = node.args[1]
    as_tuple = isinstance(index, tuple)
    items = list(index if as_tuple else (index,))
    if any(i is Ellipsis or i is None for i in items):
        return  # dims shift; channel slices with Ellipsis/None are left as traced
    for d, i in enumerate(items):
        if isinstance(i, slice) and d in x.dims and x.dims == (d,):
            kept_before = np.concatenate([[0], np.cumsum(~removed[x.atoms])])
            start, stop, _ = i.indices(len(x.atoms))
            items[d] = slice(int(kept_before[start]), int(kept_before[stop]), i.step)
    node.args = (node.args[0], tuple(items) if as_tuple else items[0])


def _node_shapes(node: fx.Node):
    return meta.output_shapes(node)
