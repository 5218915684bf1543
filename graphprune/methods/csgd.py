"""Centripetal SGD (C-SGD, Ding et al. 2019): channels clustered per group are pulled together
while training; at the end each cluster is one channel, merged losslessly.

At prepare, the number of clusters of each group is chosen by ``MaskingMethod.select`` from the
channels' L2 norms divided by their group's mean, as magnitude ranks (the kept count of each
group is its cluster count, so the merged model meets the MACs target within 0.01), and the
group's channels are clustered on their producer vectors (every "out" entry of the channel:
conv/linear rows, biases, norm scale and shift): k-means seeded by an even split in norm order
(``cluster="kmeans"``) or that split alone (``"even"``). Only groups where merging is exact
take part (passes/merge_channels.py ``mergeable_groups``: no op between producers and dense
consumers mixes channels); the others keep their width.

Training (``after_backward``): every producer entry W_i of a cluster member gets
``mean_{j in cluster} ∂L/∂W_j + ε·(W_i − mean_{j in cluster} W_j)`` as its gradient (the
optimizer adds weight decay), so the members follow the same task gradient and their
differences decay. At ``average_at`` (0.9) of the budget each cluster is averaged (producer
and "stat" entries: running statistics too), which makes its members identical; the rest of
the budget fine-tunes that model, whose members get identical gradients (their momentum
buffers still differ a little, and the pull keeps closing that). At finalize the clusters
are averaged once more (``final_residual`` says how much that moved), merge_channels adds the
consumers' input slices into the first member's and prune_channels removes the others: the
pruned model computes exactly what the averaged model does.

ε on short budgets (``centripetal=None``): a member's distance to its cluster mean evolves
under the gradient ε·d alone (methods/decay.py), so ε is fitted to shrink it by
``CENTRIPETAL_NATS`` (to 0.1%) over the budget, never below the paper's 3e-3 (CIFAR, ~10^5
iterations) and at most critical damping, where it cannot close the gap on short budgets
(methods/decay.py): averaging early and fine-tuning after (``average_at``) recovers what
averaging unconverged clusters costs. ``stats().residual`` reports how far from identical the
clusters still were when averaged (0 when they converged).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import torch

from graphprune.errors import PlanError
from graphprune.frontend.params import get_tensor
from graphprune.methods.base import option, register_method
from graphprune.methods.decay import fitted_decay
from graphprune.methods.masking import MaskingConfig, MaskingMethod
from graphprune.passes import cleanup, merge_channels, mergeable_groups, prune_channels
from graphprune.passes.runner import Pass
from graphprune.planning.ranking import choose_rounding
from graphprune.planning.selection import l2_scores, normalized

PAPER_CENTRIPETAL = 3e-3
CENTRIPETAL_NATS = math.log(1000.0)
KMEANS_ITERS = 30


@dataclass(frozen=True, slots=True, kw_only=True)
class CSGDConfig(MaskingConfig):
    """C-SGD's options; None picks the budget-fitted default (module docstring)."""

    centripetal: float | None = option(
        None, "ε pulling cluster members together (None: fit to the budget; paper 3e-3)"
    )
    cluster: Literal["kmeans", "even"] = option(
        "kmeans", "k-means on producer vectors, or an even split in norm order"
    )
    average_at: float = option(
        0.9, "fraction of training after which clusters are averaged (1: only at finalize)"
    )

    def validate(self) -> None:
        MaskingConfig.validate(self)
        if self.centripetal is not None and not self.centripetal >= 0:
            raise ValueError(f"centripetal={self.centripetal}: must be >= 0 (None fits it)")
        if not 0.0 < self.average_at <= 1.0:
            raise ValueError(f"average_at={self.average_at}: must be in (0, 1]")


@dataclass(frozen=True, slots=True)
class CSGDStats:
    centripetal: float
    merged_channels: int
    clustered_groups: int
    unmergeable_groups: tuple[str, ...]  # "group id: reason" for groups kept whole
    average_iter: int  # clusters made identical after this many steps (then fine-tuned)
    residual: float  # largest |W_i - cluster mean| / largest |mean| per tensor, then
    final_residual: float  # the same at finalize (what the last average changed)


