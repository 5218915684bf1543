"""Channel rules of the functional norms: ``F.batch_norm``, ``F.instance_norm``,
``F.group_norm`` and ``F.layer_norm``.

Libraries such as timm call these from their own modules (BatchNormAct2d, LayerNorm2d,
GroupNormAct, ...), so the trace holds a function call whose affine parameters and running
statistics are ``get_attr`` nodes of the calling module. Each such tensor becomes a site on
the channel dim, so pruning slices it like the module's own; a norm parameter the graph
computes (not a plain parameter or buffer) has no rule and refuses.

How they shrink: the sliced parameters carry the new width; the arguments that bake in a
channel count (``num_groups``, ``normalized_shape``) are rewritten by ``_shrink_norm_args``.
"""

from __future__ import annotations

import numpy as np
import torch.nn.functional as F
from torch import fx

from graphprune.analysis.atoms import ChannelError, TensorChannels
from graphprune.analysis.builder import Builder
from graphprune.analysis.rules import ParamValue, Shrink, _arg, _shape, _tc, register


def _bind(b: Builder, arg: object, axis: int, atoms: np.ndarray, role: str) -> bool:
    """Make a norm parameter argument a site; False when the argument is None."""
    if arg is None:
        return False
    v = b.value(arg)
    if not isinstance(v, ParamValue):
        raise ChannelError("norm parameter is computed in the graph, not a parameter or buffer")
    b.site(v.path, axis, atoms, role)
    return True


def _shrink_norm_args(s: Shrink, node: fx.Node, m: object) -> None:
    """Shrink the channel counts a functional norm call bakes into its arguments.

    ``group_norm``'s ``num_groups`` scales with the kept channels (whole groups go);
    ``layer_norm``'s ``normalized_shape`` takes the kept width on the channel dim.
    """
    x = s.value(node.args[0])
    if not isinstance(x, TensorChannels) or not x.dims:
        return
    removed = s.removed
    if node.target is F.group_norm and 1 in x.dims:
        atoms = x.along(1)
        groups = int(_arg(node, 1, "num_groups"))
        kept = int(np.sum(~removed[atoms]))
        _set_arg(node, 1, "num_groups", groups * kept // len(atoms))
    elif node.target is F.layer_norm:
        shape = _arg(node, 1, "normalized_shape")
        as_list = list(shape) if isinstance(shape, (list, tuple)) else [shape]
        nd = len(_shape(node))
        for d in x.dims:
            axis = d - (nd - len(as_list))
            if 0 <= axis < len(as_list):  # analysis let only x.dims == (d,) through
                as_list[axis] = int(np.sum(~removed[x.atoms]))
        if isinstance(shape, (list, tuple)):
            _set_arg(node, 1, "normalized_shape", type(shape)(as_list))
        else:
            _set_arg(node, 1, "normalized_shape", as_list[0])


@register(F.batch_norm, F.instance_norm)
def _functional_batchnorm(b: Builder, node: fx.Node, m: object) -> TensorChannels:
    """Per-channel statistics: every channel is its own unit; γ, β, μ, σ² follow it."""
    x = _tc(b, node.args[0])
    if 1 not in x.dims:
        return x
    atoms = x.along(1)
    mean = _arg(node, 1, "running_mean")
    _bind(b, mean, 0, atoms, "stat")
    _bind(b, _arg(node, 2, "running_var"), 0, atoms, "stat")
    has_weight = _bind(b, _arg(node, 3, "weight"), 0, atoms, "out")
    _bind(b, _arg(node, 4, "bias"), 0, atoms, "out")
    if has_weight:
        return x.marked_nonzero(False)  # zeroed γ and β give exactly zero
    if node.target is F.instance_norm:
        uses_input = _arg(node, 5, "use_input_stats", True)
    else:
        uses_input = _arg(node, 5, "training", False)
    if uses_input or mean is None:
        return x  # a constant (zero) channel normalizes to zero; keeps what came in
    return x.marked_nonzero(True)  # a zero channel comes out as -μ/σ


@register(F.group_norm, shrink=_shrink_norm_args)
def _functional_groupnorm(b: Builder, node: fx.Node, m: object) -> TensorChannels:
    """Statistics are per group: whole groups are the unit, so a group's channels are tied."""
    x = _tc(b, node.args[0])
    if 1 not in x.dims:
        return x
    atoms = x.along(1)
    num_groups = int(_arg(node, 1, "num_groups"))
    for group in atoms.reshape(num_groups, -1):
        b.uf.tie(group)
    weight, bias = _arg(node, 2, "weight"), _arg(node, 3, "bias")
    if weight is None:
        b.block(atoms, f"{node.name}: group_norm without affine weight")
        return x
    _bind(b, weight, 0, atoms, "out")
    _bind(b, bias, 0, atoms, "out")
    return x.marked_nonzero(False)


@register(F.layer_norm, shrink=_shrink_norm_args)
def _functional_layernorm(b: Builder, node: fx.Node, m: object) -> TensorChannels:
    """Statistics over the normalized dims include every channel there: inexact to prune."""
    x = _tc(b, node.args[0])
    nd = len(_shape(node))
    normalized_shape = _arg(node, 1, "normalized_shape")
    count = len(normalized_shape) if isinstance(normalized_shape, (list, tuple)) else 1
    normed = list(range(nd - count, nd))
    hit = [d for d in x.dims if d in normed]
    if not hit:
        return x
    weight, bias = _arg(node, 2, "weight"), _arg(node, 3, "bias")
    if len(hit) > 1 or weight is None:
        raise ChannelError("layer_norm over several channel dims or without affine weight")
    atoms = x.along(hit[0])
    axis = normed.index(hit[0])
    _bind(b, weight, axis, atoms, "out")
    _bind(b, bias, axis, atoms, "out")
    b.mark_inexact(atoms, f"{node.name}: layer_norm statistics include every channel")
    return x.marked_nonzero(False)


def _set_arg(node: fx.Node, index: int, name: str, value: object) -> None:
    if len(node.args) > index:
        args = list(node.args)
        args[index] = value
        node.args = tuple(args)
    else:
        node.kwargs = {**node.kwargs, name: value}
