"""Global Sparse Momentum SGD (GSM, Ding et al. 2019), structured: whole channels compete.

Every ``reselect_every`` iterations, after backward, each channel of each maskable group is
scored by its first-order saliency ``|Σ w·∂L/∂w|`` over all of its producer entries (the
group's conv/linear rows, biases, norm scales and shifts: every "out" site, summed over the
producers of a coupled group, since zeroing the channel zeroes them all at once; in units of
loss, so comparable across groups, and divided by the MACs one channel costs when
``cost_aware``: planning/ranking.py). The scores are smoothed over batches
(``saliency_momentum``) and the kept set is chosen to meet the MACs target by
``MaskingMethod.select`` (floors, rounding, within 0.01 of the target). Only the kept channels
keep their task gradient; the gradient of every other channel's producer entries is replaced
by ``decay`` x their value, so they shrink geometrically under the optimizer's momentum.
At ``freeze_at`` of the budget the kept set is frozen and the others are masked (hard zeros),
the rest of the budget fine-tunes the kept channels, and finalize removes the masked channels
exactly (MaskingMethod).

Defaults and short budgets (``GSMSchedule.adaptive``). The paper decays the unselected weights
with its ordinary weight decay under momentum 0.98 over ~10^5 iterations; on a few thousand
iterations that decay would move them by a percent. So:

- ``decay``: a channel left out of the kept set from the start should fall to
  ``exp(-DECAY_NATS)`` = 1% of its norm by the freeze. Under SGD with momentum μ (0.9, as
  compress trains) a gradient ``d·w`` shrinks w by ``Σ_t lr_t·d/(1-μ)`` nats over the steps
  before the freeze (cosine lr), so ``d = max(1e-4, DECAY_NATS·(1-μ) / Σ_{t<freeze} lr_t)``,
  capped at critical damping, ``lr·d <= (1-√μ)²`` (0.0026 at μ = 0.9): beyond it the weight
  oscillates around zero and shrinks no faster than about √μ per step. Simulated under the
  optimizer (methods/decay.py ``decayed_norm``, lr 0.05 cosine): 1% is reached from about
  300 iterations on (0.8% at 300, 0.8% at 1000); on shorter budgets the decay sits at the
  cap and leaves more (27% at 100, 69% at 40), which the freeze's masks then zero (the last
  10% recovers).
- ``freeze_at`` 0.9: the last 10% fine-tunes with hard masks, so the small jump of zeroing
  channels that decayed to 1% is recovered before finalize.
- ``reselect_every``: about 200 selections over the budget (every iteration on budgets of
  up to 200 iterations); the saliency is averaged in between (momentum 0.9, i.e. over ~10
  batches) so a single noisy batch does not flip the set.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from graphprune.methods.base import option, register_method
from graphprune.methods.decay import fitted_decay
from graphprune.methods.masking import MaskingConfig, MaskingMethod
from graphprune.planning.ranking import channel_costs, per_mac, taylor_saliency

DECAY_NATS = math.log(100.0)  # an always-unselected channel falls to 1% of its norm by the freeze
PAPER_DECAY = 1e-4
SELECTIONS = 200  # about this many re-selections over a budget


@dataclass(frozen=True, slots=True, kw_only=True)
class GSMConfig(MaskingConfig):
    """GSM's options; None picks the budget-adapted default (module docstring)."""

    decay: float | None = option(
        None, "decay on unselected channels' producer entries (None: fit to the budget)"
    )
    freeze_at: float = option(
        0.9, "fraction of training after which the kept set is frozen and the rest masked"
    )
    reselect_every: int | None = option(
        None, "iterations between kept-set choices (None: about 200 over the budget)"
    )
    saliency_momentum: float = option(
        0.9, "running average of the per-batch saliency (0: each batch alone, as the paper)"
    )
    cost_aware: bool = option(True, "rank channels by saliency per MAC they cost")

    def validate(self) -> None:
        MaskingConfig.validate(self)
        if self.decay is not None and not self.decay >= 0:
            raise ValueError(f"decay={self.decay}: must be >= 0 (None fits it to the budget)")
        if not 0.0 < self.freeze_at <= 1.0:
            raise ValueError(f"freeze_at={self.freeze_at}: must be in (0, 1]")
        if self.reselect_every is not None and self.reselect_every < 1:
            raise ValueError(f"reselect_every={self.reselect_every}: must be >= 1 (or None)")
        if not 0.0 <= self.saliency_momentum < 1.0:
            raise ValueError(f"saliency_momentum={self.saliency_momentum}: must be in [0, 1)")


