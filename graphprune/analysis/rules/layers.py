"""Entries of layers with parameters: conv, linear, norms, PReLU.

Their sites (weights, biases, norm parameters and statistics) are sliced generically by
prune_channels; each shrink function only makes the module's attributes agree.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from graphprune.analysis.atoms import ChannelError, TensorChannels
from graphprune.analysis.builder import Builder, MacLayer
from graphprune.analysis.rules import Shrink, _shape, _tc, register


# --- layers that create channels --------------------------------------------------------------
def _shrink_conv(s: Shrink, node: fx.Node, m: nn.modules.conv._ConvNd) -> None:
    """in/out channels and groups from the sliced weight (a depthwise conv stays depthwise).

    A grouped conv loses whole groups, or (``_groups_split_later``) the same positions in
    every group, when no group's outputs all go: then the groups count stays."""
    w = m.weight.shape
    out = s.value(node)
    if m.groups > 1 and not m.transposed and isinstance(out, TensorChannels) and out.dims:
        gone = s.removed[out.atoms].reshape(m.groups, -1)
        if not gone.all(axis=1).any():
            m.in_channels, m.out_channels = w[1] * m.groups, w[0]
            return
    if m.transposed:
        m.groups = m.groups * w[0] // m.in_channels if m.groups > 1 else 1
        m.in_channels, m.out_channels = w[0], w[1] * m.groups
    else:
        m.groups = m.groups * w[0] // m.out_channels if m.groups > 1 else 1
        m.in_channels, m.out_channels = w[1] * m.groups, w[0]


@register(
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    shrink=_shrink_conv,
)
def _conv(b: Builder, node: fx.Node, m: nn.Module) -> TensorChannels:
    x = _tc(b, node.args[0])
    t = str(node.target)
    transposed = isinstance(m, nn.modules.conv._ConvTransposeNd)
    in_axis, out_axis = (0, 1) if transposed else (1, 0)
    cout, g = m.out_channels, m.groups
    kind = "producer" if g == 1 else "grouped"
    out = b.fresh(cout, t, kind)
    x_atoms = x.along(1) if 1 in x.dims else None
    _consumes(b, node, x)
    if g == 1:
        if x_atoms is not None:
            b.site(f"{t}.weight", in_axis, x_atoms, "in")
        b.site(f"{t}.weight", out_axis, out, "out")
        b.mac_layers.append(_mac(t, x_atoms, out))
    elif x_atoms is not None and not transposed and _groups_split_later(node, g, cout):
        # Positions within groups are the unit: position j of every group goes together, on
        # the input side and on the output side (each side its own classes).
        b.uf.tie_rows(x_atoms.reshape(g, -1).T)
        b.uf.tie_rows(out.reshape(g, -1).T)
        b.site(f"{t}.weight", 1, x_atoms.reshape(g, -1)[0], "in")
        b.site(f"{t}.weight", 0, out, "out")
        b.mac_layers.append(_mac(t, x_atoms, out))
    else:
        # Whole conv groups are the unit: tie each group's input and output channels.
        if x_atoms is None:
            b.block(out, f"{t}: grouped conv whose input channels are unknown")
        else:
            b.uf.tie_rows(np.concatenate([x_atoms.reshape(g, -1), out.reshape(g, -1)], axis=1))
            b.site(f"{t}.weight", 0, x_atoms if transposed else out, "in" if transposed else "out")
        b.mac_layers.append(_mac(t, None, out))
    if m.bias is not None:
        b.site(f"{t}.bias", 0, out, "out")
    return TensorChannels((1,), out)


# Ops between a grouped conv and a view of its groups that keep every channel where it is.
_SAME_PLACE = (nn.modules.batchnorm._BatchNorm, nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Identity)
_SAME_PLACE += (nn.Hardswish, nn.LeakyReLU, nn.Dropout, nn.Dropout2d)
_SAME_PLACE_FN = {F.relu, torch.relu, F.relu6, F.silu, F.gelu, F.hardswish, F.dropout, "relu"}


