"""MACs and parameter counts, measured with torch's FlopCounterMode.

Convention (ALGORITHMS.md): MACs of convolution and linear layers only, counted for the given
example inputs (so per image when the batch is 1). FlopCounterMode reports FLOPs = 2 x MACs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.utils.flop_counter import FlopCounterMode

from graphprune.frontend.modes import eval_mode

# Convolutions and the matrix products nn.Linear lowers to; activation-activation products
# (bmm of attention) are not counted, as in the papers' convention.
_MAC_OPS = ("aten.convolution", "aten.mm", "aten.addmm")
# Inside a layer with weights a batched product is still input x weight: nn.Linear on a
# non-contiguous input of 3+ dims (an LSTM's output reshaped) lowers to bmm on meta tensors.
_WEIGHT_BMM = ("aten.bmm", "aten.baddbmm")
_WEIGHTED = (nn.Linear, nn.RNNBase)
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
    """MACs of conv and linear layers for one forward pass on ``example_inputs``, counted by
    FlopCounterMode on meta tensors. A GraphModule from ``graphprune.trace`` already had them
    counted by its last shape propagation; those counts are used while they still hold."""
    from graphprune.frontend.trace import on_meta, recorded_flops

    if isinstance(model, fx.GraphModule):
        recorded = recorded_flops(model, tuple(example_inputs))
        if recorded is not None:
            return _from_nodes(model, recorded)
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
    extra: dict[str, int] = {}  # weight products counted only inside weighted layers
    for scope, ops in counts.items():
        if scope == "Global":
            total = _macs(ops)
        elif scope.startswith(root + "."):
            name = scope[len(root) + 1 :]
            # Keep leaf modules only: a parent scope repeats its children's counts.
            per_layer[name] = _macs(ops, _is_weighted(model, name))
            extra[name] = per_layer[name] - _macs(ops)
    leaves = {
        name: macs
        for name, macs in per_layer.items()
        if macs and not any(other.startswith(name + ".") for other in per_layer)
    }
    total += sum(extra[name] for name in leaves)
    if total > sum(leaves.values()):
        leaves[UNATTRIBUTED] = total - sum(leaves.values())
    return MacsReport(macs=total, params=count_params(model), per_layer=leaves)


def _macs(ops: Mapping[object, int], weighted: bool = False) -> int:
    names = _MAC_OPS + _WEIGHT_BMM if weighted else _MAC_OPS
    return sum(v for op, v in ops.items() if str(op) in names) // 2


def _is_weighted(model: nn.Module, name: str) -> bool:
    try:
        return isinstance(model.get_submodule(name), _WEIGHTED)
    except AttributeError:  # a scope FlopCounterMode named differently
        return False


def _from_nodes(gm: fx.GraphModule, flops: Mapping[fx.Node, Mapping[str, int]]) -> MacsReport:
    """Per-layer MACs from per-node counts: a module called at several nodes sums them."""
    per_layer: dict[str, int] = {}
    total = 0
    for node, ops in flops.items():
        macs = _macs(ops, node.op == "call_module" and _is_weighted(gm, str(node.target)))
        total += macs
        if macs and node.op == "call_module":
            per_layer[str(node.target)] = per_layer.get(str(node.target), 0) + macs
    if total > sum(per_layer.values()):  # call_function convs/matmuls: no module owns them
        per_layer[UNATTRIBUTED] = total - sum(per_layer.values())
    return MacsReport(macs=total, params=count_params(gm), per_layer=per_layer)
