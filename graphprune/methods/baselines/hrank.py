"""HRank (Lin et al. 2020): filters whose feature maps have low rank carry little information.

While the model trains on its first batches, forward hooks on every conv that produces a
masked group's channels record the matrix rank of each output channel's H×W map, per input,
until ``rank_inputs`` inputs have passed each conv. A channel's score is its average rank,
divided by its layer's mean (layers of different resolution compare), then averaged over the
group's producer convs; ties (most maps are full rank) go by weight magnitude. Then one global
cut (lowest rank first) and masked fine-tuning.

The maps are the conv outputs, before norm and activation (HRank ranks after them; a
per-channel affine map changes a rank by at most one, and the hook stays on the module that
owns the channel). Groups with no conv producer rank by weight magnitude (common.with_fallback).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from graphprune.methods.base import option, register_method
from graphprune.methods.baselines.common import (
    CutOnce,
    member_mean,
    producer_rows,
    with_fallback,
)
from graphprune.methods.masking import MaskingConfig
from graphprune.passes.runner import Pass
from graphprune.planning.selection import l2_scores, normalized

# Most maps are full rank, so many channels tie; ties are broken by normalised weight magnitude,
# scaled far below the smallest rank difference (1 / (inputs x width) of a layer's mean).
TIE_BREAK = 1e-6


def map_ranks(out: torch.Tensor) -> torch.Tensor:
    """Per channel, the matrix ranks of its H×W maps summed over the batch: out is (N, C, H, W)."""
    return torch.linalg.matrix_rank(out.detach().float()).sum(dim=0)


@dataclass(frozen=True, slots=True, kw_only=True)
class HRankConfig(MaskingConfig):
    """How many inputs the ranks are averaged over."""

    rank_inputs: int = option(256, "inputs whose feature-map ranks are averaged (then the cut)")

    def validate(self) -> None:
        MaskingConfig.validate(self)
        if self.rank_inputs < 1:
            raise ValueError(f"rank_inputs={self.rank_inputs}: a number of inputs, >= 1")


@dataclass(frozen=True, slots=True)
class HRankStats:
    cut_at: int | None  # the iteration of the cut (None: cut at finalize)
    ranked_convs: int
    masked_channels: int
    removed_channels: int


@register_method
class HRank(CutOnce):
    """HRank: the lowest average feature-map rank goes; a global cut, then fine-tuning."""

    name = "hrank"
    config_class = HRankConfig
    config: HRankConfig

    def prepare(self) -> None:
        super().prepare()
        self.rows = [
            r
            for r in producer_rows(self.model, self.graph, self.masks.groups)
            if r.ndim == 4
            and r.axis == 0
            and r.path.endswith(".weight")
            and isinstance(self.model.get_submodule(r.module), nn.Conv2d)
        ]
        self.convs = sorted({r.module for r in self.rows})
        self.rank_sums = {c: None for c in self.convs}  # module -> per-output-channel sums
        self.seen = dict.fromkeys(self.convs, 0)
        self.hooks = [
            self.model.get_submodule(c).register_forward_hook(self._hook(c)) for c in self.convs
        ]

    def _hook(self, conv: str):
        def record(module, args, out) -> None:
            if self.masked_once or not module.training or self.seen[conv] >= self.enough():
                return
            ranks = map_ranks(out).double().cpu()
            prev = self.rank_sums[conv]
            self.rank_sums[conv] = ranks if prev is None else prev + ranks
            self.seen[conv] += out.shape[0]

        return record

    def enough(self) -> int:
        return self.config.rank_inputs

    def cut_iteration(self) -> int:
        """Cut once every conv has seen ``rank_inputs`` inputs (or at the end of training)."""
        if all(n >= self.enough() for n in self.seen.values()):
            return self.iteration
        return self.total_iters or self.iteration + 1

    def cut(self) -> None:
        super().cut()
        self.remove_hooks()

    def remove_hooks(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks = []

    def average_ranks(self) -> dict[str, np.ndarray]:
        """Per conv, each output channel's average map rank over the inputs it saw."""
        return {
            c: (s / max(self.seen[c], 1)).numpy()
            for c, s in self.rank_sums.items()
            if s is not None
        }

    def scores(self) -> dict[int, np.ndarray]:
        ranks = self.average_ranks()
        values = []
        for r in self.rows:
            if r.module in ranks:
                v = ranks[r.module][r.index.numpy()]
                mean = float(ranks[r.module].mean())
                values.append((r, v / mean if mean > 0 else v))
        channels = {g: len(self.masks.keep[g]) for g in self.masks.groups}
        covered = {r.gid for r, _ in values}
        magnitude = normalized(l2_scores(self.model, self.graph))
        scores = {
            g: s + TIE_BREAK * magnitude[g]
            for g, s in member_mean(values, channels).items()
            if g in covered
        }
        return with_fallback(self, scores, covered)

    def extra_state(self) -> dict:
        return {**CutOnce.extra_state(self), "rank_sums": dict(self.rank_sums), "seen": self.seen}

    def load_extra_state(self, state) -> None:
        CutOnce.load_extra_state(self, state)
        self.rank_sums = {c: s for c, s in state["rank_sums"].items()}
        self.seen = {c: int(n) for c, n in state["seen"].items()}
        if self.masked_once:
            self.remove_hooks()

    def finalize_passes(self) -> list[Pass]:
        self.remove_hooks()
        return super().finalize_passes()

    def stats(self) -> HRankStats:
        removed = (self.pass_stats.get("prune_channels") or {}).get("removed_channels", 0)
        return HRankStats(
            getattr(self, "cut_at", None),
            len(self.convs),
            self.masks.masked(),
            int(removed),  # type: ignore[arg-type]
        )
