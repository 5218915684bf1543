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

import math
import warnings
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from torch import fx

from graphprune.analysis import build_channel_graph
from graphprune.errors import PlanError
from graphprune.frontend.trace import example_inputs_of
from graphprune.passes import cleanup, fold_compactors, fuse_bn, insert_compactors, prune_channels
from graphprune.passes.compactor import Compactor
from graphprune.passes.runner import run_passes
from graphprune.planning.macs import count_macs
from graphprune.planning.plan import (
    check_flops_target,
    is_tied,
    keep_every_member_alive,
    rounded_width,
)
from graphprune.planning.selection import MacsModel, walk


def resrep_finalize(*, round_to: int = 8, fold_threshold: float = 1e-5) -> list:
    """The passes that turn a trained ResRep model into the pruned one."""
    return [
        fuse_bn,  # the compactor must sit directly on a conv to be folded
        # Q·K, Q·b; rows below the threshold become all-zero output channels
        partial(fold_compactors, threshold=fold_threshold),
        # with no plan: removes exactly the all-zero channels, in every member
        partial(prune_channels, round_to=round_to),
        cleanup,  # drops dead submodules and nodes
    ]


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
        lr_sum = sum(
            0.5 * lr * (1 + math.cos(math.pi * t / total))
            for t in range(round(0.35 * total), total)
        )
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


class ResRep:
    """Training hooks for ResRep. Inserts compactors into ``gm`` (a traced model) in place."""

    def __init__(
        self,
        gm: fx.GraphModule,
        *,
        flops_target: float,
        total_iters: int,
        lr: float = 0.05,
        schedule: ResRepSchedule | None = None,
        round_to: int = 8,
        internal_only: bool = False,
        layer_macs: dict[str, int] | None = None,
    ) -> None:
        check_flops_target(flops_target)
        self.flops_target, self.round_to = flops_target, round_to
        self.graph = build_channel_graph(gm)
        if layer_macs is None:
            layer_macs = count_macs(gm, example_inputs_of(gm)).per_layer
        self.layer_macs = layer_macs
        insert_compactors(gm, internal_only=internal_only)
        self.model = gm
        self.compactors = [m for m in gm.modules() if isinstance(m, Compactor)]
        if not self.compactors:
            raise PlanError("ResRep found no group it can prune (no dense Conv2d producers)")
        self.groups = sorted({c.group for c in self.compactors})
        # Check reachability now, with every compactor group at one channel.
        probe = self._select({g: np.ones(self.graph.groups[g].channels) for g in self.groups}, None)
        if probe is None:
            raise PlanError(self._unreachable_message())
        to_mask = sum(self.graph.groups[g].channels - int(m.sum()) for g, m in probe.items())
        self.schedule = schedule or ResRepSchedule.adaptive(total_iters, to_mask, lr)
        self.iteration = 0
        if schedule is None and total_iters < 300:
            warnings.warn(
                f"ResRep with {total_iters} iterations: masked rows may not decay below the "
                "folding threshold in fewer than ~300; train longer or use a smaller batch",
                stacklevel=2,
            )

    # --- optimizer -------------------------------------------------------------------------
    def param_groups(
        self, lr: float, weight_decay: float = 1e-4, momentum: float = 0.9
    ) -> list[dict]:
        """Compactors: their own momentum, no weight decay. Norms and biases: no weight decay."""
        compactor_params = {id(c.weight) for c in self.compactors}
        decay, no_decay = [], []
        for p in self.model.parameters():
            if id(p) not in compactor_params and p.requires_grad:
                (decay if p.dim() > 1 else no_decay).append(p)
        return [
            {"params": decay, "lr": lr, "momentum": momentum, "weight_decay": weight_decay},
            {"params": no_decay, "lr": lr, "momentum": momentum, "weight_decay": 0.0},
            {
                "params": [c.weight for c in self.compactors],
                "lr": lr,
                "momentum": self.schedule.compactor_momentum,
                "weight_decay": 0.0,
            },
        ]

    # --- the two calls a training loop makes -----------------------------------------------
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
            self.flops_target,
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

    def _unreachable_message(self) -> str:
        model = MacsModel(self.graph, self.layer_macs)
        for g in self.groups:
            n, tied = self.graph.groups[g].channels, is_tied(self.graph, g)
            model.set_kept(g, rounded_width(1, n, self.round_to, tied=tied))
        return (
            f"flops_target={self.flops_target} is out of reach for ResRep: with one channel per "
            f"compactor group (rounded up to multiples of round_to={self.round_to}) "
            f"{model.macs / model.dense:.3f} of the MACs remain; ask for more, or lower round_to"
        )

    def masked_rows_above(self, threshold: float = 1e-5) -> int:
        """Masked rows that have not yet decayed below the folding threshold (they stay)."""
        count = 0
        for c in self.compactors:
            norms = torch.linalg.vector_norm(c.matrix.detach(), dim=1)
            count += int(((c.mask == 0) & (norms >= threshold)).sum())
        return count

    def masked_fraction_macs(self) -> float:
        """Predicted remaining MACs / dense MACs under the current masks."""
        model = MacsModel(self.graph, self.layer_macs)
        for g, m in self.masks().items():
            model.set_kept(g, int(m.sum()))
        return model.macs / model.dense

    # --- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Masks live in the compactors' buffers (the model's state_dict); this is the rest."""
        return {"iteration": self.iteration}

    def load_state_dict(self, state: dict) -> None:
        self.iteration = int(state["iteration"])

    # --- the end -------------------------------------------------------------------------
    def finalize(self, *, fold_threshold: float = 1e-5, verify: bool = False) -> fx.GraphModule:
        """Fuse BN, fold compactors, remove the zeroed channels. Mutates and returns the model."""
        self.model.eval()
        result = run_passes(
            self.model,
            resrep_finalize(round_to=self.round_to, fold_threshold=fold_threshold),
            verify=verify,
        )
        self.finalize_stats = result.stats
        return result.gm


