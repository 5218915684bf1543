"""Magnitude pruning: the simplest method, and the baseline for the others.

Each channel's importance is the L2 (or L1) norm of its slices summed over every member of its
group, divided by the group's mean so groups of different sizes and member counts compare;
channels are dropped globally, lowest first, until the remaining MACs reach the target.

Three ways to run it:

- **one-shot** (no training data): prune once with the planner every one-shot method uses
  (``Method.plan``); nothing trains.
- **prune, then fine-tune** (``train_loader=``/``epochs=`` given): the lowest channels are
  masked before the first step (ChannelMasks, hard masks), the masked model fine-tunes, and
  the masked channels are removed exactly at the end, so the pruned model computes what the
  fine-tuned masked one did. Planning is the masking methods' (``MaskingMethod.select``:
  ``min_keep_fraction`` floors, rounding fallback, within 0.01 of the target).
- **iterative** (``iterative=N``): N equal training segments; at the start of segment k
  (k = 1..N) the channels are re-ranked and masked down to ``flops_target ** (k / N)`` of the
  MACs, so each step removes the same share of what remains. Masked channels rank below every
  kept one, so they go first; a group may still widen again when the global walk finds that
  cheaper, and its channels then come back with the values they had when masked. Needs
  training (the built-in trainer or your own loop).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from graphprune.methods.base import Method, MethodConfig, option, register_method
from graphprune.methods.masking import MaskingConfig, MaskingMethod
from graphprune.passes.runner import Pass
from graphprune.planning.selection import norm_scores, normalized


@dataclass(frozen=True, slots=True, kw_only=True)
class MagnitudeConfig(MaskingConfig):
    """Norm, iterative steps; ``min_keep_fraction`` applies only when it trains."""

    norm: Literal["l2", "l1"] = option("l2", "channel importance: the l2 or l1 norm of its slices")
    iterative: int = option(
        1,
        "prune in this many steps with training between (needs training); 1: one-shot, "
        "fine-tuned after pruning when given training data",
    )

    def validate(self) -> None:
        MaskingConfig.validate(self)
        if self.iterative < 1:
            raise ValueError(
                f"iterative={self.iterative}: the number of pruning steps, >= 1 (1 is one-shot)"
            )


@dataclass(frozen=True, slots=True)
class MagnitudeStats:
    removed_channels: int  # summed over groups, before the pruned model is re-measured
    mask_steps: int  # pruning steps done while training (0: one-shot without training)


@register_method
class Magnitude(MaskingMethod):
    """Group weight norms, pruned globally to the target: one-shot, fine-tuned or iterative."""

    name = "magnitude"
    config_class = MagnitudeConfig
    trains = False
    can_train = True
    config: MagnitudeConfig

    @classmethod
    def needs_training(cls, config: MethodConfig, *, has_loader: bool) -> bool:
        return has_loader or getattr(config, "iterative", 1) > 1

    @property
    def training(self) -> bool:
        """Whether this run trains (a schedule was given): masks exist only then."""
        return self.total_iters is not None

    def prepare(self) -> None:
        self.mask_steps = 0
        if not self.training:
            Method.prepare(self)  # one-shot: no masks, the plain planner at finalize
            return
        super().prepare()
        steps = self.config.iterative
        if self.total_iters < steps:  # type: ignore[operator]
            raise ValueError(
                f"iterative={steps} needs at least {steps} training iterations, got "
                f"total_iters={self.total_iters}"
            )
        self._mask_step(0)  # prune first, then train (fine-tune, or until the next step)

    def step_iterations(self) -> list[int]:
        """The iteration after which each pruning step k = 0..N-1 masks (0: before training)."""
        n = self.config.iterative
        return [k * self.total_iters // n for k in range(n)]  # type: ignore[operator]

    def on_step(self) -> None:
        points = self.step_iterations()
        if self.iteration in points[1:]:
            self._mask_step(points.index(self.iteration))

    def _mask_step(self, k: int) -> None:
        n = self.config.iterative
        self.mask_to(self.scores(), self.config.flops_target ** ((k + 1) / n), restore=True)
        self.mask_steps = k + 1

    def scores(self) -> dict[int, np.ndarray]:
        p = 2 if self.config.norm == "l2" else 1
        scores = normalized(norm_scores(self.model, self.graph, p=p))
        if self.training:  # masked channels rank below every kept one: they stay masked
            for g, keep in self.masks.keep.items():
                scores[g] = np.where(keep, scores[g], -1.0)
        return scores

    def extra_state(self) -> dict:
        return {"mask_steps": self.mask_steps}

    def load_extra_state(self, state) -> None:
        self.mask_steps = int(state.get("mask_steps", 0))

    def finalize_passes(self) -> list[Pass]:
        if not self.training:
            return Method.finalize_passes(self)
        return super().finalize_passes()

    def stats(self) -> MagnitudeStats:
        removed = (self.pass_stats.get("prune_channels") or {}).get("removed_channels", 0)
        return MagnitudeStats(removed_channels=int(removed), mask_steps=self.mask_steps)  # type: ignore[arg-type]
