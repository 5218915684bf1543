"""Functional convs and linears on parameters become modules, so the channel rules see them.

``F.conv2d(x, self.weight, self.bias, ...)`` and ``F.linear(x, w, b)`` are layers written as
calls: the weight is a parameter (a ``get_attr`` node), or is computed from parameters alone
(timm's ScaledStdConv2d and StdConv2d standardize each filter in the forward, weight
normalization divides by a norm). The channel rules follow ``nn.Conv2d``/``nn.Linear``
modules; a functional call on a computed weight would leave the layer, and every channel it
touches, unprunable.

``modularize_functional_layers`` evaluates each such weight and bias (they depend on no input,
so the values are the same in train and eval mode) and replaces the call with a new
``nn.Conv2d``/``nn.Linear`` holding them: outputs are unchanged, and the layer is pruned like
any other. The parameters only those calls read are removed from the model. The change of
parametrization is reported: training the result trains the plain weight (the gradient no
longer passes through the standardization), and the pruned model is the deployed form.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

from graphprune.frontend.params import get_tensor

_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_LINEAR_ARGS = ("input", "weight", "bias")


def modularize_functional_layers(gm: fx.GraphModule) -> dict[str, str]:
    """Replace ``F.conv2d``/``F.linear`` calls whose weight and bias depend on parameters only
    by modules (module docstring); in place. Returns new module path -> what it replaced."""
    done: dict[str, str] = {}
    sources: set[str] = set()  # the tensors the replaced weights and biases were read from
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in (F.conv2d, F.linear):
            continue
        names = _CONV_ARGS if node.target is F.conv2d else _LINEAR_ARGS
        args = dict(zip(names, node.args, strict=False)) | dict(node.kwargs)
        weight, bias = args.get("weight"), args.get("bias")
        if not isinstance(weight, fx.Node) or not isinstance(bias, (fx.Node, type(None))):
            continue
        from_weight = _computation(weight)
        inside = from_weight | (_computation(bias) if bias is not None else set())
        if any(n.op in ("placeholder", "call_module", "output") for n in inside):
            continue  # depends on the input (or on what a module computes): not parameters
        if not all(set(n.users) <= inside | {node} for n in inside):
            continue  # a tensor shared with other ops (tied weights) must stay one tensor
        options = {k: args[k] for k in names[3:] if k in args}
        if any(isinstance(v, fx.Node) for v in options.values()):
            continue
        with torch.no_grad():
            w = _evaluate(gm, weight).detach().clone()
            b = None if bias is None else _evaluate(gm, bias).detach().clone()
        module = _layer(node.target, w, b, options)
        path = _free_path(gm, _owner(node), "conv" if node.target is F.conv2d else "linear")
        gm.add_submodule(path, module)
        with gm.graph.inserting_before(node):
            call = gm.graph.call_module(path, (args["input"],))
        call.meta = dict(node.meta)
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)
        sources |= {str(n.target) for n in inside if n.op == "get_attr"}
        computed = weight.op != "get_attr" or (bias is not None and bias.op != "get_attr")
        done[path] = (
            f"{node.target.__name__} on a weight computed from parameters ({_ops(from_weight)}) "
            "became a plain layer holding the computed values: outputs unchanged, training "
            "now updates the plain weight"
            if computed
            else f"{node.target.__name__} on parameters became a module"
        )
    if done:
        _drop_unused(gm, sources)
        gm.recompile()
    return done


def _computation(root: fx.Node) -> set[fx.Node]:
    """``root`` and every node it is computed from."""
    inside, stack = set(), [root]
    while stack:
        n = stack.pop()
        if n not in inside:
            inside.add(n)
            stack.extend(n.all_input_nodes)
    return inside


def _evaluate(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor:
    """The value of a parameters-only node, computed from its own sub-graph."""
    env: dict[fx.Node, object] = {}

    def value(n: fx.Node) -> object:
        if n in env:
            return env[n]
        load = lambda a: value(a) if isinstance(a, fx.Node) else a  # noqa: E731
        args = fx.node.map_aggregate(n.args, load)
        kwargs = fx.node.map_aggregate(n.kwargs, load)
        if n.op == "get_attr":
            out = get_tensor(gm, str(n.target))
        elif n.op == "call_function":
            out = n.target(*args, **kwargs)
        elif n.op == "call_method":
            out = getattr(args[0], n.target)(*args[1:], **kwargs)
        else:  # the caller checked: parameters and constants only
            raise AssertionError(n.op)
        env[n] = out
        return out

    out = value(node)
    assert isinstance(out, torch.Tensor)
    return out


def _layer(fn, w: torch.Tensor, b: torch.Tensor | None, options: dict) -> nn.Module:
    if fn is F.linear:
        layer: nn.Module = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
    else:
        groups = int(options.get("groups", 1))
        layer = nn.Conv2d(
            w.shape[1] * groups,
            w.shape[0],
            tuple(w.shape[2:]),
            stride=options.get("stride", 1),
            padding=options.get("padding", 0),
            dilation=options.get("dilation", 1),
            groups=groups,
            bias=b is not None,
        )
    layer = layer.to(device=w.device, dtype=w.dtype)
    with torch.no_grad():
        layer.weight.copy_(w)
        if b is not None:
            layer.bias.copy_(b)
    return layer


def _owner(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


def _free_path(gm: fx.GraphModule, owner: str, kind: str) -> str:
    base = f"{owner}.{kind}" if owner else kind
    path, i = base, 1
    names = dict(gm.named_modules())
    while path in names or _exists(gm, path):
        path, i = f"{base}{i}", i + 1
    return path


def _exists(gm: fx.GraphModule, path: str) -> bool:
    try:
        get_tensor(gm, path)
    except (AttributeError, KeyError):
        return False
    return True


def _ops(nodes: set[fx.Node]) -> str:
    """The names of the functions and methods among ``nodes``, for the report."""
    names = {
        n.target if isinstance(n.target, str) else n.target.__name__
        for n in nodes
        if n.op in ("call_function", "call_method")
    }
    return ", ".join(sorted(names)) or "a parameter"


def _drop_unused(gm: fx.GraphModule, sources: set[str]) -> None:
    """Dead nodes go; then each of ``sources`` that no node reads any more (the raw weight and
    gain of a standardized conv) is deleted from its module: neither counted nor saved."""
    gm.graph.eliminate_dead_code()
    read = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    for name in sorted(sources - read):
        owner, _, attr = name.rpartition(".")
        module = gm.get_submodule(owner) if owner else gm
        if attr in module._parameters:
            del module._parameters[attr]
