"""Ranking channels across groups fairly and by cost, and landing a mask on a MACs target.

Training-time methods (ResRep) choose masks many times from scores that change. Three things
make such a choice sound, whatever the method:

- **Fair scores.** A group with several producers (a residual stream) must not look more
  important because it has more rows to sum: its channel score is the *mean* over producers
  (``producer_mean``), so a residual group and a single-producer group with identical rows
  score the same.
- **Importance per MAC saved.** Removing a channel of a stage-1 group of a CIFAR ResNet saves
  about 4x the MACs of a stage-3 channel. Dividing a score by the channel's cost
  (``channel_costs``, from the MACs model) is the knapsack ratio: the greedy walk then
  removes what costs least importance per MAC (``per_mac``). ``power`` < 1 divides by a
  root of the cost instead, weighing it less than the knapsack ratio does.
- **A floor per group.** Cost-aware ranking prefers wide, expensive layers; a minimum kept
  fraction (``guard_floors``, default 0.1, at least one channel) stops a layer collapsing.

``choose_rounding`` keeps widths hardware friendly (multiples of ``round_to``) where the target
allows and rounds narrow layers finer (``round_to``/2, /4, ... 1) where it would otherwise make
the target unreachable. With rounded widths the walk ranks a channel by the mean score of its
width step (``selection.step_keys``): a step removes ``round_to`` channels at once.
``select_kept`` runs the walk and, for a final mask, gives channels back while the MACs stay
under the target, finer if needed, so the result lands within ``tolerance`` of the target
instead of one rounding step under it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from graphprune.analysis import ChannelGraph
from graphprune.planning.plan import is_tied, keep_every_member_alive, rounded_width
from graphprune.planning.selection import MacsModel, rankable, unreachable, walk
from graphprune.planning.target import blockers

DEFAULT_MIN_KEEP_FRACTION = 0.1


def producer_mean(
    rows: Iterable[tuple[int, np.ndarray, np.ndarray]], channels: Mapping[int, int]
) -> dict[int, np.ndarray]:
    """Per group, each channel's value averaged over the producers that have a row for it.

    ``rows`` yields (group id, channel index per row, value per row), one entry per producer
    (e.g. a compactor's row norms). Channels no producer covers score 0.
    """
    sums = {g: np.zeros(n) for g, n in channels.items()}
    counts = {g: np.zeros(n) for g, n in channels.items()}
    for gid, index, values in rows:
        np.add.at(sums[gid], np.asarray(index), np.asarray(values, dtype=np.float64))
        np.add.at(counts[gid], np.asarray(index), 1.0)
    return {g: np.divide(sums[g], np.maximum(counts[g], 1.0)) for g in channels}


def taylor_saliency(
    rows: Iterable[tuple[int, np.ndarray, np.ndarray]], channels: Mapping[int, int]
) -> dict[int, np.ndarray]:
    """First-order estimate of the loss change from zeroing each group channel, one batch.

    ``rows`` yields (group id, channel index per row, Q_i·dL/dQ_i per row) per producer, where
    Q_i is a row of a gate (a compactor row) on that channel. Zeroing a group channel zeroes
    the rows of every producer at once, so the estimate is |Σ over producers of Q_i·dL/dQ_i|
    (Molchanov et al. 2019, the gate after BN): in units of loss, hence comparable across
    groups of any size or producer count. Accumulate it over batches (sum of |·| per batch).
    """
    sums = {g: np.zeros(n) for g, n in channels.items()}
    for gid, index, dots in rows:
        np.add.at(sums[gid], np.asarray(index), np.asarray(dots, dtype=np.float64))
    return {g: np.abs(s) for g, s in sums.items()}


def normalized_prior(accumulated: Mapping[int, np.ndarray]) -> dict[int, np.ndarray]:
    """Divide by the mean over *all* channels of all groups: scale 1 like an identity row's
    norm, while keeping which groups matter more (a per-group mean would erase exactly the
    cross-group information the prior is for). All ones when nothing was accumulated."""
    values = [np.asarray(v, dtype=np.float64) for v in accumulated.values()]
    mean = float(np.concatenate(values).mean()) if values and sum(map(len, values)) else 0.0
    if not mean > 0:
        return {g: np.ones(len(v)) for g, v in accumulated.items()}
    return {g: np.asarray(v, dtype=np.float64) / mean for g, v in accumulated.items()}


def channel_costs(
    graph: ChannelGraph, layer_macs: Mapping[str, int], gids: Iterable[int]
) -> dict[int, float]:
    """MACs that removing one channel of each group saves, at full width (MACs model)."""
    model = MacsModel(graph, layer_macs)
    base = model.macs
    out = {}
    for g in gids:
        n = graph.groups[g].channels
        model.set_kept(g, n - 1)
        out[g] = max(base - model.macs, 0.0)
        model.set_kept(g, n)
    return out


def per_mac(
    scores: Mapping[int, np.ndarray], costs: Mapping[int, float], power: float = 1.0
) -> dict[int, np.ndarray]:
    """Importance per MAC saved, in the scores' units: score / (cost / mean cost) ** power.

    ``power`` 1 is the knapsack ratio; 0 leaves the scores as they are; in between, a cheap
    channel needs less than proportionally more importance to stay. A group whose channels
    save no MACs keeps its scores as they are (nothing to gain there, and dividing by zero
    would make it look infinitely important)."""
    check_cost_power(power)
    positive = [c for c in costs.values() if c > 0]
    mean = float(np.mean(positive)) if positive else 1.0
    return {
        g: np.asarray(s, dtype=np.float64)
        / ((costs[g] / mean) ** power if costs.get(g, 0) > 0 else 1.0)
        for g, s in scores.items()
    }


def check_cost_power(power: float) -> None:
    """ValueError unless ``cost_power`` is in [0, 1]."""
    if not 0.0 <= power <= 1.0:
        raise ValueError(
            f"cost_power={power}: must be in [0, 1] (1 ranks by importance per MAC saved, "
            "0 by importance alone)"
        )


def check_keep_fraction(fraction: float) -> None:
    """ValueError unless ``min_keep_fraction`` is in [0, 1)."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(
            f"min_keep_fraction={fraction}: must be in [0, 1) (0.1 keeps at least a tenth of "
            "every group; 0 allows one channel)"
        )


