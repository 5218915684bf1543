"""The channel-rule registry: how each op moves channels.

A rule is ``fn(b: Builder, node: fx.Node, module: nn.Module | None) -> value`` where the value
is a ``TensorChannels`` (or a list of them for tuple outputs, or None for non-tensors).
Rules are keyed by real fx targets: module classes (looked up along the MRO), functions
(``torch.cat``, ``operator.add``) and method names (``"view"``). An op with no rule is never
guessed at: ``Builder.unknown`` marks the channels it touches unprunable, with the reason.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import fx, nn

from graphprune.analysis.atoms import ChannelError, TensorChannels
from graphprune.analysis.builder import Builder
from graphprune.frontend import meta

Rule = Callable[[Builder, fx.Node, "nn.Module | None"], object]
RULES: dict[object, Rule] = {}


def register(*targets: object) -> Callable[[Rule], Rule]:
    """Register a rule for module classes, functions or method names (extensible by users)."""

    def deco(fn: Rule) -> Rule:
        for t in targets:
            RULES[t] = fn
        return fn

    return deco


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
    rule = _lookup(node, module)
    if rule is None:
        if meta.output_shapes(node) is None and not _has_tensor_input(b, node):
            return None  # arithmetic on sizes and other non-tensor bookkeeping
        return b.unknown(node, "no channel rule for this op")
    try:
        return rule(b, node, module)
    except ChannelError as exc:
        return b.unknown(node, str(exc))


def _lookup(node: fx.Node, module: nn.Module | None) -> Rule | None:
    if module is not None:
        for cls in type(module).__mro__:
            if cls in RULES:
                return RULES[cls]
        return None
    return RULES.get(node.target)


def _has_tensor_input(b: Builder, node: fx.Node) -> bool:
    return any(
        isinstance(b.values.get(a), (TensorChannels, ParamValue, list))
        for a in node.all_input_nodes
    )


class ParamValue:
    """A parameter read with get_attr (e.g. a layer-scale gamma); bound to channels on use."""

    def __init__(self, path: str) -> None:
        self.path = path


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
from graphprune.analysis.rules import layers, tensor_ops  # noqa: E402,F401
