"""Passes and the runner that applies them in order.

A pass is a module-level function ``verb_object(gm, ctx) -> PassResult``. It mutates the
GraphModule it is given (the API entry points copy the user's model first), never returns
None, and raises ``GraphInvariantError`` naming the node when its precondition is broken.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from torch import fx, nn

from graphprune.errors import GraphInvariantError, PlanError
from graphprune.frontend import meta
from graphprune.frontend.trace import example_inputs_of, propagate_shapes


@dataclass(frozen=True, slots=True, kw_only=True)
class PassContext:
    """Options shared by passes; each pass reads the fields it documents."""

    plan: Mapping[int, Sequence[int]] | None = None  # group id -> kept; None: drop zero channels
    scores: Mapping[int, Sequence[float]] | None = None  # group id -> importance per channel
    round_to: int = 8  # kept widths rounded up to a multiple of this (1 = exact plan)
    fold_threshold: float = 1e-5  # compactor rows with a smaller L2 norm are removed
    internal_only: bool = False  # ResRep: compactors only on groups with a single producer
    verify: bool = False  # run verify() after every pass (tests, debugging)


@dataclass(frozen=True, slots=True)
class PassResult:
    gm: fx.GraphModule
    modified: bool
    stats: dict[str, object] = field(default_factory=dict)


Pass = Callable[[fx.GraphModule, PassContext], PassResult]


def run_passes(gm: fx.GraphModule, passes: Sequence[Pass], ctx: PassContext) -> PassResult:
    """Apply ``passes`` in order, recompiling after each; on failure, say which pass broke."""
    stats: dict[str, object] = {}
    modified = False
    done: list[str] = []
    for p in passes:
        try:
            result = p(gm, ctx)
            gm = result.gm
            gm.graph.lint()
            gm.recompile()
            if ctx.verify:
                verify(gm)
        except PlanError:
            raise  # the caller's input, not a broken pass
        except Exception as exc:
            before = ", ".join(done) or "none"
            raise GraphInvariantError(
                f"pass {p.__name__} failed (passes run before it: {before}): {exc}"
            ) from exc
        done.append(p.__name__)
        stats[p.__name__] = result.stats
        modified = modified or result.modified
    return PassResult(gm, modified, stats)


def verify(gm: fx.GraphModule) -> None:
    """Check the graph is well formed, modules agree with their weights, and it still runs
    on the example inputs with the recorded output shapes."""
    gm.graph.lint()
    for name, m in gm.named_modules():
        _check_module(name, m)
    output = next(n for n in gm.graph.nodes if n.op == "output")
    expected = [meta.output_shapes(a) for a in output.all_input_nodes]
    propagate_shapes(gm)
    actual = [meta.output_shapes(a) for a in output.all_input_nodes]
    if expected != actual:
        raise GraphInvariantError(f"output shapes changed from {expected} to {actual}")


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


__all__ = [
    "Pass",
    "PassContext",
    "PassResult",
    "example_inputs_of",
    "run_passes",
    "verify",
]
