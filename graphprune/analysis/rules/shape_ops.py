"""Entries of ops that move channels between tensors and dims: cat, split, indexing,
reshapes, permutes, reductions. Those that bake channel counts into their arguments (split
sizes, slice bounds, view shapes) rewrite them in their shrink functions."""

from __future__ import annotations

import operator

import numpy as np
import torch
from torch import fx, nn

from graphprune.analysis.atoms import ChannelError, TensorChannels
from graphprune.analysis.builder import Builder
from graphprune.analysis.rules import (
    ParamValue,
    Shrink,
    _arg,
    _dim,
    _shape,
    _tc,
    param_axis,
    param_shape,
    register,
    repeated_along,
)
from graphprune.errors import GraphInvariantError
from graphprune.frontend import meta
from graphprune.frontend.params import get_tensor


def _input_channels(s: Shrink, node: fx.Node) -> TensorChannels | None:
    """The channels of a call's first argument, when it carries any (else nothing to do)."""
    if node.op not in ("call_function", "call_method") or not node.args:
        return None
    x = s.value(node.args[0])
    return x if isinstance(x, TensorChannels) and x.dims else None


@register(torch.cat, torch.concat, torch.concatenate)
def _cat(b: Builder, node: fx.Node, m: object) -> TensorChannels:
    tensors = _arg(node, 0, "tensors")
    if isinstance(tensors, fx.Node):  # torch.cat(torch.split(x, 1, dim=1), dim=3): one value
        raise ChannelError("cat of a traced sequence (the output of another op)")
    inputs = list(tensors)
    nd = len(_shape(node))
    d = _dim(int(_arg(node, 1, "dim", 0)), nd)
    all_values = [b.value(a) for a in inputs]
    params = [v for v in all_values if isinstance(v, ParamValue)]
    values = [v for v in all_values if not isinstance(v, ParamValue)]
    if not values or not all(isinstance(v, TensorChannels) for v in values):
        raise ChannelError("cat of non-tensor values")
    if all(d not in v.dims for v in values):
        # Joined along a spatial/batch dim: every input must hold the same channels.
        carried = [v for v in values if v.carries]
        if not carried:
            opaque = any(v.opaque for v in values)
            return TensorChannels.unknown() if opaque else TensorChannels.free()
        out = carried[0]
        for v in values:
            if v.dims != out.dims or v.atoms.shape != out.atoms.shape:
                raise ChannelError("cat joins a tensor whose channels differ from the others'")
            if v is not out:
                b.uf.union_arrays(out.atoms, v.atoms)
        for p in params:  # a parameter joined in (a ViT's class token) is producer-side
            _bind_param(b, p, out, nd)
        flag = any(v.nonzero_when_zeroed for v in values)
        return out.marked_nonzero(flag)
    if params:
        raise ChannelError("cat of a parameter along the channel dim")
    parts = []
    for a, v in zip(inputs, values, strict=True):
        if v.dims == (d,):
            parts.append(v.atoms)
        else:  # a segment whose channels we cannot follow: fresh atoms nobody may prune
            seg = b.fresh(_shape(a)[d], f"{node.name}:segment", "input")
            b.block(seg, f"{node.name}: cat input {a.name} has unknown channels")
            parts.append(seg)
    flag = any(v.nonzero_when_zeroed for v in values)
    return TensorChannels((d,), np.concatenate(parts), nonzero_when_zeroed=flag)


def _bind_param(b: Builder, p: ParamValue, out: TensorChannels, nd: int) -> None:
    """Bind a parameter broadcast against ``out`` (right-aligned) to out's channels."""
    p_shape = param_shape(b, p)
    offset = nd - len(p_shape)
    if len(out.dims) != 1 or out.dims[0] < offset:
        raise ChannelError("a parameter meets channels it has no dim for")
    if p_shape[out.dims[0] - offset] != len(out.atoms):
        raise ChannelError("a parameter broadcasts along the channel dim")
    b.site(p.path, param_axis(p, out.dims[0] - offset), out.atoms, "out")


