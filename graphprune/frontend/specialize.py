"""Control flow on input shapes, fixed for the example inputs while tracing.

fx cannot trace ``if H != self.img_size[0]:`` or ``int(math.sqrt(N))`` when H or N come from a
traced tensor's shape: they are proxies, with no value. graphprune traces a model for one
input shape anyway (every node's shape is recorded, reshape sizes are baked for pruning), so a
value computed from *shapes alone* is known: ``ShapeValues`` computes it by running the part of
the graph traced so far on the example inputs, and the trace takes the branch the example
input takes. Values that depend on tensor contents (``if x.sum() > 0``) are never fixed: fx's
TraceError stands. Every fixed value is recorded (``gm.meta[SHAPE_SPECIALIZED]``, and a
warning): the traced model is valid for inputs of the example's shape, as pruning assumes.
"""

from __future__ import annotations

import contextlib
import linecache
import math
import operator
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import fx, nn

SHAPE_SPECIALIZED = "graphprune.shape_specialized"  # source lines whose value was fixed

# Ops whose result depends only on their arguments' values (no tensor contents): a value
# built from tensor shapes, constants and these stays a shape value.
_SCALAR_OPS = frozenset({
    operator.getitem, operator.add, operator.sub, operator.mul, operator.floordiv,
    operator.truediv, operator.mod, operator.pow, operator.neg, operator.eq, operator.ne,
    operator.lt, operator.le, operator.gt, operator.ge, operator.and_, operator.or_,
    operator.not_, operator.truth, math.sqrt, math.ceil, math.floor, int, float, len, min, max,
})  # fmt: skip
_SHAPE_METHODS = frozenset({"size", "dim", "numel"})


def shape_only(node: fx.Node, memo: dict[fx.Node, bool] | None = None) -> bool:
    """True when ``node``'s value follows from tensor shapes and constants alone."""
    memo = {} if memo is None else memo
    if node in memo:
        return memo[node]
    if node.op == "call_function" and node.target is getattr:
        ok = node.args[1] in ("shape", "ndim")
    elif node.op == "call_method" and node.target in _SHAPE_METHODS:
        ok = True  # x.size(1), x.dim(): whatever x is, only its shape is read
    elif node.op == "call_function" and node.target in _SCALAR_OPS:
        ok = all(shape_only(a, memo) for a in node.all_input_nodes)
    else:
        ok = False
    memo[node] = ok
    return ok


class ShapeValues:
    """Computes shape-only values of a graph being traced from ``root``, on the example
    inputs (``root`` in eval mode runs the graph's prefix, so no BatchNorm statistics move and
    no dropout draws; its modes are restored after)."""

    def __init__(self, root: nn.Module, example_inputs: Sequence[torch.Tensor]) -> None:
        self.root = root
        self.example_inputs = tuple(example_inputs)
        self.fixed: list[str] = []

    def value(self, node: fx.Node, where: str) -> object:
        """The value the shape-only ``node`` (see ``shape_only``) has for the example inputs
        (``where``: the user's source line, for the record)."""
        g = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        needed = _ancestors(node)
        for n in node.graph.nodes:  # every placeholder, so the inputs bind by position
            if n.op == "placeholder" or n in needed:
                env[n] = g.node_copy(n, lambda a: env[a])
            if n is node:
                break
        g.output(env[node])
        modes = {m: m.training for m in self.root.modules()}
        try:  # eval mode: no BatchNorm statistics move, no dropout; fx's patches lifted
            with torch.no_grad(), _untraced():
                value = fx.GraphModule(self.root.eval(), g)(*self.example_inputs)
        except Exception as exc:
            raise TypeError(f"computing the shape value {node.format_node()}: {exc}") from exc
        finally:
            for m, training in modes.items():
                m.training = training
        self.fixed.append(where)
        return value


_LIBRARY_DIRS = (str(Path(torch.__file__).parent), str(Path(__file__).parents[1]))


def user_line() -> str:
    """``file:line: code`` of the innermost frame outside torch and graphprune."""
    for f in reversed(traceback.extract_stack()):
        if not f.filename.startswith(_LIBRARY_DIRS):
            code = (f.line or linecache.getline(f.filename, f.lineno or 0)).strip()
            return f"{Path(f.filename).name}:{f.lineno}: {code}"
    return "?"


def _untraced():
    """Lift fx's patches of ``nn.Module.__call__`` and friends while running real tensors in
    the middle of a trace (a private fx helper; without it the run fails, and so does the
    shape value: fx's own TraceError stands)."""
    from torch.fx import _symbolic_trace

    revert = getattr(_symbolic_trace, "_maybe_revert_all_patches", None)
    return revert() if revert is not None else contextlib.nullcontext()


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen, todo = {node}, [node]
    while todo:
        for a in todo.pop().all_input_nodes:
            if a not in seen:
                seen.add(a)
                todo.append(a)
    return seen


def record(gm: fx.GraphModule, values: ShapeValues | None) -> None:
    """Store and announce what was fixed for the example inputs' shape."""
    if values is None or not values.fixed:
        return
    gm.meta[SHAPE_SPECIALIZED] = list(dict.fromkeys(values.fixed))
    shape = "x".join(str(d) for d in values.example_inputs[0].shape)
    warnings.warn(
        f"{type(values.root).__name__}: control flow on input shapes was fixed for the example "
        f"inputs ({shape}): {'; '.join(gm.meta[SHAPE_SPECIALIZED][:3])}"
        f"{' ...' if len(gm.meta[SHAPE_SPECIALIZED]) > 3 else ''}. The pruned model is for "
        "inputs of this shape.",
        stacklevel=3,
    )
