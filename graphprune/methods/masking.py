"""The base of every method that prunes by masking channels while it trains.

Such a method trains the model with channel masks (graphprune.methods.masks.ChannelMasks) and
re-decides them on its own schedule; at the end the masked channels are removed exactly, so the
pruned model computes what the masked one did. Subclasses say *when* masks change (``on_step``,
called after every optimizer step with ``iteration`` already advanced) and *how channels
rank* (``scores``); the base owns the masks, the planning to the MACs target, checkpoints and
finalize. One-shot use works too: without training, ``finalize`` masks once from ``scores()``.

Planning (``select``) is the one ResRep uses (planning/ranking.py): the globally lowest scores
go first, no group below ``min_keep_fraction`` of its width, widths rounded to ``round_to``
where the target allows and finer where it would be out of reach, and the result lands within
0.01 under the target (or as close under it as whole channels allow on a model whose channels
are coarser steps of its MACs; planning/ranking.py ``select_kept``).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from graphprune.methods.base import Method, MethodConfig, option
from graphprune.methods.masks import ChannelMasks
from graphprune.passes import cleanup, prune_channels
from graphprune.passes.runner import Pass
from graphprune.planning.ranking import (
    DEFAULT_MIN_KEEP_FRACTION,
    Selection,
    check_keep_fraction,
    floors_and_rounding,
    select_kept,
)


@dataclass(frozen=True, slots=True, kw_only=True)
class MaskingConfig(MethodConfig):
    """Options every masking method takes (subclass it for a method's own)."""

    min_keep_fraction: float = option(
        DEFAULT_MIN_KEEP_FRACTION,
        "no group keeps fewer than this fraction of its channels (at least 1): no layer collapse",
    )

    def validate(self) -> None:
        check_keep_fraction(self.min_keep_fraction)


class MaskingMethod(Method):
    """Masks channels during training, removes them exactly at the end (module docstring)."""

    trains: ClassVar[bool] = True
    hard_masks: ClassVar[bool] = True  # re-zero masked weights after every step (else: soft)
    config: MaskingConfig

    def prepare(self) -> None:
        super().prepare()
        self.masks = ChannelMasks(self.model, self.graph)
        if not self.masks.groups:
            from graphprune.errors import PlanError

            raise PlanError(f"{self.name}: the model has no prunable, exact channel group")
        self.iteration = 0
        self.floors, self.rounding = floors_and_rounding(
            self.graph,
            self.layer_macs,
            self.masks.groups,
            flops_target=self.config.flops_target,
            round_to=self.round_to,
            min_keep_fraction=self.config.min_keep_fraction,
            who=self.name,
        )
        self.masked_once = False

    # --- what subclasses define -----------------------------------------------------------
    def on_step(self) -> None:
        """Called after every optimizer step (``iteration`` counts it): change masks here."""

    def extra_state(self) -> dict:
        """A subclass's own resumable state (beyond masks and iteration)."""
        return {}

    def load_extra_state(self, state: Mapping) -> None:
        """Restore ``extra_state()``."""

    # --- planning -------------------------------------------------------------------------
    def select(
        self,
        scores: Mapping[int, np.ndarray],
        flops_target: float | None = None,
        *,
        tolerance: float = 0.01,
    ) -> Selection:
        """Kept channels per masked group for ``flops_target`` (default: the config's), at
        most ``tolerance`` of the dense MACs under it where the model's steps allow (a width
        that need not land, e.g. an eased regrowth target, passes 1.0: no trading of channels
        between groups to get closer)."""
        target = self.config.flops_target if flops_target is None else flops_target
        scores = {g: np.asarray(scores[g], dtype=np.float64) for g in self.masks.groups}
        return select_kept(
            self.graph,
            scores,
            self.layer_macs,
            target,
            rounding=self.rounding,
            floors=self.floors,
            tolerance=tolerance,
        )

    def mask_to(
        self,
        scores: Mapping[int, np.ndarray],
        flops_target: float | None = None,
        *,
        restore: bool = False,
        filters_only: bool = False,
    ) -> Selection:
        """Mask every channel the selection for ``flops_target`` drops (the others are kept,
        restored from their saved values when ``restore``; ``filters_only``: see
        ChannelMasks.apply)."""
        sel = self.select(scores, flops_target)
        self.masks.set_keep(sel.kept, restore=restore, filters_only=filters_only)
        self.masked_once = True
        return sel

    # --- the training hooks ---------------------------------------------------------------
    def step(self) -> None:
        self.iteration += 1
        self.on_step()
        if self.hard_masks:
            self.masks.apply()

    def state_dict(self) -> dict:
        return {
            "iteration": self.iteration,
            "masked_once": self.masked_once,
            "masks": self.masks.state_dict(),
            **self.extra_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.iteration = int(state["iteration"])
        self.masked_once = bool(state["masked_once"])
        self.masks.load_state_dict(state["masks"])
        self.load_extra_state(state)

    # --- the end ----------------------------------------------------------------------------
    def finalize_passes(self) -> list[Pass]:
        """Remove the masked channels (masking once from ``scores()`` if training never did),
        then the dead nodes. The masks are already rounded, so the pruner rounds nothing."""
        if not self.masked_once:
            scores = self.scores()
            if scores is None:
                raise NotImplementedError(f"{type(self).__name__}: define scores()")
            self.mask_to(scores)
        self.masks.apply()
        return [functools.partial(prune_channels, plan=self.masks.plan(), round_to=1), cleanup]
