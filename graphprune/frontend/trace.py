"""The frontend: nn.Module -> torch.fx GraphModule with shapes in node.meta.

All tracing lives here, so another frontend (torch.export, more leaf policies) can be added
without touching analysis or passes.
"""

from __future__ import annotations

import copy
import linecache
import sys
import traceback
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import fx, nn

from graphprune.errors import TraceError
from graphprune.frontend import meta
from graphprune.frontend.modes import eval_mode

EXAMPLE_INPUTS = "graphprune.example_inputs"

_TORCH_DIR = str(Path(torch.__file__).parent)


class _LeafTracer(fx.Tracer):
    """fx's default leaves (torch.nn modules), modules graphprune inserts (they set
    ``graphprune_leaf = True``) and the user's own leaf module types."""

    def __init__(
        self, leaf_types: tuple[type[nn.Module], ...] = (), leaf_names: frozenset[str] = frozenset()
    ) -> None:
        super().__init__()
        self.leaf_types = leaf_types
        self.leaf_names = leaf_names
        self.failed_in: str | None = None  # innermost submodule whose forward raised

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if (
            getattr(m, "graphprune_leaf", False)
            or (self.leaf_types and isinstance(m, self.leaf_types))
            or module_qualified_name in self.leaf_names
        ):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _PartsProxy(node, self)

    def iter(self, obj: fx.Proxy):
        """``list(x.chunk(2, 1))`` or ``for part in x.split([a, b], 1)``: the number of parts
        is in the call's arguments, so iterating the Proxy is well defined."""
        count = _static_parts(obj.node)
        if count is None:
            return super().iter(obj)
        return iter([obj[i] for i in range(count)])

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:  # the innermost module raises first
                self.failed_in = self.path_of_module(m)
            raise


class _PartsProxy(fx.Proxy):
    """A Proxy whose ``len()`` is known when it is the result of chunk/split with static
    arguments (``list(proxy)`` asks for the length before iterating)."""

    def __len__(self) -> int:
        count = _static_parts(self.node)
        return super().__len__() if count is None else count


def _static_parts(node: fx.Node) -> int | None:
    """How many tensors a chunk/split call returns, when its arguments say so."""
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    args = node.args[1:]  # after the tensor, for torch.chunk(x, n) and x.chunk(n) alike
    if name == "chunk":
        n = args[0] if args else node.kwargs.get("chunks")
        return n if isinstance(n, int) else None
    if name == "split":
        sizes = args[0] if args else node.kwargs.get("split_size_or_sections")
        return len(sizes) if isinstance(sizes, (list, tuple)) else None
    return None


