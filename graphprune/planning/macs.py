"""MACs and parameter counts, measured with torch's FlopCounterMode.

Convention (ALGORITHMS.md): MACs of convolution and linear layers only, counted for the given
example inputs (so per image when the batch is 1). FlopCounterMode reports FLOPs = 2 x MACs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from graphprune.frontend.modes import eval_mode

# Convolutions and the matrix products nn.Linear lowers to; activation-activation products
# (bmm of attention) are not counted, as in the papers' convention.
_MAC_OPS = ("aten.convolution", "aten.mm", "aten.addmm")
UNATTRIBUTED = "<outside any leaf module>"


@dataclass(frozen=True, slots=True)
class MacsReport:
    """Totals and per-module MACs (module names as in ``model.named_modules()``).

    ``per_layer`` sums to ``macs``: MACs no leaf module owns (a functional linear called at
    the top of a traced graph, a parent module's own matmuls) are under ``UNATTRIBUTED``.
    """

    macs: int
    params: int
    per_layer: dict[str, int]


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_macs(model: nn.Module, example_inputs: Sequence[torch.Tensor]) -> MacsReport:
    """Run one forward pass under FlopCounterMode and return MACs of conv and linear layers."""
    from graphprune.frontend.trace import on_meta

    with eval_mode(model), FlopCounterMode(display=False) as counter:
        try:
            on_meta(model, example_inputs)  # counts need shapes only
        except (NotImplementedError, RuntimeError):  # an op without a meta kernel: run it
            counter.flop_counts.clear()
            model(*example_inputs)
    counts = counter.get_flop_counts()
    root = type(model).__name__
    per_layer: dict[str, int] = {}
    total = 0
    for scope, ops in counts.items():
        macs = sum(v for op, v in ops.items() if str(op) in _MAC_OPS) // 2
        if scope == "Global":
            total = macs
        elif scope.startswith(root + "."):
            name = scope[len(root) + 1 :]
            # Keep leaf modules only: a parent scope repeats its children's counts.
            per_layer[name] = macs
    leaves = {
        name: macs
        for name, macs in per_layer.items()
        if macs and not any(other.startswith(name + ".") for other in per_layer)
    }
    if total > sum(leaves.values()):
        leaves[UNATTRIBUTED] = total - sum(leaves.values())
    return MacsReport(macs=total, params=count_params(model), per_layer=leaves)