def guard_floors(channels: Mapping[int, int], fraction: float) -> dict[int, int]:
    """The fewest channels each group may keep: ``ceil(fraction x width)``, at least 1."""
    check_keep_fraction(fraction)
    return {g: max(1, int(np.ceil(fraction * n - 1e-9))) for g, n in channels.items()}


@dataclass(frozen=True, slots=True)
class Rounding:
    """Widths >= ``round_to`` are multiples of ``round_to``; narrower ones multiples of
    ``fine``. ``Rounding(1, 1)`` is exact."""

    round_to: int
    fine: int

    def width(self, kept: int, total: int, *, tied: bool) -> int:
        return rounded_width(kept, total, self.round_to, tied=tied, fine=self.fine)

    def __str__(self) -> str:
        if self.round_to <= 1:
            return "exact widths"
        if self.fine == self.round_to:
            return f"multiples of {self.round_to}"
        return f"multiples of {self.round_to}, narrower widths multiples of {self.fine}"


def rounding_ladder(round_to: int) -> list[Rounding]:
    """From the asked rounding to exact: (8, 8), (8, 4), (8, 2), (8, 1), (1, 1)."""
    rungs = [Rounding(round_to, round_to)]
    fine = round_to // 2
    while round_to > 1 and fine >= 1:
        rungs.append(Rounding(round_to, fine))
        fine //= 2
    if round_to > 1:
        rungs.append(Rounding(1, 1))
    return rungs


def floor_fraction(
    graph: ChannelGraph,
    layer_macs: Mapping[str, int],
    floors: Mapping[int, int],
    rounding: Rounding,
) -> float:
    """Remaining MACs / dense MACs with every group in ``floors`` at its rounded floor."""
    model = MacsModel(graph, layer_macs)
    for g, k in floors.items():
        n = graph.groups[g].channels
        model.set_kept(g, rounding.width(k, n, tied=is_tied(graph, g)))
    return model.macs / model.dense


