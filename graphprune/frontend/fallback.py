"""Tracing what torch.fx cannot trace whole: freeze the failing submodules, prune the rest.

symbolic_trace fails on Python control flow over tensor values or shapes (``if x.shape[-1] !=
self.size:``), on asserts over shapes, and on code fx cannot proxy. Such code usually sits in
one small submodule (a patch embedding, a window attention, a detection head). Rather than
refuse the whole model, ``trace_with_fallback`` retries with that submodule kept as an opaque
leaf call: its channels, and those of the tensors it reads, become unprunable (the channel
rules block an op they cannot see into), everything else is analyzed and pruned as usual.
It repeats up to ``max_frozen`` times, since freezing one module can expose the next
(a parent that branches on its child's output shape). A model whose own ``forward`` takes
``*args``/``**kwargs`` (fx would iterate a Proxy) is traced through a wrapper that passes the
example inputs positionally, and the wrapper is stripped from the result. A submodule whose
code differs between train and eval mode (``frontend.modes``) is frozen the same way, with
every other module of its class in the same retrace (a DropPath in each of a transformer's
blocks).

A model whose *own* forward differs between the modes (``if self.training and
self.aux_logits:`` in GoogLeNet and Inception v3) has no submodule to freeze: it is traced in
eval mode only (``trace(..., eval_only=True)``), the deployed model, and ``gm.meta[EVAL_ONLY]``
says why (the compression report repeats it). The train-mode-only code (the auxiliary heads)
is not part of the result.

Invariant: a frozen submodule's weights are never sliced, so its forward runs unchanged on
inputs of the shapes it was traced with. The frozen modules and the reason each was frozen
are recorded in ``gm.meta[FROZEN]`` and appear in the compression report.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Sequence

import torch
from torch import fx, nn

from graphprune.errors import TraceError
from graphprune.frontend.trace import as_inputs, trace

FROZEN = "graphprune.frozen_submodules"
EVAL_ONLY = "graphprune.eval_mode_only"
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
    example_inputs = as_inputs(example_inputs)
    leaf_modules = tuple(leaf_modules)
    frozen: dict[str, str] = {}
    mode_types: list[type[nn.Module]] = []  # classes whose code depends on the mode
    wrap = False
    eval_only: str | None = None  # why the model's own forward is traced in eval mode only
    while True:
        try:
            if wrap:
                names = tuple(_WRAPPED + n for n in frozen)
                gm = trace(
                    _positional(model, len(example_inputs)),
                    example_inputs,
                    leaf_modules=(*leaf_modules, *mode_types),
                    leaf_names=names,
                    eval_only=eval_only is not None,
                )
                gm = _unwrap(gm, type(model).__name__)
            else:
                gm = trace(
                    model,
                    example_inputs,
                    leaf_modules=(*leaf_modules, *mode_types),
                    leaf_names=tuple(frozen),
                    eval_only=eval_only is not None,
                )
        except TraceError as exc:
            path = exc.module_path
            if wrap and path is not None:
                path = path[len(_WRAPPED) :] if path.startswith(_WRAPPED) else None
            if not wrap and not path and not frozen and _takes_varargs(model):
                wrap = True
                continue
            if exc.mode_dependent and not path and eval_only is None:
                eval_only = (
                    _first_line(exc) + "; traced in eval mode only (the deployed model): code "
                    "the model's own forward runs in train mode only is not in the result"
                )
                continue
            if not path or path in frozen or len(frozen) >= max_frozen:
                if frozen:
                    note = ", ".join(frozen)
                    raise TraceError(f"{exc}\n  (after freezing {note})", module_path=path) from exc
                raise
            if exc.mode_dependent:
                # The same class runs the same code: freeze all its modules in one retrace.
                cls = type(model.get_submodule(path))
                same = [n for n, m in model.named_modules() if type(m) is cls]
                mode_types.append(cls)
                others = f"; every {cls.__name__} kept as a leaf ({len(same)} modules)"
                frozen[path] = _first_line(exc) + (others if len(same) > 1 else "")
                continue
            frozen[path] = _first_line(exc)
            continue
        gm.meta[FROZEN] = dict(frozen)
        if eval_only is not None:
            gm.meta[EVAL_ONLY] = eval_only
        return gm


def frozen_submodules(gm: fx.GraphModule) -> dict[str, str]:
    """Submodule name -> why it was frozen (empty when the model traced whole)."""
    return dict(gm.meta.get(FROZEN, {}))


def eval_mode_only(gm: fx.GraphModule) -> str | None:
    """Why the graph follows the model's eval mode only (None: it follows both modes)."""
    return gm.meta.get(EVAL_ONLY)


_WRAPPED = "model."


def _positional(model: nn.Module, count: int) -> nn.Module:
    """A module whose forward takes exactly ``count`` inputs and calls ``model`` with them,
    so fx sees named placeholders instead of ``*args``. fx traces ``type(root).forward``,
    hence a class made for this arity."""
    names = ", ".join(f"input_{i}" for i in range(count))
    scope: dict[str, object] = {}
    exec(f"def forward(self, {names}):\n    return self.model({names})", scope)  # noqa: S102
    cls = type("Positional", (nn.Module,), {"forward": scope["forward"]})
    wrapper = cls()
    wrapper.model = model
    return wrapper


def _takes_varargs(model: nn.Module) -> bool:
    kinds = {p.kind for p in inspect.signature(model.forward).parameters.values()}
    return bool(kinds & {inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD})


def _unwrap(gm: fx.GraphModule, name: str) -> fx.GraphModule:
    """The same graph over the inner model: targets lose the wrapper's ``model.`` prefix."""
    for node in gm.graph.nodes:
        if node.op in ("call_module", "get_attr") and str(node.target).startswith(_WRAPPED):
            node.target = str(node.target)[len(_WRAPPED) :]
    inner = fx.GraphModule(gm.get_submodule("model"), gm.graph, name)
    inner.meta.update(gm.meta)
    return inner


def _first_line(exc: TraceError) -> str:
    """The fx error itself, without the source location and fix hint trace() appends."""
    text = str(exc).splitlines()[0]
    return text.split(": ", 1)[1] if text.startswith("torch.fx could not trace") else text
