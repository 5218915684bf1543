"""FPGM (He et al. 2019): prune the filters nearest the geometric median of their layer, with
soft filter pruning: re-masked on a schedule (once per epoch by default) while the masked
filters keep training, so a wrongly pruned filter can come back; hard removal at the end.
For short budgets the soft phase ends at ``soft_fraction`` of training (default half): the
masks are chosen a last time, made hard, and the rest fine-tunes (``soft_fraction=1``: soft to
the end, the paper's protocol, which leaves no training after the last choice).

Soft masks zero only the filters (conv/linear weights: ``filters_only``): the channel's norm
scale and shift stay, as in the paper, so a masked filter still gets a gradient (with its
norm layer zeroed too, a channel behind a ReLU would never move again). At the end every
producer entry of the masked channels is zeroed (the hard removal) and they are removed.

Filter j of a producer layer scores D_j = Σ_k ||F_j − F_k||_2 over the group's filters k in
that layer (the sum the geometric median minimises: the smallest sums are nearest it, the most
replaceable). Each producer's sums are divided by their mean (layers of different size and
scale compare), then averaged over the group's producers (a residual stream has several).
Groups with no conv/linear producer rank by weight magnitude (common.with_fallback).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from graphprune.methods.base import option, register_method
from graphprune.methods.baselines.common import (
    member_mean,
    phase_end,
    producer_rows,
    with_fallback,
)
from graphprune.methods.masking import MaskingConfig, MaskingMethod
from graphprune.passes.runner import Pass


def distance_sums(filters: torch.Tensor) -> torch.Tensor:
    """Row j: Σ_k ||filters[j] − filters[k]||_2 (filters flattened to one row each)."""
    rows = filters.reshape(len(filters), -1).double()
    return torch.cdist(rows, rows).sum(dim=1)


@dataclass(frozen=True, slots=True, kw_only=True)
class FPGMConfig(MaskingConfig):
    """How often the soft masks are re-chosen."""

    remask_every: int = option(
        0, "iterations between re-masks; 0: once per epoch (a tenth of training if unknown)"
    )
    soft_fraction: float = option(
        0.5,
        "share of training with soft masks; then the masks are chosen a last time, made hard "
        "and the rest fine-tunes (1: soft to the end, as the paper)",
    )

    def validate(self) -> None:
        MaskingConfig.validate(self)
        if self.remask_every < 0:
            raise ValueError(f"remask_every={self.remask_every}: iterations, >= 0 (0: per epoch)")
        if not 0.0 < self.soft_fraction <= 1.0:
            raise ValueError(
                f"soft_fraction={self.soft_fraction}: must be in (0, 1]; 1 keeps soft masks to "
                "the end (the paper), less leaves the rest for fine-tuning with hard masks"
            )


@dataclass(frozen=True, slots=True)
class FPGMStats:
    remasks: int  # how often the soft masks were chosen
    masked_channels: int
    removed_channels: int


@register_method
class FPGM(MaskingMethod):
    """FPGM: filters nearest their layer's geometric median go; soft masks, then fine-tuning."""

    name = "fpgm"
    config_class = FPGMConfig
    hard_masks = False  # soft filter pruning: masked filters are zeroed, then train on
    config: FPGMConfig

    def prepare(self) -> None:
        super().prepare()
        groups = self.masks.groups
        self.rows = [r for r in producer_rows(self.model, self.graph, groups) if r.ndim >= 2]
        self.remasks = 0
        self.last_mask = -1
        self.hardened = False

    @torch.no_grad()
    def after_backward(self) -> None:
        """Clip each masked filter's gradient to the mean gradient norm of its tensor's kept
        filters. A zeroed filter feeds its norm layer a zero-variance channel, which scales
        that filter's gradient by about std/sqrt(eps) (10^3 to 10^4 measured on ResNet-20):
        unclipped, the first step after a mask throws the filter, and with momentum the whole
        network, far off (Fashion-MNIST ResNet-20 went to chance). Clipped, masked filters
        still train, at the pace of the kept ones."""
        if not self.masked_once or self.hardened:
            return
        for r in self.rows:
            keep = torch.from_numpy(self.masks.keep[r.gid][r.pos])
            if keep.all() or not keep.any():
                continue
            p = self.model.get_parameter(r.path)
            if p.grad is None:
                continue
            g = p.grad.index_select(r.axis, r.index).movedim(r.axis, 0)
            norms = g.reshape(len(r.pos), -1).norm(dim=1)
            cap = norms[keep].mean()
            scale = torch.where(keep, 1.0, (cap / norms.clamp_min(1e-30)).clamp(max=1.0))
            shape = [-1] + [1] * (g.dim() - 1)
            clipped = (g * scale.to(g.dtype).reshape(shape)).movedim(0, r.axis)
            p.grad.index_copy_(r.axis, r.index, clipped)

    def period(self) -> int:
        if self.config.remask_every:
            return self.config.remask_every
        if self.iters_per_epoch:
            return self.iters_per_epoch
        return max(1, (self.total_iters or 10) // 10)

    def soft_end(self) -> int:
        """The iteration of the last (hard) choice."""
        if self.config.soft_fraction >= 1.0:
            return self.total_iters or 0
        return phase_end(self, self.config.soft_fraction)

    def on_step(self) -> None:
        if self.hardened:
            return
        if self.iteration >= self.soft_end():
            self.remask()
            self.harden()
        elif self.iteration % self.period() == 0:
            self.remask()

    def harden(self) -> None:
        """From now on the masks are hard: every producer entry zeroed after each step."""
        self.hardened = True
        self.hard_masks = True
        self.masks.apply()

    def remask(self) -> None:
        """Choose the masks from the current weights (masked filters trained since the last
        choice compete again) and zero the masked ones."""
        self.mask_to(self.scores(), filters_only=True)
        self.remasks += 1
        self.last_mask = self.iteration

    def scores(self) -> dict[int, np.ndarray]:
        values = []
        for r in self.rows:
            d = distance_sums(r.values(self.model).detach().movedim(r.axis, 0))
            mean = float(d.mean())
            values.append((r, (d / mean if mean > 0 else d).cpu().numpy()))
        channels = {g: len(self.masks.keep[g]) for g in self.masks.groups}
        covered = {r.gid for r in self.rows}
        scores = {g: s for g, s in member_mean(values, channels).items() if g in covered}
        return with_fallback(self, scores, covered)

    def extra_state(self) -> dict:
        return {"remasks": self.remasks, "last_mask": self.last_mask, "hardened": self.hardened}

    def load_extra_state(self, state) -> None:
        self.remasks, self.last_mask = int(state["remasks"]), int(state["last_mask"])
        if state["hardened"]:
            self.harden()

    def finalize_passes(self) -> list[Pass]:
        """Hard removal: the masks chosen last (re-chosen now if soft filters trained since)."""
        if self.masked_once and not self.hardened and self.last_mask != self.iteration:
            self.remask()
        return super().finalize_passes()

    def stats(self) -> FPGMStats:
        removed = (self.pass_stats.get("prune_channels") or {}).get("removed_channels", 0)
        return FPGMStats(self.remasks, self.masks.masked(), int(removed))  # type: ignore[arg-type]