def _groups_split_later(node: fx.Node, groups: int, cout: int) -> bool:
    """True when the conv's output, through norms and activations, is viewed as
    (batch, groups, cout // groups, ...): a split-attention (radix) block or a channel
    shuffle. That view ties position j across the groups, so whole groups could never go;
    pruning the same positions in every group instead is also exact and keeps the block
    prunable. A choice between two exact partitions: correctness does not depend on it."""
    frontier, seen = [node], 0
    while frontier and seen < 16:
        n = frontier.pop()
        seen += 1
        for user in n.users:
            if user.op == "call_method" and user.target in ("view", "reshape"):
                shape = _shape(user)
                if len(shape) > 2 and tuple(shape[1:3]) == (groups, cout // groups):
                    return True
            elif user.args[:1] != (n,):
                continue
            elif user.op == "call_module":
                if isinstance(user.graph.owning_module.get_submodule(user.target), _SAME_PLACE):
                    frontier.append(user)
            elif user.op in ("call_function", "call_method") and user.target in _SAME_PLACE_FN:
                frontier.append(user)
    return False


def _consumes(b: Builder, node: fx.Node, x: TensorChannels) -> None:
    """A layer reading channels that are not zero when their producers are zeroed: removing
    them changes this layer's output, so their groups are not exact."""
    if x.nonzero_when_zeroed and x.dims:
        b.mark_inexact(
            x.all_atoms(),
            f"{node.name}: reads channels that an earlier op (sigmoid, non-affine norm, "
            "+constant, ...) makes non-zero even when zeroed",
        )


def _mac(target: str, in_atoms: np.ndarray | None, out_atoms: np.ndarray) -> MacLayer:
    return MacLayer(target, in_atoms, out_atoms)


def _shrink_linear(s: Shrink, node: fx.Node, m: nn.Linear) -> None:
    m.out_features, m.in_features = m.weight.shape


@register(nn.Linear, shrink=_shrink_linear)
def _linear(b: Builder, node: fx.Node, m: nn.Linear) -> TensorChannels:
    x = _tc(b, node.args[0])
    t = str(node.target)
    last = len(_shape(node)) - 1
    out = b.fresh(m.out_features, t, "producer")
    if x.dims and x.dims != (last,):
        raise ChannelError("linear over a tensor with channels on other dims than the last")
    in_atoms = x.atoms if x.dims else None
    _consumes(b, node, x)
    if in_atoms is not None:
        b.site(f"{t}.weight", 1, in_atoms, "in")
    b.site(f"{t}.weight", 0, out, "out")
    if m.bias is not None:
        b.site(f"{t}.bias", 0, out, "out")
    b.mac_layers.append(_mac(t, in_atoms, out))
    return TensorChannels((last,), out)


# --- normalization --------------------------------------------------------------------------
def _shrink_batchnorm(s: Shrink, node: fx.Node, m: nn.Module) -> None:
    kept = s.kept(s.value(node.args[0]), 1)
    if kept is not None:
        m.num_features = kept


@register(
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    shrink=_shrink_batchnorm,
)
def _batchnorm(b: Builder, node: fx.Node, m: nn.Module) -> TensorChannels:
    x = _tc(b, node.args[0])
    if 1 not in x.dims:
        return x
    atoms = x.along(1)
    t = str(node.target)
    for name, tensor in list(m.named_parameters(recurse=False)) + list(
        m.named_buffers(recurse=False)
    ):
        if tensor is not None and tensor.dim() == 1 and tensor.numel() == len(atoms):
            b.site(f"{t}.{name}", 0, atoms, "out" if name in ("weight", "bias") else "stat")
    if getattr(m, "affine", False):
        return x.marked_nonzero(False)  # zeroed γ and β give exactly zero
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return x.marked_nonzero(True)  # a zero channel comes out as -μ/σ
    return x  # instance norm maps a constant channel to zero; keeps what came in


def _shrink_groupnorm(s: Shrink, node: fx.Node, m: nn.GroupNorm) -> None:
    """Whole groups go (analysis tied them), so channels per group stay the same; one group
    stays one group."""
    kept = s.kept(s.value(node.args[0]), 1)
    if kept is not None and kept != m.num_channels:
        if m.num_groups > 1:
            m.num_groups = m.num_groups * kept // m.num_channels
        m.num_channels = kept


@register(nn.GroupNorm, shrink=_shrink_groupnorm)
def _groupnorm(b: Builder, node: fx.Node, m: nn.GroupNorm) -> TensorChannels:
    x = _tc(b, node.args[0])
    if 1 not in x.dims:
        return x
    atoms = x.along(1)
    t = str(node.target)
    if m.num_groups == 1:
        # One group (timm's GroupNorm1, the channels-first LayerNorm of PoolFormer): any
        # channel can go, like LayerNorm's, but the statistics change: inexact.
        b.mark_inexact(atoms, f"{t}: GroupNorm statistics include every channel")
    else:
        # Statistics are per group: only whole groups can go without changing the others.
        b.uf.tie_rows(atoms.reshape(m.num_groups, -1))
    if m.affine:
        b.site(f"{t}.weight", 0, atoms, "out")
        b.site(f"{t}.bias", 0, atoms, "out")
    else:
        b.block(atoms, f"{t}: GroupNorm without affine parameters")
    return x.marked_nonzero(False)


def _shrink_layernorm(s: Shrink, node: fx.Node, m: nn.LayerNorm) -> None:
    if m.weight is not None:
        m.normalized_shape = tuple(m.weight.shape)


@register(nn.LayerNorm, shrink=_shrink_layernorm)
def _layernorm(b: Builder, node: fx.Node, m: nn.LayerNorm) -> TensorChannels:
    x = _tc(b, node.args[0])
    nd = len(_shape(node))
    normed = list(range(nd - len(m.normalized_shape), nd))
    hit = [d for d in x.dims if d in normed]
    if not hit:
        return x
    t = str(node.target)
    if len(hit) > 1 or m.weight is None:
        raise ChannelError("LayerNorm over several channel dims or without affine weight")
    atoms = x.along(hit[0])
    axis = normed.index(hit[0])
    b.site(f"{t}.weight", axis, atoms, "out")
    if m.bias is not None:
        b.site(f"{t}.bias", axis, atoms, "out")
    b.mark_inexact(atoms, f"{t}: LayerNorm statistics include every channel")
    return x.marked_nonzero(False)


def _shrink_prelu(s: Shrink, node: fx.Node, m: nn.PReLU) -> None:
    m.num_parameters = m.weight.numel()


@register(nn.PReLU, shrink=_shrink_prelu)
def _prelu(b: Builder, node: fx.Node, m: nn.PReLU) -> TensorChannels:
    x = _tc(b, node.args[0])
    if m.num_parameters > 1 and 1 in x.dims:
        b.site(f"{node.target}.weight", 0, x.along(1), "out")
    return x


# --- recurrent layers -----------------------------------------------------------------------
def _shrink_rnn(s: Shrink, node: fx.Node, m: nn.RNNBase) -> None:
    """input_size from the sliced first-layer weights; the module's cached list of weight
    tensors is rebuilt, else its forward would still run the old ones."""
    m.input_size = m.weight_ih_l0.shape[1]
    m._init_flat_weights()


@register(nn.LSTM, nn.GRU, nn.RNN, shrink=_shrink_rnn)
def _rnn(b: Builder, node: fx.Node, m: nn.RNNBase) -> list:
    """A recurrent layer consumes its input's features; its hidden units stay.

    The input features enter only the first layer's input weights (``weight_ih_l0`` and, if
    bidirectional, ``weight_ih_l0_reverse``, along axis 1): a removed feature is a removed
    column there, exact when the feature is zero. The hidden units (outputs, ``h_n``,
    ``c_n``) feed the recurrence itself and are not pruned. Timm's Sequencer runs a BiLSTM
    over each row and column of a feature map; with this rule the channels around it prune.

    MACs: per step and direction, a layer multiplies ``gates * hidden`` rows by its input
    plus its hidden state. Only the first layer's input width scales with pruning, so the
    MAC model pairs the input's atoms with as many fixed ones as the rest of the columns
    (``hidden`` of layer 0, ``(directions + 1) * hidden`` of each further layer).
    """
    x = _tc(b, node.args[0])
    t = str(node.target)
    if m.proj_size or len(node.args) > 1 or node.kwargs:
        # Projected LSTMs and a given initial state: their widths are not modelled here.
        return b.unknown(node, "recurrent layer with proj_size or an initial state")
    shape = _shape(node.args[0])
    last = len(shape) - 1
    if x.dims and x.dims != (last,):
        raise ChannelError("recurrent layer over a tensor with channels off the feature dim")
    _consumes(b, node, x)
    directions = 2 if m.bidirectional else 1
    reason = f"{t}: hidden units of a recurrent layer are not pruned"
    out = b.fresh(directions * m.hidden_size, t, "producer")
    b.block(out, reason)
    state = [b.fresh(m.hidden_size, t, "producer") for _ in (0, 1)]
    for atoms in state:
        b.block(atoms, reason)
    # Output, h_n and c_n have the input's number of dims, features last.
    states = [TensorChannels((last,), a) for a in state]
    fixed = b.fresh(m.hidden_size * (1 + (m.num_layers - 1) * (directions + 1)), t, "producer")
    b.block(fixed, reason)
    if x.dims:
        for suffix in ("", "_reverse")[:directions]:
            b.site(f"{t}.weight_ih_l0{suffix}", 1, x.atoms, "in")
        b.mac_layers.append(_mac(t, np.concatenate([x.atoms, fixed]), out))
    else:
        b.mac_layers.append(_mac(t, None, out))
    return [TensorChannels((last,), out), states if isinstance(m, nn.LSTM) else states[0]]
