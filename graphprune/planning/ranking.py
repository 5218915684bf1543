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
  removes what costs least importance per MAC (``per_mac``).
- **A floor per group.** Cost-aware ranking prefers wide, expensive layers; a minimum kept
  fraction (``guard_floors``, default 0.1, at least one channel) stops a layer collapsing.

``choose_rounding`` keeps widths hardware friendly (multiples of ``round_to``) where the target
allows and rounds narrow layers finer (``round_to``/2, /4, ... 1) where it would otherwise make
the target unreachable. ``select_kept`` runs the walk and, for a final mask, gives channels
back while the MACs stay under the target, finer if needed, so the result lands within
``tolerance`` of the target instead of one rounding step under it.
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


def per_mac(scores: Mapping[int, np.ndarray], costs: Mapping[int, float]) -> dict[int, np.ndarray]:
    """Importance per MAC saved, in the scores' units: score / (cost / mean cost).

    A group whose channels save no MACs keeps its scores as they are (nothing to gain there,
    and dividing by zero would make it look infinitely important)."""
    positive = [c for c in costs.values() if c > 0]
    mean = float(np.mean(positive)) if positive else 1.0
    return {
        g: np.asarray(s, dtype=np.float64) / (costs[g] / mean if costs.get(g, 0) > 0 else 1.0)
        for g, s in scores.items()
    }


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
    final choice: if it still ends more than ``tolerance`` under the target, the finer rungs
    of the ladder are tried (the first within tolerance wins, else the closest)."""
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
        counts = {g: len(plan[g]) if g in plan else graph.groups[g].channels for g in scores}
        if reached:
            counts = _give_back(graph, scores, layer_macs, flops_target, counts, r)
        sel = _selection(graph, scores, layer_macs, counts, r, flops_target)
        if max_drop is not None or not sel.reached:
            return sel if best is None else best
        if flops_target - sel.macs_fraction <= tolerance:
            return sel
        if best is None or sel.macs_fraction > best.macs_fraction:
            best = sel
    assert best is not None
    return best


def _order(scores: np.ndarray) -> np.ndarray:
    return np.argsort(-rankable(scores), kind="stable")  # best first, as walk keeps them


def _selection(graph, scores, layer_macs, counts, rounding, target) -> Selection:
    plan = {g: np.sort(_order(scores[g])[:k]) for g, k in counts.items()}
    plan = keep_every_member_alive(
        graph, {g: p for g, p in plan.items() if len(p) < graph.groups[g].channels}, scores
    )
    model = MacsModel(graph, layer_macs)
    kept = {}
    for g in scores:
        kept[g] = plan.get(g, np.arange(graph.groups[g].channels))
        model.set_kept(g, len(kept[g]))
    frac = model.macs / model.dense
    return Selection(kept, rounding, frac, frac <= target * (1 + 1e-9))


def _give_back(graph, scores, layer_macs, target, counts, rounding) -> dict[int, int]:
    """Greedy: re-add the next allowed width step with the best score per added MAC while the
    MACs stay under the target."""
    model = MacsModel(graph, layer_macs)
    for g, k in counts.items():
        model.set_kept(g, k)
    limit = target * model.dense * (1 + 1e-9)
    orders = {g: _order(s) for g, s in scores.items()}
    tied = {g: is_tied(graph, g) for g in scores}
    counts = dict(counts)
    while True:
        best, best_ratio = None, -np.inf
        for g, k in counts.items():
            n = graph.groups[g].channels
            if k >= n:
                continue
            up = rounding.width(k + 1, n, tied=tied[g])
            before = model.macs
            model.set_kept(g, up)
            added, fits = model.macs - before, model.macs <= limit
            model.set_kept(g, k)
            if not fits:
                continue
            gain = float(np.sum(np.asarray(scores[g])[orders[g][k:up]]))
            ratio = gain / added if added > 0 else np.inf
            if ratio > best_ratio:
                best, best_ratio = (g, up), ratio
        if best is None:
            return counts
        counts[best[0]] = best[1]
        model.set_kept(best[0], best[1])


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
