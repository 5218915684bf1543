"""ResRep's rows for the groups a compactor cannot fold into: the channel's own weights.

A compactor folds only into a dense conv (Q·K). Depthwise-separable blocks (the depthwise
conv's channels are the expanding conv's), Linear producers (transformer MLPs and attention
projections), layer scales and norms called as functions have no such conv. For them a
channel's "row" is every producer entry of its group taken together (conv and linear rows,
biases, norm scales and shifts, depthwise filters, layer scales: the "out" sites of
methods/masks.py), and gradient resetting acts on that row directly:

    grad_w = m_c·∂L/∂w + λ_c·w / max(||w_c||, eps)      for every entry w of channel c

so a masked channel (m_c = 0) gets no task gradient and is pulled to zero as one vector, as a
masked compactor row is. From the schedule's ``zero_at`` masked channels are held at exactly
zero (ChannelMasks' hard masks), and finalize's ``prune_channels`` removes them with no output
change. A norm's shift is an entry of the row, so a removed channel leaves no constant behind.

Scale. Compactor rows start as identity rows of norm 1; a channel's own entries start at any
norm. Scores are therefore norms relative to the start (1 for every channel at first, like an
identity row), and the push is multiplied by the channel's starting norm, so λ pulls a kernel
row by the same fraction of itself as a compactor row. These entries train under the model's
optimizer (compress(): SGD with momentum MODEL_MOMENTUM at the model's lr), not under the
compactors' momentum μ and lr scale s, and a push travels lr/(1-momentum) per unit of λ, so it
is also multiplied by s·(1-MODEL_MOMENTUM)/(1-μ) to travel as far as a compactor row's.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import torch
from torch import fx

from graphprune.analysis import ChannelGraph
from graphprune.methods.masks import ChannelMasks

MODEL_MOMENTUM = 0.9  # the momentum compress() trains the model's own weights with


class KernelRows:
    """Soft ResRep masks on groups without compactors, and their hard zeros from ``zero_at``."""

    def __init__(self, gm: fx.GraphModule, graph: ChannelGraph, groups: Iterable[int]) -> None:
        self.masks = ChannelMasks(gm, graph, groups)  # the hard zeros and the exact removal
        self.keep = {g: np.ones(len(k), dtype=bool) for g, k in self.masks.keep.items()}
        self.start = self.masks.producer_norms()

    @property
    def groups(self) -> list[int]:
        return self.masks.groups

    def relative_norms(self) -> dict[int, np.ndarray]:
        """Each channel's row norm over its norm when ResRep began (0 for a row that was 0)."""
        now = self.masks.producer_norms()
        return {
            g: np.divide(v, self.start[g], out=np.zeros_like(v), where=self.start[g] > 0)
            for g, v in now.items()
        }

    def saliency(self) -> dict[int, np.ndarray]:
        """This batch's |Σ w·∂L/∂w| per channel over its row: the Taylor prior's term, the
        same quantity a compactor row's Q_i·∂L/∂Q_i measures (scaling the channel)."""
        return {g: np.abs(v) for g, v in self.masks.producer_dots().items()}

    def reset_grads(
        self,
        *,
        active: float,
        masked: float,
        eps: float,
        compactor_momentum: float,
        compactor_lr_scale: float = 1.0,
    ) -> None:
        """Gradient resetting on the rows (module docstring): λ = ``active`` on kept channels,
        ``masked`` on masked ones, both scaled to the channel's starting norm, and to the
        compactors' momentum and lr scale (λ is sized for the compactors' optimizer)."""
        travel = (1.0 - MODEL_MOMENTUM) / (1.0 - compactor_momentum)
        scale = {g: np.maximum(n0, 1e-12) * travel for g, n0 in self.start.items()}
        # eps is half a compactor's step (which already holds the lr scale) in units of a
        # row's norm: a kernel row's step is that times scale[g]
        self.masks.reset_grads(
            task={g: k.astype(np.float64) for g, k in self.keep.items()},
            push={
                g: np.where(k, active, masked) * compactor_lr_scale * scale[g]
                for g, k in self.keep.items()
            },
            eps={g: eps * s for g, s in scale.items()},
        )

    def set_keep(self, keep: Mapping[int, np.ndarray]) -> None:
        """New soft masks (boolean per channel) for the rows' groups."""
        for g in self.keep:
            self.keep[g] = np.asarray(keep[g], dtype=bool).copy()

    def hold_masked_at_zero(self) -> None:
        """Zero the masked channels' entries (from ``zero_at`` on, after every step)."""
        self.masks.set_keep(self.keep)

    def freeze_masked(self) -> None:
        """In the hard phase: masked entries get no gradient (momentum cannot move them)."""
        self.masks.zero_grads()

    def not_decayed(self, threshold: float) -> int:
        """Masked channels whose row is still at least ``threshold`` of its starting norm."""
        rel = self.relative_norms()
        return sum(int((~self.keep[g] & (rel[g] >= threshold)).sum()) for g in self.keep)

    @torch.no_grad()
    def zero_decayed(self, threshold: float) -> None:
        """Before finalize: zero the masked channels that decayed below ``threshold`` (all of
        them once ``zero_at`` has passed); one that did not stays, and is counted."""
        rel = self.relative_norms()
        self.masks.set_keep({g: self.keep[g] | (rel[g] >= threshold) for g in self.keep})

    def state_dict(self) -> dict:
        return {
            "keep": {g: torch.from_numpy(k.copy()) for g, k in self.keep.items()},
            "start": {g: torch.from_numpy(v.copy()) for g, v in self.start.items()},
            "masks": self.masks.state_dict(),
        }

    def load_state_dict(self, state: Mapping) -> None:
        self.keep = {int(g): k.numpy().astype(bool) for g, k in state["keep"].items()}
        self.start = {int(g): v.numpy().copy() for g, v in state["start"].items()}
        self.masks.load_state_dict(state["masks"])
