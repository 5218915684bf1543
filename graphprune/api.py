"""The one-call API: ``compress(model, method=..., ...)`` and friends.

Entry points copy the user's model (trace() does), so it is never mutated.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import fx, nn

from graphprune.analysis import build_channel_graph
from graphprune.errors import PlanError
from graphprune.frontend.trace import example_inputs_of, trace
from graphprune.planning.macs import count_macs
from graphprune.planning.plan import check_flops_target
from graphprune.report import CompressionReport, build_report

METHODS = ("magnitude", "resrep")


@dataclass(frozen=True, slots=True)
class CompressionResult:
    """The pruned model (an ordinary nn.Module) and what was done to get it."""

    model: fx.GraphModule
    report: CompressionReport


def compress(
    model: nn.Module,
    method: str = "magnitude",
    *,
    example_inputs: Sequence[torch.Tensor],
    flops_target: float = 0.5,
    round_to: int = 8,
    leaf_modules: Iterable[type[nn.Module]] = (),
    strict: bool = False,
    verify: bool = False,
    **options: object,
) -> CompressionResult:
    """Prune ``model`` until its MACs are ``flops_target`` x the dense MACs.

    ``flops_target`` is remaining MACs / dense MACs, as in the papers (0.5 = half the MACs).
    ``round_to`` rounds kept widths up to hardware-friendly multiples. Method-specific
    options (e.g. ResRep's ``train_loader``, ``epochs``) pass through ``options``.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    check_flops_target(flops_target)
    start = time.perf_counter()
    gm = trace(model, example_inputs, leaf_modules=leaf_modules)
    graph = build_channel_graph(gm, strict=strict)
    groups = graph.groups
    dense = count_macs(gm, example_inputs_of(gm))
    if not any(g.prunable for g in groups):
        reasons = "; ".join(sorted({r for g in groups for r in g.reasons}))
        raise PlanError(f"{type(model).__name__} has no prunable channel group ({reasons})")
    if method == "magnitude":
        from graphprune.methods.magnitude import compress_magnitude

        if options:
            raise TypeError(f"magnitude takes no options {sorted(options)}")
        pruned, stats, extra = compress_magnitude(
            gm,
            flops_target=flops_target,
            round_to=round_to,
            layer_macs=dense.per_layer,
            graph=graph,
            verify=verify,
        )
    else:
        from graphprune.methods.resrep import compress_resrep

        pruned, stats, extra = compress_resrep(
            gm,
            flops_target=flops_target,
            round_to=round_to,
            layer_macs=dense.per_layer,
            verify=verify,
            **options,
        )
    pruned.eval()
    report = build_report(
        method,
        flops_target,
        dense,
        count_macs(pruned, example_inputs_of(gm)),
        groups,
        dict(stats.get("widths", {})),
        time.perf_counter() - start,
        extra,
    )
    return CompressionResult(pruned, report)


def export(
    model: nn.Module,
    example_inputs: Sequence[torch.Tensor],
    path,
    *,
    backend: str = "onnx",
    fp16: bool = False,
    **options: object,
):
    """Write a deployable artifact: ``backend="onnx"`` (cleaned with onnx-graphsurgeon) or
    ``"tensorrt"`` (an engine built from that ONNX; needs the tensorrt package and a GPU).
    See graphprune.backends.export; imported lazily so ``import graphprune`` stays light."""
    from graphprune.backends import export as _export

    return _export(model, example_inputs, path, backend=backend, fp16=fp16, **options)