@dataclass(frozen=True, slots=True, kw_only=True)
class GSMSchedule:
    """When GSM re-selects and freezes, and how fast unselected channels decay."""

    decay: float
    freeze_iter: int  # masks go hard after this many optimizer steps
    reselect_every: int

    @staticmethod
    def adaptive(config: GSMConfig, total_iters: int, lr: float) -> GSMSchedule:
        """The budget-adapted defaults for the options left at None (module docstring)."""
        total = max(int(total_iters), 1)
        freeze = min(total, max(1, round(config.freeze_at * total)))
        decay = config.decay
        if decay is None:
            decay = fitted_decay(total, lr, freeze, nats=DECAY_NATS, floor=PAPER_DECAY)
        every = config.reselect_every
        if every is None:
            every = max(1, total // SELECTIONS)
        return GSMSchedule(decay=float(decay), freeze_iter=freeze, reselect_every=every)


@dataclass(frozen=True, slots=True)
class GSMStats:
    schedule: GSMSchedule
    selections: int  # kept-set choices made before the freeze
    masked_channels: int
    masked_macs_fraction: float  # remaining MACs / dense predicted by the final masks


@register_method
class GSM(MaskingMethod):
    """Structured Global Sparse Momentum: only the most salient channels keep their task
    gradient; the rest decay, are masked at the freeze and removed exactly at the end."""

    name = "gsm"
    config_class = GSMConfig
    config: GSMConfig

    def prepare(self) -> None:
        super().prepare()
        lr = 0.05 if self.lr is None else self.lr
        self.schedule = GSMSchedule.adaptive(self.config, self.total_iters or 1, lr)
        self.costs = channel_costs(self.graph, self.layer_macs, self.masks.groups)
        self.saliency: dict[int, np.ndarray] | None = None
        self.selected: dict[int, np.ndarray] | None = None  # boolean per channel
        self.selections = 0

    # --- scoring --------------------------------------------------------------------------
    def batch_saliency(self) -> dict[int, np.ndarray]:
        """This batch's |Σ w·∂L/∂w| per channel, over all of the channel's producer entries."""
        dots = self.masks.producer_dots()
        rows = ((g, np.arange(len(d)), d) for g, d in dots.items())
        return taylor_saliency(rows, {g: len(d) for g, d in dots.items()})

    def scores(self) -> dict[int, np.ndarray]:
        if self.saliency is None:
            raise ValueError(
                "gsm ranks channels by their gradients: train it first (compress with "
                "train_loader= and epochs=, or call after_backward() in your loop)"
            )
        return per_mac(self.saliency, self.costs) if self.config.cost_aware else self.saliency

    # --- the training hooks ---------------------------------------------------------------
    def after_backward(self) -> None:
        if self.masked_once:  # frozen: masked channels stay at zero
            self.masks.zero_grads()
            return
        batch = self.batch_saliency()
        beta = self.config.saliency_momentum
        if self.saliency is None:
            self.saliency = batch
        else:
            self.saliency = {g: beta * self.saliency[g] + (1 - beta) * batch[g] for g in batch}
        if self.selected is None or self.iteration % self.schedule.reselect_every == 0:
            kept = self.select(self.scores()).kept
            self.selected = {g: np.isin(np.arange(len(batch[g])), kept[g]) for g in batch}
            self.selections += 1
        self.masks.replace_grads(
            {g: ~k for g, k in self.selected.items()}, decay=self.schedule.decay
        )

    def on_step(self) -> None:
        if not self.masked_once and self.iteration >= self.schedule.freeze_iter:
            self.mask_to(self.scores())

    # --- checkpoints and stats ------------------------------------------------------------
    def extra_state(self) -> dict:
        def tensors(d):
            return None if d is None else {g: torch.from_numpy(v.copy()) for g, v in d.items()}

        return {
            "saliency": tensors(self.saliency),
            "selected": tensors(self.selected),
            "selections": self.selections,
        }

    def load_extra_state(self, state: Mapping) -> None:
        def arrays(d):
            return None if d is None else {int(g): v.numpy().copy() for g, v in d.items()}

        self.saliency = arrays(state["saliency"])
        self.selected = arrays(state["selected"])
        self.selections = int(state["selections"])

    def stats(self) -> GSMStats:
        return GSMStats(
            schedule=self.schedule,
            selections=self.selections,
            masked_channels=self.masks.masked(),
            masked_macs_fraction=self.masks.macs_fraction(self.layer_macs),
        )
