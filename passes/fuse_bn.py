"""fuse_bn: fold an inference-mode BatchNorm into the convolution that feeds it."""

from __future__ import annotations

import torch
from torch import fx, nn

from graphprune.analysis.rules import treated_as
from graphprune.passes.runner import PassResult, graph_pass


@graph_pass(preserves_outputs=True)
def fuse_bn(gm: fx.GraphModule) -> PassResult:
    """Merge each BatchNorm that directly follows a convolution into that convolution.

    Requires: the conv is called once and its output is used by the BatchNorm only (else the
    pair is left alone).
    Effects:  conv(K, b) -> BN(γ, β, μ, σ)  becomes  conv(γ/σ·K, (b − μ)·γ/σ + β); BN nodes go.
    """
    fused = 0
    calls: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            calls[str(n.target)] = calls.get(str(n.target), 0) + 1
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        bn = gm.get_submodule(node.target)
        src = node.args[0]
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or src.op != "call_module":
            continue
        conv = gm.get_submodule(src.target)
        # A conv called at several nodes shares its weights; folding one BN would change all.
        if not _fusable(conv, bn) or len(src.users) != 1 or calls[str(src.target)] != 1:
            continue
        _fold_into(conv, bn)
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
        fused += 1
    if fused:
        gm.delete_all_unused_submodules()
    return PassResult(gm, fused > 0, {"fused": fused})


def _fusable(conv: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> bool:
    # Exact classes (or declared equivalents): a subclass may standardize or quantize its
    # weight in forward, and a scaled weight would then compute something else.
    return (
        treated_as(conv) in (nn.Conv1d, nn.Conv2d, nn.Conv3d)
        and treated_as(bn) is nn.modules.batchnorm._BatchNorm
        and bn.running_mean is not None
        and conv.out_channels == bn.num_features
    )


@torch.no_grad()
def _fold_into(conv: nn.modules.conv._ConvNd, bn: nn.modules.batchnorm._BatchNorm) -> None:
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    new_bias = bias * scale + shift
    # A new Parameter, not an in-place update: a weight tied to another conv must not change.
    weight = conv.weight * scale.view(-1, *([1] * (conv.weight.dim() - 1)))
    conv.weight = nn.Parameter(weight.detach(), conv.weight.requires_grad)
    conv.bias = nn.Parameter(new_bias.to(conv.weight.dtype))
