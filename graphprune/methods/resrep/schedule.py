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
# masked row is pushed to travel twice that before the masked rows are zeroed.
GROWN_NORM = 2.0
# The adaptive schedule's phases, as fractions of training: warm-up, masking until MASK_END,
# masked rows decay until ZERO_AT, where they are zeroed; fine-tuning after.
WARMUP, MASK_END, ZERO_AT = 0.15, 0.30, 0.6
# Compactor rows take this fraction of their task-gradient step (adaptive schedule; the
# paper: 1). ResRepSchedule.adaptive gives the reasoning and the measurements.
TASK_SCALE = 0.1


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
    task_scale: float = 1.0  # an active row's task gradient x this (the paper: 1)
    eps: float = 1e-8  # keeps λ·Q/||Q|| finite at Q = 0 (the official code has none)
    mask_until: int | None = None  # last iteration that may change masks (None: the paper's, never)
    zero_at: int | None = None  # from this iteration masked rows are held at exactly zero
    penalty_until: int | None = None  # active rows feel ``penalty`` up to here (None: always)

    def __post_init__(self) -> None:
        checks = (
            ("warmup_iters", self.warmup_iters >= 0, ">= 0"),
            ("mask_interval", self.mask_interval >= 1, ">= 1"),
            ("channels_per_update", self.channels_per_update >= 1, ">= 1"),
            ("penalty", self.penalty >= 0, ">= 0"),
            ("masked_penalty", self.masked_penalty > 0, "> 0 (it is what decays masked rows)"),
            ("compactor_momentum", 0 <= self.compactor_momentum < 1, "in [0, 1)"),
            ("compactor_lr_scale", self.compactor_lr_scale > 0, "> 0"),
            ("task_scale", self.task_scale >= 0, ">= 0 (1: the paper's full task gradient)"),
            ("eps", self.eps > 0, "> 0"),
        )
        for name, ok, need in checks:
            if not ok:
                raise ValueError(f"ResRepSchedule {name}={getattr(self, name)!r}: must be {need}")

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

        Timing: the first 15% (WARMUP) is warm-up: no masks yet, the penalty already shapes
        the rows, and the Taylor prior that the first masks rest on is measured. That prior
        is most of the ranking signal on a short run (without it ResRep lost 2.8 points at 70%
        fewer MACs), and a longer warm-up measures it on more batches: on Fashion-MNIST
        ResNet-20 (375 iterations, 70% fewer MACs, 10 seeds paired with a 5% warm-up)
        10 / 15 / 20% gave +0.14 / +0.23 / +0.09 points, 15% with masking to 35% +0.19, and
        accumulating the prior on through the masking window instead -0.03; with 2,345
        iterations (3 seeds) 15% gave +0.11 (BENCHMARKS.md).
        Masking runs to 30% in 30-60 updates (one per iteration on a shorter window), each
        allowed twice its share of the channels to mask, the last one uncapped and exact so
        the target is met; then the masks freeze and masked rows decay until ZERO_AT (60%),
        where they are set to exactly zero and held there; the last 40% fine-tunes the network
        the pruned model will be. On short budgets the gradual decay cannot be lossless, and
        without that fine-tuning window the network kept adapting to shrinking channels until
        the lr reached zero: on Fashion-MNIST ResNet-20 with 375 iterations at 50% fewer MACs
        this schedule measured 82.9% where decay-until-the-end gave 73-74%
        (benchmarks/fashion_resnet.py setting, seed 0, one run each).

        Momentum μ: a masked row's push is averaged over ~1/(1-μ) steps; to settle at zero
        rather than swing around it that horizon must be short against the decay window D:
        1/(1-μ) = D/30, kept within [10, 100], i.e. μ in [0.9, 0.99] (the paper's 0.99 from
        D = 3000 on).

        Compactor lr: the model's lr, as in the paper. (Scaling it by 100·(1-μ), to move them
        as far per step as the paper's μ = 0.99 does, made the compactors' steps ten times
        noisier at μ = 0.9 and cost about ten points of accuracy in the run above.)

        Task step: an active row gets TASK_SCALE (0.1) x its task gradient,
        grad_i = 0.1·m_i·dL/dQ_i + λ_i·Q_i/||Q_i||. A compactor is a free C x C map behind a
        trained layer's norm with nothing to renormalize it; at the full step its task updates
        perturb a trained network faster than a short run undoes. On Fashion-MNIST ResNet-20
        (375 iterations, 3 seeds, BENCHMARKS.md), at the full step, ResRep at 0.95 of the MACs,
        where almost nothing is pruned, ended 1.2 points below one-shot magnitude +
        fine-tuning; at 0.5 of the MACs task steps of 1 / 0.1 / 0.03 gave 82.5 / 83.9 / 83.9%.
        A six times longer run (2,350 iterations, 0.3 of the MACs, one seed) gave 89.54% at 1
        and 89.60% at 0.1: the full step buys nothing there either. A small CNN trained from
        scratch does need the compactors' own learning (a digits CNN: 90.3 / 82.8 / 78.6% at
        1 / 0.1 / 0.03), hence 0.1 rather than less. Scaling the gradient rather than the lr
        leaves the penalties' travel below unchanged, and a user's own optimizer that puts the
        compactors at the model's lr still gets the intended step.

        λ (every row): the paper's 1e-4, raised on short budgets so that it moves an
        unsupported row by SHAPING = 0.1 of its norm before the masks freeze:
        λ = max(1e-4, 0.1 / Σ_{t<30%} lr_t/(1-μ)). It stops when the masks freeze
        (``penalty_until``): the ranking it shapes is settled then, and pulling on the rows
        that stay only shrinks the network the pruned model will be. On Fashion-MNIST
        ResNet-20 (375 iterations, 3 seeds) stopping it gained 1.5 points at 90% fewer MACs
        and was within seed noise at 50% and 70% (BENCHMARKS.md); the paper never freezes
        masks and keeps λ.

        λ_m (masked rows): a row pushed by λ_m·Q/||Q|| moves lr_t·λ_m/(1-μ) per step, so it
        travels 4 (twice GROWN_NORM, the norm a learning row may reach) over D when
        λ_m = 4 / Σ_{30%<=t<60%} lr_t/(1-μ) (never below λ); whatever is left at 60% is
        zeroed. Below ||Q|| = eps = lr·λ_m/2 the push acts as a weight decay too weak to
        overshoot.
        """
        total = max(int(total_iters), 1)
        warmup = round(WARMUP * total)
        mask_end = max(warmup + 1, round(MASK_END * total))
        zero_at = max(mask_end + 1, round(ZERO_AT * total))
        interval = max(1, (mask_end - warmup) // 30)
        updates = max(1, (mask_end - warmup) // interval)
        horizon = min(100.0, max(10.0, (zero_at - mask_end) / 30.0))
        momentum = 1.0 - 1.0 / horizon
        moved_per_lambda = horizon  # lr / (1 - μ) per unit of lr
        shaping_sum = sum(cosine_lr(lr, t, total) for t in range(mask_end)) * moved_per_lambda
        decay_sum = sum(cosine_lr(lr, t, total) for t in range(mask_end, zero_at))
        penalty = max(1e-4, SHAPING / max(shaping_sum, 1e-12))
        masked_penalty = max(penalty, 2.0 * GROWN_NORM / max(decay_sum * moved_per_lambda, 1e-12))
        return ResRepSchedule(
            warmup_iters=warmup,
            mask_interval=interval,
            channels_per_update=max(1, math.ceil(2.0 * channels_to_mask / updates)),
            penalty=penalty,
            masked_penalty=masked_penalty,
            compactor_momentum=momentum,
            compactor_lr_scale=1.0,
            task_scale=TASK_SCALE,
            eps=max(1e-8, 0.5 * lr * masked_penalty),
            mask_until=mask_end,
            zero_at=zero_at,
            penalty_until=mask_end,
        )
