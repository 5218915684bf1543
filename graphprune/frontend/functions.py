"""Custom ``torch.autograd.Function``s under tracing: kept as opaque calls, backward intact.

fx traces *through* ``MyFn.apply(x)``: the forward's ops are recorded and the custom backward
is lost, so a traced gradient-reversal layer trains with the opposite gradient. While
tracing, ``Function.apply`` is patched: a call on fx proxies becomes one ``call_module`` node
running a ``FunctionCall`` leaf, which calls the real ``apply`` (forward and backward). Its
channels are unprunable unless a rule is registered for the Function class itself.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import fx, nn
from torch.utils._pytree import tree_flatten


class FunctionCall(nn.Module):
    """``function.apply(*args)`` as a module, so the graph keeps it as one opaque call."""

    graphprune_leaf = True

    def __init__(self, function: type[torch.autograd.Function]) -> None:
        super().__init__()
        self.function = function

    def forward(self, *args, **kwargs):
        return self.function.apply(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"{self.function.__module__}.{self.function.__qualname__}"


@contextmanager
def functions_as_leaves(tracer: fx.Tracer) -> Iterator[None]:
    """Inside the block, ``apply`` on proxies records a FunctionCall node in ``tracer``."""
    Function = torch.autograd.Function
    original = vars(Function)["apply"]
    added: dict[type, str] = {}

    def apply(cls, *args, **kwargs):
        if not any(isinstance(a, fx.Proxy) for a in tree_flatten((args, kwargs))[0]):
            return original.__func__(cls, *args, **kwargs)
        name = added.get(cls)
        if name is None:
            name = f"graphprune_fn{len(added)}_{cls.__name__}"
            tracer.root.add_module(name, FunctionCall(cls))
            added[cls] = name
        return tracer.create_proxy("call_module", name, args, kwargs)

    Function.apply = classmethod(apply)  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        Function.apply = original  # type: ignore[method-assign]
