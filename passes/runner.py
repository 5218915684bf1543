"""Passes and the runner that applies them in order.

A pass is a module-level function ``verb_object(gm, *, its_own_options...) -> PassResult``
decorated with ``@graph_pass``. It mutates the GraphModule it is given (the API entry points
copy the user's model first), never returns None, and raises ``GraphInvariantError`` naming
the node when a precondition is broken. ``modified=False`` promises the graph and every
parameter shape are untouched.

The runner alone lints, recompiles and re-records shapes after a pass that modified the
graph, so a pass body never does; a pass that would need fresh shapes half-way should be two
passes. Calling a pass directly (``prune_channels(gm, plan=p)``) runs it through the same
machinery as ``run_passes(gm, [partial(prune_channels, plan=p)])`` and returns its own result.

With ``verify=True`` the runner also checks structure after each pass (``verify``) and, for a
pass declared output-preserving, that the model's outputs on the example inputs (eval mode)
did not change beyond float32 rounding; a failure names the pass and the passes before it.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.utils._pytree import tree_leaves

from graphprune.errors import GraphInvariantError, PlanError
from graphprune.frontend import meta
from graphprune.frontend.modes import eval_mode
from graphprune.frontend.trace import example_inputs_of, propagate_shapes

# Outputs of an output-preserving pass may move by this much relative to the largest output
# magnitude: float32 re-association (a fused BN, a folded 1x1) over a deep net stays far below.
OUTPUT_RTOL = 1e-4


@dataclass(frozen=True, slots=True)
class PassResult:
    gm: fx.GraphModule
    modified: bool
    stats: dict[str, object] = field(default_factory=dict)


# A requirement looks at the graph before a pass runs: it returns None when met, or a message
# (or raises GraphInvariantError) naming the offending node.
Requirement = Callable[[fx.GraphModule], "str | None"]


@dataclass(frozen=True, slots=True)
class PassSpec:
    """What ``@graph_pass`` records about a pass; the runner reads it."""

    name: str
    body: Callable[..., PassResult]  # the undecorated function
    requires: tuple[Requirement, ...]
    # True/False, or a predicate over the bound options (prune_channels preserves outputs
    # only when it removes just the all-zero channels, i.e. plan=None).
    preserves_outputs: bool | Callable[[Mapping[str, object]], bool]

    def preserves(self, options: Mapping[str, object]) -> bool:
        p = self.preserves_outputs
        return bool(p(options)) if callable(p) else bool(p)


def graph_pass(
    *,
    requires: Sequence[Requirement] = (),
    preserves_outputs: bool | Callable[[Mapping[str, object]], bool],
) -> Callable[[Callable[..., PassResult]], Callable[..., PassResult]]:
    """Declare a function a pass: what it requires of the graph and whether outputs survive it."""

    def deco(body: Callable[..., PassResult]) -> Callable[..., PassResult]:
        spec = PassSpec(body.__name__, body, tuple(requires), preserves_outputs)

        @functools.wraps(body)
        def run_alone(gm: fx.GraphModule, **options: object) -> PassResult:
            return _Run(gm, None, verify=False).apply(spec, options)

        run_alone.graph_pass = spec  # type: ignore[attr-defined]
        return run_alone

    return deco


Pass = Callable[..., PassResult]  # a @graph_pass function, or a functools.partial of one


def run_passes(
    gm: fx.GraphModule,
    passes: Sequence[Pass],
    *,
    verify: bool = False,
    example_inputs: Sequence[torch.Tensor] | None = None,
) -> PassResult:
    """Apply ``passes`` in order. Each entry is a pass or ``functools.partial(pass, opt=...)``.

    Returns the final module, whether any pass modified it, and each pass's stats by name.
    ``example_inputs`` default to the ones ``graphprune.trace`` recorded.
    """
    run = _Run(gm, example_inputs, verify=verify)
    stats: dict[str, object] = {}
    modified = False
    for entry in passes:
        spec, options = _resolve(entry)
        result = run.apply(spec, options)
        key = spec.name if spec.name not in stats else f"{spec.name}#{len(run.done)}"
        stats[key] = result.stats
        modified = modified or result.modified
    return PassResult(run.gm, modified, stats)


def _resolve(entry: object) -> tuple[PassSpec, dict[str, object]]:
    options: dict[str, object] = {}
    fn = entry
    if isinstance(entry, functools.partial):
        if entry.args:
            raise TypeError(f"bind options of {entry.func.__name__} by keyword, not by position")
        options, fn = dict(entry.keywords), entry.func
    spec = getattr(fn, "graph_pass", None)
    if not isinstance(spec, PassSpec):
        name = getattr(fn, "__name__", repr(fn))
        raise TypeError(f"{name} is not a pass: decorate it with @graph_pass(...)")
    return spec, options


class _Run:
    """One walk of the runner: the module, the inputs, what ran, and cached reference outputs."""

    def __init__(self, gm: fx.GraphModule, inputs, *, verify: bool) -> None:
        self.gm, self.verify, self.done = gm, verify, []
        self.inputs = tuple(inputs) if inputs is not None else None
        self.reference: list[torch.Tensor] | None = None  # outputs of self.gm as it is now

    def _inputs(self) -> tuple[torch.Tensor, ...]:
        return self.inputs if self.inputs is not None else example_inputs_of(self.gm)

    def apply(self, spec: PassSpec, options: dict[str, object]) -> PassResult:
        where = f"pass {spec.name} (passes run before it: {', '.join(self.done) or 'none'})"
        try:
            inspect.signature(spec.body).bind(self.gm, **options)
        except TypeError as exc:
            raise TypeError(f"{spec.name}: {exc}") from None
        for requirement in spec.requires:
            try:
                problem = requirement(self.gm)
            except GraphInvariantError as exc:
                problem = str(exc)
            if problem:
                raise GraphInvariantError(f"{where} requires {requirement.__name__}: {problem}")
        compare = self.verify and spec.preserves(options)
        if compare and self.reference is None:
            self.reference = _outputs(self.gm, self._inputs())
        shapes_before = _output_shapes(self.gm) if self.verify else None
        try:
            result = spec.body(self.gm, **options)
        except (PlanError, GraphInvariantError):
            raise  # the caller's input, or a precondition the pass itself names
        except Exception as exc:
            raise GraphInvariantError(f"{where} failed: {type(exc).__name__}: {exc}") from exc
        if not isinstance(result, PassResult):
            raise TypeError(f"{spec.name} returned {type(result).__name__}, not a PassResult")
        self.gm = result.gm
        if result.modified:
            try:
                self.gm.graph.lint()
                self.gm.recompile()
                propagate_shapes(self.gm, self._inputs())
            except Exception as exc:
                raise GraphInvariantError(f"{where} left a broken graph: {exc}") from exc
        if self.verify:
            try:
                verify(self.gm, output_shapes=shapes_before)
            except GraphInvariantError as exc:
                raise GraphInvariantError(f"{where}: {exc}") from exc
        if compare:
            after = _outputs(self.gm, self._inputs())
            _compare_outputs(self.reference, after, where)
            self.reference = after
        elif result.modified:
            self.reference = None
        self.done.append(spec.name)
        return result


@torch.no_grad()
def _outputs(gm: fx.GraphModule, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    with eval_mode(gm):
        out = gm(*inputs)
    return [t.detach().clone() for t in tree_leaves(out) if isinstance(t, torch.Tensor)]


def _compare_outputs(before: list[torch.Tensor], after: list[torch.Tensor], where: str) -> None:
    if len(before) != len(after):
        raise GraphInvariantError(
            f"{where} is declared output-preserving but changed the number of outputs "
            f"from {len(before)} to {len(after)}"
        )
    for i, (a, b) in enumerate(zip(before, after, strict=True)):
        if a.shape != b.shape:
            raise GraphInvariantError(
                f"{where} is declared output-preserving but output {i} changed shape "
                f"from {tuple(a.shape)} to {tuple(b.shape)}"
            )
        if not a.is_floating_point():
            same = bool(torch.equal(a, b))
            diff, scale = (0.0 if same else float("inf")), 0.0
        else:
            diff = float((a - b).abs().max()) if a.numel() else 0.0
            scale = float(a.abs().max()) if a.numel() else 0.0
        if not diff <= OUTPUT_RTOL * scale + 1e-6:  # also catches NaN
            raise GraphInvariantError(
                f"{where} is declared output-preserving but changed output {i}: max |difference| "
                f"{diff:.3g} against max |output| {scale:.3g} (allowed: {OUTPUT_RTOL:g} of it)"
            )


def _output_shapes(gm: fx.GraphModule) -> list[Any]:
    output = next(n for n in gm.graph.nodes if n.op == "output")
    return [meta.output_shapes(a) for a in output.all_input_nodes]


def verify(gm: fx.GraphModule, *, output_shapes: Sequence[Any] | None = None) -> None:
    """Check the graph is well formed, modules agree with their weights and, when given, the
    recorded output shapes equal ``output_shapes`` (shapes are recorded by the runner)."""
    gm.graph.lint()
    for name, m in gm.named_modules():
        _check_module(name, m)
    if output_shapes is not None:
        actual = _output_shapes(gm)
        if list(output_shapes) != actual:
            raise GraphInvariantError(f"output shapes changed from {output_shapes} to {actual}")


def _check_module(name: str, m: nn.Module) -> None:
    if isinstance(m, nn.modules.conv._ConvNd):
        w = m.weight.shape
        cin, cout = (w[0], w[1] * m.groups) if m.transposed else (w[1] * m.groups, w[0])
        if (cin, cout) != (m.in_channels, m.out_channels):
            raise GraphInvariantError(
                f"{name}: weight {tuple(w)} disagrees with in/out channels "
                f"{m.in_channels}/{m.out_channels} (groups={m.groups})"
            )
    elif isinstance(m, nn.Linear) and tuple(m.weight.shape) != (m.out_features, m.in_features):
        raise GraphInvariantError(f"{name}: weight {tuple(m.weight.shape)} disagrees with features")


def shapes_recorded(gm: fx.GraphModule) -> str | None:
    """Requirement: the module came from graphprune.trace (shapes and example inputs recorded)."""
    if not any(meta.SHAPE in n.meta for n in gm.graph.nodes):
        return "no recorded shapes; make the GraphModule with graphprune.trace()"
    return None


__all__ = [
    "OUTPUT_RTOL",
    "Pass",
    "PassResult",
    "PassSpec",
    "Requirement",
    "example_inputs_of",
    "graph_pass",
    "run_passes",
    "shapes_recorded",
    "verify",
]
