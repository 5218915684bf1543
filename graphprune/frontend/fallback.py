"""Tracing what torch.fx cannot trace whole: freeze the failing submodules, prune the rest.

symbolic_trace fails on Python control flow over tensor values or shapes (``if x.shape[-1] !=
self.size:``), on asserts over shapes, and on code fx cannot proxy. Such code usually sits in
one small submodule (a patch embedding, a window attention, a detection head). Rather than
refuse the whole model, ``trace_with_fallback`` retries with that submodule kept as an opaque
leaf call: its channels, and those of the tensors it reads, become unprunable (the channel
rules block an op they cannot see into), everything else is analyzed and pruned as usual.
It repeats up to ``max_frozen`` times, since freezing one module can expose the next
(a parent that branches on its child's output shape).

Invariant: a frozen submodule's weights are never sliced, so its forward runs unchanged on
inputs of the shapes it was traced with. The frozen modules and the reason each was frozen
are recorded in ``gm.meta[FROZEN]`` and appear in the compression report.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import fx, nn

from graphprune.errors import TraceError
from graphprune.frontend.trace import trace

FROZEN = "graphprune.frozen_submodules"
MAX_FROZEN = 16


def trace_with_fallback(
    model: nn.Module,
    example_inputs: Sequence[torch.Tensor],
    *,
    leaf_modules: Iterable[type[nn.Module]] = (),
    max_frozen: int = MAX_FROZEN,
) -> fx.GraphModule:
    """``trace()``, retrying with each submodule that fx fails in kept as a leaf.

    Raises the last TraceError when the failure is in the model's own forward (nothing to
    freeze), in a submodule already frozen, or after ``max_frozen`` submodules.
    """
    leaf_modules = tuple(leaf_modules)
    frozen: dict[str, str] = {}
    while True:
        try:
            gm = trace(model, example_inputs, leaf_modules=leaf_modules, leaf_names=tuple(frozen))
        except TraceError as exc:
            path = exc.module_path
            if not path or path in frozen or len(frozen) >= max_frozen:
                if frozen:
                    note = ", ".join(frozen)
                    raise TraceError(f"{exc}\n  (after freezing {note})", module_path=path) from exc
                raise
            frozen[path] = _first_line(exc)
            continue
        gm.meta[FROZEN] = dict(frozen)
        return gm


def frozen_submodules(gm: fx.GraphModule) -> dict[str, str]:
    """Submodule name -> why it was frozen (empty when the model traced whole)."""
    return dict(gm.meta.get(FROZEN, {}))


def _first_line(exc: TraceError) -> str:
    """The fx error itself, without the source location and fix hint trace() appends."""
    text = str(exc).splitlines()[0]
    return text.split(": ", 1)[1] if text.startswith("torch.fx could not trace") else text
