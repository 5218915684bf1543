"""Entries of parameter-free elementwise-like ops: activations, pooling and resizing,
arithmetic with broadcasting. None needs a shrink function: channel counts live only in
their inputs."""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from graphprune.analysis.atoms import ChannelError, TensorChannels
from graphprune.analysis.builder import Builder
from graphprune.analysis.rules import (
    ParamValue,
    _arg,
    _dim,
    _shape,
    _tc,
    param_axis,
    param_shape,
    register,
    repeated_along,
)

# --- ops that pass channels through unchanged ---------------------------------------------
# Elementwise ops with f(0) = 0: a zeroed channel stays zero.
_ELEMENTWISE = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Tanh, nn.Hardswish, nn.Hardtanh, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
    nn.Dropout3d, nn.AlphaDropout,
    F.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.gelu, F.silu, F.mish, F.hardswish,
    F.hardtanh, F.dropout, F.dropout2d, torch.relu, torch.tanh, torch.clone, F.tanh,
    "relu", "relu_", "tanh", "contiguous", "clone", "detach", "float", "half", "to", "type_as",
)  # fmt: skip
# Elementwise ops with f(0) != 0: a zeroed channel comes out non-zero.
_NONZERO_AT_ZERO = (
    nn.Sigmoid, nn.Hardsigmoid, nn.Softplus, torch.sigmoid, F.sigmoid, F.hardsigmoid,
    F.softplus, "sigmoid", "sigmoid_", torch.exp, "exp",
)  # fmt: skip


@register(*_ELEMENTWISE)
def _elementwise(b: Builder, node: fx.Node, m: nn.Module | None) -> TensorChannels:
    return _tc(b, node.args[0])


@register(*_NONZERO_AT_ZERO)
def _nonzero_at_zero(b: Builder, node: fx.Node, m: nn.Module | None) -> TensorChannels:
    return _tc(b, node.args[0]).marked_nonzero()


@register(torch.clamp, "clamp", "clamp_")
def _clamp(b: Builder, node: fx.Node, m: object) -> TensorChannels:
    low, high = _arg(node, 1, "min"), _arg(node, 2, "max")
    moves_zero = (isinstance(low, (int, float)) and low > 0) or (
        isinstance(high, (int, float)) and high < 0
    )
    x = _tc(b, node.args[0])
    return x.marked_nonzero() if moves_zero or isinstance(low, fx.Node) else x


@register(operator.pow, torch.pow, "pow")
def _pow(b: Builder, node: fx.Node, m: object) -> TensorChannels:
    """``x ** p`` with a number p (timm's StarReLU squares a ReLU): elementwise; 0 ** p is 0
    for p > 0 only (1 for p = 0, inf below). A tensor exponent or base is not followed."""
    base, exponent = node.args[0], _arg(node, 1, "exponent")
    if not isinstance(base, fx.Node) or not isinstance(exponent, (int, float)):
        return b.unknown(node, "power with a tensor exponent or a number base")
    x = _tc(b, base)
    return x if exponent > 0 else x.marked_nonzero()


_SPATIAL = (
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
    nn.Upsample,
    nn.UpsamplingNearest2d,
    nn.UpsamplingBilinear2d,
    nn.ZeroPad2d,
    nn.ConstantPad1d,
    nn.ConstantPad2d,
    nn.ConstantPad3d,
    nn.ReflectionPad1d,
    nn.ReflectionPad2d,
    nn.ReplicationPad1d,
    nn.ReplicationPad2d,
    F.max_pool1d,
    F.max_pool2d,
    F.max_pool3d,
    F.avg_pool1d,
    F.avg_pool2d,
    F.avg_pool3d,
    F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d,
    F.adaptive_max_pool2d,
    F.interpolate,
    F.pad,
    torch.nn.functional.upsample,
)


@register(*_SPATIAL)
def _spatial(b: Builder, node: fx.Node, m: nn.Module | None) -> TensorChannels:
    """Pooling, resizing, padding: fine as long as no channel dim changes size."""
    x = _tc(b, node.args[0])
    in_shape, out_shape = _shape(node.args[0]), _shape(node)
    if len(in_shape) != len(out_shape) or any(in_shape[d] != out_shape[d] for d in x.dims):
        raise ChannelError(f"changes a channel dim: {in_shape} -> {out_shape}")
    pad_value = getattr(m, "value", None) if m is not None else None
    if node.target is F.pad:
        pad_value = _arg(node, 3, "value", 0)
    return x.marked_nonzero(True) if pad_value not in (None, 0, 0.0) else x


@register(
    nn.Softmax, nn.LogSoftmax, F.softmax, F.log_softmax, torch.softmax, "softmax", "log_softmax"
)
def _softmax(b: Builder, node: fx.Node, m: nn.Module | None) -> TensorChannels:
    x = _tc(b, node.args[0])
    nd = len(_shape(node))
    d = m.dim if m is not None else _arg(node, 1, "dim")
    if d is None or (_dim(int(d), nd) in x.dims and not repeated_along(b, x, _dim(int(d), nd))):
        raise ChannelError("softmax normalizes over channels")
    return x.marked_nonzero()  # a zero channel becomes uniform 1/N


# --- combining tensors ------------------------------------------------------------------------
_ADD = (operator.add, operator.sub, operator.iadd, torch.add, torch.sub, "add", "add_", "sub")
_MUL = (operator.mul, operator.imul, torch.mul, "mul", "mul_")
_DIV = (operator.truediv, torch.div, "div")


