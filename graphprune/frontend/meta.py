"""The one place that reads and writes graphprune's entries in ``fx.Node.meta``.

Keys are namespaced (``graphprune.*``) so they never collide with torch's own meta entries.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

SHAPE = "graphprune.shape"
DTYPE = "graphprune.dtype"
FLOPS = "graphprune.flops"  # {op name: FLOPs} the node's ops performed on the example inputs

Shape = tuple[int, ...]


def set_output_meta(node: fx.Node, value: Any) -> None:
    """Record the shape (or nested tuple of shapes) of a node's runtime value."""
    node.meta[SHAPE] = _shape_of(value)
    if isinstance(value, torch.Tensor):
        node.meta[DTYPE] = value.dtype


def set_flops(node: fx.Node, flops: dict[str, int]) -> None:
    node.meta[FLOPS] = {op: v for op, v in flops.items() if v}


def flops(node: fx.Node) -> dict[str, int]:
    return node.meta.get(FLOPS, {})


def shape(node: fx.Node) -> Shape | None:
    """The node's output shape, or None when it is not a single tensor."""
    value = node.meta.get(SHAPE)
    if isinstance(value, tuple) and all(isinstance(d, int) for d in value):
        return value
    return None


def output_shapes(node: fx.Node) -> Any:
    """Shape structure as recorded: a Shape, a list of them for tuple outputs, or None."""
    return node.meta.get(SHAPE)


def _shape_of(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return tuple(int(d) for d in value.shape)
    if isinstance(value, (tuple, list)) and not isinstance(value, torch.Size):
        return [_shape_of(v) for v in value]
    return None
