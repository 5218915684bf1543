"""Choosing which channels to keep: importance scores and a MACs-targeted global ranking.

The MACs model: a conv/linear layer's MACs scale with the fraction of its input channels kept
(dense layers only; a grouped conv's per-group input width is fixed) times the fraction of its
output channels kept. Each group contributes a fixed number of indices per channel to each
layer, so remaining MACs are a cheap function of how many channels each group keeps. The
pruned model is always re-measured with FlopCounterMode; the model only guides the search.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping

import numpy as np
import torch
from torch import fx

from graphprune.analysis import ChannelGraph
from graphprune.errors import PlanError
from graphprune.frontend.params import get_tensor
from graphprune.planning.plan import (
    check_flops_target,
    is_tied,
    keep_every_member_alive,
    rounded_width,
)


def l2_scores(gm: fx.GraphModule, graph: ChannelGraph) -> dict[int, np.ndarray]:
    """Per prunable group: for each channel, the L2 norms of its slices summed over members."""
    scores = {g.id: np.zeros(g.channels) for g in graph.groups if g.prunable}
    for s in graph.sites:
        if s.role == "stat" or s.atoms.ndim != 1:
            continue
        w = get_tensor(gm, s.path).detach()
        norms = torch.linalg.vector_norm(w.transpose(0, s.axis).reshape(w.shape[s.axis], -1), dim=1)
        gids, pos = graph.positions(s.atoms)
        for gid in np.unique(gids).tolist():
            if gid in scores:
                hit = gids == gid
                np.add.at(scores[gid], pos[hit], norms.cpu().numpy()[hit])
    return scores


class MacsModel:
    """Predicted MACs as a function of kept channels per group."""

    def __init__(self, graph: ChannelGraph, layer_macs: Mapping[str, int]) -> None:
        self.graph = graph
        self.layers = []  # (dense macs, in size, out size, {gid: per-channel count} in/out)
        self.touching: dict[int, list[int]] = defaultdict(list)
        for layer in graph.mac_layers:
            dense = int(layer_macs.get(layer.target, 0))
            if not dense:
                continue
            sides = [self._counts(layer.in_atoms), self._counts(layer.out_atoms)]
            index = len(self.layers)
            self.layers.append((dense, sides))
            for gid in set(sides[0]) | set(sides[1]):
                self.touching[gid].append(index)
        self.kept = {g.id: g.channels for g in graph.groups}
        self.layer_macs = [self._layer(i) for i in range(len(self.layers))]
        self.dense = sum(d for d, _ in self.layers)

    def _counts(self, atoms: np.ndarray | None) -> dict[int, float]:
        if atoms is None:
            return {}
        gids = self.graph.atom_group[atoms.reshape(-1)]
        return {
            int(g): float(np.sum(gids == g)) / self.graph.groups[int(g)].channels
            for g in np.unique(gids)
        }

    def _layer(self, i: int) -> float:
        dense, sides = self.layers[i]
        frac = 1.0
        for counts in sides:
            if counts:
                full = sum(c * self.graph.groups[g].channels for g, c in counts.items())
                frac *= sum(c * self.kept[g] for g, c in counts.items()) / full
        return dense * frac

    def set_kept(self, gid: int, kept: int) -> None:
        self.kept[gid] = kept
        for i in self.touching.get(gid, ()):
            self.layer_macs[i] = self._layer(i)

    @property
    def macs(self) -> float:
        return float(sum(self.layer_macs))


def select_channels(
    graph: ChannelGraph,
    scores: Mapping[int, np.ndarray],
    layer_macs: Mapping[str, int],
    flops_target: float,
    *,
    round_to: int = 1,
) -> dict[int, np.ndarray]:
    """Drop the globally lowest-scoring channels until remaining MACs <= target x dense.

    Returns kept indices per group. Raises PlanError when even one channel per group stays
    above the target, naming the smallest reachable fraction.
    """
    check_flops_target(flops_target)
    plan, reached = walk(graph, scores, layer_macs, flops_target, round_to=round_to)
    if not reached:
        raise out_of_reach(graph, layer_macs, scores, flops_target, round_to)
    return keep_every_member_alive(graph, plan, scores)


def walk(
    graph: ChannelGraph,
    scores: Mapping[int, np.ndarray],
    layer_macs: Mapping[str, int],
    flops_target: float,
    *,
    round_to: int = 1,
    max_drop: int | None = None,
    fine: int | None = None,
    min_keep: Mapping[int, int] | None = None,
) -> tuple[dict[int, np.ndarray], bool]:
    """The global walk: lowest score first, never emptying a group, widths rounded up to
    ``round_to`` as they will be pruned (so the MACs seen are the MACs the model will have),
    dropping at most ``max_drop`` channels. Returns (kept per changed group, target reached).
    ``fine`` rounds widths below ``round_to`` more finely (``rounded_width``); ``min_keep``
    (group id -> channels) is a floor no group is walked below (at least 1 always).
    """
    model = MacsModel(graph, layer_macs)
    target = flops_target * model.dense
    order = sorted((float(s), gid, pos) for gid, arr in scores.items() for pos, s in enumerate(arr))
    tied = {gid: is_tied(graph, gid) for gid in scores}
    removed: dict[int, int] = defaultdict(int)
    floor = dict(min_keep or {})
    dropped = 0  # channels actually dropped after rounding, what max_drop limits
    for _, gid, _pos in order:
        if model.macs <= target or (max_drop is not None and dropped >= max_drop):
            break
        n = graph.groups[gid].channels
        if n - removed[gid] <= max(1, floor.get(gid, 1)):
            continue
        removed[gid] += 1
        before = model.kept[gid]
        model.set_kept(gid, rounded_width(n - removed[gid], n, round_to, tied=tied[gid], fine=fine))
        dropped += before - model.kept[gid]
    plan = {}
    for gid, arr in scores.items():
        keep = model.kept[gid]
        if keep < graph.groups[gid].channels:
            best = np.argsort(-np.asarray(arr), kind="stable")[:keep]
            plan[gid] = np.sort(best)
    return plan, model.macs <= target * (1 + 1e-9)


def out_of_reach(
    graph: ChannelGraph,
    layer_macs: Mapping[str, int],
    gids: Iterable[int],
    flops_target: float,
    round_to: int,
    *,
    who: str = "",
) -> PlanError:
    """The error for a target below the floor: the MACs left when each of the groups ``gids``
    (those the method can prune) keeps one channel, rounded up as the pruner would."""
    model = MacsModel(graph, layer_macs)
    gids = list(gids)
    for gid in gids:
        n = graph.groups[gid].channels
        model.set_kept(gid, rounded_width(1, n, round_to, tied=is_tied(graph, gid)))
    return unreachable(
        flops_target,
        model.macs / model.dense,
        who=who,
        at=f"one channel in each of the {len(gids)} groups it can prune (rounded up to a "
        f"multiple of round_to={round_to})",
        fix="lower round_to",
    )


def unreachable(flops_target: float, floor: float, *, who: str, at: str, fix: str) -> PlanError:
    """The one "out of reach" message: the target, the least reachable fraction ``floor`` and
    the state ``at`` which it is reached, and what to change (``fix``, or more prunable layers).
    """
    return PlanError(
        f"flops_target={flops_target} is out of reach{f' for {who}' if who else ''}: with "
        f"{at}, {floor:.3f} of the dense MACs remain; ask for at least {floor:.3f}, {fix}, or "
        "make more layers prunable"
    )


def normalized(scores: Mapping[int, np.ndarray]) -> dict[int, np.ndarray]:
    """Divide each group's scores by their mean so groups of different scale compare."""
    return {g: s / (s.mean() if s.mean() > 0 else 1.0) for g, s in scores.items()}
