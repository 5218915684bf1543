"""Channel rules of attention: ``matmul``/``@``, ``F.scaled_dot_product_attention``, ``unbind``.

A qkv Linear reshaped to (..., 3, heads, head_dim) carries its channels on a grid, and the
reshape rule lets the grid shrink along one dim only, so the kept channels stay a grid:

- **Head dims** (the default): each head-dim column is tied across every head (and across q,
  k, v), so a channel of the group is "position j of every head". The heads dim is then a
  batch dim whose slices all hold the same channels, which attention passes through.
  Removing q_j and k_j removes a term of every score sum q·k (both zero when zeroed, so the
  scores do not change) and v_j a zero column of the output, then the matching input
  column of the output projection.
- **Whole heads** (``prune_whole_heads``): each head's slice is tied into one channel: its q,
  k and v rows and its input columns of the output projection. The heads dim is a batch dim
  that shrinks: a batched matmul (or attention) unites head h of both operands, and its
  output carries head h too. A zeroed head has zero v, so its output is zero (its scores
  are uniform after softmax, times zero values), and removing it is exact.

How they shrink: weights are sliced through the sites of the Linear layers; reshape sizes
follow (prune_channels); ``scaled_dot_product_attention`` without an explicit ``scale`` gets
the dense model's 1/sqrt(head_dim) baked in (``_shrink_sdpa``), since its default would follow
the pruned head dim.
"""

from __future__ import annotations

import operator

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx

from graphprune.analysis.atoms import ChannelError, TensorChannels
from graphprune.analysis.builder import Builder
from graphprune.analysis.rules import Shrink, _arg, _dim, _shape, _tc, register


def _fixed_along(b: Builder, x: TensorChannels, d: int) -> bool:
    """True when every slice of ``x`` along dim ``d`` holds the same channel classes, so no
    plan can remove a position of ``d`` (it would empty every slice at once)."""
    if d not in x.dims or len(x.dims) < 2:
        return False
    axis = x.dims.index(d)
    roots = b.uf.roots()
    slices = [np.take(x.atoms, i, axis=axis).reshape(-1) for i in range(x.atoms.shape[axis])]
    first = set(roots[slices[0]].tolist())
    return all(set(roots[s].tolist()) == first for s in slices[1:])


def _shrinking_batch_dims(b: Builder, *xs: TensorChannels, batch: set[int]) -> set[int]:
    """Batch dims along which some operand's channels differ per slice (whole heads)."""
    return {d for x in xs for d in x.dims if d in batch and not _fixed_along(b, x, d)}


def _one_per_slice(b: Builder, x: TensorChannels, d: int) -> np.ndarray:
    """Tie each slice of ``x`` along dim ``d`` into one channel; one atom per slice."""
    axis = x.dims.index(d)
    rows = np.moveaxis(x.atoms, axis, 0).reshape(x.atoms.shape[axis], -1)
    b.uf.tie_rows(rows)
    return rows[:, 0]


def _per_head_matmul(
    b: Builder, a: TensorChannels, c: TensorChannels, heads: set[int], nd: int
) -> TensorChannels:
    """A batched matmul whose batch dim shrinks (whole heads): slice h of the output is
    a[h] @ c[h], so head h of both operands and of the output is one channel, zero when
    either operand's slice is zero."""
    if len(heads) != 1:
        raise ChannelError("matmul with channels on more than one batch dim")
    (d,) = heads
    if d not in a.dims or d not in c.dims:
        raise ChannelError("matmul: a batch dim that could shrink has channels on one side only")
    ha, hc = _one_per_slice(b, a, d), _one_per_slice(b, c, d)
    if len(ha) != len(hc):
        raise ChannelError("matmul: the operands' heads differ in number")
    b.uf.union_arrays(ha, hc)
    zero = not (a.nonzero_when_zeroed and c.nonzero_when_zeroed)
    # Channels on the left's rows (M) or the right's columns (N) pass on with the heads;
    # contracted ones (the left's last dim, the right's second-to-last) are in the same
    # head slice, so removing the head removes them.
    a_out, c_out = set(a.dims) - {d, nd - 1}, set(c.dims) - {d, nd - 2}
    if a_out and c_out:
        raise ChannelError("both matmul operands carry channels besides the heads")
    if c_out and nd - 2 not in c.dims:
        return c.marked_nonzero(not zero)
    if a_out and nd - 1 not in a.dims:
        return a.marked_nonzero(not zero)
    if a_out or c_out:
        raise ChannelError("matmul passes on channels of an operand it also contracts")
    return TensorChannels((d,), ha, a.opaque or c.opaque, not zero)