@register(*_ADD, *_MUL, *_DIV)
def _binary(b: Builder, node: fx.Node, m: object) -> object:
    """Elementwise with broadcasting: aligned channel dims are the same channels."""
    out_nd = len(_shape(node))
    tensors: list[tuple[TensorChannels, tuple[int, ...]]] = []
    params: list[ParamValue] = []
    for a in node.args[:2]:
        v = b.values.get(a) if isinstance(a, fx.Node) else None
        if isinstance(v, ParamValue):
            params.append(v)
        elif isinstance(v, TensorChannels):
            tensors.append((v.offset_dims(out_nd - len(_shape(a))), _shape(a)))
    if not tensors:
        return TensorChannels.free() if params else None
    x = tensors[0][0] if len(tensors) == 1 else _unify(b, tensors[0], tensors[1], out_nd)
    bound = _bind_params(b, params, x, out_nd)
    return x.marked_nonzero(_nonzero_after(node, tensors, params, bound))


def _bind_params(b: Builder, params: list[ParamValue], x: TensorChannels, out_nd: int) -> int:
    """Parameters broadcast against ``x`` hold producer-side entries of its channels. Returns
    how many did; the others (a scalar, or one varying only off the channel dims) are shared
    by every channel, so zeroing a channel does not zero them."""
    for p in params:
        p_shape = param_shape(b, p)
        for axis, size in enumerate(p_shape):
            d = axis + out_nd - len(p_shape)
            if size > 1 and d in x.dims:
                b.site(p.path, param_axis(p, axis), x.along(d), "out")
    return sum(_per_channel(b, p, x, out_nd) for p in params)


@register(torch.addcmul, "addcmul")
def _addcmul(b: Builder, node: fx.Node, m: object) -> TensorChannels:
    """input + value * t1 * t2 (GRN's bias + weight * (x * Nx)): all operands' channels align."""
    out_nd = len(_shape(node))
    tensors: list[tuple[TensorChannels, tuple[int, ...]]] = []
    params: list[ParamValue] = []
    zero: list[bool] = []  # per operand: is a zeroed channel zero in it?
    for a in node.args[:3]:
        v = b.value(a)
        if isinstance(v, ParamValue):
            params.append(v)
            zero.append(None)  # zero with the channel if its entries are per channel
        elif isinstance(v, TensorChannels):
            tensors.append((v.offset_dims(out_nd - len(_shape(a))), _shape(a)))
            zero.append(v.carries and not v.nonzero_when_zeroed)
        else:
            raise ChannelError("addcmul of a non-tensor operand")
    if not tensors:
        return TensorChannels.free()
    x = tensors[0][0]
    for other in tensors[1:]:
        x = _unify(b, (x, tensors[0][1]), other, out_nd)
    _bind_params(b, params, x, out_nd)
    zero = [
        _per_channel(b, b.value(a), x, out_nd) if z is None else z
        for z, a in zip(zero, node.args[:3], strict=True)
    ]
    return x.marked_nonzero(not (zero[0] and (zero[1] or zero[2])))


def _per_channel(b: Builder, p: ParamValue, x: TensorChannels, out_nd: int) -> bool:
    """Does ``p`` have its own entries for ``x``'s channels (sized along a channel dim)?"""
    shape = param_shape(b, p)
    return any(n > 1 and i + out_nd - len(shape) in x.dims for i, n in enumerate(shape))


def _nonzero_after(node: fx.Node, tensors, params, bound: int) -> bool:
    """Can a zeroed channel be non-zero in the result? (0 + c, 0 / 0, sigmoid(0) * 1, ...)
    ``bound`` of the ``params`` have per-channel entries (zeroed with the channel)."""
    flags = [t.nonzero_when_zeroed for t, _ in tensors]
    carries = [t.carries for t, _ in tensors]
    scalars = [a for a in node.args[:2] if isinstance(a, (int, float))]
    if node.target in _MUL:
        if params:
            return False  # the parameter's own entries for the channel are zeroed
        return (
            all(flags) if all(carries) else any(f for f, c in zip(flags, carries, strict=True) if c)
        )
    if node.target in _DIV:
        # c / x, param / x, x / y and x / param: a zeroed divisor gives inf or nan.
        if len(tensors) == 2:
            return flags[0] or tensors[1][0].carries
        numerator_is_tensor = len(tensors) == 1 and node.args[0] is not None and not params
        return flags[0] if numerator_is_tensor and isinstance(node.args[1], (int, float)) else True
    # addition: a non-zero constant, a parameter shared by all channels (a learnable scalar
    # shift, as timm's LearnableAffineBlock adds) or a tensor without these channels shifts
    # a zero channel
    return (
        any(flags)
        or any(v != 0 for v in scalars)
        or bound < len(params)
        or (len(tensors) == 2 and not all(carries))
    )


def _unify(b: Builder, left, right, out_nd: int) -> TensorChannels:
    (a, a_shape), (c, c_shape) = left, right
    a_full = (1,) * (out_nd - len(a_shape)) + a_shape
    c_full = (1,) * (out_nd - len(c_shape)) + c_shape
    for one, other, other_full in ((a, c, c_full), (c, a, a_full)):
        for d in one.dims:
            if d not in other.dims and other_full[d] > 1:
                raise ChannelError(f"channels on dim {d} meet a tensor with other content there")
    if a.dims and c.dims:
        if a.dims != c.dims or a.atoms.shape != c.atoms.shape:
            raise ChannelError("operands carry channels on different dims")
        b.uf.union_arrays(a.atoms, c.atoms)
        return a
    if a.dims or c.dims:
        return a if a.dims else c
    return TensorChannels.unknown() if (a.opaque or c.opaque) else a


@register("size", "dim", "numel")
def _size(b: Builder, node: fx.Node, m: object) -> None:
    return None
