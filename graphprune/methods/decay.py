"""How strong a pull toward a point must be to close a given gap within a training budget.

GSM decays its unselected channels toward zero and C-SGD pulls each cluster's members toward
their mean. Either way a quantity w (a weight, a member's distance to its cluster mean) gets
the gradient ``d·w`` and nothing else, under SGD with momentum μ and a cosine lr. While
``lr·d`` is small, w shrinks by ``Σ_t lr_t·d/(1-μ)`` nats, so ``d = nats·(1-μ)/Σ_t lr_t``.
Above critical damping, ``lr·d > (1-√μ)²`` (0.0026 at μ = 0.9), w oscillates around zero and
shrinks no faster than about √μ per step, so ``d`` is capped there: on short budgets the gap
is then not fully closed (``decayed_norm`` says how far it gets), and the method must cope
(GSM masks what is left at its freeze; C-SGD averages the clusters at finalize).
"""

from __future__ import annotations

import math

from graphprune.training.loop import cosine_lr

ASSUMED_MOMENTUM = 0.9  # compress trains with SGD momentum 0.9 (fit's default)


def fitted_decay(
    total: int, lr: float, until: int, *, nats: float, floor: float,
    momentum: float = ASSUMED_MOMENTUM,
) -> float:  # fmt: skip
    """The pull ``d`` that shrinks w by ``nats`` over iterations [0, until) of a ``total``
    budget at base ``lr`` (cosine), at least ``floor``, at most critical damping."""
    moved = sum(cosine_lr(lr, t, total) for t in range(until)) / (1 - momentum)
    critical = (1 - math.sqrt(momentum)) ** 2 / lr
    return min(max(floor, nats / max(moved, 1e-12)), max(critical, floor))


def decayed_norm(decay: float, lrs: list[float], momentum: float = ASSUMED_MOMENTUM) -> float:
    """|w| after SGD with ``momentum`` at the learning rates ``lrs`` on a w that starts at 1
    and whose gradient is only ``decay·w`` (the 1-D recursion is exact for it)."""
    w, v = 1.0, 0.0
    for lr in lrs:
        v = momentum * v + decay * w
        w -= lr * v
    return abs(w)