def choose_rounding(
    graph: ChannelGraph,
    layer_macs: Mapping[str, int],
    floors: Mapping[int, int],
    flops_target: float,
    round_to: int,
    *,
    who: str = "",
) -> Rounding:
    """The coarsest rung of ``rounding_ladder(round_to)`` that can reach ``flops_target`` with
    every group at or above its floor: ``round_to`` wherever the target allows it, finer only
    where it would make the target unreachable. PlanError, naming the smallest reachable
    fraction, when even exact widths at the floors cannot."""
    ladder = rounding_ladder(round_to)
    floor = {r: floor_fraction(graph, layer_macs, floors, r) for r in ladder}
    for r in ladder:
        if floor[r] <= flops_target:
            return r
    raise unreachable(
        flops_target,
        floor[ladder[-1]],
        who=who,
        at="every group it can prune at its floor (min_keep_fraction, at least one channel; "
        "exact widths)",
        fix="lower min_keep_fraction",
        limits=blockers(graph, layer_macs),
    )


def floors_and_rounding(
    graph: ChannelGraph,
    layer_macs: Mapping[str, int],
    groups: Iterable[int],
    *,
    flops_target: float,
    round_to: int,
    min_keep_fraction: float,
    who: str = "",
) -> tuple[dict[int, int], Rounding]:
    """What every selection of a method is bound by: each group's floor (``guard_floors``)
    and the coarsest rounding that can still reach the target (``choose_rounding``)."""
    floors = guard_floors({g: graph.groups[g].channels for g in groups}, min_keep_fraction)
    rounding = choose_rounding(graph, layer_macs, floors, flops_target, round_to, who=who)
    return floors, rounding


@dataclass(frozen=True, slots=True)
class Selection:
    """Kept channel indices per group (every group scored), the rounding used and the
    predicted remaining MACs / dense MACs."""

    kept: dict[int, np.ndarray]
    rounding: Rounding
    macs_fraction: float
    reached: bool


def select_kept(
    graph: ChannelGraph,
    scores: Mapping[int, np.ndarray],
    layer_macs: Mapping[str, int],
    flops_target: float,
    *,
    rounding: Rounding,
    floors: Mapping[int, int],
    max_drop: int | None = None,
    tolerance: float = 0.01,
) -> Selection:
    """The walk to ``flops_target`` (lowest score first, ``floors`` respected, at most
    ``max_drop`` channels dropped). Once the target is reached, channels are given back, best
    score per MAC first, while the MACs stay at or under it. Without ``max_drop`` this is a
    final choice that must land within ``tolerance`` under the target: where single steps
    cannot (a model whose channels are coarse steps of its MACs), one group gives a step to
    another (``_Kept.swap``); where that still cannot, the finer rungs of the ladder are tried
    (the first within tolerance wins). If none lands, the closest is taken and single channels
    are given back at exact widths wherever they fit, so the result is as close under the
    target as channel steps allow: no channel of any group fits back under it.

    The kept channels are tracked as explicit sets from the walk on, and the MACs predicted
    from them per channel, so a group that layers read only in part (the halves of a split, a
    shuffle branch) is predicted as it will be pruned, not by its kept fraction."""
    rungs = [rounding]
    if max_drop is None:
        ladder = rounding_ladder(rounding.round_to)
        rungs += [r for r in ladder[ladder.index(rounding) + 1 :]] if rounding in ladder else []
    best: Selection | None = None
    for r in rungs:
        plan, reached = walk(
            graph,
            scores,
            layer_macs,
            flops_target,
            round_to=r.round_to,
            fine=r.fine,
            max_drop=max_drop,
            min_keep=floors,
        )
        kept = _Kept(graph, scores, layer_macs, plan, r, floors)
        if reached:  # channels given back to keep a tensor alive may overshoot: trim first
            kept.trim(flops_target)
        if reached and max_drop is not None:
            kept.give_back(flops_target)
        elif reached:
            kept.land(flops_target, tolerance)
        sel = kept.selection(flops_target)
        if max_drop is not None:
            return sel
        if sel.reached and flops_target - sel.macs_fraction <= tolerance:
            return sel
        if best is None or _closer(sel, best):
            best = sel
    assert best is not None
    if best.reached:  # no rung lands: the closest, then single channels wherever they fit
        exact = _Kept(graph, scores, layer_macs, best.kept, Rounding(1, 1), floors)
        exact.land(flops_target, tolerance)
        best = exact.selection(flops_target)
    return best


def _closer(a: Selection, b: Selection) -> bool:
    """Is ``a`` a better final choice than ``b``: under the target, then as close as can be."""
    if a.reached != b.reached:
        return a.reached
    return a.macs_fraction > b.macs_fraction if a.reached else a.macs_fraction < b.macs_fraction


