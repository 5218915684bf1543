"""fold_compactors: merge each ResRep compactor into the convolution that feeds it."""

from __future__ import annotations

import torch
from torch import fx, nn

from graphprune.passes.compactor import Compactor
from graphprune.passes.runner import PassResult, graph_pass


def compactors_follow_dense_convs(gm: fx.GraphModule) -> str | None:
    """Requirement: each compactor's input is a dense, non-transposed conv used only by it
    (fuse_bn has moved any BatchNorm in between into the conv)."""
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), Compactor):
            continue
        src = node.args[0]
        conv = gm.get_submodule(src.target) if src.op == "call_module" else None
        if (
            not isinstance(conv, nn.modules.conv._ConvNd)
            or conv.transposed
            or conv.groups != 1
            or len(src.users) != 1
        ):
            return (
                f"{node.name}: a compactor must directly follow a dense conv used only by it "
                f"(found {src.op} {src.target}); run fuse_bn first"
            )
    return None


@graph_pass(requires=(compactors_follow_dense_convs,), preserves_outputs=True)
def fold_compactors(gm: fx.GraphModule, *, threshold: float = 1e-5) -> PassResult:
    """Merge every compactor into the conv that feeds it; near-zero rows become exact zeros.

    Before: conv(K, b) -> compactor(Q)      After: conv(Q·K, Q·b); compactors disappear.
    Rows of Q with L2 norm below ``threshold`` give all-zero output channels (never every row
    of one compactor), which prune_channels then removes; outputs change only by those rows.
    """
    folded, zeroed = 0, 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), Compactor):
            continue
        src = node.args[0]
        zeroed += _fold(gm.get_submodule(src.target), gm.get_submodule(node.target), threshold)
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
        folded += 1
    if folded:
        gm.delete_all_unused_submodules()
    return PassResult(gm, folded > 0, {"folded": folded, "zeroed_rows": zeroed})


@torch.no_grad()
def _fold(conv: nn.modules.conv._ConvNd, compactor: Compactor, threshold: float) -> int:
    q = compactor.matrix.detach()
    k = conv.weight.detach()
    weight = torch.einsum("oc,c...->o...", q, k)
    if conv.bias is not None:
        bias = q @ conv.bias.detach()
    else:
        bias = torch.zeros(q.shape[0], device=q.device, dtype=q.dtype)
    norms = torch.linalg.vector_norm(q, dim=1)
    dead = norms < threshold
    if dead.all():
        dead[torch.argmax(norms)] = False
    weight[dead] = 0.0
    bias[dead] = 0.0
    conv.weight = nn.Parameter(weight.contiguous())
    conv.bias = nn.Parameter(bias)
    return int(dead.sum())