def compress_resrep(
    gm: fx.GraphModule,
    *,
    flops_target: float,
    train_loader,
    epochs: int,
    lr: float = 0.05,
    round_to: int = 8,
    layer_macs: dict[str, int] | None = None,
    val_loader=None,
    loss_fn=None,
    train_step=None,
    schedule: ResRepSchedule | str | None = None,
    internal_only: bool = False,
    checkpoint_dir=None,
    resume: bool = False,
    progress: bool = True,
    verify: bool = False,
):
    """compress(method="resrep"): train with the hooks, then finalize. Returns
    (pruned model, prune stats, extra report fields)."""
    from graphprune.training.loop import evaluate, fit

    iters = len(train_loader)
    if iters == 0:
        from graphprune.errors import TrainingError

        raise TrainingError("train_loader is empty: it yields no batch to train on")
    if schedule == "paper":
        schedule = ResRepSchedule.paper(iters)
    elif isinstance(schedule, str):
        raise ValueError(f"schedule={schedule!r}: use 'paper', None (adaptive) or a ResRepSchedule")
    rr = ResRep(
        gm,
        flops_target=flops_target,
        total_iters=epochs * iters,
        lr=lr,
        schedule=schedule,
        round_to=round_to,
        internal_only=internal_only,
        layer_macs=layer_macs,
    )
    extra_fit = {"loss_fn": loss_fn} if loss_fn is not None else {}
    history = fit(
        rr.model,
        train_loader,
        epochs=epochs,
        lr=lr,
        param_groups=rr.param_groups(lr),
        hooks=rr,
        train_step=train_step,
        val_loader=val_loader,
        checkpoint_dir=checkpoint_dir,
        resume=resume,
        progress=progress,
        desc="resrep",
        **extra_fit,
    )
    extra: dict[str, object] = {
        "train_seconds": round(history.seconds, 1),
        "masked_macs_fraction": round(rr.masked_fraction_macs(), 4),
        "masked_rows_not_decayed": rr.masked_rows_above(),
        "schedule": str(rr.schedule),
    }
    if val_loader is not None:
        extra["accuracy_before_folding"] = evaluate(rr.model, val_loader)
    pruned = rr.finalize(verify=verify)
    if val_loader is not None:
        extra["accuracy_after_folding"] = evaluate(pruned, val_loader)
    # fuse_bn and fold_compactors create no channels, so group ids match the analysis of gm.
    return pruned, rr.finalize_stats["prune_channels"], extra
