"""One-shot magnitude pruning: the simplest method, and the baseline for the others.

Each channel's importance is the L2 norm of its slices summed over every member of its group
(scores normalized by the group mean so groups compare); channels are dropped globally,
lowest first, until the remaining MACs reach the target. No training.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from graphprune.methods.base import Method, MethodConfig, register_method
from graphprune.planning.selection import l2_scores, normalized


@dataclass(frozen=True, slots=True, kw_only=True)
class MagnitudeConfig(MethodConfig):
    """The common options only: the target and the width rounding."""


@dataclass(frozen=True, slots=True)
class MagnitudeStats:
    removed_channels: int  # summed over groups, before the pruned model is re-measured


@register_method
class Magnitude(Method):
    """One-shot: rank each group's channels by weight norm, prune globally to the MACs target."""

    name = "magnitude"
    config_class = MagnitudeConfig

    def scores(self) -> dict[int, np.ndarray]:
        return normalized(l2_scores(self.model, self.graph))

    def stats(self) -> MagnitudeStats:
        removed = (self.pass_stats.get("prune_channels") or {}).get("removed_channels", 0)
        return MagnitudeStats(removed_channels=int(removed))  # type: ignore[arg-type]
