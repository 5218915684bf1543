"""ResRep (Ding et al., ICCV 2021): lossless channel pruning by gradient resetting.

Compactors (identity 1x1 convs behind each producer's norm) learn to "forget": after every
backward pass, each compactor row i gets  grad_i = m_i·dL/dQ_i + λ·Q_i / max(||Q_i||, eps),
so masked rows (m_i = 0) only decay. Masks are re-chosen on a schedule by ranking all rows
globally by norm until the remaining MACs reach the target. At the end, BN is fused, the
compactors are folded into the convs (exact) and the zeroed channels are removed.

Use ``ResRep`` in any training loop (own loop, DDP, Lightning)::

    rr = ResRep(graphprune.trace(model, (x,)), flops_target=0.5, total_iters=T, lr=0.05)
    opt = torch.optim.SGD(rr.param_groups(lr=0.05), lr=0.05)
    for x, y in loader:
        loss = F.cross_entropy(rr.model(x), y)
        opt.zero_grad(); loss.backward(); rr.after_backward(); opt.step(); rr.step()
    pruned = rr.finalize()
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import fx

from graphprune.errors import PlanError
from graphprune.methods.base import Method, MethodConfig, option, register_method
from graphprune.methods.resrep.schedule import ResRepSchedule
from graphprune.passes import cleanup, fold_compactors, fuse_bn, insert_compactors, prune_channels
from graphprune.passes.compactor import Compactor
from graphprune.passes.runner import Pass
from graphprune.planning.plan import keep_every_member_alive
from graphprune.planning.selection import MacsModel, out_of_reach, walk


def resrep_finalize(*, round_to: int = 8, fold_threshold: float = 1e-5) -> list[Pass]:
    """The passes that turn a trained ResRep model into the pruned one."""
    return [
        fuse_bn,  # the compactor must sit directly on a conv to be folded
        # Q·K, Q·b; rows below the threshold become all-zero output channels
        functools.partial(fold_compactors, threshold=fold_threshold),
        # with no plan: removes exactly the all-zero channels, in every member
        functools.partial(prune_channels, round_to=round_to),
        cleanup,  # drops dead submodules and nodes
    ]


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

    def validate(self) -> None:
        if not self.fold_threshold >= 0:
            raise ValueError(f"fold_threshold={self.fold_threshold}: must be >= 0")


@dataclass(frozen=True, slots=True)
class ResRepStats:
    masked_macs_fraction: float  # remaining MACs / dense predicted by the final masks
    masked_rows_not_decayed: int  # masked rows still above fold_threshold: they are kept
    schedule: ResRepSchedule


@register_method
class ResRep(Method):
    """Lossless pruning by gradient resetting on compactors, folded into the convs at the end."""

    name = "resrep"
    config_class = ResRepConfig
    trains = True
    min_iters = 300  # masked rows need ~300 iterations to decay below the fold threshold
    config: ResRepConfig

    # --- prepare --------------------------------------------------------------------------
    def prepare_passes(self) -> list[Pass]:
        return [functools.partial(insert_compactors, internal_only=self.config.internal_only)]

    def prepare(self) -> None:
        """Insert compactors, check the target is reachable with them, fit the schedule."""
        super().prepare()
        self.compactors = [m for m in self.model.modules() if isinstance(m, Compactor)]
        if not self.compactors:
            raise PlanError("ResRep found no group it can prune (no dense Conv2d producers)")
        self.groups = sorted({c.group for c in self.compactors})
        # Check reachability now, with every compactor group at one channel.
        probe = self._select({g: np.ones(self.graph.groups[g].channels) for g in self.groups}, None)
        if probe is None:
            raise out_of_reach(
                self.graph,
                self.layer_macs,
                self.groups,
                self.config.flops_target,
                self.round_to,
                who="ResRep",
            )
        to_mask = sum(self.graph.groups[g].channels - int(m.sum()) for g, m in probe.items())
        self.schedule = self._schedule(to_mask)
        self.iteration = 0
        self._final_stats: ResRepStats | None = None

    def _schedule(self, to_mask: int) -> ResRepSchedule:
        s, total = self.config.schedule, int(self.total_iters or 0)
        if isinstance(s, ResRepSchedule):
            return s
        if s == "paper":
            if self.iters_per_epoch is None:
                raise TypeError("schedule='paper' counts epochs: pass iters_per_epoch=")
            return ResRepSchedule.paper(self.iters_per_epoch)
        if total < self.min_iters:
            warnings.warn(
                f"ResRep with {total} iterations: masked rows may not decay below the "
                f"folding threshold in fewer than ~{self.min_iters}; train longer or use a "
                "smaller batch",
                stacklevel=4,
            )
        return ResRepSchedule.adaptive(total, to_mask, 0.05 if self.lr is None else self.lr)

    # --- the training hooks ---------------------------------------------------------------
    def own_param_groups(self, lr: float) -> list[dict]:
        """Compactors: their own momentum, no weight decay."""
        return [
            {
                "params": [c.weight for c in self.compactors],
                "lr": lr,
                "momentum": self.schedule.compactor_momentum,
                "weight_decay": 0.0,
            }
        ]

    @torch.no_grad()
    def after_backward(self) -> None:
        """Gradient resetting: grad_i = m_i·dL/dQ_i + λ_i·Q_i / max(||Q_i||, eps), where
        λ_i is ``penalty`` for active rows and ``masked_penalty`` for masked ones."""
        s = self.schedule
        for c in self.compactors:
            q = c.matrix
            grad = c.weight.grad.view_as(q) if c.weight.grad is not None else torch.zeros_like(q)
            norms = torch.linalg.vector_norm(q, dim=1, keepdim=True).clamp_min(s.eps)
            m = c.mask.view(-1, 1)
            lam = m * s.penalty + (1 - m) * s.masked_penalty
            new = m * grad + lam * q / norms
            c.weight.grad = new.view_as(c.weight)

    def step(self) -> None:
        """Advance one iteration; re-choose masks every ``mask_interval`` after warm-up,
        until ``mask_until``."""
        self.iteration += 1
        s = self.schedule
        if s.mask_until is not None and self.iteration > s.mask_until:
            return
        if (
            self.iteration >= s.warmup_iters
            and (self.iteration - s.warmup_iters) % s.mask_interval == 0
        ):
            self.update_masks()

    def state_dict(self) -> dict:
        """Masks live in the compactors' buffers (the model's state_dict); this is the rest."""
        return {"iteration": self.iteration}

    def load_state_dict(self, state: dict) -> None:
        self.iteration = int(state["iteration"])

    # --- masks ---------------------------------------------------------------------------
    def group_scores(self) -> dict[int, np.ndarray]:
        """Per group: each channel's compactor row norms summed over the group's compactors."""
        scores = {g: np.zeros(self.graph.groups[g].channels) for g in self.groups}
        for c in self.compactors:
            norms = torch.linalg.vector_norm(c.matrix.detach(), dim=1).cpu().numpy()
            np.add.at(scores[c.group], c.channel_index.cpu().numpy(), norms)
        return scores

    def masks(self) -> dict[int, np.ndarray]:
        out = {g: np.ones(self.graph.groups[g].channels) for g in self.groups}
        for c in self.compactors:
            out[c.group][c.channel_index.cpu().numpy()] = c.mask.cpu().numpy()
        return out

    @torch.no_grad()
    def update_masks(self) -> None:
        """Rank all rows globally by norm; mask the lowest until the MACs target, but at most
        ``channels_per_update`` more than are masked now (no cap at the last update before
        ``mask_until``). Recomputed from scratch each time."""
        s = self.schedule
        masked_now = sum(int((m == 0).sum()) for m in self.masks().values())
        last = s.mask_until is not None and self.iteration + s.mask_interval > s.mask_until
        cap = None if last else masked_now + s.channels_per_update
        new = self._select(self.group_scores(), cap)
        if new is None:
            return
        for c in self.compactors:
            c.mask.copy_(torch.from_numpy(new[c.group][c.channel_index.cpu().numpy()]))

    def _select(
        self, scores: dict[int, np.ndarray], cap: int | None
    ) -> dict[int, np.ndarray] | None:
        plan, reached = walk(
            self.graph,
            scores,
            self.layer_macs,
            self.config.flops_target,
            round_to=self.round_to,
            max_drop=cap,
        )
        if cap is None and not reached:
            return None
        plan = keep_every_member_alive(self.graph, plan, scores)
        masks = {g: np.ones(self.graph.groups[g].channels) for g in self.groups}
        for g, kept in plan.items():
            masks[g][:] = 0
            masks[g][kept] = 1
        return masks

    def masked_rows_above(self, threshold: float | None = None) -> int:
        """Masked rows that have not yet decayed below the folding threshold (they stay)."""
        threshold = self.config.fold_threshold if threshold is None else threshold
        count = 0
        for c in self.compactors:
            norms = torch.linalg.vector_norm(c.matrix.detach(), dim=1)
            count += int(((c.mask == 0) & (norms >= threshold)).sum())
        return count

    def masked_fraction_macs(self) -> float:
        """Predicted remaining MACs / dense MACs under the current masks."""
        model = MacsModel(self.graph, self.layer_macs)
        for g, m in self.masks().items():
            model.set_kept(g, np.nonzero(m)[0])
        return model.macs / model.dense

    # --- the end -------------------------------------------------------------------------
    def finalize_passes(self) -> list[Pass]:
        return resrep_finalize(round_to=self.round_to, fold_threshold=self.config.fold_threshold)

    def finalize(self, *, verify: bool | None = None) -> fx.GraphModule:
        """Fuse BN, fold compactors, remove the zeroed channels. Mutates and returns the model."""
        self._final_stats = self.stats()  # the compactors are gone afterwards
        return super().finalize(verify=verify)

    @property
    def finalize_stats(self) -> dict[str, object]:
        return self.pass_stats

    def stats(self) -> ResRepStats:
        if self._final_stats is not None:
            return self._final_stats
        return ResRepStats(
            masked_macs_fraction=self.masked_fraction_macs(),
            masked_rows_not_decayed=self.masked_rows_above(),
            schedule=self.schedule,
        )