class ClusterSites:
    """Cluster means along every producer ("out") and "stat" site of the clustered groups.

    Each site axis gets a label per index: the global id of its channel's cluster, or an id
    of its own for channels in no cluster (and other groups), so ``mean`` is one index_add."""

    def __init__(self, gm, graph, labels: Mapping[int, np.ndarray]) -> None:
        self.gm = gm
        base = {}
        offset = 0
        for g, lab in labels.items():
            base[g] = offset
            offset += int(lab.max()) + 1
        self.sites = []
        for s in graph.sites:
            if s.role not in ("out", "stat"):
                continue
            gids, pos = graph.positions(s.atoms.reshape(-1))
            hit = np.isin(gids, list(labels))
            if not hit.any():
                continue
            site_labels = np.arange(len(gids)) + offset  # singletons
            for g, lab in labels.items():
                in_g = gids == g
                site_labels[in_g] = base[g] + lab[pos[in_g]]
            _, dense = np.unique(site_labels, return_inverse=True)
            idx = torch.from_numpy(dense.astype(np.int64))
            counts = torch.bincount(idx).to(torch.float64)
            self.sites.append((s.path, s.axis, s.role, idx, counts))

    def mean(self, t: torch.Tensor, axis: int, idx: torch.Tensor, counts) -> torch.Tensor:
        """Each entry replaced by the mean over its cluster along ``axis``."""
        moved = t.movedim(axis, 0)
        sums = torch.zeros((len(counts), *moved.shape[1:]), dtype=torch.float64)
        sums.index_add_(0, idx, moved.double())
        shape = (-1,) + (1,) * (moved.dim() - 1)
        return (sums / counts.view(shape))[idx].to(t.dtype).movedim(0, axis)

    @torch.no_grad()
    def pull(self, centripetal: float) -> None:
        """grad_i <- cluster mean of grads + ε (W_i - cluster mean of W), at "out" sites."""
        for path, axis, role, idx, counts in self.sites:
            t = get_tensor(self.gm, path)
            if role != "out" or t.grad is None:
                continue
            w = t.detach()
            t.grad.copy_(self.mean(t.grad, axis, idx, counts))
            if centripetal:
                t.grad.add_(w - self.mean(w, axis, idx, counts), alpha=centripetal)

    @torch.no_grad()
    def average(self) -> float:
        """Make every cluster identical (its mean, at "out" and "stat" sites); returns the
        largest relative distance of a member's producer entries from the mean before."""
        residual = 0.0
        for path, axis, role, idx, counts in self.sites:
            t = get_tensor(self.gm, path)
            mean = self.mean(t.detach(), axis, idx, counts)
            if role == "out":
                diff = (t.detach() - mean).abs().max()
                residual = max(residual, float(diff / mean.abs().max().clamp_min(1e-12)))
            t.copy_(mean)
        return residual


def cluster_channels(vectors: np.ndarray, k: int, method: str = "kmeans") -> np.ndarray:
    """A cluster label (0..k-1, every label used) per row of ``vectors``: an even split in
    order of norm, refined by k-means when ``method == "kmeans"`` (deterministic)."""
    n = len(vectors)
    if not 1 <= k <= n:
        raise ValueError(f"k={k}: must be in [1, {n}]")
    order = np.argsort(-np.linalg.norm(vectors, axis=1), kind="stable")
    labels = np.empty(n, dtype=np.int64)
    for c, chunk in enumerate(np.array_split(order, k)):
        labels[chunk] = c
    if method == "even" or k in (1, n):
        return labels
    for _ in range(KMEANS_ITERS):
        centers = np.stack([vectors[labels == c].mean(axis=0) for c in range(k)])
        dist = ((vectors[:, None, :] - centers[None, :, :]) ** 2).sum(axis=2)
        new = dist.argmin(axis=1)
        for c in range(k):  # an emptied cluster takes the point farthest from its center
            if not (new == c).any():
                counts = np.bincount(new, minlength=k)
                far = np.argmax(np.where(counts[new] > 1, dist[np.arange(n), new], -1.0))
                new[far] = c
        if np.array_equal(new, labels):
            break
        labels = new
    return labels


