"""The frontend: nn.Module -> torch.fx GraphModule with shapes in node.meta.

All tracing lives here, so another frontend (torch.export, more leaf policies) can be added
without touching analysis or passes.
"""

from __future__ import annotations

import copy
import inspect
import linecache
import operator
import sys
import traceback
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import fx, nn
from torch.utils.flop_counter import FlopCounterMode

from graphprune.errors import TraceError
from graphprune.frontend import meta
from graphprune.frontend.attention import split_multihead_attention
from graphprune.frontend.functional_layers import modularize_functional_layers
from graphprune.frontend.functions import functions_as_leaves
from graphprune.frontend.inputs import (
    check_example_inputs,
    check_model_matches_inputs,
    warn_nonfinite,
)
from graphprune.frontend.modes import bind_training_flags, eval_mode
from graphprune.frontend.specialize import ShapeValues, shape_only, user_line
from graphprune.frontend.specialize import record as record_specialized

EXAMPLE_INPUTS = "graphprune.example_inputs"
FUNCTIONAL_LAYERS = "graphprune.functional_layers"  # new module path -> what it replaced
FLOPS_FOR = "graphprune.flops_for"  # what the recorded per-node FLOPs were counted for

_TORCH_DIR = str(Path(torch.__file__).parent)
# Frames of fx and of graphprune's tracer are never the user's line that failed.
_TRACER_FILES = (_TORCH_DIR, __file__, str(Path(__file__).with_name("specialize.py")))


class _LeafTracer(fx.Tracer):
    """fx's default leaves (torch.nn modules), modules graphprune inserts (they set
    ``graphprune_leaf = True``) and the user's own leaf module types."""

    def __init__(
        self,
        leaf_types: tuple[type[nn.Module], ...] = (),
        leaf_names: frozenset[str] = frozenset(),
        shapes: ShapeValues | None = None,
    ) -> None:
        super().__init__()
        self.leaf_types = leaf_types
        self.leaf_names = leaf_names
        self.failed_in: str | None = None  # innermost submodule whose forward raised
        self.called: set[str] = set()  # every submodule whose forward ran (leaf or not)
        self.shapes = shapes  # fixes control flow on input shapes (frontend.specialize)

    def shape_value(self, obj: fx.Proxy) -> object:
        """The example inputs' value of a proxy computed from shapes alone; else fx's own
        TraceError (control flow on tensor contents is never fixed)."""
        if self.shapes is not None and shape_only(obj.node):
            return self.shapes.value(obj.node, user_line())
        return super().to_bool(obj)  # raises fx's TraceError

    def to_bool(self, obj: fx.Proxy) -> bool:
        return bool(self.shape_value(obj))

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
        self.called.add(self.path_of_module(m))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:  # the innermost module raises first
                self.failed_in = self.path_of_module(m)
            raise


