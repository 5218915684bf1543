"""ResRep (Ding et al., ICCV 2021): lossless channel pruning by gradient resetting.

Compactors (identity 1x1 convs behind each producer's norm) learn to "forget": after every
backward pass, each compactor row i gets  grad_i = m_i·dL/dQ_i + λ·Q_i / max(||Q_i||, eps),
so masked rows (m_i = 0) only decay. Masks are re-chosen on a schedule until the remaining
MACs reach the target. At the end, BN is fused, the compactors are folded into the convs
(exact) and the zeroed channels are removed.

Groups a compactor cannot fold into (depthwise-separable blocks, Linear producers, layer scales,
norms called as functions) get the same gradient resetting on their own weights: a channel's
row is every producer entry of its group (kernel_rows.py), held at exactly zero once masked
rows are zeroed, and removed exactly by the pruner (``kernel_resetting``, on by default).

How channels are ranked (planning/ranking.py has the reasoning): a channel's importance is
its compactor row norm averaged over the group's producers (never summed: a residual stream
would look 4-10x more important), times a first-order Taylor prior measured over the warm-up
(informative from the first mask, when norms have barely moved), divided by the square root
of the MACs the channel costs (``cost_power``; 1 would be importance per MAC saved); no group
goes below ``min_keep_fraction`` of its width. Widths are multiples of ``round_to`` (8) where
the target allows and finer where it would be out of reach, and a width step of 8 channels is
ranked by their mean score (``selection.step_keys``); the last mask update lands within 0.01 of
the target.

Why cost ** 0.5 (Fashion-MNIST ResNet-20, 375 iterations, BENCHMARKS.md): dividing by the
full cost piles the cut on the early, high-resolution layers. With multiples of 8, cost ** 0.5
was +0.10 ± 0.07 / +0.43 ± 0.22 points at 50 / 70% fewer MACs (10 seeds paired on the same
bases) and +0.5 at 90% (3 seeds); 0.25 was no better and 0.75 worse at 70%. Exact widths
(``round_to=1``) were more accurate still on that narrow network (+0.21 / +0.15); ranking each
step of 8 channels by their mean score (``step_keys``) then closed that gap with multiples of 8
(+0.26 ± 0.05 / +0.17 ± 0.09 over per-channel ranking, +0.05 / +0.02 over exact widths). Exact
widths are not the default because widths just past ONNX Runtime's channel blocks run slowly:
the demo's ResNet-56 at 0.3 of the MACs ran 0.57x the dense speed at batch 32 with exact widths,
where multiples of 8 had given 1.5x.

Use ``ResRep`` in any training loop (own loop, DDP, Lightning)::

    rr = ResRep(graphprune.trace(model, (x,)), flops_target=0.5, total_iters=T, lr=0.05)
    opt = torch.optim.SGD(rr.param_groups(lr=0.05), lr=0.05)
    for x, y in loader:
        loss = F.cross_entropy(rr.model(x), y)   # or DistillLoss(teacher)(rr.model(x), x, y)
        opt.zero_grad(); loss.backward(); rr.after_backward(); opt.step(); rr.step()
    pruned = rr.finalize()
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import fx

from graphprune.errors import PlanError, TrainingError
from graphprune.methods.base import Method, MethodConfig, option, register_method
from graphprune.methods.resrep.kernel_rows import KernelRows
from graphprune.methods.resrep.schedule import (
    GROWN_NORM,
    ResRepSchedule,
)
from graphprune.passes import cleanup, fold_compactors, fuse_bn, insert_compactors, prune_channels
from graphprune.passes.compactor import Compactor
from graphprune.passes.runner import Pass
from graphprune.planning.ranking import (
    DEFAULT_MIN_KEEP_FRACTION,
    channel_costs,
    check_cost_power,
    check_keep_fraction,
    floors_and_rounding,
    normalized_prior,
    per_mac,
    producer_mean,
    rank_correlation,
    select_kept,
    taylor_saliency,
)
from graphprune.planning.selection import MacsModel


def resrep_finalize(*, round_to: int = 1, fold_threshold: float = 1e-5) -> list[Pass]:
    """The passes that turn a trained ResRep model into the pruned one. The masks already
    have their rounded widths, so the pruner removes exactly the zeroed channels."""
    return [
        fuse_bn,  # the compactor must sit directly on a conv to be folded
        # Q·K, Q·b; rows below the threshold become all-zero output channels
        functools.partial(fold_compactors, threshold=fold_threshold),
        # with no plan: removes exactly the all-zero channels, in every member
        functools.partial(prune_channels, round_to=round_to),
        cleanup,  # drops dead submodules and nodes
    ]


# Importance / cost ** COST_POWER: halfway between importance alone and per MAC saved.
# ResRepConfig.cost_power and BENCHMARKS.md have the measurements.
COST_POWER = 0.5

# Fewer iterations leave the adaptive schedule's phases a handful of steps each.
MIN_ADAPTIVE_ITERS = 120


@dataclass(frozen=True, slots=True, kw_only=True)
class ResRepConfig(MethodConfig):
    schedule: ResRepSchedule | Literal["adaptive", "paper"] = option(
        "adaptive",
        "'adaptive' fits the budget, 'paper' has the paper's constants; or a ResRepSchedule",
    )
    internal_only: bool = option(
        False, "compactors only on single-producer groups (the paper's internal layers)"
    )
    fold_threshold: float = option(
        1e-5, "compactor rows with a smaller L2 norm are removed when folding"
    )
    min_keep_fraction: float = option(
        DEFAULT_MIN_KEEP_FRACTION,
        "no group keeps fewer than this fraction of its channels (at least 1): no layer collapse",
    )
    cost_aware: bool = option(
        True, "weigh a channel's importance against the MACs it costs (see cost_power)"
    )
    cost_power: float = option(
        COST_POWER,
        "when cost-aware, importance / MACs cost ** this: 1 is per MAC saved (faster models), "
        "0.5 weighs cost less (more accurate)",
    )
    taylor_prior: bool = option(
        True, "weigh row norms by a first-order Taylor saliency measured over the warm-up"
    )
    kernel_resetting: bool = option(
        True,
        "groups no compactor can fold into (depthwise convs, linear layers, layer scales) get "
        "gradient resetting on their own weights; False: compactor groups only (the paper)",
    )

    def validate(self) -> None:
        if not self.fold_threshold >= 0:
            raise ValueError(f"fold_threshold={self.fold_threshold}: must be >= 0")
        check_keep_fraction(self.min_keep_fraction)
        check_cost_power(self.cost_power)


@dataclass(frozen=True, slots=True)
class ResRepStats:
    masked_macs_fraction: float  # remaining MACs / dense predicted by the final masks
    masked_rows_not_decayed: int  # masked rows above fold_threshold (finalize refuses them)
    rounding: str  # the widths the final masks use (finer than round_to only where needed)
    rank_stability: tuple[float, ...]  # Spearman of scores between consecutive mask updates
    schedule: ResRepSchedule


@register_method
class ResRep(Method):
    """Lossless pruning by gradient resetting on compactors, folded into the convs at the end."""

    name = "resrep"
    config_class = ResRepConfig
    trains = True
    min_iters = 320  # the demo refuses fewer (compress refuses < MIN_ADAPTIVE_ITERS)
    config: ResRepConfig

    # --- prepare --------------------------------------------------------------------------
    def prepare_passes(self) -> list[Pass]:
        return [functools.partial(insert_compactors, internal_only=self.config.internal_only)]

    def prepare(self) -> None:
        """Insert compactors, choose the rounding that can reach the target, fit the schedule."""
        super().prepare()
        self.compactors = [m for m in self.model.modules() if isinstance(m, Compactor)]
        compacted = {c.group for c in self.compactors}
        self.kernel = self._kernel_rows(compacted)
        if not self.compactors and self.kernel is None:
            raise PlanError(self._nothing_to_prune())
        self.groups = sorted(compacted | set(self.kernel.groups if self.kernel else ()))
        channels = {g: self.graph.groups[g].channels for g in self.groups}
        self.costs = channel_costs(self.graph, self.layer_macs, self.groups)
        self.floors, self.rounding = floors_and_rounding(
            self.graph,
            self.layer_macs,
            self.groups,
            flops_target=self.config.flops_target,
            round_to=self.round_to,
            min_keep_fraction=self.config.min_keep_fraction,
            who="ResRep",
        )
        self.final_rounding = self.rounding
        probe = self._select({g: np.ones(n) for g, n in channels.items()}, None)
        to_mask = sum(channels[g] - int(m.sum()) for g, m in probe.items())
        self.schedule = self._schedule(to_mask)
        self.iteration = 0
        self.prior_sum = {g: np.zeros(n) for g, n in channels.items()}
        self.last_scores: np.ndarray | None = None
        self.rank_stability: list[float] = []
        self.push_scale = 1.0  # masked-row push x this, set when the masks freeze
        self._final_stats: ResRepStats | None = None

    def _nothing_to_prune(self) -> str:
        if not self.config.kernel_resetting:
            why = "kernel_resetting=False leaves only groups made by dense Conv2d layers"
        else:
            inexact = [g for g in self.graph.groups if g.prunable and not g.exact]
            why = "no prunable channel group"
            if inexact:
                why = (
                    f"its {len(inexact)} prunable groups are all inexact: a zeroed channel "
                    f"still changes the others ({inexact[0].inexact_reasons[0]}), so masks "
                    "cannot remove channels losslessly; one-shot pruning can (compress(model, "
                    "'magnitude') without train_loader, then fine-tune the pruned model)"
                )
        return f"ResRep found no group it can prune: {why}"

    def _kernel_rows(self, compacted: set[int]) -> KernelRows | None:
        """Rows on the group's own weights for every other prunable, exact group (only
        single-producer ones with ``internal_only``), or None when there is none."""
        if not self.config.kernel_resetting:
            return None
        ids = [
            g.id
            for g in self.graph.groups
            if g.prunable
            and g.exact
            and g.channels > 1
            and g.id not in compacted
            and not (self.config.internal_only and len(g.producers) > 1)
        ]
        return KernelRows(self.model, self.graph, ids) if ids else None

    def _schedule(self, to_mask: int) -> ResRepSchedule:
        s, total = self.config.schedule, int(self.total_iters or 0)
        if isinstance(s, ResRepSchedule):
            return s
        if s == "paper":
            if self.iters_per_epoch is None:
                raise TypeError("schedule='paper' counts epochs: pass iters_per_epoch=")
            return ResRepSchedule.paper(self.iters_per_epoch)
        if total < MIN_ADAPTIVE_ITERS:
            per = self.iters_per_epoch
            epochs = f" ({math.ceil(MIN_ADAPTIVE_ITERS / per)} epochs of {per})" if per else ""
            raise TrainingError(
                f"ResRep with {total} iterations: the adaptive schedule needs at least "
                f"{MIN_ADAPTIVE_ITERS}{epochs} (a warm-up, mask updates over the next 15% of "
                "training, the masked rows' decay and fine-tuning): train longer or use a "
                "smaller batch"
            )
        return ResRepSchedule.adaptive(total, to_mask, 0.05 if self.lr is None else self.lr)

    # --- the training hooks ---------------------------------------------------------------
    def own_param_groups(self, lr: float) -> list[dict]:
        """Compactors: the schedule's momentum and lr scale, no weight decay."""
        return [
            {
                "params": [c.weight for c in self.compactors],
                "lr": lr * self.schedule.compactor_lr_scale,
                "momentum": self.schedule.compactor_momentum,
                "weight_decay": 0.0,
            }
        ]

    @torch.no_grad()
    def after_backward(self) -> None:
        """Gradient resetting: grad_i = τ·m_i·dL/dQ_i + λ_i·Q_i / max(||Q_i||, eps), where
        τ is the schedule's ``task_scale`` (the paper: 1), λ_i is ``penalty`` for active rows
        (0 after ``penalty_until``) and ``masked_penalty`` for masked ones. During the warm-up
        the unscaled task gradient first feeds the Taylor prior."""
        s = self.schedule
        active = s.penalty if s.penalty_until is None or self.iteration <= s.penalty_until else 0.0
        if self.config.taylor_prior and self.iteration < s.warmup_iters:
            self._accumulate_prior()
        if self.kernel is not None:
            if s.zero_at is not None and self.iteration >= s.zero_at:
                self.kernel.freeze_masked()  # held at zero: see _zero_masked_rows
            else:
                self.kernel.reset_grads(
                    active=active,
                    masked=s.masked_penalty * self.push_scale,
                    eps=s.eps * self.push_scale,
                    compactor_momentum=s.compactor_momentum,
                    compactor_lr_scale=s.compactor_lr_scale,
                )
        for c in self.compactors:
            q = c.matrix
            grad = c.weight.grad.view_as(q) if c.weight.grad is not None else torch.zeros_like(q)
            m = c.mask.view(-1, 1)
            eps = m * s.eps + (1 - m) * s.eps * self.push_scale
            norms = torch.maximum(torch.linalg.vector_norm(q, dim=1, keepdim=True), eps)
            lam = m * active + (1 - m) * s.masked_penalty * self.push_scale
            new = s.task_scale * m * grad + lam * q / norms
            c.weight.grad = new.view_as(c.weight)

    def _accumulate_prior(self) -> None:
        rows = [
            (
                c.group,
                c.channel_index.cpu().numpy(),
                (c.matrix * c.weight.grad.view_as(c.matrix)).sum(1).double().cpu().numpy(),
            )
            for c in self.compactors
            if c.weight.grad is not None
        ]
        channels = {g: len(v) for g, v in self.prior_sum.items()}
        for g, v in taylor_saliency(rows, channels).items():
            self.prior_sum[g] += v
        if self.kernel is not None:
            for g, v in self.kernel.saliency().items():
                self.prior_sum[g] += v

    def step(self) -> None:
        """Advance one iteration; re-choose masks every ``mask_interval`` after warm-up,
        until ``mask_until``."""
        self.iteration += 1
        s = self.schedule
        if s.zero_at is not None and self.iteration >= s.zero_at:
            self._zero_masked_rows()
        if s.mask_until is not None and self.iteration > s.mask_until:
            return
        if (
            self.iteration >= s.warmup_iters
            and (self.iteration - s.warmup_iters) % s.mask_interval == 0
        ):
            self.update_masks()

    @torch.no_grad()
    def _zero_masked_rows(self) -> None:
        """Hold masked rows at exactly zero: the decay window is over, the rest of training
        fine-tunes the network that the final model will be."""
        for c in self.compactors:
            c.matrix.mul_(c.mask.view(-1, 1))
        if self.kernel is not None:
            self.kernel.hold_masked_at_zero()

    def state_dict(self) -> dict:
        """Masks live in the compactors' buffers (the model's state_dict); this is the rest."""
        return {
            "iteration": self.iteration,
            "prior_sum": {g: torch.from_numpy(v.copy()) for g, v in self.prior_sum.items()},
            "last_scores": None if self.last_scores is None else torch.from_numpy(self.last_scores),
            "rank_stability": list(self.rank_stability),
            "final_rounding": (self.final_rounding.round_to, self.final_rounding.fine),
            "push_scale": self.push_scale,
            "kernel": None if self.kernel is None else self.kernel.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        from graphprune.planning.ranking import Rounding

        self.iteration = int(state["iteration"])
        if "prior_sum" in state:
            self.prior_sum = {int(g): v.numpy().copy() for g, v in state["prior_sum"].items()}
            last = state["last_scores"]
            self.last_scores = None if last is None else last.numpy().copy()
            self.rank_stability = [float(x) for x in state["rank_stability"]]
            self.final_rounding = Rounding(*state["final_rounding"])
            self.push_scale = float(state.get("push_scale", 1.0))
        if self.kernel is not None:
            self.kernel.load_state_dict(state["kernel"])

    # --- masks ---------------------------------------------------------------------------
    def group_scores(self) -> dict[int, np.ndarray]:
        """Per group and channel: mean compactor row norm over the group's producers (for a
        group without compactors: its row's norm relative to the start), times the Taylor
        prior (when used), divided by the channel's MACs cost ** ``cost_power`` (when
        cost-aware)."""
        channels = {g: self.graph.groups[g].channels for g in self.groups}
        if self.kernel is not None:
            channels = {g: n for g, n in channels.items() if g not in self.kernel.keep}
        scores = producer_mean(
            (
                (
                    c.group,
                    c.channel_index.cpu().numpy(),
                    torch.linalg.vector_norm(c.matrix.detach(), dim=1).double().cpu().numpy(),
                )
                for c in self.compactors
            ),
            channels,
        )
        if self.kernel is not None:
            scores.update(self.kernel.relative_norms())
        if self.config.taylor_prior:
            prior = normalized_prior(self.prior_sum)
            scores = {g: s * prior[g] for g, s in scores.items()}
        if not self.config.cost_aware:
            return scores
        return per_mac(scores, self.costs, power=self.config.cost_power)

    def masks(self) -> dict[int, np.ndarray]:
        out = {g: np.ones(self.graph.groups[g].channels) for g in self.groups}
        for c in self.compactors:
            out[c.group][c.channel_index.cpu().numpy()] = c.mask.cpu().numpy()
        for g, k in (self.kernel.keep if self.kernel is not None else {}).items():
            out[g] = k.astype(np.float64)
        return out

    @torch.no_grad()
    def update_masks(self) -> None:
        """Rank all channels globally; mask the lowest until the MACs target, but at most
        ``channels_per_update`` more than are masked now; the last update before
        ``mask_until`` is uncapped and lands within 0.01 of the target. Recomputed from
        scratch each time; the rank correlation with the previous update is recorded."""
        s = self.schedule
        masked_now = sum(int((m == 0).sum()) for m in self.masks().values())
        last = s.mask_until is not None and self.iteration + s.mask_interval > s.mask_until
        scores = self.group_scores()
        flat = np.concatenate([scores[g] for g in self.groups])
        if self.last_scores is not None:
            rho = rank_correlation(self.last_scores, flat)
            if rho is not None:
                self.rank_stability.append(round(rho, 4))
        self.last_scores = flat
        new = self._select(scores, None if last else masked_now + s.channels_per_update)
        for c in self.compactors:
            c.mask.copy_(torch.from_numpy(new[c.group][c.channel_index.cpu().numpy()]))
        if self.kernel is not None:
            self.kernel.set_keep({g: new[g] > 0 for g in self.kernel.keep})
        if last:  # masks freeze: push harder if a masked row grew beyond what the schedule
            # was sized for (GROWN_NORM), so it still travels twice its norm in time
            rows = [
                torch.linalg.vector_norm(c.matrix.detach(), dim=1)[c.mask == 0]
                .double()
                .cpu()
                .numpy()
                for c in self.compactors
            ]
            if self.kernel is not None:
                rel = self.kernel.relative_norms()
                rows += [rel[g][~k] for g, k in self.kernel.keep.items()]
            grown = max((float(r.max()) for r in rows if r.size), default=0.0)
            self.push_scale = max(1.0, grown / GROWN_NORM)

    def _select(self, scores: dict[int, np.ndarray], cap: int | None) -> dict[int, np.ndarray]:
        sel = select_kept(
            self.graph,
            scores,
            self.layer_macs,
            self.config.flops_target,
            rounding=self.rounding,
            floors=self.floors,
            max_drop=cap,
        )
        if cap is None:
            self.final_rounding = sel.rounding
        masks = {}
        for g in self.groups:
            masks[g] = np.zeros(self.graph.groups[g].channels)
            masks[g][sel.kept[g]] = 1
        return masks

    def masked_rows_above(self, threshold: float | None = None) -> int:
        """Masked rows that have not yet decayed below the folding threshold (a kernel row:
        below that fraction of its starting norm)."""
        threshold = self.config.fold_threshold if threshold is None else threshold
        count = 0
        for c in self.compactors:
            norms = torch.linalg.vector_norm(c.matrix.detach(), dim=1)
            count += int(((c.mask == 0) & (norms >= threshold)).sum())
        return count + (self.kernel.not_decayed(threshold) if self.kernel is not None else 0)

    def masked_fraction_macs(self) -> float:
        """Predicted remaining MACs / dense MACs under the current masks."""
        model = MacsModel(self.graph, self.layer_macs)
        for g, m in self.masks().items():
            model.set_kept(g, np.nonzero(m)[0])
        return model.macs / model.dense

    # --- the end -------------------------------------------------------------------------
    def finalize_passes(self) -> list[Pass]:
        return resrep_finalize(round_to=1, fold_threshold=self.config.fold_threshold)

    def finalize(self, *, verify: bool | None = None) -> fx.GraphModule:
        """Fuse BN, fold compactors, remove the zeroed channels. Mutates and returns the model.
        Warns when masked rows have not decayed (only possible with the paper's or a custom
        schedule): they stay, the model keeps more MACs than the target, and compress()
        raises TargetMissedError with the result."""
        self._final_stats = self.stats()  # the compactors are gone afterwards
        left = self._final_stats.masked_rows_not_decayed
        planned = self._final_stats.masked_macs_fraction
        if left:
            warnings.warn(
                f"ResRep: {left} masked compactor rows are still above fold_threshold="
                f"{self.config.fold_threshold} after {self.iteration} iterations, so folding "
                f"would keep them and miss the MACs target ({planned:.3f} planned). Use the "
                "adaptive schedule (it zeroes masked rows at 60% of training) or a schedule "
                "whose masked_penalty decays rows in time",
                stacklevel=2,
            )
        if self.kernel is not None:  # zeroed already from zero_at; the paper's schedule: now
            self.kernel.zero_decayed(self.config.fold_threshold)
        return super().finalize(verify=verify)

    @property
    def finalize_stats(self) -> dict[str, object]:
        return self.pass_stats

    def stats(self) -> ResRepStats:
        if self._final_stats is not None:
            return self._final_stats
        return ResRepStats(
            masked_macs_fraction=round(self.masked_fraction_macs(), 4),
            masked_rows_not_decayed=self.masked_rows_above(),
            rounding=str(self.final_rounding),
            rank_stability=tuple(self.rank_stability),
            schedule=self.schedule,
        )