@register_method
class CSGD(MaskingMethod):
    """Centripetal SGD: clustered channels are pulled together while training, then merged."""

    name = "csgd"
    config_class = CSGDConfig
    hard_masks: ClassVar[bool] = False  # never masks: clusters are merged at the end
    config: CSGDConfig

    def prepare(self) -> None:
        super().prepare()
        self.keep_unmergeable_whole()
        total = self.total_iters or 1
        lr = 0.05 if self.lr is None else self.lr
        eps = self.config.centripetal
        if eps is None:
            eps = fitted_decay(total, lr, total, nats=CENTRIPETAL_NATS, floor=PAPER_CENTRIPETAL)
        self.centripetal = float(eps)
        self.average_iter = min(total, max(1, round(self.config.average_at * total)))
        self.set_clusters(self.choose_clusters())
        self.residual = self.final_residual = 0.0

    def keep_unmergeable_whole(self) -> None:
        """Groups where merging would not be exact (``mergeable_groups``) get a floor of their
        full width, so ``select`` never narrows them; the rounding is re-chosen with them."""
        self.unmergeable = {
            g: why
            for g, why in mergeable_groups(self.model, self.graph).items()
            if why is not None and g in self.masks.keep
        }
        if not self.unmergeable:
            return
        self.floors.update({g: self.graph.groups[g].channels for g in self.unmergeable})
        try:
            self.rounding = choose_rounding(
                self.graph,
                self.layer_macs,
                self.floors,
                self.config.flops_target,
                self.round_to,
                who=self.name,
            )
        except PlanError as exc:
            kept = "; ".join(f"group {g}: {why}" for g, why in self.unmergeable.items())
            raise PlanError(f"{exc}. csgd keeps whole the groups it cannot merge: {kept}") from None

    # --- clusters -------------------------------------------------------------------------
    def scores(self) -> dict[int, np.ndarray]:
        """Channel L2 norms over the group's members, divided by the group's mean (as
        magnitude ranks): they size the clusters, a group's weakest channels merge first."""
        return normalized(l2_scores(self.model, self.graph))

    def choose_clusters(self) -> dict[int, np.ndarray]:
        """Group id -> cluster label per channel, for the groups select narrows."""
        kept = self.select(self.scores()).kept
        vectors = self._producer_vectors()
        return {
            g: cluster_channels(vectors[g], len(k), self.config.cluster)
            for g, k in kept.items()
            if len(k) < self.graph.groups[g].channels
        }

    def set_clusters(self, labels: Mapping[int, np.ndarray]) -> None:
        self.labels = {int(g): np.asarray(v, dtype=np.int64) for g, v in labels.items()}
        self.sites = ClusterSites(self.model, self.graph, self.labels)

    def clusters(self) -> dict[int, list[np.ndarray]]:
        """Group id -> the channel indices of each cluster (ascending; the first is kept)."""
        return {
            g: [np.nonzero(lab == c)[0] for c in range(int(lab.max()) + 1)]
            for g, lab in self.labels.items()
        }

    def _producer_vectors(self) -> dict[int, np.ndarray]:
        parts: dict[int, list[np.ndarray]] = {g: [] for g in self.masks.groups}
        for s in self.graph.sites:
            if s.role != "out":
                continue
            gids, pos = self.graph.positions(s.atoms.reshape(-1))
            t = get_tensor(self.model, s.path).detach().movedim(s.axis, 0)
            flat = t.reshape(t.shape[0], -1).double().cpu().numpy()
            for g in parts:
                in_g = gids == g
                if in_g.any():
                    block = np.zeros((self.graph.groups[g].channels, flat.shape[1]))
                    block[pos[in_g]] = flat[in_g]
                    parts[g].append(block)
        return {g: np.concatenate(p, axis=1) for g, p in parts.items() if p}

    # --- training -------------------------------------------------------------------------
    def after_backward(self) -> None:
        self.sites.pull(self.centripetal)

    def on_step(self) -> None:
        if self.iteration == self.average_iter:
            self.residual = self.sites.average()

    def extra_state(self) -> dict:
        return {
            "labels": {g: torch.from_numpy(v.copy()) for g, v in self.labels.items()},
            "residual": self.residual,
        }

    def load_extra_state(self, state: Mapping) -> None:
        self.set_clusters({int(g): v.numpy() for g, v in state["labels"].items()})
        self.residual = float(state["residual"])

    # --- the end --------------------------------------------------------------------------
    def average_clusters(self) -> float:
        """Make each cluster exactly identical (its mean); the residual before, relative."""
        self.final_residual = self.sites.average()
        return self.final_residual

    def finalize_passes(self) -> list[Pass]:
        self.average_clusters()
        clusters = self.clusters()
        plan = {g: np.sort([c[0] for c in cl]) for g, cl in clusters.items()}
        return [
            functools.partial(merge_channels, clusters=clusters),
            functools.partial(prune_channels, plan=plan, round_to=1),
            cleanup,
        ]

    def stats(self) -> CSGDStats:
        return CSGDStats(
            centripetal=self.centripetal,
            merged_channels=sum(len(v) - int(v.max()) - 1 for v in self.labels.values()),
            clustered_groups=len(self.labels),
            unmergeable_groups=tuple(f"{g}: {why}" for g, why in self.unmergeable.items()),
            average_iter=self.average_iter,
            residual=self.residual,
            final_residual=self.final_residual,
        )