class _PartsProxy(fx.Proxy):
    """A Proxy whose ``len()`` is known when it is the result of chunk/split with static
    arguments (``list(proxy)`` asks for the length before iterating), and whose ``int()``,
    ``float()`` and index value are known when it is computed from shapes alone."""

    def __len__(self) -> int:
        count = _static_parts(self.node)
        return super().__len__() if count is None else count

    def __int__(self) -> int:
        return int(self.tracer.shape_value(self))  # type: ignore[attr-defined]

    def __float__(self) -> float:
        return float(self.tracer.shape_value(self))  # type: ignore[attr-defined]

    def __index__(self) -> int:
        return operator.index(self.tracer.shape_value(self))  # type: ignore[attr-defined]


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
    eval_only: bool = False,
) -> fx.GraphModule:
    """Trace a copy of ``model`` and record every node's output shape.

    The copy means passes may rewrite the GraphModule freely: the user's model is never
    touched. ``leaf_modules`` (types) and ``leaf_names`` (qualified submodule names) are kept
    as opaque calls (their channels become unprunable); use them for submodules fx cannot
    trace. A TraceError carries ``module_path``, the innermost submodule that failed (None
    when the failure is in the model's own forward), which ``frontend.fallback`` freezes.

    The graph behaves like the model in train and eval mode (``frontend.modes``), or this
    raises. ``eval_only=True`` traces the eval-mode forward without that check: for a model
    whose own forward runs extra code in train mode only (GoogLeNet's and Inception v3's
    auxiliary classifiers), the graph is the model as deployed; in train mode it still runs
    the eval-mode code (submodules such as BatchNorm follow their own flags as usual).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"trace() needs an nn.Module, got {type(model).__name__}")
    example_inputs = as_inputs(example_inputs)
    check_example_inputs(model, example_inputs)
    check_model_matches_inputs(model, example_inputs)
    warn_nonfinite(model)
    model = copy.deepcopy(model)
    if eval_only:
        model.eval()
    split_multihead_attention(model, keep=tuple(leaf_modules))
    shapes = ShapeValues(model, example_inputs)
    tracer = _LeafTracer(tuple(leaf_modules), frozenset(leaf_names), shapes)
    defaults = _unsupplied_defaults(model, len(example_inputs))
    graph = _trace_graph(tracer, model, defaults)

    def retrace(stack_traces: bool) -> fx.Graph:
        again = _LeafTracer(tuple(leaf_modules), frozenset(leaf_names), shapes)
        again.record_stack_traces = stack_traces
        return _trace_graph(again, model, defaults)

    if not eval_only:
        bind_training_flags(model, graph, retrace)
    for node in graph.nodes:
        # Type annotations become globals of the generated code that torch.save cannot pickle.
        node.type = None
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    gm.meta[EXAMPLE_INPUTS] = tuple(t.detach().clone() for t in example_inputs)
    record_specialized(gm, shapes)
    layers = modularize_functional_layers(gm)  # F.conv2d/F.linear on parameters: modules
    if layers:
        gm.meta[FUNCTIONAL_LAYERS] = layers
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


def _unsupplied_defaults(model: nn.Module, supplied: int) -> dict[str, object]:
    """forward's parameters after the example inputs whose defaults are None or a plain
    bool/int/float/str, with those defaults.

    The graph is the model called as ``model(*example_inputs)``: a parameter left out keeps
    its default. Traced as a placeholder instead, ``mask=None`` would be a proxy, so ``if mask
    is not None`` takes the branch the call never takes (timm's Hiera traced its masking code
    and dropped its head)."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return {
        p.name: p.default
        for p in params[supplied:]
        if p.kind in (*positional, inspect.Parameter.KEYWORD_ONLY)
        and (p.default is None or type(p.default) in (bool, int, float, str))
    }  # a tensor default stays an input of the graph, as fx traces it


def _trace_graph(tracer: fx.Tracer, model: nn.Module, defaults: dict[str, object]) -> fx.Graph:
    try:
        with functions_as_leaves(tracer):
            graph = tracer.trace(model, concrete_args=defaults or None)
        graph.called_modules = frozenset(getattr(tracer, "called", ()))  # for frontend.modes
        return graph
    except Exception as exc:  # fx raises many types; all mean "not traceable"
        raise TraceError(
            _explain_trace_failure(model, exc), module_path=getattr(tracer, "failed_in", None)
        ) from exc


# Module types (exact: a subclass may override forward) whose output has exactly their
# input's shape and dtype. On meta tensors they run through Python decompositions (BatchNorm
# alone was most of a ResNet's shape pass), so the shape pass hands the input through instead;
# they have no multiply-accumulates to count.
_SHAPE_PRESERVING = frozenset({
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.ReLU, nn.ReLU6, nn.Hardtanh,
    nn.LeakyReLU, nn.SiLU, nn.GELU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.Mish,
    nn.ELU, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
})  # fmt: skip


class _ShapeRecorder(fx.Interpreter):
    """Runs the graph, recording each node's output shape and the FLOPs its ops performed."""

    def __init__(self, gm: fx.GraphModule, counter: FlopCounterMode | None = None) -> None:
        super().__init__(gm)
        self.counter = counter

    def run_node(self, n: fx.Node):
        before = dict(self.counter.flop_counts["Global"]) if self.counter else {}
        value = super().run_node(n)
        meta.set_output_meta(n, value)
        if self.counter is not None:
            after = self.counter.flop_counts["Global"]
            meta.set_flops(n, {str(op): v - before.get(op, 0) for op, v in after.items()})
        return value

    def call_module(self, target, args, kwargs):
        x = args[0] if len(args) == 1 and not kwargs else None
        if isinstance(x, torch.Tensor) and x.is_meta:
            if type(self.fetch_attr(target)) in _SHAPE_PRESERVING:
                return x
        return super().call_module(target, args, kwargs)


class _RecordingRunner(nn.Module):
    def __init__(self, gm: fx.GraphModule, counter: FlopCounterMode | None = None) -> None:
        super().__init__()
        self.gm, self.counter = gm, counter

    def forward(self, *inputs):
        return _ShapeRecorder(self.gm, self.counter).run(*inputs)


