"""Helpers for checking pruning exactness, used by graphprune's tests and useful to users.

The exactness argument: if every producer-side entry of a channel is zero (conv row, bias,
norm scale and shift, layer scale), the channel is zero everywhere it flows, so removing it
from every member changes no output.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import fx, nn

from graphprune.analysis import ChannelGraph
from graphprune.frontend.params import get_tensor
from graphprune.planning.plan import keep_every_member_alive


def random_plan(
    graph: ChannelGraph, rng: np.random.Generator, *, fraction: float = 0.5, exact_only: bool = True
) -> dict[int, list[int]]:
    """Drop a random subset (about ``fraction``) of each prunable group's channels."""
    plan = {}
    for g in graph.groups:
        if not g.prunable or (exact_only and not g.exact) or g.channels < 2:
            continue
        keep = max(1, int(round(g.channels * (1 - rng.uniform(0, fraction)))))
        plan[g.id] = sorted(rng.choice(g.channels, size=keep, replace=False).tolist())
    repaired = keep_every_member_alive(graph, {k: np.asarray(v) for k, v in plan.items()})
    return {k: [int(c) for c in v] for k, v in repaired.items()}


@torch.no_grad()
def zero_dropped_channels(gm: fx.GraphModule, graph: ChannelGraph, plan) -> None:
    """Zero every producer-side entry of the channels ``plan`` drops (in place)."""
    removed = graph.removed_mask({k: np.asarray(v) for k, v in plan.items()})
    for s in graph.sites:
        if s.role != "out":
            continue
        drop = np.nonzero(removed[s.atoms.reshape(-1)])[0]
        if len(drop):
            get_tensor(gm, s.path).index_fill_(s.axis, torch.from_numpy(drop), 0.0)


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give norm layers non-trivial statistics and affine parameters, so checks are not vacuous."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
        if isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)):
            if getattr(m, "weight", None) is not None:
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            if getattr(m, "bias", None) is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model


@torch.no_grad()
def check_random_plan_exact(
    gm: fx.GraphModule, inputs: tuple[torch.Tensor, ...], *, seed: int = 0, atol: float = 1e-5
) -> dict[int, list[int]]:
    """Prune a random plan of ``gm``'s exact groups and check the outputs equal those of the
    same model with the dropped channels zeroed (the exactness argument above). Mutates
    ``gm``; returns the plan (empty when nothing was prunable)."""
    from graphprune.analysis import build_channel_graph
    from graphprune.passes import prune_channels

    graph = build_channel_graph(gm)
    plan = random_plan(graph, np.random.default_rng(seed))
    zero_dropped_channels(gm, graph, plan)
    expected = gm(*inputs)
    prune_channels(gm, plan=plan, round_to=1)
    torch.testing.assert_close(gm(*inputs), expected, atol=atol, rtol=atol)
    return plan
