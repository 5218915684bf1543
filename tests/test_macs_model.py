"""The planner's MACs model predicts the MACs a plan really leaves (FlopCounterMode).

A layer that reads only part of a group (one half of a split, one branch of a channel
shuffle) loses exactly the channels of that part the plan drops; predicting it from the
group's kept fraction alone made ShuffleNetV2 stop at 0.87 of its MACs when asked for 0.5.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import graphprune as gp
from graphprune import trace
from graphprune.analysis import build_channel_graph
from graphprune.passes import prune_channels
from graphprune.planning.macs import count_macs
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
