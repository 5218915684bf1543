"""One-shot magnitude pruning: the simplest method, and the baseline for the others.

Each channel's importance is the L2 norm of its slices summed over every member of its group
(scores normalized by the group mean so groups compare); channels are dropped globally,
lowest first, until the remaining MACs reach the target. No training.
"""

from __future__ import annotations

from functools import partial

from torch import fx

from graphprune.analysis import ChannelGraph, build_channel_graph
from graphprune.frontend.trace import example_inputs_of
from graphprune.passes import prune_channels
from graphprune.passes.runner import run_passes
from graphprune.planning.macs import count_macs
from graphprune.planning.selection import l2_scores, normalized, select_channels


def plan_magnitude(
    gm: fx.GraphModule,
    flops_target: float,
    round_to: int,
    layer_macs: dict[str, int] | None = None,
    graph: ChannelGraph | None = None,
):
    """The plan (group id -> kept channels) and the scores it was chosen by. ``graph`` and
    ``layer_macs`` may be passed when the caller already has them for this ``gm``."""
    graph = graph or build_channel_graph(gm)
    scores = normalized(l2_scores(gm, graph))
    if layer_macs is None:
        layer_macs = count_macs(gm, example_inputs_of(gm)).per_layer
    plan = select_channels(graph, scores, layer_macs, flops_target, round_to=round_to)
    return plan, scores


def compress_magnitude(
    gm: fx.GraphModule,
    *,
    flops_target: float,
    round_to: int = 8,
    layer_macs: dict[str, int] | None = None,
    graph: ChannelGraph | None = None,
    verify: bool = False,
):
    plan, scores = plan_magnitude(gm, flops_target, round_to, layer_macs, graph)
    prune = partial(prune_channels, plan=plan, scores=scores, round_to=round_to)
    result = run_passes(gm, [prune], verify=verify)
    return result.gm, result.stats["prune_channels"], {}
