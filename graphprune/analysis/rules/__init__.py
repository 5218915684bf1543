"""The op registry: one entry per op says how it moves channels AND how it shrinks.

An entry is an ``OpRule(analyze, shrink)``:

- ``analyze(b: Builder, node: fx.Node, module: nn.Module | None) -> value`` follows channels
  through the op during analysis. The value is a ``TensorChannels`` (or a list of them for
  tuple outputs, or None for non-tensors). It records the op's parameters whose indices are
  channels with ``b.site(path, axis, atoms, role)``, unions/ties atoms that must be pruned
  together, and raises ``ChannelError`` for what it cannot follow.
- ``shrink(s: Shrink, node: fx.Node, module: nn.Module | None) -> None`` (optional) runs in
  ``prune_channels`` after every site's tensor has been sliced: it makes whatever else holds a
  channel count agree (module attributes such as ``out_channels``/``num_features``, split sizes,
  slice bounds, view constants). ``s`` gives each node's channels and shapes before pruning and
  which atoms are removed. Ops whose only channel-bearing state is their sites need none.

Entries are keyed by real fx targets: module classes, functions (``torch.cat``,
``operator.add``), method names (``"view"``) and custom ``torch.autograd.Function`` classes
(traced as opaque calls, see frontend/functions.py). Add an op with
``@register(target, ..., shrink=fn)`` on its analyze function (user code may do the same).
An op with no entry is never guessed at: ``Builder.unknown`` marks the channels it touches
unprunable, with the reason.

A module matches its exact class only. A subclass may override ``forward`` (a
weight-standardised conv, a QAT conv with fake-quantized weights) or hold per-channel state
the base entry does not know, so it gets its base's entry only when declared equivalent:
``register_equivalent(MyConv, nn.Conv2d)`` or a class attribute
``graphprune_equivalent = nn.Conv2d`` set on the class itself (not inherited).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
from torch import fx, nn

from graphprune.analysis.atoms import ChannelError, TensorChannels
from graphprune.analysis.builder import Builder
from graphprune.frontend import meta
from graphprune.frontend.functions import FunctionCall
from graphprune.frontend.params import get_tensor

Rule = Callable[[Builder, fx.Node, "nn.Module | None"], object]


@dataclass(frozen=True, slots=True)
class Shrink:
    """What a shrink function knows: the module, per-node channels and shapes as they were
    before pruning, and which channel atoms are removed."""

    gm: fx.GraphModule
    values: Mapping[fx.Node, object]  # node -> TensorChannels (etc.) before pruning
    old_shapes: Mapping[fx.Node, object]  # node -> recorded output shapes before pruning
    removed: np.ndarray  # atom -> True when pruned away

    def value(self, arg: object) -> object:
        return self.values.get(arg) if isinstance(arg, fx.Node) else None

    def kept(self, value: object, dim: int) -> int | None:
        """How many channels survive along ``dim`` when that is the value's only channel dim."""
        if isinstance(value, TensorChannels) and value.dims == (dim,):
            return int(np.sum(~self.removed[value.atoms]))
        return None


ShrinkFn = Callable[[Shrink, fx.Node, "nn.Module | None"], None]


@dataclass(frozen=True, slots=True)
class OpRule:
    """One op's entry: how it moves channels (``analyze``) and how it shrinks (``shrink``)."""

    analyze: Rule
    shrink: ShrinkFn | None = None


RULES: dict[object, OpRule] = {}
EQUIVALENT: dict[type, type] = {}


def register(*targets: object, shrink: ShrinkFn | None = None) -> Callable[[Rule], Rule]:
    """Register ``fn`` (the analyze function) and ``shrink`` as the entry of each target:
    module classes, functions or method names. Replaces an existing entry (extensible by users).
    """

    def deco(fn: Rule) -> Rule:
        for t in targets:
            RULES[t] = OpRule(fn, shrink)
        return fn

    return deco


def register_equivalent(cls: type[nn.Module], base: type[nn.Module]) -> None:
    """Declare that ``cls`` computes exactly what ``base`` does (same forward, same per-channel
    parameters and buffers), so ``base``'s entry and every pass treat it like ``base``."""
    if not (isinstance(cls, type) and isinstance(base, type) and issubclass(cls, base)):
        raise TypeError(f"register_equivalent({cls!r}, {base!r}): cls must subclass base")
    EQUIVALENT[cls] = base


def treated_as(module: nn.Module) -> type | None:
    """The class whose entry applies to ``module``: its own, or the one it is declared
    equivalent to; None when there is none (its channels become unprunable)."""
    cls = type(module)
    if cls in RULES:
        return cls
    base = vars(cls).get("graphprune_equivalent") or EQUIVALENT.get(cls)
    while base is not None and base not in RULES:
        base = vars(base).get("graphprune_equivalent") or EQUIVALENT.get(base)
    return base


def lookup(node: fx.Node, module: nn.Module | None) -> OpRule | None:
    """The entry for a node: by the module's exact (or declared equivalent) class, by the
    Function class of an opaque autograd.Function call, or by the call target."""
    if isinstance(module, FunctionCall):
        return RULES.get(module.function)
    if module is not None:
        cls = treated_as(module)
        return RULES[cls] if cls is not None else None
    return RULES.get(node.target) if node.op in ("call_function", "call_method") else None


