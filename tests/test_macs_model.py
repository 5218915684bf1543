"""The planner's MACs model predicts the MACs a plan really leaves (FlopCounterMode).

A layer that reads only part of a group (one half of a split, one branch of a channel
shuffle) loses exactly the channels of that part the plan drops; predicting it from the
group's kept fraction alone made ShuffleNetV2 stop at 0.87 of its MACs when asked for 0.5.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import graphprune as gp
from graphprune import trace
from graphprune.analysis import build_channel_graph
from graphprune.passes import prune_channels
from graphprune.planning.macs import UNATTRIBUTED, count_macs
from graphprune.planning.selection import MacsModel
from graphprune.testing.exactness import random_plan
from graphprune.testing.zoo import ZOO, ZOO_INPUT_SHAPE


@pytest.mark.parametrize("name", sorted(ZOO))
@pytest.mark.parametrize("seed", [0, 1])
def test_predicted_macs_equal_measured_macs_of_the_pruned_model(name: str, seed: int) -> None:
    torch.manual_seed(0)
    x = torch.randn(ZOO_INPUT_SHAPE)
    gm = trace(ZOO[name]().eval(), (x,))
    graph = build_channel_graph(gm)
    dense = count_macs(gm, (x,))
    plan = random_plan(graph, np.random.default_rng(seed), fraction=0.9, exact_only=False)
    model = MacsModel(graph, dense.per_layer)
    assert model.dense == dense.macs
    for gid, keep in plan.items():
        model.set_kept(gid, np.asarray(keep))
    prune_channels(gm, plan=plan, round_to=1)
    assert model.macs == pytest.approx(count_macs(gm, (x,)).macs, rel=1e-9)


@pytest.mark.parametrize("name", ["shufflenet", "yolo"])
def test_compress_reaches_the_target_on_partial_readers(name: str) -> None:
    torch.manual_seed(0)
    result = gp.compress(
        ZOO[name]().eval(),
        "magnitude",
        example_inputs=(torch.randn(ZOO_INPUT_SHAPE),),
        flops_target=0.5,
        round_to=1,
    )
    assert 0.45 <= result.report.macs_ratio <= 0.5 + 1e-9


class OpaqueMatmul(nn.Module):
    """Two prunable convs, then a per-pixel ``x @ W`` with a raw parameter: no rule follows it
    and no leaf module owns its MACs, over a quarter of the model's."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.w1 = nn.Parameter(torch.randn(16, 64) * 0.1)
        self.w2 = nn.Parameter(torch.randn(64, 16) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(torch.relu(self.conv1(x))).permute(0, 2, 3, 1)
        return ((y @ self.w1) @ self.w2).mean((1, 2))


def test_macs_no_layer_owns_count_toward_the_dense_total() -> None:
    torch.manual_seed(0)
    x = torch.randn(ZOO_INPUT_SHAPE)
    gm = trace(OpaqueMatmul().eval(), (x,))
    dense = count_macs(gm, (x,))
    assert sum(dense.per_layer.values()) == dense.macs
    convs = {"conv1": 3 * 16 * 9 * 32 * 32, "conv2": 16 * 16 * 9 * 32 * 32}
    assert {k: dense.per_layer[k] for k in convs} == convs
    # FlopCounterMode counts the matmul it lowers to mm (what it counts is its business;
    # that it is accounted for is ours)
    assert dense.per_layer[UNATTRIBUTED] == dense.macs - sum(convs.values()) >= 32 * 32 * 16 * 64
    model = MacsModel(build_channel_graph(gm), dense.per_layer)
    assert model.dense == dense.macs and model.macs == dense.macs
    # The planner aims at half of everything, not half of the convs alone (that silently
    # left 0.7 of the MACs), and reaches it by pruning the convs harder.
    result = gp.compress(OpaqueMatmul().eval(), "magnitude", example_inputs=(x,), round_to=1)
    assert result.report.macs_ratio <= 0.5 + 1e-9


class SharedUnderTwoNames(nn.Module):
    """One conv registered at the top and inside a block (timm's CoaT shares its positional
    conv between blocks this way)."""

    def __init__(self) -> None:
        super().__init__()
        self.pos = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.block = nn.Sequential(nn.Conv2d(3, 8, 1), self.pos)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.pos(self.block(x)))


def test_counting_leaves_a_module_shared_under_two_names_untouched() -> None:
    model = SharedUnderTwoNames().eval()
    x = torch.randn(1, 3, 8, 8)
    before = {n: t for n, t in model.state_dict(keep_vars=True).items()}
    report = count_macs(model, (x,))
    assert report.macs == 3 * 8 * 64 + 2 * 8 * 9 * 64  # the 1x1 conv, the shared one twice
    after = model.state_dict(keep_vars=True)
    assert all(after[n] is t and not t.is_meta for n, t in before.items())
    assert model.pos.weight is model.block[1].weight