def _shrink_split(s: Shrink, node: fx.Node, m: object) -> None:
    """Each piece's size becomes its surviving channels; chunk/tensor_split become split."""
    x = _input_channels(s, node)
    if x is None:
        return
    nd = len(s.old_shapes[node.args[0]])
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    dim = dim + nd if dim < 0 else dim
    if dim not in x.dims:
        return
    sizes, offset = [], 0
    axis = x.dims.index(dim)
    for shape in s.old_shapes[node]:
        part = x.sliced(dim, offset, offset + shape[dim]).atoms
        # Positions along ``dim`` that keep any atom (channels may span several dims, e.g.
        # heads x head_dim, where a position goes only with all its atoms).
        others = tuple(a for a in range(part.ndim) if a != axis)
        sizes.append(int(np.sum((~s.removed[part]).any(axis=others))))
        offset += shape[dim]
    node.op, node.target = "call_function", torch.split
    node.args, node.kwargs = (node.args[0], sizes, dim), {}


@register(
    torch.split,
    torch.chunk,
    "split",
    "chunk",
    torch.tensor_split,
    "tensor_split",
    shrink=_shrink_split,
)
def _split(b: Builder, node: fx.Node, m: object) -> list[TensorChannels]:
    x = _tc(b, node.args[0])
    outs = meta.output_shapes(node)
    nd = len(_shape(node.args[0]))
    d = _dim(int(_arg(node, 2, "dim", 0)), nd)
    parts, offset = [], 0
    for s in outs:
        parts.append(x.sliced(d, offset, offset + s[d]))
        offset += s[d]
    return parts


def _shrink_getitem(s: Shrink, node: fx.Node, m: object) -> None:
    """Slice bounds on the channel dim count surviving channels."""
    x = _input_channels(s, node)
    if x is None:
        return
    index = node.args[1]
    as_tuple = isinstance(index, tuple)
    items = list(index if as_tuple else (index,))
    if any(i is Ellipsis or i is None for i in items):
        return  # dims shift; channel slices with Ellipsis/None are left as traced
    for d, i in enumerate(items):
        if isinstance(i, slice) and d in x.dims and x.dims == (d,):
            kept_before = np.concatenate([[0], np.cumsum(~s.removed[x.atoms])])
            start, stop, _ = i.indices(len(x.atoms))
            items[d] = slice(int(kept_before[start]), int(kept_before[stop]), i.step)
    node.args = (node.args[0], tuple(items) if as_tuple else items[0])


@register(operator.getitem, shrink=_shrink_getitem)
def _getitem(b: Builder, node: fx.Node, m: object) -> object:
    src, index = node.args
    v = b.value(src)
    if isinstance(v, list):
        return v[index]
    if isinstance(v, ParamValue):
        return _index_param(b, v, index, node)
    if not isinstance(v, TensorChannels):
        return None
    in_shape = _shape(src)
    index = index if isinstance(index, tuple) else (index,)
    if any(i is Ellipsis for i in index):
        at = index.index(Ellipsis)
        fill = len(in_shape) - (len(index) - 1 - sum(i is None for i in index))
        index = index[:at] + (slice(None),) * fill + index[at + 1 :]
    out, din, dout, removed, inserted = v, 0, 0, [], []
    for i in index:
        if i is None:
            inserted.append(dout)
            dout += 1
        elif isinstance(i, int):
            removed.append(din)
            din += 1
        elif isinstance(i, slice) and not any(isinstance(x, fx.Node) for x in (i.start, i.stop)):
            if din in out.dims:
                if i.step not in (None, 1):
                    raise ChannelError("strided slice of a channel dim")
                start, stop, _ = i.indices(in_shape[din])
                original = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
                special = any(j is None or j is Ellipsis for j in original)
                if (start, stop) != (0, in_shape[din]) and special:
                    raise ChannelError("channel slice combined with None or Ellipsis indexing")
                out = out.sliced(din, start, stop)
            din += 1
            dout += 1
        else:
            raise ChannelError(f"unsupported index {i!r}")
    out = out.without_dims(removed)
    for p in inserted:
        out = out.with_dims(tuple(x + (x >= p) for x in out.dims))
    return out


# --- moving dims around ----------------------------------------------------------------------
def _shrink_param_view(s: Shrink, node: fx.Node, p: ParamValue) -> None:
    """The view of a sliced parameter takes its new sizes (``weight.view(1, C, 1, 1)``)."""
    own = get_tensor(s.gm, p.path).shape
    packed = len(node.args) == 2 and isinstance(node.args[1], (list, tuple))
    shape = list(node.args[1] if packed else node.args[1:])
    for d, axis in enumerate(p.view[1]):
        if axis >= 0 and isinstance(shape[d], int) and shape[d] != -1:
            shape[d] = int(own[axis])
    node.args = (node.args[0], tuple(shape)) if packed else (node.args[0], *shape)


