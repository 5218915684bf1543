"""CHEX (Hou et al., CVPR 2022): channel exploration. Train with channel masks and keep
re-deciding them, pruning and regrowing, so an early mistake can be undone and widths move
between layers under one global MACs budget.

Every ``delta_t`` iterations until ``t_max`` of training, an update:

1. **Widths** (global): each channel scores its norm scale |γ| averaged over the group's norm
   members (a mean, so a residual group with 10 norms is comparable with a single-producer
   one), optionally divided by the MACs it costs (``cost_aware``; off by default: on small
   models whose per-channel costs differ 2-4x between groups, per-MAC scores pile the whole
   cut on the costliest group, whose coarse steps then land 0.01-0.03 under the target on
   the zoo, where |γ| alone spreads it and lands within 0.01); ``MaskingMethod.select`` walks all
   groups to the MACs target (floors, rounding ladder). A masked channel has γ = 0 and ranks
   last. Groups without a norm score by their producers' filter norms, scaled so their mean
   equals the mean |γ| of the normed channels.
2. **Channels** (per group): the group's width is kept by column subset selection on its
   stacked producer filters: the top leverage scores from its top right singular vectors
   (``selection="qr"``: QR with column pivoting; wide matrices: L1 norm).
3. **Regrowth**: the target eased by the regrowth factor δ_t = δ0·(1 + cos(π·t/t_max))/2,
   target + δ_t·(1 - target), gives each group a larger width; the difference is drawn from
   the group's other channels without replacement with probability softmax of their
   projection residual onto the kept filters (their most recent weights: saved ones for
   channels masked earlier), and they come back with exactly those weights, norm affine
   parameters, running statistics and consumer input slices (``set_keep(restore=True)``).

At ``t_max`` the masks freeze at the target (no regrowth) and training continues; finalize
removes the masked channels exactly. Unlike the official code, whole coupled groups are masked
(residual streams included), so the saving is physical.

Use ``Chex`` in any training loop::

    cx = Chex(graphprune.trace(model, (x,)), flops_target=0.5, total_iters=T)
    opt = torch.optim.SGD(cx.param_groups(lr=0.05), lr=0.05, momentum=0.9)
    for x, y in loader:
        loss = F.cross_entropy(cx.model(x), y)
        opt.zero_grad(); loss.backward(); opt.step(); cx.step()
    pruned = cx.finalize()
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

from graphprune.frontend.params import get_tensor
from graphprune.methods.base import option, register_method
from graphprune.methods.chex.css import keep_order, projection_residual, sample_softmax
from graphprune.methods.masking import MaskingConfig, MaskingMethod
from graphprune.passes.runner import Pass
from graphprune.planning.ranking import Selection, channel_costs, per_mac, producer_mean

# Re-allocations before the masks freeze when delta_t is adaptive (see ChexConfig).
ADAPTIVE_UPDATES = 20
NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


@dataclass(frozen=True, slots=True, kw_only=True)
class ChexConfig(MaskingConfig):
    """CHEX's options. Defaults scale with the budget (``total_iters`` = T):

    - ``t_max`` = 0.3: the masks freeze after 30% of training, as ResRep's do. The paper
      explores for 180 of 250 epochs (0.72) from scratch; under a cosine lr only 4% of the lr
      integral is left after 0.72, so a short run would end on an architecture it barely
      trained. Measured on the Fashion-MNIST ResNet-20 smoke (96 iterations, 0.3 of the MACs,
      seed 0, the chex-smoke benchmark command): t_max 0.7 gave 66.0% test accuracy, 0.3
      gave 71.8% (prune-once magnitude + fine-tune: 73.1%). ``t_max=0.72`` is the paper's.
    - ``delta_t`` = round(t_max·T / 20): 20 re-allocations before the freeze whatever the
      budget (the paper's 2 epochs of 250 make 90 on ImageNet; on a few hundred iterations
      that would leave a regrown channel 1-2 steps before the next decision), more steps per
      period as T grows.
    - ``delta0`` = 0.3: the paper regrows δ0 = 0.2-0.3 of the channels (about 40% of the
      pruned ones); here δ is a share of the pruned MACs given back (target eased to
      target + δ·(1 - target)), 0.3 at the start, cosine-decayed to 0 at the freeze.
    - No initial mask (the official init_channel_ratio): the first update, after the first
      step, prunes straight to the target, which leaves the most steps to explore and recover.
    """

    delta_t: int | None = option(
        None, "iterations between re-allocations; None: t_max x budget / 20 (20 updates)"
    )
    t_max: float = option(0.3, "fraction of training after which the masks freeze at the target")
    delta0: float = option(
        0.3, "regrowth at the start: share of the pruned MACs given back (cosine-decayed to 0)"
    )
    selection: Literal["leverage", "qr"] = option(
        "leverage", "column subset selection per group: SVD leverage scores or pivoted QR"
    )
    cost_aware: bool = option(
        False, "allocate widths by norm scale per MAC a channel costs (the paper: by |γ| alone)"
    )
    seed: int = option(0, "seed of the regrowth sampling (with the iteration: resumes agree)")

    def validate(self) -> None:
        MaskingConfig.validate(self)
        if self.delta_t is not None and self.delta_t < 1:
            raise ValueError(f"delta_t={self.delta_t}: must be >= 1 iteration (or None)")
        if not 0.0 < self.t_max <= 1.0:
            raise ValueError(f"t_max={self.t_max}: must be in (0, 1] (a fraction of training)")
        if not 0.0 <= self.delta0 < 1.0:
            raise ValueError(f"delta0={self.delta0}: must be in [0, 1) (0 never regrows)")


@dataclass(frozen=True, slots=True)
class ChexStats:
    masked_macs_fraction: float  # remaining MACs / dense predicted by the current masks
    updates: int  # re-allocations done (the freeze included)
    regrown: int  # channels brought back, summed over updates
    rounding: str  # the widths the masks use
    delta_t: int
    freeze_iter: int


@register_method
class Chex(MaskingMethod):
    """Prune-and-regrow with global width re-allocation and column subset selection."""

    name = "chex"
    config_class = ChexConfig
    config: ChexConfig

    def prepare(self) -> None:
        super().prepare()
        c = self.config
        total = max(1, int(self.total_iters or 1))
        self.freeze_iter = max(1, round(c.t_max * total))
        self.delta_t = c.delta_t or max(1, round(self.freeze_iter / ADAPTIVE_UPDATES))
        self.costs = channel_costs(self.graph, self.layer_macs, self.masks.groups)
        self.updates = 0
        self.regrown = 0
        self.last_rounding = self.rounding
        groups = set(self.masks.groups)
        self._norm_sites, self._filter_sites = [], []
        for s in self.graph.sites:
            if s.role != "out" or s.atoms.ndim != 1:
                continue
            if not np.isin(self.graph.atom_group[s.atoms], list(groups)).any():
                continue
            t = get_tensor(self.model, s.path)
            try:
                owner = self.model.get_submodule(s.path.rpartition(".")[0])
            except AttributeError:
                owner = None
            if t.dim() == 1 and s.path.endswith(".weight") and isinstance(owner, NORMS):
                self._norm_sites.append(s)
            elif t.dim() >= 2:
                self._filter_sites.append(s)

    # --- the schedule ---------------------------------------------------------------------
    def regrowth_factor(self, iteration: int) -> float:
        """δ_t = δ0·(1 + cos(π·t/t_max))/2: δ0 at the start, 0 at the freeze."""
        t = min(iteration, self.freeze_iter) / self.freeze_iter
        return self.config.delta0 * (1.0 + math.cos(math.pi * t)) / 2.0

    def on_step(self) -> None:
        it = self.iteration
        if it == self.freeze_iter:
            self.update(0.0)
        elif it < self.freeze_iter and (it - 1) % self.delta_t == 0:
            self.update(self.regrowth_factor(it))

    def extra_state(self) -> dict:
        return {"chex": {"updates": self.updates, "regrown": self.regrown}}

    def load_extra_state(self, state) -> None:
        own = state.get("chex", {})
        self.updates = int(own.get("updates", 0))
        self.regrown = int(own.get("regrown", 0))

    # --- scores -----------------------------------------------------------------------------
    def width_scores(self) -> dict[int, np.ndarray]:
        """Per masked group and channel: mean |γ| over the group's norms (filter norms, scaled
        to the normed channels' mean |γ|, for groups without one), per MAC when cost-aware."""
        channels = {g: self.graph.groups[g].channels for g in self.masks.groups}
        gamma = producer_mean(self._rows(self._norm_sites, "abs"), channels)
        normed = {g for s in self._norm_sites for g in self._gids(s)}
        filt = producer_mean(self._rows(self._filter_sites, "l2"), channels)
        active = [gamma[g][self.masks.keep[g]] for g in normed]
        ref = float(np.concatenate(active).mean()) if active else 1.0
        scores = {}
        for g in self.masks.groups:
            if g in normed:
                scores[g] = gamma[g]
            else:
                mean = float(filt[g][self.masks.keep[g]].mean())
                scores[g] = filt[g] * (ref / mean if mean > 0 else 1.0)
        return per_mac(scores, self.costs) if self.config.cost_aware else scores

    def _gids(self, s) -> set[int]:
        return set(np.unique(self.graph.atom_group[s.atoms]).tolist()) & set(self.masks.keep)

    def _rows(self, sites, kind: str):
        for s in sites:
            t = get_tensor(self.model, s.path).detach().double().cpu()
            v = t.abs() if kind == "abs" else t.movedim(s.axis, 0).flatten(1).norm(dim=1)
            gids, pos = self.graph.positions(s.atoms)
            for g in self._gids(s):
                hit = gids == g
                yield g, pos[hit], v.numpy()[hit]

    def filters(self, g: int, *, last: Callable[[str], torch.Tensor] | None = None) -> np.ndarray:
        """Group ``g``'s stacked producer filters, features x channels (column j: everything
        the producers hold for channel j). ``last``: where to read tensors instead of the
        model (``masks.last_values``: masked channels hold their saved values)."""
        n = self.graph.groups[g].channels
        blocks = []
        for s in self._filter_sites:
            gids, pos = self.graph.positions(s.atoms)
            hit = np.nonzero(gids == g)[0]
            if not len(hit):
                continue
            t = last(s.path) if last is not None else get_tensor(self.model, s.path)
            rows = t.detach().movedim(s.axis, 0).flatten(1).double().cpu().numpy()
            p = pos[hit]
            order = np.argsort(p, kind="stable")
            first = np.searchsorted(p[order], p[order])
            occurrence = np.empty(len(p), dtype=np.int64)
            occurrence[order] = np.arange(len(p)) - first  # k-th row a site holds for a channel
            for m in range(int(occurrence.max()) + 1):
                block = np.zeros((n, rows.shape[1]))
                sel = occurrence == m
                block[p[sel]] = rows[hit[sel]]
                blocks.append(block)
        return np.concatenate(blocks, axis=1).T if blocks else np.zeros((0, n))

    # --- an update --------------------------------------------------------------------------
    def choose(self, scores: dict[int, np.ndarray], flops_target: float | None = None):
        """The selection for the target: widths from ``scores`` (the global walk), each
        group's channels by column subset selection on its filters. The walk is run again on
        scores re-ordered by the subset choice (the group's own values, largest on the first
        chosen column, made strictly decreasing by steps far below the smallest gap between
        distinct scores, so exact ties follow the choice too): the widths are those of the
        first walk (up to the order of exactly tied scores) and planning's invariants hold."""
        widths = self.select(scores, flops_target)
        values = np.concatenate([np.asarray(scores[g], dtype=np.float64) for g in scores])
        distinct = np.unique(values[np.isfinite(values)])
        gap = float(np.diff(distinct).min()) if len(distinct) > 1 else 1.0
        step = gap / (4.0 * (max(len(v) for v in scores.values()) + 1))
        ordered = {}
        for g in self.masks.groups:
            x = self.filters(g)
            s = np.asarray(scores[g], dtype=np.float64)
            if not x.size:
                ordered[g] = s
                continue
            order = keep_order(x, len(widths.kept[g]), self.config.selection)
            ordered[g] = np.empty(len(s))
            ordered[g][order] = np.sort(s)[::-1] - step * np.arange(len(s))
        return self.select(ordered, flops_target)

    @torch.no_grad()
    def update(self, delta: float) -> Selection:
        """Prune to the target, then (``delta`` > 0) regrow up to the eased target."""
        target = self.config.flops_target
        scores = self.width_scores()
        sel = self.choose(scores)
        keep = {}
        for g in self.masks.groups:
            keep[g] = np.zeros(self.graph.groups[g].channels, dtype=bool)
            keep[g][sel.kept[g]] = True
        if delta > 0:
            up = self.select(scores, target + delta * (1.0 - target), tolerance=1.0)
            rng = np.random.default_rng([self.config.seed, self.iteration])
            last = functools.cache(self.masks.last_values)  # each tensor once per update
            for g in self.masks.groups:
                grow = len(up.kept[g]) - int(keep[g].sum())
                candidates = np.nonzero(~keep[g])[0]
                if grow <= 0 or not len(candidates):
                    continue
                x = self.filters(g, last=last)
                eps = projection_residual(x[:, keep[g]], x[:, candidates])
                picked = candidates[sample_softmax(eps, min(grow, len(candidates)), rng)]
                keep[g][picked] = True
        self.regrown += self.masks.set_keep(keep, restore=True)[1]
        self.masked_once = True
        self.updates += 1
        self.last_rounding = sel.rounding
        return sel

    def scores(self) -> dict[int, np.ndarray]:
        return self.width_scores()

    # --- the end ----------------------------------------------------------------------------
    def finalize_passes(self) -> list[Pass]:
        """Freeze at the target first if training stopped before ``t_max`` (or never ran)."""
        if not self.masked_once or self.iteration < self.freeze_iter:
            self.update(0.0)
        return super().finalize_passes()

    def stats(self) -> ChexStats:
        return ChexStats(
            masked_macs_fraction=round(self.masks.macs_fraction(self.layer_macs), 4),
            updates=self.updates,
            regrown=self.regrown,
            rounding=str(self.last_rounding),
            delta_t=self.delta_t,
            freeze_iter=self.freeze_iter,
        )
