"""Network slimming (Liu et al. 2017) and polarization (Zhuang et al. 2020): a sparsity
regularizer on the norm scales (gamma) while training, then one global cut by |gamma|, then
masked fine-tuning and exact removal.

- **slimming** adds ``s * sign(gamma)`` to each gamma's gradient (the L1 subgradient).
  The papers train 160 epochs; for short budgets the default strength comes from the
  budget instead: ``pull / (sparsity-phase steps x lr)``, the same total pull in any length
  of training (a given ``sparsity``/``strength`` is used as is).
- **polarization** adds ``lambda * dR/dgamma`` for R(v) = t·||v||_1 − ||v − mean(v)||_1 per
  norm layer and group (v: that layer's gammas of that group): the first term pulls every
  scale to 0, the second pushes scales away from their mean, so scales split into a cluster at
  0 and one away from it, and the cut falls into the gap.

A channel's score is |gamma| averaged over the group's norm layers (a residual stream has
several; the average keeps it comparable to a single-layer group). Groups with no norm layer
rank by their normalised weight magnitude on the same scale (common.with_fallback).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from graphprune.methods.base import option, register_method
from graphprune.methods.baselines.common import (
    CutOnce,
    member_mean,
    phase_end,
    scale_rows,
    with_fallback,
)
from graphprune.methods.masking import MaskingConfig


def l1_grad(v: torch.Tensor) -> torch.Tensor:
    """The subgradient of ||v||_1 that slimming uses: sign(v) (0 at 0)."""
    return torch.sign(v)


def polarization_grad(v: torch.Tensor, t: float) -> torch.Tensor:
    """A subgradient of R(v) = t·Σ|v_i| − Σ|v_i − mean(v)| (sign(0) = 0):
    dR/dv_j = t·sign(v_j) − sign(v_j − m) + (1/n)·Σ_i sign(v_i − m), m = mean(v)."""
    d = torch.sign(v - v.mean())
    return t * torch.sign(v) - d + d.mean()


PULL_DOC = (
    "with a strength of 0: the total pull on each scale over the sparsity phase "
    "(strength x phase steps x lr; the paper's runs: about 0.03 ResNet, 0.3 VGG)"
)
PAPER_STRENGTH = 1e-4  # when the strength is 0 and no lr is known (a user's loop without lr=)


@dataclass(frozen=True, slots=True, kw_only=True)
class SlimmingConfig(MaskingConfig):
    """The L1 strength (or the pull it comes from) and the length of the sparsity phase."""

    sparsity: float = option(
        0.0,
        "s in s·sign(gamma) on norm scales (paper: 1e-4 VGG, 1e-5 ResNet over 160 epochs); "
        "0: from the budget, s = pull / (phase steps x lr)",
    )
    pull: float = option(0.1, PULL_DOC)
    sparsity_fraction: float = option(
        0.4, "share of training with the regularizer; then the cut and masked fine-tuning"
    )

    def validate(self) -> None:
        MaskingConfig.validate(self)
        _check_phase(self.sparsity, self.pull, self.sparsity_fraction)


@dataclass(frozen=True, slots=True, kw_only=True)
class PolarizationConfig(MaskingConfig):
    """The regularizer's strength (or the pull it comes from), t, the sparsity phase."""

    strength: float = option(
        0.0,
        "lambda: the regularizer's weight (paper: 8e-5 ResNet-50); 0: from the budget, "
        "lambda = pull / (phase steps x lr)",
    )
    pull: float = option(0.1, PULL_DOC)
    t: float = option(1.4, "t in t·||g||_1 − ||g − mean(g)||_1; above 1 pulls toward 0 overall")
    sparsity_fraction: float = option(
        0.4, "share of training with the regularizer; then the cut and masked fine-tuning"
    )

    def validate(self) -> None:
        MaskingConfig.validate(self)
        _check_phase(self.strength, self.pull, self.sparsity_fraction)
        if self.t <= 0:
            raise ValueError(f"t={self.t}: must be > 0 (1.2 to 1.6 in the paper)")