def _index_param(b: Builder, v: ParamValue, index: object, node: fx.Node) -> ParamValue:
    """``gamma[:, None, None]`` and the like: full slices, None and Ellipsis only move the
    parameter's axes, so its entries still follow the channels it is multiplied with."""
    ndim = len(param_shape(b, v))
    items = index if isinstance(index, tuple) else (index,)
    if sum(i is Ellipsis for i in items) > 1:
        raise ChannelError("more than one Ellipsis")
    if Ellipsis in items:
        at = items.index(Ellipsis)
        fill = ndim - sum(i is not None and i is not Ellipsis for i in items)
        items = items[:at] + (slice(None),) * fill + items[at + 1 :]
    axes: list[int] = []
    din = 0
    for i in items:
        if i is None:
            axes.append(-1)
        elif i == slice(None):
            axes.append(param_axis(v, din))
            din += 1
        else:
            raise ChannelError(f"parameter {v.path} indexed with {i!r}")
    axes.extend(param_axis(v, d) for d in range(din, ndim))
    return ParamValue(v.path, (_shape(node), tuple(axes)))


@register(getattr)
def _getattr(b: Builder, node: fx.Node, m: object) -> object:
    """``x.data`` is ``x``; ``x.mT`` / ``x.T`` move dims; non-tensor attributes (shape,
    dtype, device) carry no channels. Any other tensor attribute is unknown."""
    src, name = node.args[0], node.args[1]
    v = b.value(src)
    if name == "data":
        return v
    if meta.shape(node) is None:
        return None
    if name in ("mT", "mH", "T", "H") and isinstance(v, TensorChannels):
        nd = len(_shape(node))
        perm = list(range(nd))
        if name in ("mT", "mH"):
            perm[-2], perm[-1] = perm[-1], perm[-2]
        else:
            perm.reverse()
        if v.carries and perm[0] != 0:
            raise ChannelError(f".{name} moves the batch dim")
        return v.permuted(perm)
    raise ChannelError(f"tensor attribute .{name}")


_SIZE_ARITHMETIC = (operator.floordiv, operator.mul, operator.add, operator.sub)


def _shrinks(s: Shrink, size: object) -> bool:
    """Is ``size`` a node reading a dim of a tensor whose channels on that dim are pruned
    (``x.shape[i]``, ``x.size(i)``, ``x.size()[i]``), or arithmetic on one (``C // heads``)?"""
    if not isinstance(size, fx.Node):
        return False
    if size.op == "call_function" and size.target in _SIZE_ARITHMETIC:  # C // heads
        return any(_shrinks(s, a) for a in size.args)
    src, dim = None, None
    if size.op == "call_function" and size.target is operator.getitem:
        holder, index = size.args
        if isinstance(holder, fx.Node) and isinstance(index, int):
            if holder.op == "call_function" and holder.target is getattr:
                src, dim = holder.args[0], index  # x.shape[i]
            elif holder.op == "call_method" and holder.target == "size" and len(holder.args) == 1:
                src, dim = holder.args[0], index  # x.size()[i]
    elif size.op == "call_method" and size.target == "size" and len(size.args) == 2:
        src, dim = size.args  # x.size(i)
    x = s.value(src) if isinstance(src, fx.Node) else None
    if not isinstance(x, TensorChannels) or not isinstance(dim, int):
        return False
    shape = s.old_shapes.get(src)
    if not isinstance(shape, (tuple, list, torch.Size)):
        return False
    dim = dim % len(shape)
    if dim not in x.dims:
        return False
    axis = x.dims.index(dim)
    return bool(s.removed[np.moveaxis(x.atoms, axis, 0)].reshape(x.atoms.shape[axis], -1).any())