def _order(scores: np.ndarray) -> np.ndarray:
    return np.argsort(-rankable(scores), kind="stable")  # best first, as walk keeps them


class _Kept:
    """The channels a selection keeps, as a boolean mask per scored group, with the MACs they
    leave (MacsModel on explicit sets: exact per channel). Widths move in steps of the
    rounding: up by the best-scoring dropped channels, down by the worst-scoring kept ones,
    never below a group's floor and never leaving a layer side that reads the group empty."""

    def __init__(self, graph, scores, layer_macs, plan, rounding: Rounding, floors) -> None:
        self.graph, self.rounding = graph, rounding
        self.scores = {g: rankable(s) for g, s in scores.items()}
        self.order = {g: _order(s) for g, s in scores.items()}
        self.tied = {g: is_tied(graph, g) for g in scores}
        full = {g: np.arange(graph.groups[g].channels) for g in scores}
        alive = keep_every_member_alive(graph, dict(plan), scores)
        self.keep = {}
        self.model = MacsModel(graph, layer_macs)
        for g in scores:
            self.keep[g] = np.zeros(graph.groups[g].channels, dtype=bool)
            self.keep[g][alive.get(g, full[g])] = True
            self.model.set_kept(g, np.nonzero(self.keep[g])[0])
        self.floor = {
            g: rounding.width(floors.get(g, 1), graph.groups[g].channels, tied=self.tied[g])
            for g in scores
        }
        self.sides = _partial_sides(graph, scores)

    def _side_emptied(self, g: int) -> bool:
        """Does a tensor reading part of group ``g`` (and only scored groups) keep nothing?"""
        return any(not any(self.keep[h][pos].any() for h, pos in side) for side in self.sides[g])

    @property
    def fraction(self) -> float:
        return self.model.macs / self.model.dense

    def _set(self, g: int, keep: np.ndarray) -> None:
        self.keep[g] = keep
        self.model.set_kept(g, np.nonzero(keep)[0])

    def step_up(self, g: int) -> np.ndarray | None:
        """The group's mask one rounding step wider (its best dropped channels back)."""
        keep, n = self.keep[g], len(self.keep[g])
        k = int(keep.sum())
        if k >= n:
            return None
        up = self.rounding.width(k + 1, n, tied=self.tied[g])
        dropped = [c for c in self.order[g] if not keep[c]]
        new = keep.copy()
        new[dropped[: up - k]] = True
        return new

    def step_down(self, g: int) -> np.ndarray | None:
        """The group's mask one rounding step narrower (its worst kept channels dropped)."""
        keep, n = self.keep[g], len(self.keep[g])
        k = int(keep.sum())
        down = next(
            (
                w
                for w in (self.rounding.width(j, n, tied=self.tied[g]) for j in range(k - 1, 0, -1))
                if w < k
            ),
            0,
        )
        if down < max(1, self.floor[g]):
            return None
        kept = [c for c in self.order[g] if keep[c]]
        new = keep.copy()
        new[kept[down:]] = False
        return new

    def _try(self, moves: list[tuple[int, np.ndarray]]) -> tuple[float, bool]:
        """MACs after ``moves`` and whether every layer side still reads a channel; undone."""
        before = [(g, self.keep[g]) for g, _ in moves]
        for g, keep in moves:
            self._set(g, keep)
        macs = self.model.macs
        empty = any(self.model.emptied(g) is not None or self._side_emptied(g) for g, _ in moves)
        for g, keep in reversed(before):
            self._set(g, keep)
        return macs, not empty

    def _gain(self, g: int, new: np.ndarray) -> float:
        """Score added (positive) or removed (negative) by replacing the group's mask."""
        s = self.scores[g]
        return float(s[new & ~self.keep[g]].sum() - s[self.keep[g] & ~new].sum())

    def give_back(self, target: float) -> None:
        """Greedy: re-add the step with the best score per added MAC while MACs stay under."""
        limit = target * self.model.dense * (1 + 1e-9)
        while True:
            best, best_ratio = None, -np.inf
            for g in self.keep:
                new = self.step_up(g)
                if new is None:
                    continue
                macs, ok = self._try([(g, new)])
                if not ok or macs > limit:
                    continue
                added = macs - self.model.macs
                ratio = self._gain(g, new) / added if added > 0 else np.inf
                if ratio > best_ratio:
                    best, best_ratio = (g, new), ratio
            if best is None:
                return
            self._set(*best)

    def trim(self, target: float) -> None:
        """Greedy: while above the target, drop the step that loses the least score per MAC
        it saves (floors and every tensor side respected)."""
        limit = target * self.model.dense * (1 + 1e-9)
        while self.model.macs > limit:
            best, best_ratio = None, np.inf
            for g in self.keep:
                new = self.step_down(g)
                if new is None:
                    continue
                macs, ok = self._try([(g, new)])
                saved = self.model.macs - macs
                if not ok or saved <= 0:
                    continue
                ratio = -self._gain(g, new) / saved
                if ratio < best_ratio:
                    best, best_ratio = (g, new), ratio
            if best is None:
                return
            self._set(*best)

    def land(self, target: float, tolerance: float) -> None:
        """Give back, then swap steps between groups and give back again, until the MACs are
        within ``tolerance`` under the target or no swap gets closer."""
        self.give_back(target)
        while target - self.fraction > tolerance and self.swap(target, tolerance):
            self.give_back(target)

    def swap(self, target: float, tolerance: float) -> bool:
        """One group steps up and another steps down so the MACs get closer to the target
        (still under it): among swaps that land within ``tolerance``, the one that loses the
        least score; else the one that gets closest. False when no swap gets closer."""
        dense, now = self.model.dense, self.model.macs
        limit = target * dense * (1 + 1e-9)
        ups, downs = {}, {}
        for g in self.keep:  # each step alone: a first guess at what a pair adds
            for steps, make in ((ups, self.step_up), (downs, self.step_down)):
                new = make(g)
                if new is not None:
                    macs, ok = self._try([(g, new)])
                    if ok:
                        steps[g] = (new, macs - now)
        pairs = sorted(
            (
                (du + dd, g, h)
                for g, (_, du) in ups.items()
                for h, (_, dd) in downs.items()
                if g != h and 0 < du + dd <= limit - now + 0.05 * dense
            ),
            reverse=True,
        )
        landing, closest = None, None
        for _, g, h in pairs:
            macs, ok = self._try([(g, ups[g][0]), (h, downs[h][0])])
            if not ok or not now < macs <= limit:
                continue
            gain = self._gain(g, ups[g][0]) + self._gain(h, downs[h][0])
            if target * dense - macs <= tolerance * dense:
                if landing is None or gain > landing[0]:
                    landing = (gain, g, h)
            elif closest is None or macs > closest[0]:
                closest = (macs, g, h)
        pick = landing or closest
        if pick is None:
            return False
        _, g, h = pick
        up, down = ups[g][0], downs[h][0]
        self._set(g, up)
        self._set(h, down)
        return True

    def selection(self, target: float) -> Selection:
        kept = {g: np.nonzero(k)[0] for g, k in self.keep.items()}
        frac = self.fraction
        return Selection(kept, self.rounding, frac, frac <= target * (1 + 1e-9))


def _partial_sides(graph, scores) -> dict[int, list[list[tuple[int, np.ndarray]]]]:
    """Per scored group, the tensor sides that read only part of it and nothing unscored, as
    (group, positions) parts: the ones a selection could empty (a side holding a whole group,
    or a channel that is never pruned, cannot be)."""
    out: dict[int, list[list[tuple[int, np.ndarray]]]] = {g: [] for g in scores}
    for _, atoms in graph.tensor_sides():
        gids, pos = graph.positions(atoms)
        parts = [(int(h), np.unique(pos[gids == h])) for h in np.unique(gids)]
        if any(h not in scores or len(p) == graph.groups[h].channels for h, p in parts):
            continue
        for h, _ in parts:
            out[h].append(parts)
    return out


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float | None:
    """Spearman's rho of two score vectors (average ranks for ties); None when either is
    constant (no ranking to compare)."""
    ra, rb = _ranks(np.asarray(a, dtype=np.float64)), _ranks(np.asarray(b, dtype=np.float64))
    if ra.std() == 0 or rb.std() == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x), dtype=np.float64)
    _, inverse = np.unique(x, return_inverse=True)
    sums = np.bincount(inverse, weights=ranks)
    return sums[inverse] / np.bincount(inverse)[inverse]
