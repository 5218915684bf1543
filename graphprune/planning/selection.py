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
    return norm_scores(gm, graph, p=2)


def norm_scores(gm: fx.GraphModule, graph: ChannelGraph, *, p: float) -> dict[int, np.ndarray]:
    """Per prunable group: for each channel, the ``p``-norms of its slices summed over members
    (p=1: the L1 filter norm of Li et al.; p=2: ``l2_scores``)."""
    scores = {g.id: np.zeros(g.channels) for g in graph.groups if g.prunable}
    for s in graph.sites:
        if s.role == "stat" or s.atoms.ndim != 1:
            continue
        w = get_tensor(gm, s.path).detach()
        others = tuple(d for d in range(w.dim()) if d != s.axis)
        norms = torch.linalg.vector_norm(w, ord=p, dim=others) if others else w.abs()
        gids, pos = graph.positions(s.atoms)
        for gid in np.unique(gids).tolist():
            if gid in scores:
                hit = gids == gid
                np.add.at(scores[gid], pos[hit], norms.cpu().numpy()[hit])
    return scores


class MacsModel:
    """Predicted MACs as a function of which channels each group keeps.

    A group with scores keeps its top-``k`` channels (highest score first, as the planner
    and the pruner keep them); any group may be given an explicit set. Each layer side counts
    the group atoms it holds among the kept channels, so a layer that reads only part of a
    group (one half of a split, a channel-shuffle branch) sees exactly the channels it loses.
    A group without scores kept by count alone is predicted by its kept fraction (an average).
    """

    def __init__(
        self,
        graph: ChannelGraph,
        layer_macs: Mapping[str, int],
        scores: Mapping[int, np.ndarray] | None = None,
    ) -> None:
        self.graph = graph
        self.order: dict[int, np.ndarray] = {}  # gid -> positions, first kept first
        self.rank: dict[int, np.ndarray] = {}  # gid -> rank of each position in that order
        self.ordered = set(scores or ())  # groups whose top-k by score is known
        for g in graph.groups:
            if scores is not None and g.id in scores:
                self._set_order(g.id, np.argsort(-rankable(scores[g.id]), kind="stable"))
            else:
                self._set_order(g.id, np.arange(g.channels))
        # per layer: (dense macs, [side: (atoms on that side, {gid: atoms per position})])
        self.layers: list[tuple[int, list[tuple[int, dict[int, tuple]]]]] = []
        self.touching: dict[int, list[int]] = defaultdict(list)
        for layer in graph.mac_layers:
            dense = int(layer_macs.get(layer.target, 0))
            if not dense:
                continue
            sides = [self._counts(layer.in_atoms), self._counts(layer.out_atoms)]
            index = len(self.layers)
            self.layers.append((dense, sides))
            for gid in set(sides[0][1]) | set(sides[1][1]):
                self.touching[gid].append(index)
        # MACs of layers analysis does not model (an opaque op's matmuls, a leaf module with
        # no rule): they stay whatever the plan, and count toward the dense total, so a
        # target is a fraction of what the model really costs.
        modeled = {layer.target for layer in graph.mac_layers}
        self.fixed = float(sum(v for k, v in layer_macs.items() if k not in modeled))
        self.kept: dict[int, int] = {g.id: g.channels for g in graph.groups}
        self._kept_sets: dict[int, np.ndarray] = {}
        self.layer_macs = [self._layer(i) for i in range(len(self.layers))]
        self.dense = sum(d for d, _ in self.layers) + self.fixed

    def _set_order(self, gid: int, order: np.ndarray) -> None:
        self.order[gid] = order
        self.rank[gid] = np.empty(len(order), dtype=np.int64)
        self.rank[gid][order] = np.arange(len(order))

    def _cumulative(self, gid: int, per_position: np.ndarray) -> np.ndarray:
        by_rank = np.zeros_like(per_position)
        by_rank[self.rank[gid]] = per_position
        return np.concatenate([[0], np.cumsum(by_rank)])

    def _counts(self, atoms: np.ndarray | None) -> tuple[int, dict[int, tuple]]:
        """Atoms per position of each group on one layer side, and their running sum over
        the group's keep order (so the top-k count is one lookup)."""
        if atoms is None:
            return 0, {}
        gids, pos = self.graph.positions(atoms.reshape(-1))
        out = {}
        for g in np.unique(gids).tolist():
            per_position = np.bincount(pos[gids == g], minlength=self.graph.groups[g].channels)
            out[g] = (per_position, self._cumulative(g, per_position))
        return atoms.size, out

    def _kept_atoms(self, gid: int, counts: tuple) -> float:
        per_position, cumulative = counts
        kept = self._kept_sets.get(gid)
        if kept is not None:
            return float(per_position[kept].sum())
        if gid not in self.ordered:
            return float(per_position.sum()) * self.kept[gid] / len(per_position)
        return float(cumulative[self.kept[gid]])

    def _layer(self, i: int) -> float:
        dense, sides = self.layers[i]
        frac = 1.0
        for total, counts in sides:
            if counts:
                frac *= sum(self._kept_atoms(g, c) for g, c in counts.items()) / total
        return dense * frac

    def set_kept(self, gid: int, kept: int | np.ndarray) -> None:
        """Keep the top ``kept`` channels of the group by score, or exactly the given ones."""
        if isinstance(kept, (int, np.integer)):
            if self.kept[gid] == int(kept) and gid not in self._kept_sets:
                return  # most steps of a rounded walk leave the width as it was
            self.kept[gid] = int(kept)
            self._kept_sets.pop(gid, None)
        else:
            self._kept_sets[gid] = np.asarray(kept, dtype=np.int64)
            self.kept[gid] = len(self._kept_sets[gid])
        for i in self.touching.get(gid, ()):
            self.layer_macs[i] = self._layer(i)

    @property
    def macs(self) -> float:
        return float(sum(self.layer_macs)) + self.fixed

    def kept_positions(self, gid: int) -> np.ndarray:
        kept = self._kept_sets.get(gid)
        return np.sort(kept if kept is not None else self.order[gid][: self.kept[gid]])

    def emptied(self, gid: int) -> np.ndarray | None:
        """Per-position atom counts of a layer side touching ``gid`` that keeps no atom."""
        for i in self.touching.get(gid, ()):
            for _, counts in self.layers[i][1]:
                if gid in counts and not any(self._kept_atoms(g, c) for g, c in counts.items()):
                    return counts[gid][0]
        return None

    def protect(self, gid: int, pos: int) -> None:
        """Move channel ``pos`` to the front of its group's keep order: kept while any is."""
        order = self.order[gid]
        self._set_order(gid, np.concatenate([[pos], order[order != pos]]))
        self.ordered.add(gid)
        for i in self.touching.get(gid, ()):
            for _, counts in self.layers[i][1]:
                if gid in counts:
                    counts[gid] = (counts[gid][0], self._cumulative(gid, counts[gid][0]))
            self.layer_macs[i] = self._layer(i)


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


