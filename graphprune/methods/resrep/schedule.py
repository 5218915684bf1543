"""When and how fast ResRep masks channels, and how hard masked rows are pushed to zero."""

from __future__ import annotations

import math
from dataclasses import dataclass

from graphprune.training.loop import cosine_lr

PAPER_MOMENTUM = 0.99
# Before the masks freeze, the penalty should have moved a row the task does not hold by this
# fraction of its initial norm (1), so row norms carry a signal of their own.
SHAPING = 0.1
# Active rows grow while they learn (up to about twice their initial norm on short runs); a
# masked row is pushed to travel twice that, and the budget check simulates a row of this norm.
GROWN_NORM = 2.0


@dataclass(frozen=True, slots=True, kw_only=True)
class ResRepSchedule:
    """When and how fast ResRep masks channels, and how hard masked rows are pushed to zero."""

    warmup_iters: int  # no masks before; the Taylor prior is accumulated over these iterations
    mask_interval: int
    channels_per_update: int
    penalty: float  # λ on every row (the paper's group-lasso term)
    masked_penalty: float  # λ on masked rows; equal to ``penalty`` in the paper
    compactor_momentum: float
    compactor_lr_scale: float = 1.0  # compactor lr = this x the model's lr (the paper: 1)
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
            compactor_momentum=PAPER_MOMENTUM,
        )

    @staticmethod
    def adaptive(total_iters: int, channels_to_mask: int, lr: float) -> ResRepSchedule:
        """Fit the schedule and the compactors' optimizer to the budget (cosine lr from ``lr``).

        Timing: the first 5% is warm-up (the Taylor prior is measured there), masking runs to
        30% in ~30 updates, each allowed twice its share of the channels to mask, the last one
        uncapped and exact so the target is met; then masks freeze, so every masked row has the
        last 70% (D iterations) to decay.

        Momentum μ: a masked row's push is averaged over ~1/(1-μ) steps; to settle at zero
        rather than swing around it that horizon must be short against D: 1/(1-μ) = D/30,
        kept within [10, 100], i.e. μ in [0.9, 0.99] (the paper's 0.99 from D = 3000 on).

        Compactor lr: with momentum μ a parameter moves lr/(1-μ) per unit gradient. The paper's
        compactors (μ = 0.99) move 100·lr, ten times the convs' 10·lr (μ = 0.9); a lower μ at
        the same lr made them learn up to 10x slower. Their lr is scaled by 100·(1-μ) to keep
        the paper's 100·lr at every μ.

        λ (every row): the paper's 1e-4, raised on short budgets so that it moves an
        unsupported row by SHAPING = 0.1 of its norm before the masks freeze:
        λ = max(1e-4, 0.1 / Σ_{t<30%} 100·lr_t). (The paper's own λ-to-budget ratio would need
        ~0.1 here, which cost 20 points of accuracy on digits before any masking.)

        λ_m (masked rows): a row pushed by λ_m·Q/||Q|| moves 100·lr_t·λ_m per step, so it
        travels 4 (twice GROWN_NORM, the norm a learning row may reach) over D when
        λ_m = 4 / Σ_{t>=30%} 100·lr_t (never below λ). Below ||Q|| = eps = lr_c·λ_m/2 the
        push acts as a weight decay too weak to overshoot and the row shrinks geometrically
        under the 1e-5 folding threshold.
        ``masked_row_decays`` simulates exactly that row; ResRep refuses a budget where it
        would not reach the threshold and names one that would.
        """
        total = max(int(total_iters), 1)
        warmup = round(0.05 * total)
        mask_end = max(warmup + 1, round(0.30 * total))
        interval = max(1, (mask_end - warmup) // 30)
        updates = max(1, (mask_end - warmup) // interval)
        horizon = min(100.0, max(10.0, (total - mask_end) / 30.0))
        momentum = 1.0 - 1.0 / horizon
        lr_scale = 100.0 * (1.0 - momentum)
        moved_per_lambda = 100.0  # lr_c / (1 - μ) per unit of lr
        shaping_sum = sum(cosine_lr(lr, t, total) for t in range(mask_end)) * moved_per_lambda
        decay_sum = sum(cosine_lr(lr, t, total) for t in range(mask_end, total)) * moved_per_lambda
        penalty = max(1e-4, SHAPING / max(shaping_sum, 1e-12))
        masked_penalty = max(penalty, 2.0 * GROWN_NORM / max(decay_sum, 1e-12))
        return ResRepSchedule(
            warmup_iters=warmup,
            mask_interval=interval,
            channels_per_update=max(1, math.ceil(2.0 * channels_to_mask / updates)),
            penalty=penalty,
            masked_penalty=masked_penalty,
            compactor_momentum=momentum,
            compactor_lr_scale=lr_scale,
            eps=max(1e-8, 0.5 * lr * lr_scale * masked_penalty),
            mask_until=mask_end,
        )


def masked_row_decays(
    schedule: ResRepSchedule,
    total_iters: int,
    lr: float,
    threshold: float,
    *,
    start_norm: float = GROWN_NORM,
) -> bool:
    """Whether a row masked at the last mask update (norm ``start_norm``, no momentum yet)
    falls below ``threshold`` by the end of training, under SGD with the schedule's momentum
    and a cosine lr. The gradient of a masked row is λ_m·Q/max(||Q||, eps), parallel to Q, so
    the row only scales: this one-dimensional recursion is exact for it."""
    s = schedule
    start = s.mask_until if s.mask_until is not None else total_iters - 1
    q, v = float(start_norm), 0.0
    base = lr * s.compactor_lr_scale
    for t in range(max(0, start), total_iters):
        v = s.compactor_momentum * v + s.masked_penalty * q / max(abs(q), s.eps)
        q -= cosine_lr(base, t, total_iters) * v
    return abs(q) < threshold


def iterations_that_suffice(
    channels_to_mask: int, lr: float, threshold: float, *, at_least: int
) -> int:
    """The fewest iterations (within 5%) for which the adaptive schedule decays a masked row
    below ``threshold``; searched by doubling from ``at_least`` and then bisection."""

    def ok(total: int) -> bool:
        s = ResRepSchedule.adaptive(total, channels_to_mask, lr)
        return masked_row_decays(s, total, lr, threshold)

    hi = max(2, int(at_least))
    while not ok(hi):
        hi *= 2
        if hi > 10_000_000:
            return hi
    lo = max(1, hi // 2)
    while hi - lo > max(1, hi // 20):
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if ok(mid) else (mid, hi)
    return hi
