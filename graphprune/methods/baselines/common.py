"""What the classic baselines share: where a group's norm scales and producer weights are, how
per-member values become one comparable score per channel, and the "score, cut once, fine-tune
masked" schedule.

Comparability: a group with several members (a residual stream has one norm layer per block)
must not look more important for having more of them, so member values are averaged
(``producer_mean``, as ResRep ranks); criteria whose scale differs by layer (weight norms,
distances) are first divided by their member's mean.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import fx, nn

from graphprune.analysis import ChannelGraph
from graphprune.frontend.params import get_tensor
from graphprune.methods.masking import MaskingMethod
from graphprune.planning.ranking import producer_mean
from graphprune.planning.selection import l2_scores, normalized

NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


@dataclass(frozen=True, slots=True)
class Rows:
    """One producer tensor's slice of one group: ``tensor`` indexed along ``axis`` at
    ``index`` holds the group's channels ``pos``."""

    path: str
    module: str  # the owning module's path
    axis: int
    ndim: int  # the tensor's: >= 2 for a filter (conv/linear weight), 1 for a scale or bias
    gid: int
    index: torch.Tensor
    pos: np.ndarray

    def values(self, gm: fx.GraphModule) -> torch.Tensor:
        return get_tensor(gm, self.path).index_select(self.axis, self.index)

    def per_channel(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` (this slice, or a tensor of its shape) summed to one value per channel."""
        return t.movedim(self.axis, 0).reshape(len(self.pos), -1).sum(dim=1)


def producer_rows(gm: fx.GraphModule, graph: ChannelGraph, groups: list[int]) -> Iterator[Rows]:
    """Every producer-side ("out") slice of the given groups, one per (tensor, group)."""
    wanted = set(groups)
    for s in graph.sites:
        if s.role != "out" or s.atoms.ndim != 1:
            continue
        gids, pos = graph.positions(s.atoms)
        ndim = get_tensor(gm, s.path).dim()
        for gid in sorted(set(np.unique(gids).tolist()) & wanted):
            hit = np.nonzero(gids == gid)[0]
            module = s.path.rpartition(".")[0]
            yield Rows(s.path, module, s.axis, ndim, gid, torch.from_numpy(hit), pos[hit])


def is_norm(gm: fx.GraphModule, rows: Rows) -> bool:
    return isinstance(gm.get_submodule(rows.module), NORMS)


def scale_rows(gm: fx.GraphModule, graph: ChannelGraph, groups: list[int]) -> list[Rows]:
    """The norm scales (gamma) of the given groups: slimming's and polarization's parameters."""
    return [
        r for r in producer_rows(gm, graph, groups) if r.path.endswith(".weight") and is_norm(gm, r)
    ]


def member_mean(
    values: list[tuple[Rows, np.ndarray]], channels: dict[int, int]
) -> dict[int, np.ndarray]:
    """Per group, each channel's value averaged over the members that hold it."""
    return producer_mean(((r.gid, r.pos, v) for r, v in values), channels)


def with_fallback(
    m: MaskingMethod, scores: dict[int, np.ndarray], covered: set[int]
) -> dict[int, np.ndarray]:
    """Scores for every masked group: groups the criterion does not cover (no norm layer, no
    conv producer) get their normalised weight magnitude times the mean covered score, so
    they rank on the same scale instead of being pruned first or never."""
    missing = [g for g in m.masks.groups if g not in covered]
    if not missing:
        return scores
    values = [scores[g] for g in covered if g in scores]
    scale = float(np.concatenate(values).mean()) if values else 1.0
    magnitude = normalized(l2_scores(m.model, m.graph))
    out = dict(scores)
    for g in missing:
        out[g] = magnitude[g] * (scale if scale > 0 else 1.0)
    return out


class CutOnce(MaskingMethod):
    """Score while training, mask once at ``cut_iteration()`` (globally, to the target), then
    fine-tune with hard masks; the base removes the masked channels exactly at the end. A run
    shorter than the scoring phase cuts at finalize."""

    def cut_iteration(self) -> int:
        raise NotImplementedError

    def scoring(self) -> bool:
        """True while the scoring (e.g. sparsity) phase runs."""
        return not self.masked_once

    def on_step(self) -> None:
        if not self.masked_once and self.iteration >= self.cut_iteration():
            self.cut()

    def cut(self) -> None:
        self.mask_to(self.scores())
        self.cut_at = self.iteration

    def extra_state(self) -> dict:
        return {"cut_at": getattr(self, "cut_at", None)}

    def load_extra_state(self, state) -> None:
        self.cut_at = state.get("cut_at")


def phase_end(m: MaskingMethod, fraction: float) -> int:
    """The iteration that ends a phase of ``fraction`` of the training (at least one step)."""
    return max(1, round(fraction * (m.total_iters or 0)))