def _shrink_view(s: Shrink, node: fx.Node, m: object) -> None:
    """Explicit sizes of channel dims in view/reshape become the surviving counts."""
    param = s.value(node)
    if isinstance(param, ParamValue) and param.view is not None:
        _shrink_param_view(s, node, param)
        return
    out = s.value(node)
    packed = len(node.args) == 2 and isinstance(node.args[1], (list, tuple))
    shape = list(node.args[1] if packed else node.args[1:])
    channel_dims = set(out.dims) if isinstance(out, TensorChannels) else set()
    old = s.old_shapes.get(node)
    if isinstance(old, (tuple, list, torch.Size)) and len(old) == len(shape):
        for d, size in enumerate(shape):
            # A size read from a pruned channel dim of another tensor (``B, N, C = x.shape``
            # then ``y.reshape(B, N, C)``) shrinks with that tensor; where this view's own
            # dim carries none of those channels, ``y`` keeps its size there: bake it.
            if d not in channel_dims and _shrinks(s, size):
                shape[d] = int(old[d])
        node.args = (node.args[0], tuple(shape)) if packed else (node.args[0], *shape)
    if _input_channels(s, node) is None or not isinstance(out, TensorChannels) or not out.dims:
        return
    kept = ~s.removed[out.atoms]
    per_axis = [
        int(kept.any(axis=tuple(a for a in range(kept.ndim) if a != axis)).sum())
        for axis in range(kept.ndim)
    ]
    if len(shape) != len(old or ()):  # sizes passed as one traced value (x.view(sizes))
        if kept.all() or not isinstance(old, (tuple, list, torch.Size)):
            return  # nothing to resize, or no record to resize from (the check will say)
        full = [int(v) for v in old]  # type: ignore[union-attr]
        for axis, d in enumerate(out.dims):
            full[d] = per_axis[axis]
        full[0] = -1  # the batch stays whatever the input's is
        node.args = (node.args[0], tuple(full))
        return
    for axis, d in enumerate(out.dims):
        # A size read from another tensor (x.shape[-1]) is static for a channel dim: bake it.
        if isinstance(shape[d], fx.Node) or (isinstance(shape[d], int) and shape[d] != -1):
            shape[d] = per_axis[axis]
    if int(kept.sum()) != int(np.prod(per_axis)):
        raise GraphInvariantError(
            f"{node.name}: pruning would leave a ragged {s.old_shapes[node]} view"
        )
    node.args = (node.args[0], tuple(shape)) if packed else (node.args[0], *shape)


# Only view/reshape carry explicit sizes; flatten, squeeze and friends need no rewriting.
@register(torch.reshape, "view", "reshape", shrink=_shrink_view)
@register(
    nn.Flatten,
    torch.flatten,
    torch.squeeze,
    torch.unsqueeze,
    "flatten",
    "squeeze",
    "unsqueeze",
    "view_as",
    "reshape_as",
)
def _reshape(b: Builder, node: fx.Node, m: object) -> object:
    v = b.value(node.args[0])
    if isinstance(v, ParamValue):
        return _param_view(b, v, _shape(node))
    out = _tc(b, node.args[0]).reshaped(_shape(node.args[0]), _shape(node))
    if len(out.dims) > 1:
        # Channels split over several dims (attention's (3, heads, head_dim), a channel
        # shuffle's (groups, C/groups)): only one dim may shrink, so the kept channels stay a
        # grid, and positions along it are pruned together. The last dim (head dims) unless
        # the model is analyzed for whole heads (``prune_whole_heads``): the second-to-last.
        axis = -2 if b.prune_heads else -1
        b.uf.tie_rows(np.moveaxis(out.atoms, axis, 0).reshape(out.atoms.shape[axis], -1))
    return out


def _param_view(b: Builder, v: ParamValue, shape: tuple[int, ...]) -> ParamValue:
    """A parameter viewed to broadcast: only size-1 axes may come or go, so every axis of
    size > 1 is one of the parameter's own (the channel axis it will bind)."""
    own = param_shape(b, v)
    own_axes = [param_axis(v, a) for a, size in enumerate(own) if size > 1]
    sizes = [size for size in own if size > 1]
    if [size for size in shape if size > 1] != sizes:
        raise ChannelError("view of a parameter that moves entries between axes")
    it = iter(own_axes)
    return ParamValue(v.path, (tuple(shape), tuple(next(it) if n > 1 else -1 for n in shape)))


@register(torch.permute, "permute", torch.transpose, "transpose", "t")
def _permute(b: Builder, node: fx.Node, m: object) -> TensorChannels:
    x = _tc(b, node.args[0])
    nd = len(_shape(node))
    name = node.target if isinstance(node.target, str) else node.target.__name__
    if name in ("transpose", "t"):
        d0, d1 = (
            (0, 1) if name == "t" else (_dim(int(node.args[1]), nd), _dim(int(node.args[2]), nd))
        )
        perm = list(range(nd))
        perm[d0], perm[d1] = perm[d1], perm[d0]
    else:
        dims = node.args[1:] if len(node.args) > 2 else node.args[1]
        perm = [_dim(int(p), nd) for p in (dims if isinstance(dims, (list, tuple)) else [dims])]
    # The batch dim may move (timm's qkv.permute(2, 0, 3, 1, 4) puts q/k/v first for an
    # unbind); rules that need dim 0 to be the batch check it themselves (reshape does).
    return x.permuted(perm)