@torch.no_grad()
def on_meta(module: nn.Module, inputs: Sequence[torch.Tensor]):
    """Call ``module`` on meta tensors: shapes (and FLOP counts) without any arithmetic.

    Parameters are swapped for meta stand-ins with functional_call; the module is untouched.
    """
    state = {
        name: torch.empty_like(t, device="meta")
        for name, t in [
            # Tied parameters appear once; functional_call re-ties them (tie_weights=True).
            *module.named_parameters(),
            *module.named_buffers(),
        ]
    }
    # functional_call restores by name; a module shared under two paths (timm's CoaT shares
    # one conv between blocks) got a meta stand-in back for one of them, in the user's model.
    # Every tensor is put back on its own module object afterwards.
    originals = [
        (store, name, t)
        for m in module.modules()
        for store in (m._parameters, m._buffers)
        for name, t in store.items()
    ]
    # Modules that cache what they compute (ultralytics' Detect keeps its anchors and the
    # input shape they are for) would keep meta tensors; every plain attribute is put back.
    attributes = [(m, dict(m.__dict__)) for m in module.modules()]
    try:
        return torch.func.functional_call(module, state, tuple(t.to("meta") for t in inputs))
    finally:
        for store, name, t in originals:
            if store.get(name) is not t:
                store[name] = t
        for m, before in attributes:
            for name in [k for k in m.__dict__ if k not in before]:
                del m.__dict__[name]
            for name, value in before.items():
                if m.__dict__.get(name) is not value:
                    m.__dict__[name] = value


@torch.no_grad()
def propagate_shapes(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor] | None = None):
    """(Re)compute node shapes by running the example inputs, on meta tensors, in eval mode.

    The same run records, per node, the FLOPs torch's ``FlopCounterMode`` counts for its ops,
    and a fingerprint of the graph, parameter shapes and inputs they hold for
    (``recorded_flops``), so MACs need no second pass. Eval mode, so BatchNorm running
    statistics are not updated by this bookkeeping run.
    """
    if example_inputs is None:
        example_inputs = gm.meta.get(EXAMPLE_INPUTS)
        if example_inputs is None:
            raise TraceError("GraphModule has no recorded example inputs; pass example_inputs=")
    gm.meta.pop(FLOPS_FOR, None)
    with eval_mode(gm):
        try:
            try:
                with FlopCounterMode(display=False) as counter:
                    on_meta(_RecordingRunner(gm, counter), example_inputs)
            except (NotImplementedError, RuntimeError):  # an op without a meta kernel: run it
                with FlopCounterMode(display=False) as counter:
                    _ShapeRecorder(gm, counter).run(*example_inputs)
        except Exception as exc:
            msg = (
                f"running the traced graph on the example inputs failed: {exc}\n  fix: give "
                "example inputs with the shape, dtype and device the model's forward expects"
            )
            raise TraceError(msg) from exc
    gm.meta[FLOPS_FOR] = _fingerprint(gm, example_inputs)


def recorded_flops(
    gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor]
) -> dict[fx.Node, dict[str, int]] | None:
    """Per node, FLOPs by op as the last ``propagate_shapes`` counted them; None when the graph,
    a parameter shape or the inputs' shapes changed since (then count again)."""
    seen = gm.meta.get(FLOPS_FOR)
    if seen is None or seen != _fingerprint(gm, example_inputs):
        return None
    return {n: meta.flops(n) for n in gm.graph.nodes}


def _fingerprint(gm: fx.GraphModule, inputs: Sequence[torch.Tensor]) -> tuple:
    """What per-node FLOPs depend on: the graph, each called module's hyperparameters
    (its repr: channels, kernel, stride, groups, ...), parameter shapes and input shapes."""
    return (
        str(gm.graph),
        tuple(repr(gm.get_submodule(n.target)) for n in gm.graph.nodes if n.op == "call_module"),
        tuple((k, tuple(v.shape)) for k, v in gm.state_dict(keep_vars=True).items()),
        tuple((tuple(t.shape), t.dtype) for t in inputs),
    )


def example_inputs_of(gm: fx.GraphModule) -> tuple[torch.Tensor, ...]:
    inputs = gm.meta.get(EXAMPLE_INPUTS)
    if inputs is None:
        raise TraceError("this GraphModule was not made by graphprune.trace(); trace it first")
    return inputs


def _explain_trace_failure(model: nn.Module, exc: Exception) -> str:
    """Name the user's source line that fx choked on and suggest leaf_modules=."""
    frames = traceback.extract_tb(sys.exc_info()[2])
    user = [f for f in frames if not f.filename.startswith(_TRACER_FILES)]
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