@register(operator.matmul, torch.matmul, torch.bmm, "matmul", "bmm")
def _matmul(b: Builder, node: fx.Node, m: object) -> TensorChannels:
    """(..., M, K) @ (..., K, N): channels contracted over K must be the same on both sides
    (q_j meets k_j); channels on M (rows of the left) or N (columns of the right) pass on."""
    left, right = _tc(b, node.args[0]), _tc(b, node.args[1])
    sa, sb, so = _shape(node.args[0]), _shape(node.args[1]), _shape(node)
    if len(sa) < 2 or len(sb) < 2:
        raise ChannelError("matmul with a vector operand")
    nd = len(so)
    a, c = left.offset_dims(nd - len(sa)), right.offset_dims(nd - len(sb))
    batch = set(range(nd - 2))
    heads = _shrinking_batch_dims(b, a, c, batch=batch)
    if heads:
        return _per_head_matmul(b, a, c, heads, nd)
    # In output coordinates: the left's K is at nd - 1, the right's K at nd - 2.
    a_k, c_k = nd - 1 in a.dims, nd - 2 in c.dims
    if a_k != c_k:
        raise ChannelError("matmul contracts channels with content that is not those channels")
    if a_k:
        a_rest = tuple(d for d in a.dims if d != nd - 1)
        c_rest = tuple(d for d in c.dims if d != nd - 2)
        if a_rest != c_rest or a.atoms.shape != c.atoms.shape or not set(a_rest) <= batch:
            raise ChannelError("matmul contracts channels laid out differently on each side")
        b.uf.union_arrays(a.atoms, c.atoms)
        return TensorChannels.free()
    if a.dims and c.dims:
        if a.dims != c.dims or a.atoms.shape != c.atoms.shape or not set(a.dims) <= batch:
            raise ChannelError("both matmul operands carry channels on different dims")
        b.uf.union_arrays(a.atoms, c.atoms)
        return a.marked_nonzero(a.nonzero_when_zeroed and c.nonzero_when_zeroed)
    x = a if a.dims else c
    if not x.dims:
        opaque = a.opaque or c.opaque
        return TensorChannels.unknown() if opaque else TensorChannels.free()
    return x  # its batch dims, if any carry channels, hold the same ones in every slice


def _shrink_sdpa(s: Shrink, node: fx.Node, m: object) -> None:
    """Keep the dense 1/sqrt(E) scale when q's last dim (E) is pruned and no scale was given."""
    x = s.value(node.args[0])
    if not isinstance(x, TensorChannels) or _arg(node, 6, "scale") is not None:
        return
    e = _shape(node.args[0])[-1]
    if x.dims and x.dims[-1] == len(_shape(node.args[0])) - 1 and s.removed[x.atoms].any():
        node.kwargs = {**node.kwargs, "scale": float(e) ** -0.5}


@register(F.scaled_dot_product_attention, shrink=_shrink_sdpa)
def _sdpa(b: Builder, node: fx.Node, m: object) -> TensorChannels:
    """softmax(q kᵀ · scale + mask) v over (..., L, E) q/k and (..., S, Ev) v."""
    q, k, v = (_tc(b, a) for a in node.args[:3])
    nd = len(_shape(node))
    batch = set(range(nd - 2))
    mask = _arg(node, 3, "attn_mask")
    mask_value = b.value(mask)  # None also for an unused optional input (timm's attn_mask)
    if isinstance(mask_value, TensorChannels) and mask_value.carries:
        raise ChannelError("attention mask carries channels")
    for x in (q, k, v):
        if (nd - 2) in x.dims:
            raise ChannelError("channels on the sequence dim of attention")
    if q.dims or k.dims:
        if q.dims != k.dims or q.atoms.shape != k.atoms.shape or nd - 1 not in q.dims:
            raise ChannelError("q and k carry channels differently")
        b.uf.union_arrays(q.atoms, k.atoms)
    heads = _shrinking_batch_dims(b, q, v, batch=batch)
    if heads:  # whole heads: head h of q, k and v is one channel; a zero v zeroes its output
        (d,) = heads if len(heads) == 1 else (None,)
        if d is None or any(d not in x.dims for x in (q, k, v)):
            raise ChannelError("attention heads carry channels in some of q, k, v only")
        b.uf.union_arrays(_one_per_slice(b, q, d), _one_per_slice(b, v, d))
    return v


@register(torch.unbind, "unbind")
def _unbind(b: Builder, node: fx.Node, m: object) -> list[TensorChannels]:
    x = _tc(b, node.args[0])
    s = _shape(node.args[0])
    d = _dim(int(_arg(node, 1, "dim", 0)), len(s))
    if d not in x.dims:
        return [x.without_dims([d])] * s[d]
    if not _fixed_along(b, x, d):
        raise ChannelError("unbind along a channel dim that could shrink")
    axis = x.dims.index(d)
    dims = tuple(e - (e > d) for e in x.dims if e != d)
    return [x.with_dims(dims, np.take(x.atoms, i, axis=axis)) for i in range(s[d])]
