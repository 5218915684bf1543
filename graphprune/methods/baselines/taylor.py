"""Gate decorator / first-order Taylor importance (You et al. 2019; Molchanov et al. 2019).

Zeroing channel c of a layer output a changes the loss by about −Σ a·∂L/∂a over the positions
of c (first order). For a norm layer's output y = gamma·x̂ + beta this sum is exactly
gamma·∂L/∂gamma + beta·∂L/∂beta, and for a conv/linear output a = W x + b it is
Σ W·∂L/∂W over the filter + b·∂L/∂b, so the estimate needs no activations: only the producer
parameters and their gradients after backward. Zeroing a group channel zeroes it in every
producer of the group at once (a residual stream's norm layers), so the per-batch estimate is
|Σ over producers| (graphprune.planning.ranking.taylor_saliency), accumulated over batches as
a sum of absolute values. The unit is loss, so groups of any size compare as they are.

Producers: the group's norm layers (scale and shift) where it has any, else its conv/linear
weights and biases (and other producer parameters). Scoring runs for the first
``score_fraction`` of training; then one global cut and masked fine-tuning.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from graphprune.methods.base import option, register_method
from graphprune.methods.baselines.common import CutOnce, is_norm, phase_end, producer_rows
from graphprune.methods.masking import MaskingConfig
from graphprune.planning.ranking import taylor_saliency


@dataclass(frozen=True, slots=True, kw_only=True)
class TaylorConfig(MaskingConfig):
    """How long importance is accumulated before the cut."""

    score_fraction: float = option(
        0.1, "share of training whose batches accumulate importance; then the cut"
    )

    def validate(self) -> None:
        MaskingConfig.validate(self)
        if not 0.0 < self.score_fraction < 1.0:
            raise ValueError(
                f"score_fraction={self.score_fraction}: must be in (0, 1), the share of "
                "training that scores before the cut (the rest fine-tunes)"
            )


@dataclass(frozen=True, slots=True)
class TaylorStats:
    cut_at: int | None  # the iteration of the cut (None: cut at finalize)
    scored_batches: int
    masked_channels: int
    removed_channels: int


@register_method
class Taylor(CutOnce):
    """Gate decorator: |Σ gate·∂L/∂gate| per channel over batches; a global cut; fine-tuning."""

    name = "taylor"
    config_class = TaylorConfig
    config: TaylorConfig

    def prepare(self) -> None:
        super().prepare()
        rows = list(producer_rows(self.model, self.graph, self.masks.groups))
        normed = {r.gid for r in rows if is_norm(self.model, r)}
        self.rows = [r for r in rows if is_norm(self.model, r) or r.gid not in normed]
        self.channels = {g: len(self.masks.keep[g]) for g in self.masks.groups}
        self.saliency = {g: np.zeros(n) for g, n in self.channels.items()}
        self.batches = 0

    def cut_iteration(self) -> int:
        return phase_end(self, self.config.score_fraction)

    @torch.no_grad()
    def batch_saliency(self) -> dict[int, np.ndarray]:
        """This batch's |Σ over producers of Σ p·∂L/∂p| per channel (gradients must exist)."""
        rows = []
        for r in self.rows:
            p = self.model.get_parameter(r.path)
            if p.grad is None:
                continue
            dots = r.per_channel((p.detach() * p.grad).index_select(r.axis, r.index))
            rows.append((r.gid, r.pos, dots.double().cpu().numpy()))
        return taylor_saliency(rows, self.channels)

    def after_backward(self) -> None:
        if not self.scoring():
            return
        for g, s in self.batch_saliency().items():
            self.saliency[g] += s
        self.batches += 1

    def scores(self) -> dict[int, np.ndarray]:
        return {g: s.copy() for g, s in self.saliency.items()}

    def extra_state(self) -> dict:
        saliency = {g: torch.from_numpy(s.copy()) for g, s in self.saliency.items()}
        return {**CutOnce.extra_state(self), "saliency": saliency, "batches": self.batches}

    def load_extra_state(self, state) -> None:
        CutOnce.load_extra_state(self, state)
        self.saliency = {int(g): s.numpy().copy() for g, s in state["saliency"].items()}
        self.batches = int(state["batches"])

    def stats(self) -> TaylorStats:
        removed = (self.pass_stats.get("prune_channels") or {}).get("removed_channels", 0)
        return TaylorStats(
            getattr(self, "cut_at", None),
            self.batches,
            self.masks.masked(),
            int(removed),  # type: ignore[arg-type]
        )
