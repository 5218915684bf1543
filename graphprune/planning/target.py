"""The promise about a MACs target: reached within TOLERANCE, or a PlanError that says why.

Planning predicts MACs with a model (``selection.MacsModel``); the truth is the pruned model
counted by FlopCounterMode. ``check_reached`` compares the truth with the target after
pruning, so a disagreement between the two can never pass silently, and ``blockers`` is the
one description of what keeps MACs from shrinking (unprunable groups and their reasons, MACs
no group touches, frozen submodules) that every refusal prints.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

import numpy as np

from graphprune.analysis import ChannelGraph
from graphprune.errors import PlanError, TargetMissedError
from graphprune.planning.macs import MacsReport

TOLERANCE = 0.01  # a reached ratio may exceed the target by this much


def blockers(
    graph: ChannelGraph,
    layer_macs: Mapping[str, int],
    frozen: Mapping[str, str] | None = None,
    *,
    limit: int = 6,
) -> str:
    """What keeps MACs from shrinking, biggest first: one line per cause."""
    total = sum(int(v) for v in layer_macs.values()) or 1
    prunable = np.array([g.prunable for g in graph.groups], dtype=bool)
    stuck: Counter[str] = Counter()  # reason -> MACs of layers only unprunable groups touch
    modelled = set()
    for layer in graph.mac_layers:
        modelled.add(layer.target)
        macs = int(layer_macs.get(layer.target, 0))
        sides = [a.reshape(-1) for a in (layer.in_atoms, layer.out_atoms) if a is not None]
        gids = {int(g) for a in sides for g in graph.atom_group[a]}
        if not macs or any(prunable[g] for g in gids):
            continue
        reasons = sorted({r for g in gids for r in graph.groups[g].reasons})
        stuck[reasons[0] if reasons else "no prunable group"] += macs
    fixed = sum(int(v) for k, v in layer_macs.items() if k not in modelled)
    lines = [
        f"{macs / total:.1%} of the MACs sit in layers only unprunable groups touch: {reason}"
        for reason, macs in stuck.most_common(limit)
    ]
    if len(stuck) > limit:
        lines.append(f"... and {len(stuck) - limit} more reasons")
    if fixed:
        lines.append(
            f"{fixed / total:.1%} of the MACs are outside any prunable conv/linear "
            "(functional ops, attention modules, frozen submodules)"
        )
    if frozen:
        lines.append(
            "frozen submodules (fx could not trace them): "
            + "; ".join(f"{k} ({v})" for k, v in frozen.items())
        )
    if not lines:  # every layer is prunable: the floor named before this sets the limit
        return " no unprunable layer; only the floor above"
    return "\n  - ".join(["", *lines])


def check_reached(
    flops_target: float,
    dense: MacsReport,
    pruned: MacsReport,
    graph: ChannelGraph,
    frozen: Mapping[str, str] | None = None,
    *,
    trained: bool = False,
    result: object = None,
) -> float:
    """The measured ratio, or an error when it exceeds the target by more than TOLERANCE.

    One-shot methods raise PlanError (the planner and the measurement disagree). A method
    that trained can end short when training stops before its masked channels decay; that is
    a TargetMissedError carrying ``result`` (the trained, pruned model and its report), so
    the error never throws the training away.
    """
    ratio = pruned.macs / dense.macs
    if ratio > flops_target + TOLERANCE:
        why = (
            "training ended before the masked channels decayed below the folding threshold "
            "(see the report's stats); train longer or with a larger lr. The trained, pruned "
            "model is in this error's .result"
            if trained
            else "the planner's MACs model and the pruned model disagree; please report this "
            "with the model"
        )
        msg = (
            f"flops_target={flops_target} was not reached: the pruned model keeps {ratio:.3f} of "
            f"the dense MACs (counted by FlopCounterMode), more than {flops_target} + "
            f"{TOLERANCE}: {why}. What limits pruning:{blockers(graph, dense.per_layer, frozen)}"
        )
        if trained:
            raise TargetMissedError(msg, result=result)
        raise PlanError(msg)
    return ratio
