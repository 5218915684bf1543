"""When and how fast ResRep masks channels, and how hard masked rows are pushed to zero."""

from __future__ import annotations

import math
from dataclasses import dataclass

from graphprune.training.loop import cosine_lr


@dataclass(frozen=True, slots=True, kw_only=True)
class ResRepSchedule:
    """When and how fast ResRep masks channels, and how hard masked rows are pushed to zero."""

    warmup_iters: int
    mask_interval: int
    channels_per_update: int
    penalty: float  # λ on every row (the paper's group-lasso term)
    masked_penalty: float  # λ on masked rows; equal to ``penalty`` in the paper
    compactor_momentum: float
    eps: float = 1e-8  # keeps λ·Q/||Q|| finite at Q = 0 (the official code has none)
    mask_until: int | None = None  # last iteration that may change masks (None: the paper's, never)

    @staticmethod
    def paper(iters_per_epoch: int) -> ResRepSchedule:
        """The paper's constants (5 warm-up epochs, every 200 iterations, 4 channels,
        λ = 1e-4, momentum 0.99): right for ~10^5 iterations, too slow for short runs."""
        return ResRepSchedule(
            warmup_iters=5 * iters_per_epoch,
            mask_interval=200,
            channels_per_update=4,
            penalty=1e-4,
            masked_penalty=1e-4,
            compactor_momentum=0.99,
        )

    @staticmethod
    def adaptive(total_iters: int, channels_to_mask: int, lr: float) -> ResRepSchedule:
        """Fit the schedule to the budget, assuming a cosine lr from ``lr`` to 0.

        Masking runs from 5% to 30% of training in ~30 updates, each allowed twice its share
        of the estimated channels to mask, and the last one uncapped so the target is reached
        whatever the estimate (ranked by learned norms, cheap channels go first and more of
        them are needed than a uniform-score estimate says); then the masks are frozen, so no
        row is newly masked too late to decay (re-ranking until the end left dozens of rows
        above the threshold on digits).
        Active rows keep the paper's λ = 1e-4. Masked rows get a stronger λ_m, set so that a
        row pushed by λ_m·Q/||Q|| with momentum μ travels about twice its initial norm (1)
        over the last 65%: λ_m = 2·(1 − μ) / Σ lr_t. Below ||Q|| = eps = lr·λ_m/2 the push
        acts as a weight decay too weak to overshoot and the row shrinks geometrically, under
        the 1e-5 folding threshold. Short budgets use
        μ = 0.9: with the paper's 0.99 a row averages its push over ~100 steps and oscillates
        around zero instead of settling. These constants come from simulating one masked row
        under this schedule; it reaches 1e-5 from about 300 iterations on, not from 100. The
        paper's λ on every row would have to be ~0.1 at such budgets, which cost 20 points of
        accuracy on digits before any masking.
        """
        total = max(int(total_iters), 1)
        warmup = round(0.05 * total)
        mask_end = max(warmup + 1, round(0.30 * total))
        interval = max(1, (mask_end - warmup) // 30)
        updates = max(1, (mask_end - warmup) // interval)
        momentum = 0.9 if total < 50_000 else 0.99
        lr_sum = sum(cosine_lr(lr, t, total) for t in range(round(0.35 * total), total))
        masked_penalty = 2.0 * (1.0 - momentum) / max(lr_sum, 1e-12)
        return ResRepSchedule(
            warmup_iters=warmup,
            mask_interval=interval,
            channels_per_update=max(1, math.ceil(2.0 * channels_to_mask / updates)),
            penalty=1e-4,
            masked_penalty=masked_penalty,
            compactor_momentum=momentum,
            eps=0.5 * lr * masked_penalty,
            mask_until=mask_end,
        )