def trace(
    model: nn.Module,
    example_inputs: Sequence[torch.Tensor],
    *,
    leaf_modules: Iterable[type[nn.Module]] = (),
    leaf_names: Iterable[str] = (),
) -> fx.GraphModule:
    """Trace a copy of ``model`` and record every node's output shape.

    The copy means passes may rewrite the GraphModule freely: the user's model is never
    touched. ``leaf_modules`` (types) and ``leaf_names`` (qualified submodule names) are kept
    as opaque calls (their channels become unprunable); use them for submodules fx cannot
    trace. A TraceError carries ``module_path``, the innermost submodule that failed (None
    when the failure is in the model's own forward), which ``frontend.fallback`` freezes.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"trace() needs an nn.Module, got {type(model).__name__}")
    example_inputs = as_inputs(example_inputs)
    model = copy.deepcopy(model)
    tracer = _LeafTracer(tuple(leaf_modules), frozenset(leaf_names))
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # fx raises many types; all mean "not traceable"
        raise TraceError(_explain_trace_failure(model, exc), module_path=tracer.failed_in) from exc
    for node in graph.nodes:
        # Type annotations become globals of the generated code that torch.save cannot pickle.
        node.type = None
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    gm.meta[EXAMPLE_INPUTS] = tuple(t.detach().clone() for t in example_inputs)
    propagate_shapes(gm)
    return gm


def as_inputs(example_inputs: torch.Tensor | Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Example inputs as the tuple ``model(*inputs)`` takes. A lone tensor is one input, not a
    batch to unbind; anything else must be a non-empty sequence of tensors (TypeError)."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    inputs = tuple(example_inputs) if isinstance(example_inputs, Sequence) else ()
    if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise TypeError(
            "example_inputs must be a tensor or a non-empty tuple of tensors, e.g. (x,); got "
            f"{type(example_inputs).__name__}"
        )
    return inputs


class _ShapeRecorder(fx.Interpreter):
    def run_node(self, n: fx.Node):
        value = super().run_node(n)
        meta.set_output_meta(n, value)
        return value


class _RecordingRunner(nn.Module):
    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__()
        self.gm = gm

    def forward(self, *inputs):
        return _ShapeRecorder(self.gm).run(*inputs)


@torch.no_grad()
def on_meta(module: nn.Module, inputs: Sequence[torch.Tensor]):
    """Call ``module`` on meta tensors: shapes (and FLOP counts) without any arithmetic.

    Parameters are swapped for meta stand-ins with functional_call; the module is untouched.
    """
    state = {
        name: torch.empty_like(t, device="meta")
        for name, t in [
            *module.named_parameters(remove_duplicate=False),
            *module.named_buffers(remove_duplicate=False),
        ]
    }
    return torch.func.functional_call(module, state, tuple(t.to("meta") for t in inputs))


@torch.no_grad()
def propagate_shapes(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor] | None = None):
    """(Re)compute node shapes by running the example inputs, on meta tensors, in eval mode.

    Eval mode, so BatchNorm running statistics are not updated by this bookkeeping run.
    """
    if example_inputs is None:
        example_inputs = gm.meta.get(EXAMPLE_INPUTS)
        if example_inputs is None:
            raise TraceError("GraphModule has no recorded example inputs; pass example_inputs=")
    with eval_mode(gm):
        try:
            try:
                on_meta(_RecordingRunner(gm), example_inputs)
            except (NotImplementedError, RuntimeError):  # an op without a meta kernel: run it
                _ShapeRecorder(gm).run(*example_inputs)
        except Exception as exc:
            msg = f"running the traced graph on the example inputs failed: {exc}"
            raise TraceError(msg) from exc


def example_inputs_of(gm: fx.GraphModule) -> tuple[torch.Tensor, ...]:
    inputs = gm.meta.get(EXAMPLE_INPUTS)
    if inputs is None:
        raise TraceError("this GraphModule was not made by graphprune.trace(); trace it first")
    return inputs


def _explain_trace_failure(model: nn.Module, exc: Exception) -> str:
    """Name the user's source line that fx choked on and suggest leaf_modules=."""
    frames = traceback.extract_tb(sys.exc_info()[2])
    user = [f for f in frames if not f.filename.startswith(_TORCH_DIR)]
    where = ""
    owner = ""
    if user:
        f = user[-1]
        code = (f.line or linecache.getline(f.filename, f.lineno or 0)).strip()
        where = f"\n  at {f.filename}:{f.lineno}: {code}"
        owner = _module_owning(model, f.filename, f.lineno)
    hint = (
        f"mark that submodule as a leaf, e.g. trace(..., leaf_modules=[{owner}]) "
        "(its channels become unprunable)"
        if owner and owner != type(model).__name__
        else "move the data-dependent part into a submodule and pass it as leaf_modules=[...], "
        "or rewrite the line without Python control flow on tensor values"
    )
    return (
        f"torch.fx could not trace {type(model).__name__}: {type(exc).__name__}: {exc}{where}\n"
        f"  fix: {hint}"
    )


def _module_owning(model: nn.Module, filename: str, lineno: int | None) -> str:
    """The module class whose method holds the failing line (innermost if nested)."""
    best, best_start = "", -1
    for m in model.modules():
        for attr in vars(type(m)).values():
            code = getattr(attr, "__code__", None)
            if code is None or code.co_filename != filename or lineno is None:
                continue
            lines = [line for _, _, line in code.co_lines() if line is not None]
            if (
                lines
                and code.co_firstlineno <= lineno <= max(lines)
                and code.co_firstlineno > best_start
            ):
                best, best_start = type(m).__name__, code.co_firstlineno
    return best
