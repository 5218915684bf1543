"""Training-time channel masks over coupled groups: the one mechanism every masking method
(CHEX, slimming, FPGM, GSM, iterative magnitude, ...) shares.

A masked channel has every producer-side entry (conv rows, biases, norm scale and shift, layer
scales: the graph's "out" sites) held at zero, so the channel is zero everywhere it flows and
removing it later changes no output: the exactness argument of graphprune.testing.exactness.
Only prunable, exact groups can be masked (in an inexact group a zeroed channel is not zero
downstream).

When a channel is masked, the current values of all its entries (producers, the consumers'
input slices, norm running statistics) are saved, so ``set_keep(..., restore=True)`` brings a
channel back exactly as it was when it was masked (CHEX's regrowth). ``apply()`` re-zeroes the
masked producer entries; call it after every optimizer step (hard masks), or only when masks
change (soft masks: the zeroed weights keep training, as in FPGM's soft filter pruning).

Invariant: ``keep`` has one boolean per channel of each maskable group; a group never has all
its channels masked (a group must keep at least one channel, as pruning requires).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import fx

from graphprune.analysis import ChannelGraph
from graphprune.frontend.params import get_tensor
from graphprune.planning.selection import MacsModel


@dataclass(frozen=True, slots=True)
class _SiteIndex:
    """One parameter/buffer axis: which group and channel each of its indices belongs to."""

    path: str
    axis: int
    role: str  # "out" (zeroing it zeroes the channel), "in" or "stat"
    gids: np.ndarray
    pos: np.ndarray


class ChannelMasks:
    """Per-group keep masks on a traced model (see the module docstring)."""

    def __init__(
        self, gm: fx.GraphModule, graph: ChannelGraph, groups: Iterable[int] | None = None
    ) -> None:
        maskable = {g.id for g in graph.groups if g.prunable and g.exact and g.channels > 1}
        ids = sorted(maskable if groups is None else groups)
        bad = [g for g in ids if g not in maskable]
        if bad:
            raise ValueError(
                f"groups {bad} cannot be masked: only prunable, exact groups with more than "
                "one channel can (see graph.groups[i].reasons / inexact_reasons)"
            )
        self.gm, self.graph = gm, graph
        self.keep = {g: np.ones(graph.groups[g].channels, dtype=bool) for g in ids}
        self._sites: list[_SiteIndex] = []
        for s in graph.sites:
            gids, pos = graph.positions(s.atoms.reshape(-1))
            if np.isin(gids, ids).any():
                self._sites.append(_SiteIndex(s.path, s.axis, s.role, gids, pos))
        self._saved: dict[str, torch.Tensor] = {}  # path -> last values of masked entries

    # --- reading ------------------------------------------------------------------------
    @property
    def groups(self) -> list[int]:
        return list(self.keep)

    def plan(self) -> dict[int, np.ndarray]:
        """Group id -> kept channel indices, for the groups with a masked channel (the plan
        ``prune_channels`` removes exactly)."""
        return {g: np.nonzero(k)[0] for g, k in self.keep.items() if not k.all()}

    def masked(self) -> int:
        """Masked channels, summed over groups."""
        return sum(int((~k).sum()) for k in self.keep.values())

    def macs_fraction(self, layer_macs: Mapping[str, int]) -> float:
        """Predicted remaining MACs / dense MACs with the masked channels removed."""
        model = MacsModel(self.graph, layer_macs)
        for g, k in self.keep.items():
            model.set_kept(g, np.nonzero(k)[0])
        return model.macs / model.dense

    def last_values(self, path: str) -> torch.Tensor:
        """A copy of the tensor at ``path`` in which every masked channel's entries hold the
        values ``set_keep(..., restore=True)`` would give back (the "most recent" weights of
        masked channels, as CHEX scores regrowth candidates by them); kept entries are as
        they are now."""
        t = get_tensor(self.gm, path).detach().clone()
        saved = self._saved.get(path)
        if saved is None:
            return t
        masked = {g: ~k for g, k in self.keep.items()}
        for s, idx in self._indices(masked, roles=("out", "in", "stat"), path=path):
            t.index_copy_(s.axis, idx, saved.index_select(s.axis, idx))
        return t

    # --- writing ------------------------------------------------------------------------
    @torch.no_grad()
    def set_keep(
        self,
        keep: Mapping[int, np.ndarray | Iterable[int]],
        *,
        restore: bool = False,
        filters_only: bool = False,
    ) -> tuple[int, int]:
        """New masks for the groups in ``keep`` (a boolean array per channel, or the kept
        indices); other groups keep theirs. Newly masked channels are saved, then zeroed.
        Newly kept ones get their saved values back when ``restore`` (else they start from
        whatever they hold now: zero, or what soft masking let them learn). ``filters_only``
        is passed to ``apply``. Returns (newly masked, newly kept) channel counts."""
        new = {g: self._as_bool(g, k) for g, k in keep.items()}
        dropped = {g: self.keep[g] & ~k for g, k in new.items()}
        regrown = {g: ~self.keep[g] & k for g, k in new.items()}
        self._copy(dropped, save=True)
        if restore:
            self._copy(regrown, save=False)
        for g, k in new.items():
            self.keep[g] = k
        self.apply(filters_only=filters_only)
        return (
            sum(int(d.sum()) for d in dropped.values()),
            sum(int(r.sum()) for r in regrown.values()),
        )

    @torch.no_grad()
    def apply(self, *, filters_only: bool = False) -> None:
        """Zero every producer-side entry of the masked channels. ``filters_only`` zeroes only
        the conv/linear weights (tensors of two or more dims): soft filter pruning, where a
        masked channel keeps its norm shift and so a gradient path to come back through; it
        is exactly zero only after a full ``apply()``."""
        for s, idx in self._indices({g: ~k for g, k in self.keep.items()}, roles=("out",)):
            t = get_tensor(self.gm, s.path)
            if not filters_only or t.dim() >= 2:
                t.index_fill_(s.axis, idx, 0.0)

    def zero_grads(self) -> None:
        """Zero the gradients of masked producer entries (call between backward and step when
        momentum or weight decay must not move them; ``apply`` alone re-zeroes the weights)."""
        self.replace_grads({g: ~k for g, k in self.keep.items()})

    @torch.no_grad()
    def replace_grads(self, channels: Mapping[int, np.ndarray], decay: float = 0.0) -> None:
        """Replace the gradient of the producer entries of ``channels`` (group id -> boolean
        per channel) by ``decay`` x their values: the task gradient is dropped and only the
        decay moves them (GSM's non-selected channels; ``decay=0`` freezes them)."""
        for s, idx in self._indices(channels, roles=("out",)):
            t = get_tensor(self.gm, s.path)
            if t.grad is None:
                continue
            if decay:
                t.grad.index_copy_(s.axis, idx, decay * t.detach().index_select(s.axis, idx))
            else:
                t.grad.index_fill_(s.axis, idx, 0.0)

    def producer_dots(self) -> dict[int, np.ndarray]:
        """Per group, Σ w·∂L/∂w over each channel's producer entries (every "out" site: all
        producers, biases and norm affine parameters of the group). Zeroing a channel zeroes
        all of them at once, so -this is the first-order loss change of masking it.
        Entries without a gradient contribute 0."""
        return self._producer_sums(lambda t: None if t.grad is None else t.detach() * t.grad)

    def producer_norms(self) -> dict[int, np.ndarray]:
        """Per group, the L2 norm of each channel's producer entries taken together (the
        channel's "row" across every out site of the group)."""
        squares = self._producer_sums(lambda t: t.detach().double() ** 2)
        return {g: np.sqrt(v) for g, v in squares.items()}

    @torch.no_grad()
    def reset_grads(
        self,
        task: Mapping[int, np.ndarray],
        push: Mapping[int, np.ndarray],
        eps: Mapping[int, np.ndarray],
    ) -> None:
        """Gradient resetting on the producer entries of the groups in ``task`` (ResRep on a
        group's own weights): every entry w of channel c gets
        ``grad = task_c·∂L/∂w + push_c·w / max(||w_c||, eps_c)``, where ``||w_c||`` is the
        channel's norm over all its producer entries (``producer_norms``). Arrays are per
        channel; entries of other groups are left alone; a trainable tensor without a gradient
        gets one (the push alone)."""
        norms = self.producer_norms()
        for s in self._sites:
            if s.role != "out":
                continue
            t = get_tensor(self.gm, s.path)
            if not t.requires_grad:
                continue
            keep_task = np.ones(len(s.gids))
            pull = np.zeros(len(s.gids))
            for g in task:
                in_g = s.gids == g
                if in_g.any():
                    p = s.pos[in_g]
                    keep_task[in_g] = task[g][p]
                    pull[in_g] = push[g][p] / np.maximum(norms[g][p], eps[g][p])
            if (keep_task == 1).all() and not pull.any():
                continue
            shape = [1] * t.dim()
            shape[s.axis] = len(s.gids)
            a = torch.as_tensor(keep_task, dtype=t.dtype, device=t.device).view(shape)
            b = torch.as_tensor(pull, dtype=t.dtype, device=t.device).view(shape)
            grad = torch.zeros_like(t) if t.grad is None else t.grad
            t.grad = grad * a + b * t.detach()

    @torch.no_grad()
    def _producer_sums(self, per_entry) -> dict[int, np.ndarray]:
        """Per group and channel, the sum over its producer entries of ``per_entry(tensor)``
        (an elementwise function of the tensor; None skips the tensor)."""
        sums = {g: np.zeros(len(k)) for g, k in self.keep.items()}
        for s in self._sites:
            if s.role != "out":
                continue
            values = per_entry(get_tensor(self.gm, s.path))
            if values is None:
                continue
            dims = [d for d in range(values.dim()) if d != s.axis]
            values = (values.sum(dim=dims) if dims else values).double().cpu().numpy()
            for g, total in sums.items():
                in_g = s.gids == g
                if in_g.any():
                    np.add.at(total, s.pos[in_g], values[in_g])
        return sums

    # --- checkpoints --------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "keep": {g: torch.from_numpy(k.copy()) for g, k in self.keep.items()},
            "saved": {p: t.clone() for p, t in self._saved.items()},
        }

    def load_state_dict(self, state: Mapping) -> None:
        keep = {int(g): k.numpy().astype(bool) for g, k in state["keep"].items()}
        if {g: len(k) for g, k in keep.items()} != {g: len(k) for g, k in self.keep.items()}:
            raise ValueError("mask state is for other groups or widths than this model's")
        self.keep = keep
        self._saved = {p: t.clone() for p, t in state["saved"].items()}

    # --- internals ----------------------------------------------------------------------
    def _as_bool(self, g: int, k: np.ndarray | Iterable[int]) -> np.ndarray:
        if g not in self.keep:
            raise KeyError(f"group {g} is not masked by this ChannelMasks (groups {self.groups})")
        n = len(self.keep[g])
        a = np.asarray(list(k) if not isinstance(k, np.ndarray) else k)
        if a.dtype == bool:
            if a.shape != (n,):
                raise ValueError(f"group {g}: a boolean mask needs {n} entries, got {a.shape}")
            out = a.copy()
        else:
            out = np.zeros(n, dtype=bool)
            out[a.astype(np.int64)] = True
        if not out.any():
            raise ValueError(f"group {g}: every channel masked; a group keeps at least one")
        return out

    def _indices(
        self, select: Mapping[int, np.ndarray], roles: tuple[str, ...], path: str | None = None
    ):
        """(site, index tensor) for the entries of the selected channels at ``roles`` sites
        (of the tensor at ``path`` only, when given)."""
        for s in self._sites:
            if s.role not in roles or (path is not None and s.path != path):
                continue
            hit = np.zeros(len(s.gids), dtype=bool)
            for g, chosen in select.items():
                if chosen.any():
                    in_g = s.gids == g
                    hit[in_g] = chosen[s.pos[in_g]]
            if hit.any():
                yield s, torch.from_numpy(np.nonzero(hit)[0])

    def _copy(self, select: Mapping[int, np.ndarray], *, save: bool) -> None:
        for s, idx in self._indices(select, roles=("out", "in", "stat")):
            t = get_tensor(self.gm, s.path)
            if save:
                saved = self._saved.setdefault(s.path, t.detach().clone())
                saved.index_copy_(s.axis, idx, t.detach().index_select(s.axis, idx))
            elif s.path in self._saved:
                t.index_copy_(s.axis, idx, self._saved[s.path].index_select(s.axis, idx))