@register(torch.mean, torch.sum, torch.amax, torch.amin, "mean", "sum", "amax", "amin")
def _reduce(b: Builder, node: fx.Node, m: object) -> TensorChannels:
    dims = _arg(node, 1, "dim")
    name = node.target if isinstance(node.target, str) else node.target.__name__
    return _reduced(b, node, dims, bool(_arg(node, 2, "keepdim", False)), exact=name == "sum")


@register("norm", torch.norm, torch.linalg.vector_norm)
def _norm(b: Builder, node: fx.Node, m: object) -> TensorChannels:
    """A vector norm: zero entries add nothing to it, for every order."""
    dims = _arg(node, 2, "dim")
    return _reduced(b, node, dims, bool(_arg(node, 3, "keepdim", False)), exact=True)


def _reduced(
    b: Builder, node: fx.Node, dims: object, keepdim: bool, *, exact: bool
) -> TensorChannels:
    """Reduce over ``dims``. Over spatial dims channels pass on; over every channel dim the
    result has no channels left, and removing zeroed channels leaves it unchanged only for
    ``exact`` reductions (sum, norms); a mean divides by how many there are, a max can be a
    zero, so those groups are inexact (GRN's channel mean, CBAM's channel pooling)."""
    x = _tc(b, node.args[0])
    nd = len(_shape(node.args[0]))
    if dims is None:
        raise ChannelError("reduces over every dim, channels included")
    dims = [_dim(int(d), nd) for d in (dims if isinstance(dims, (list, tuple)) else [dims])]
    hit = [d for d in dims if d in x.dims]
    if not hit:
        return x if keepdim else x.without_dims(dims)
    if len(hit) < len(x.dims) and all(repeated_along(b, x, d) for d in hit):
        # Over a dim that never shrinks (stacked paths): each channel reduces on its own.
        atoms = x.atoms
        for d in sorted(hit, reverse=True):
            atoms = np.take(atoms, 0, axis=x.dims.index(d))
        out = x.with_dims(tuple(d for d in x.dims if d not in hit), atoms)
        return out if keepdim else out.without_dims(dims)
    if set(x.dims) - set(dims):
        raise ChannelError("reduces over some channel dims but not all")
    if not exact or x.nonzero_when_zeroed:
        b.mark_inexact(
            x.all_atoms(), f"{node.name}: reducing over channels depends on the removed ones"
        )
    return TensorChannels.free()


@register("expand", "expand_as")
def _expand(b: Builder, node: fx.Node, m: object) -> object:
    """Broadcast to a larger shape: channel dims keep their size. A parameter stays a
    parameter (bound to channels where it is used, e.g. a class token joined by cat)."""
    v = b.value(node.args[0])
    in_shape, out_shape = _shape(node.args[0]), _shape(node)
    if isinstance(v, ParamValue):
        if len(in_shape) != len(out_shape):
            raise ChannelError("expand adds dims to a parameter")
        return v
    x = _tc(b, node.args[0]).offset_dims(len(out_shape) - len(in_shape))
    if any(out_shape[d] != in_shape[d - (len(out_shape) - len(in_shape))] for d in x.dims):
        raise ChannelError("expand changes a channel dim")
    return x


@register(torch.stack)
def _stack(b: Builder, node: fx.Node, m: object) -> TensorChannels:
    """Stack along a new dim: the inputs' channels correspond position by position (a
    selective kernel's paths are summed after), so they are unioned, and the new dim, one
    copy per input, never shrinks."""
    inputs = list(_arg(node, 0, "tensors"))
    nd = len(_shape(node))
    d = _dim(int(_arg(node, 1, "dim", 0)), nd)
    values = [_tc(b, a) for a in inputs]
    first = values[0]
    for v in values[1:]:
        if v.dims != first.dims or v.atoms.shape != first.atoms.shape:
            raise ChannelError("stack of tensors whose channels differ")
        b.uf.union_arrays(first.atoms, v.atoms)
    if not first.dims:
        opaque = any(v.opaque for v in values)
        return TensorChannels.unknown() if opaque else TensorChannels.free()
    shifted = [e + (e >= d) for e in first.dims]
    dims = tuple(sorted([*shifted, d]))
    atoms = np.stack([v.atoms for v in values], axis=dims.index(d))
    return first.with_dims(dims, atoms).marked_nonzero(any(v.nonzero_when_zeroed for v in values))