def rankable(scores: object) -> np.ndarray:
    """Scores as floats with NaN/Inf (weights that are not finite) as +inf: such a channel
    ranks above every other, so no comparison with a non-finite score ever drops it."""
    a = np.asarray(scores, dtype=np.float64)
    return np.where(np.isfinite(a), a, np.inf)


def step_keys(
    scores: np.ndarray, n: int, round_to: int, *, tied: bool = False, fine: int | None = None
) -> np.ndarray:
    """The score the walk ranks each channel of one group by: the mean score of the channels
    whose removal makes the same step of the group's rounded width (``rounded_width``); at
    exact widths (and in tied groups) every channel is a step of its own.

    With multiples of 8 a group loses its channels 8 at a time, so a step costs the sum of
    the 8 channels' scores. Walking channels by their own scores instead waits for the step's
    best channel: one strong channel among seven weak ones kept the whole step, however weak
    the rest, and the cut went to groups whose channels were uniformly a little better (on
    Fashion-MNIST ResNet-20, ResRep at 50% fewer MACs: +0.26 points from this alone,
    BENCHMARKS.md). Within a group the keys still rise in score order."""
    scores = np.asarray(scores, dtype=np.float64)
    removal = np.argsort(-scores, kind="stable")[::-1]  # the reverse of the keep order
    # the group's width after each removal in that order; a step ends where it drops
    widths = [rounded_width(n - 1 - j, n, round_to, tied=tied, fine=fine) for j in range(n)]
    ends = np.nonzero(np.diff(np.concatenate([[n], widths])) < 0)[0]
    step = np.searchsorted(ends, np.arange(n))  # the step of each removal
    means = np.bincount(step, scores[removal]) / np.bincount(step)
    keys = np.empty(n)
    keys[removal] = means[step]
    return keys


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
    With rounded widths a channel is walked at its step's mean score (``step_keys``).
    ``fine`` rounds widths below ``round_to`` more finely (``rounded_width``); ``min_keep``
    (group id -> channels) is a floor no group is walked below (at least 1 always).
    """
    model = MacsModel(graph, layer_macs, scores)
    target = flops_target * model.dense
    # A NaN/Inf score (weights that are not finite) ranks nothing: that channel is kept.
    scores = {g: rankable(a) for g, a in scores.items()}
    tied = {gid: is_tied(graph, gid) for gid in scores}
    keys = {
        g: step_keys(a, graph.groups[g].channels, round_to, tied=tied[g], fine=fine)
        for g, a in scores.items()
    }
    order = sorted(
        (float(key), float(s), gid, pos)
        for gid, arr in scores.items()
        for pos, (s, key) in enumerate(zip(arr, keys[gid], strict=True))
        if np.isfinite(key)
    )
    removed: dict[int, int] = defaultdict(int)
    floor = dict(min_keep or {})
    protected: dict[int, int] = defaultdict(int)
    dropped = 0  # channels actually dropped after rounding, what max_drop limits
    for _, _, gid, _pos in order:
        if model.macs <= target or (max_drop is not None and dropped >= max_drop):
            break
        n = graph.groups[gid].channels
        if n - removed[gid] <= max(1, floor.get(gid, 1), protected[gid]):
            continue
        removed[gid] += 1
        before = model.kept[gid]
        model.set_kept(gid, rounded_width(n - removed[gid], n, round_to, tied=tied[gid], fine=fine))
        # A layer reading only some of the group's channels (half of a split, a shuffle
        # branch) must keep one: its best channel is then kept ahead of the score order.
        while (side := model.emptied(gid)) is not None:
            if protected[gid] >= model.kept[gid]:
                removed[gid] -= 1
                model.set_kept(gid, before)
                break
            held = np.nonzero(side)[0]
            model.protect(gid, int(held[np.argmin(model.rank[gid][held])]))
            protected[gid] += 1
        dropped += before - model.kept[gid]
    plan = {}
    for gid in scores:
        if model.kept[gid] < graph.groups[gid].channels:
            plan[gid] = model.kept_positions(gid)
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
    out = {}
    for g, s in scores.items():
        finite = s[np.isfinite(s)]
        mean = finite.mean() if finite.size else 0.0
        out[g] = s / (mean if mean > 0 else 1.0)
    return out