def _check_phase(strength: float, pull: float, fraction: float) -> None:
    if strength < 0:
        raise ValueError(f"strength {strength}: must be >= 0 (0: from the budget and pull)")
    if pull <= 0:
        raise ValueError(f"pull={pull}: must be > 0 (0.1 by default)")
    if not 0.0 < fraction < 1.0:
        raise ValueError(
            f"sparsity_fraction={fraction}: must be in (0, 1), the share of training before "
            "the cut (the rest fine-tunes)"
        )


@dataclass(frozen=True, slots=True)
class ScaleCutStats:
    strength: float  # the regularizer's weight used (given, or from the budget and pull)
    cut_at: int | None  # the iteration of the cut (None: cut at finalize, training too short)
    masked_channels: int
    groups_without_norm: int  # ranked by weight magnitude instead
    removed_channels: int


class _ScaleCut(CutOnce):
    """The shared part: a gradient term on gamma during the sparsity phase, the cut by |gamma|."""

    def prepare(self) -> None:
        super().prepare()
        self.rows = scale_rows(self.model, self.graph, self.masks.groups)

    def cut_iteration(self) -> int:
        return phase_end(self, self.config.sparsity_fraction)

    def scale_grad(self, v: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def strength(self, given: float) -> float:
        """``given``, or when it is 0 the budget's: pull / (sparsity-phase steps x lr), so a
        short run regularizes as much in total as a long one (the paper's 1e-4 without lr)."""
        if given > 0:
            return given
        if not self.lr:
            return PAPER_STRENGTH
        return self.config.pull / (self.cut_iteration() * self.lr)

    @torch.no_grad()
    def after_backward(self) -> None:
        if not self.scoring():
            return
        for r in self.rows:
            gamma = self.model.get_parameter(r.path)
            if gamma.grad is None:
                continue
            g = self.scale_grad(gamma.detach().index_select(r.axis, r.index))
            gamma.grad.index_add_(r.axis, r.index, g.to(gamma.grad.dtype))

    def scores(self) -> dict[int, np.ndarray]:
        values = [(r, r.values(self.model).detach().abs().cpu().numpy()) for r in self.rows]
        channels = {g: len(self.masks.keep[g]) for g in self.masks.groups}
        covered = {r.gid for r in self.rows}
        scores = {g: s for g, s in member_mean(values, channels).items() if g in covered}
        return with_fallback(self, scores, covered)

    def stats(self) -> ScaleCutStats:
        removed = (self.pass_stats.get("prune_channels") or {}).get("removed_channels", 0)
        return ScaleCutStats(
            strength=self.strength_used,
            cut_at=getattr(self, "cut_at", None),
            masked_channels=self.masks.masked(),
            groups_without_norm=len(set(self.masks.groups) - {r.gid for r in self.rows}),
            removed_channels=int(removed),  # type: ignore[arg-type]
        )


@register_method
class Slimming(_ScaleCut):
    """Network slimming: L1 on norm scales, a global cut by |gamma|, masked fine-tuning."""

    name = "slimming"
    config_class = SlimmingConfig
    config: SlimmingConfig

    @property
    def strength_used(self) -> float:
        return self.strength(self.config.sparsity)

    def scale_grad(self, v: torch.Tensor) -> torch.Tensor:
        return self.strength_used * l1_grad(v)


@register_method
class Polarization(_ScaleCut):
    """Polarization: t·|gamma| − |gamma − mean| per layer, a cut in the gap, masked fine-tuning."""

    name = "polarization"
    config_class = PolarizationConfig
    config: PolarizationConfig

    @property
    def strength_used(self) -> float:
        return self.strength(self.config.strength)

    def scale_grad(self, v: torch.Tensor) -> torch.Tensor:
        return self.strength_used * polarization_grad(v, self.config.t)