def apply_rule(b: Builder, node: fx.Node) -> object:
    if node.op == "placeholder":
        return _placeholder(b, node)
    if node.op == "output":
        for arg in node.all_input_nodes:
            b.block_value(b.values.get(arg), f"{arg.name}: network output")
        return None
    if node.op == "get_attr":
        return ParamValue(str(node.target))
    module = b.gm.get_submodule(node.target) if node.op == "call_module" else None
    rule = lookup(node, module)
    if rule is None:
        if meta.output_shapes(node) is None and not _has_tensor_input(b, node):
            return None  # arithmetic on sizes and other non-tensor bookkeeping
        return b.unknown(node, _no_rule_reason(module))
    first_new_atom = b.uf.count
    try:
        value = rule.analyze(b, node, module)
    except ChannelError as exc:
        # Channels the rule created before giving up belong to no member: not prunable.
        b.block(np.arange(first_new_atom, b.uf.count), f"{node.name}: {exc}")
        return b.unknown(node, str(exc))
    if value is None and meta.shape(node) is not None and _has_tensor_input(b, node):
        # A tensor the rule could not describe must not read as "carries no channels".
        return b.unknown(node, "its rule cannot follow the channels into this tensor")
    return value


def _no_rule_reason(module: nn.Module | None) -> str:
    if module is None:
        return "no channel rule for this op"
    if isinstance(module, FunctionCall):
        name = module.function.__qualname__
        return (
            f"custom autograd.Function {name} is kept as an opaque call (so its backward "
            f"is used); to prune through it, register a rule: "
            f"graphprune.analysis.rules.register({name})"
        )
    cls = type(module)
    base = next((c for c in cls.__mro__[1:] if c in RULES), None)
    if base is None:
        return f"no channel rule for {cls.__name__}"
    return (
        f"{cls.__name__} subclasses {base.__name__} but is not declared equivalent (its "
        f"forward or per-channel state may differ); if it computes exactly what "
        f"{base.__name__} does, call graphprune.analysis.rules.register_equivalent("
        f"{cls.__name__}, {base.__name__}) or set graphprune_equivalent = {base.__name__} on it"
    )


def _has_tensor_input(b: Builder, node: fx.Node) -> bool:
    return any(
        isinstance(b.values.get(a), (TensorChannels, ParamValue, list))
        for a in node.all_input_nodes
    )


class ParamValue:
    """A parameter read with get_attr (e.g. a layer-scale gamma); bound to channels on use.

    ``view`` is set when the graph reshaped it to broadcast (GRN's ``weight.view(1, 1, 1, -1)``):
    the viewed shape, and for each viewed axis the parameter's own axis (-1 for size-1 axes).
    """

    def __init__(
        self, path: str, view: tuple[tuple[int, ...], tuple[int, ...]] | None = None
    ) -> None:
        self.path = path
        self.view = view


def param_shape(b: Builder, v: ParamValue) -> tuple[int, ...]:
    """The shape the parameter has where it is used: its viewed shape, else its own (an
    expanded read keeps its own, whose size-1 axes bind no channels)."""
    return v.view[0] if v.view is not None else tuple(get_tensor(b.gm, v.path).shape)


def param_axis(v: ParamValue, axis: int) -> int:
    """The parameter's own axis behind an axis of ``param_shape``."""
    return v.view[1][axis] if v.view is not None else axis


def repeated_along(b: Builder, x: TensorChannels, d: int) -> bool:
    """True when channels span several dims and every slice along ``d`` holds the same
    channel classes at the same positions (paths stacked by a selective kernel, a radix view
    whose columns are tied): no plan can shrink ``d``, and a channel's entries along it go
    together, so normalizing or summing along ``d`` stays within each channel."""
    if d not in x.dims or len(x.dims) < 2:
        return False
    find = np.vectorize(b.uf.find, otypes=[np.int64])
    classes = find(x.atoms)
    axis = x.dims.index(d)
    first = np.take(classes, [0], axis=axis)
    return bool(np.all(classes == first))


def _tc(b: Builder, arg: object) -> TensorChannels:
    v = b.value(arg)
    if isinstance(v, TensorChannels):
        return v
    raise ChannelError(f"expected a tensor input, got {type(v).__name__}")


def _shape(node: object) -> tuple[int, ...]:
    s = meta.shape(node) if isinstance(node, fx.Node) else None
    if s is None:
        raise ChannelError("no recorded shape (was the model traced with graphprune.trace?)")
    return s


def _arg(node: fx.Node, index: int, name: str, default: object = None) -> object:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def _placeholder(b: Builder, node: fx.Node) -> object:
    s = meta.shape(node)
    if s is None:
        return None
    if len(s) < 2:
        return TensorChannels.free()
    atoms = b.fresh(s[1], node.name, "input")
    b.block(atoms, f"{node.name}: network input")
    return TensorChannels((1,), atoms)


# The rule modules register themselves on import; they use the helpers above.
from graphprune.analysis.rules import (  # noqa: E402,F401
    attention,
    layers,
    norms,
    shape_ops,
    tensor_ops,
)

# torch's own subclasses that compute exactly what their base does. Not the QAT, quantized or
# reference modules (fake-quantized weights, packed parameters, per-channel observers), and
# not the Lazy* ones (they become their base class once materialized).
for _cls, _base in (
    (nn.BatchNorm1d, nn.modules.batchnorm._BatchNorm),
    (nn.BatchNorm2d, nn.modules.batchnorm._BatchNorm),
    (nn.BatchNorm3d, nn.modules.batchnorm._BatchNorm),
    (nn.SyncBatchNorm, nn.modules.batchnorm._BatchNorm),
    (nn.InstanceNorm1d, nn.modules.instancenorm._InstanceNorm),
    (nn.InstanceNorm2d, nn.modules.instancenorm._InstanceNorm),
    (nn.InstanceNorm3d, nn.modules.instancenorm._InstanceNorm),
    (nn.ZeroPad1d, nn.ConstantPad1d),
    (nn.ZeroPad3d, nn.ConstantPad3d),
    (nn.modules.linear.NonDynamicallyQuantizableLinear, nn.Linear),
):
    register_equivalent(_cls, _base)
