"""Pruning plans: which channels of each group to keep, and the checks every plan must pass.

A plan maps a group id (``analyze(gm)`` numbering) to the sorted channel indices it keeps;
groups it does not name keep everything.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import fx

from graphprune.analysis import ChannelGraph
from graphprune.analysis.atoms import unique_pairs
from graphprune.errors import PlanError
from graphprune.frontend.params import get_tensor

Plan = dict[int, np.ndarray]


def validate_plan(graph: ChannelGraph, plan: Mapping[int, Sequence[int]]) -> dict[int, np.ndarray]:
    """Check every entry names a prunable group and keeps a valid, non-empty channel set."""
    groups = graph.groups
    out: dict[int, np.ndarray] = {}
    for gid, keep in plan.items():
        if not isinstance(gid, (int, np.integer)) or not 0 <= gid < len(groups):
            raise PlanError(f"plan names group {gid!r}; this model has groups 0..{len(groups) - 1}")
        g = groups[gid]
        if any(not isinstance(k, (int, np.integer)) or isinstance(k, bool) for k in keep):
            raise PlanError(f"group {gid}: kept channel indices must be integers, got {list(keep)}")
        kept = np.asarray(sorted(int(k) for k in keep), dtype=np.int64)
        if len(kept) == g.channels and np.array_equal(kept, np.arange(g.channels)):
            continue
        if not g.prunable:
            raise PlanError(f"group {gid} cannot be pruned: {'; '.join(g.reasons)}")
        if len(kept) == 0:
            raise PlanError(
                f"plan keeps no channel of group {gid} ({', '.join(g.producers)}): "
                "keep at least one, or the layers lose their whole output"
            )
        if kept[0] < 0 or kept[-1] >= g.channels:
            raise PlanError(
                f"group {gid} has channels 0..{g.channels - 1}; plan keeps {kept.tolist()}"
            )
        if len(np.unique(kept)) != len(kept):
            raise PlanError(f"plan keeps channels of group {gid} more than once: {kept.tolist()}")
        out[int(gid)] = kept
    return out


@torch.no_grad()
def dead_channel_plan(gm: fx.GraphModule, graph: ChannelGraph) -> dict[int, np.ndarray]:
    """Keep the channels with any non-zero producer-side entry (conv row, bias, norm affine).

    A channel whose producer-side entries are all zero is zero wherever it flows, so removing
    it is exact. At least one channel per group is kept.
    """
    # Inexact groups are left whole: a zero producer does not make their channels vanish.
    alive = {g.id: np.zeros(g.channels, dtype=bool) for g in graph.groups if g.prunable and g.exact}
    for s in graph.sites:
        if s.role != "out" or s.atoms.ndim != 1:
            continue
        t = get_tensor(gm, s.path).detach()
        nonzero = (
            (t.transpose(0, s.axis).reshape(t.shape[s.axis], -1) != 0).any(dim=1).cpu().numpy()
        )
        gids, pos = graph.positions(s.atoms)
        for gid in alive:
            hit = (gids == gid) & nonzero
            alive[gid][pos[hit]] = True
    plan = {}
    for gid, a in alive.items():
        if not a.any():
            a[0] = True
        if not a.all():
            plan[gid] = np.nonzero(a)[0]
    return plan


def check_nothing_emptied(graph: ChannelGraph, removed: np.ndarray) -> None:
    """A plan may keep a group alive yet drop every channel one member sees (e.g. the half
    of a split a branch reads); that member would be left with zero channels."""
    for label, atoms in graph.tensor_sides():
        if removed[atoms].all():
            gids = sorted(set(graph.atom_group[atoms].tolist()))
            raise PlanError(
                f"plan removes every channel of {label} (groups {gids}); "
                "keep at least one of the channels it reads"
            )


def round_plan(
    graph: ChannelGraph,
    plan: dict[int, np.ndarray],
    round_to: int,
    scores: Mapping[int, Sequence[float]] | None = None,
) -> dict[int, np.ndarray]:
    """Round each kept width up to a multiple of ``round_to`` (never above the group's size).

    Channels are added back by highest score, or lowest index when no scores are given.
    Groups whose channels are tied blocks (GroupNorm groups, conv groups) keep their widths.
    """
    if round_to <= 1:
        return plan
    out = {}
    for gid, kept in plan.items():
        n = graph.groups[gid].channels
        want = rounded_width(len(kept), n, round_to, tied=is_tied(graph, gid))
        if want == len(kept):
            out[gid] = kept
            continue
        dropped = np.setdiff1d(np.arange(n), kept)
        if scores is not None and gid in scores:
            s = np.asarray(scores[gid])[dropped]
            dropped = dropped[np.argsort(-s, kind="stable")]
        out[gid] = np.sort(np.concatenate([kept, dropped[: want - len(kept)]]))
    return out


def check_flops_target(flops_target: object) -> None:
    """Every entry point takes the target as remaining MACs / dense MACs, strictly in (0, 1)."""
    if not isinstance(flops_target, (int, float)) or not 0.0 < flops_target < 1.0:
        raise PlanError(
            f"flops_target={flops_target!r}: must be in (0, 1), the fraction of dense MACs to "
            "keep (0.5 keeps half)"
        )


def rounded_width(
    kept: int, total: int, round_to: int, *, tied: bool = False, fine: int | None = None
) -> int:
    """The width ``kept`` channels become: rounded up to a multiple of ``round_to``, capped at
    ``total``. Groups smaller than ``round_to`` and tied groups (one channel = a GroupNorm
    group, a conv group, a shuffle column) are not rounded. The planner and the pruner both
    use this, so the MACs a plan was chosen for are the MACs the pruned model has.

    ``fine`` (a divisor step below ``round_to``, e.g. 4, 2 or 1) rounds widths under
    ``round_to`` to multiples of ``fine`` instead, so a narrow layer can go below ``round_to``
    where a deep target needs it while wide layers keep hardware-friendly multiples. The
    result never decreases as ``kept`` grows."""
    if round_to <= 1 or total < round_to or tied:
        return kept
    step = round_to if fine is None or kept >= round_to else max(1, fine)
    return min(total, -(-kept // step) * step)


def is_tied(graph: ChannelGraph, gid: int) -> bool:
    """True when one channel of the group spans several channels of one producer."""
    atoms = np.nonzero(graph.atom_group == gid)[0]
    pairs = unique_pairs(graph.atom_source[atoms], graph.atom_pos[atoms])
    return pairs.shape[1] < len(atoms)


def keep_every_member_alive(
    graph: ChannelGraph,
    plan: dict[int, np.ndarray],
    scores: Mapping[int, np.ndarray] | None = None,
) -> dict[int, np.ndarray]:
    """Give back one channel to any tensor side (``ChannelGraph.tensor_sides``, e.g. one half
    of a split) the plan leaves empty: the best-scoring one it sees, or without scores the
    lowest-numbered. Updates ``plan``."""
    removed = graph.removed_mask(plan)
    for _, atoms in graph.tensor_sides():
        if removed[atoms].all():
            gids, pos = graph.positions(atoms)
            gid = int(gids[0])
            candidates = np.unique(pos[gids == gid])
            best = (
                candidates[np.argmax(np.asarray(scores[gid])[candidates])]
                if scores is not None
                else candidates[0]
            )
            plan[gid] = np.union1d(plan[gid], [best])
            removed = graph.removed_mask(plan)
    return plan
