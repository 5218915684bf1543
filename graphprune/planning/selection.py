"""Choosing which channels to keep: importance scores and a MACs-targeted global ranking.

The MACs model: a conv/linear layer's MACs scale with the fraction of its input channels kept
(dense layers only; a grouped conv's per-group input width is fixed) times the fraction of its
output channels kept; a layer that sees only some channels of a group (a split half) counts
which channels are kept, best first. MACs outside every modelled layer are a fixed part of the
dense total. The pruned model is always re-measured with FlopCounterMode (planning.target).
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
    """Predicted MACs as a function of kept channels per group.

    A layer side that sees every channel of a group equally often shrinks in proportion to
    the channels kept. A side that sees only some channels (half of a split, one shuffle
    column, a slice) shrinks by which channels are kept, so with ``ranking`` (per group, the
    channels best first: the order a plan keeps them in) keeping ``k`` channels means keeping
    ``ranking[:k]`` and the side's kept count is exact. Without a ranking, sides are assumed
    to see channels uniformly.
    """

    def __init__(
        self,
        graph: ChannelGraph,
        layer_macs: Mapping[str, int],
        ranking: Mapping[int, np.ndarray] | None = None,
    ) -> None:
        self.graph = graph
        self.ranking = ranking or {}
        self.layers = []  # (dense macs, [in side, out side]); side: {gid: kept count by width}
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
        # MACs no group shrinks (frozen submodules, functional linears, attention modules):
        # part of the dense total the target is a fraction of, never of what pruning removes.
        modelled = {layer.target for layer in graph.mac_layers}
        self.fixed = sum(int(v) for k, v in layer_macs.items() if k not in modelled)
        self.dense = sum(d for d, _ in self.layers) + self.fixed

    def _counts(self, atoms: np.ndarray | None) -> dict[int, np.ndarray]:
        """Per group: atoms of this side kept when the group keeps 0, 1, ... channels."""
        if atoms is None:
            return {}
        gids, pos = self.graph.positions(atoms.reshape(-1))
        out = {}
        for g in np.unique(gids).tolist():
            n = self.graph.groups[g].channels
            per_channel = np.bincount(pos[gids == g], minlength=n).astype(np.float64)
            order = self.ranking.get(g)
            if order is None or np.all(per_channel == per_channel[0]):
                # Uniform: kept atoms scale with the kept channel count.
                out[g] = np.arange(n + 1) * (per_channel.sum() / n)
            else:
                out[g] = np.concatenate([[0.0], np.cumsum(per_channel[np.asarray(order)])])
        return out

    def _layer(self, i: int) -> float:
        dense, sides = self.layers[i]
        frac = 1.0
        for counts in sides:
            if counts:
                full = sum(c[-1] for c in counts.values())
                frac *= sum(c[self.kept[g]] for g, c in counts.items()) / full
        return dense * frac

    def set_kept(self, gid: int, kept: int) -> None:
        self.kept[gid] = kept
        for i in self.touching.get(gid, ()):
            self.layer_macs[i] = self._layer(i)

    @property
    def macs(self) -> float:
        return float(sum(self.layer_macs)) + self.fixed


def ranking_of(scores: Mapping[int, np.ndarray]) -> dict[int, np.ndarray]:
    """Per group, channels best first: the order ``walk`` keeps them in."""
    return {g: np.argsort(-np.asarray(s), kind="stable") for g, s in scores.items()}


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
    ranking = ranking_of(scores)
    model = MacsModel(graph, layer_macs, ranking)
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
    for gid in scores:
        keep = model.kept[gid]
        if keep < graph.groups[gid].channels:
            plan[gid] = np.sort(ranking[gid][:keep])
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
    from graphprune.planning.target import blockers

    ranking = ranking_of(gids) if isinstance(gids, Mapping) else None
    model = MacsModel(graph, layer_macs, ranking)
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
        limits=blockers(graph, layer_macs),
    )


def unreachable(
    flops_target: float, floor: float, *, who: str, at: str, fix: str, limits: str = ""
) -> PlanError:
    """The one "out of reach" message: the target, the least reachable fraction ``floor`` and
    the state ``at`` which it is reached, and what to change (``fix``, or more prunable layers).
    """
    return PlanError(
        f"flops_target={flops_target} is out of reach{f' for {who}' if who else ''}: with "
        f"{at}, {floor:.3f} of the dense MACs remain; ask for at least {floor:.3f}, {fix}, or "
        "make more layers prunable" + (f". What limits pruning:{limits}" if limits else "")
    )


def normalized(scores: Mapping[int, np.ndarray]) -> dict[int, np.ndarray]:
    """Divide each group's scores by their mean so groups of different scale compare."""
    return {g: s / (s.mean() if s.mean() > 0 else 1.0) for g, s in scores.items()}
