"""No silent shortfall: compress reaches the MACs target (within 0.01, measured by
FlopCounterMode) or raises PlanError saying what blocks more. One small model per cause of
a past shortfall: a member that sees only some of its group's channels, and MACs outside
every prunable layer."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torch import nn

import graphprune as gp
from graphprune.analysis import build_channel_graph
from graphprune.errors import PlanError, TargetMissedError
from graphprune.planning.macs import UNATTRIBUTED, MacsReport
from graphprune.planning.selection import (
    MacsModel,
    l2_scores,
    normalized,
)
from graphprune.planning.target import TOLERANCE, check_reached
from graphprune.testing.zoo import ZOO, ZOO_INPUT_SHAPE, UnknownOp


def _ratio(model: nn.Module, pruned: nn.Module, x: torch.Tensor) -> float:
    return gp.count_macs(pruned, (x,)).macs / gp.count_macs(model, (x,)).macs


class SplitHeavy(nn.Module):
    """One conv's channels split into a half read by a heavy conv and a half read by a light
    one (the shape of ShuffleNet's and Res2Net's splits). Channels 8..15 have small weights, so
    a magnitude plan drops them first, and they only feed the light conv: the MACs fall far
    less than "fraction of the group kept" predicts."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.heavy = nn.Conv2d(8, 32, 3, padding=1)
        self.light = nn.Conv2d(8, 4, 1)
        self.fc = nn.Linear(36, 10)
        with torch.no_grad():
            self.conv.weight[8:] *= 0.01
            self.conv.bias[8:] *= 0.01

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.conv(x).split(8, dim=1)
        y = torch.cat([self.heavy(a), self.light(b)], dim=1)
        return self.fc(y.mean((2, 3)))


class _Matmul(torch.autograd.Function):
    """A custom Function: kept as one opaque call, its matmul counted but never modelled."""

    @staticmethod
    def forward(ctx, y, w):
        return y @ w.t()

    @staticmethod
    def backward(ctx, grad):
        raise NotImplementedError


class OpaqueLinear(nn.Module):
    """A third of the MACs in an opaque call no channel group shrinks: the target is a
    fraction of all MACs, not of the prunable layers' MACs. (A plain F.linear on a parameter
    would become a module and be pruned: frontend.functional_layers.)"""

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU()
        )
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.proj = nn.Parameter(torch.randn(4096, 32 * 16) * 0.01)
        self.fc = nn.Linear(4096, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pool(self.convs(x)).flatten(1)
        return self.fc(_Matmul.apply(y, self.proj))


X = torch.randn(1, 3, 16, 16)


@pytest.mark.parametrize("keep", [9, 12, 14])
def test_subset_members_are_counted_by_which_channels_are_kept(keep: int) -> None:
    from graphprune.passes import prune_channels

    torch.manual_seed(0)
    gm = gp.trace(SplitHeavy().eval(), (X,))
    graph = build_channel_graph(gm)
    layer_macs = gp.count_macs(gm, (X,)).per_layer
    scores = normalized(l2_scores(gm, graph))
    (gid,) = [g.id for g in graph.groups if g.producers == ("conv",)]
    ranking = np.argsort(-scores[gid], kind="stable")
    assert set(ranking[:8].tolist()) == set(range(8))  # the heavy half ranks first
    predicted = MacsModel(graph, layer_macs, scores)
    predicted.set_kept(gid, keep)
    uniform = MacsModel(graph, layer_macs)
    uniform.set_kept(gid, keep)
    # Brute force: keep the best `keep` channels, prune, count with FlopCounterMode.
    prune_channels(gm, plan={gid: np.sort(ranking[:keep])}, round_to=1)
    measured = gp.count_macs(gm, (X,)).macs
    assert predicted.macs == pytest.approx(measured, rel=1e-9)
    assert uniform.macs != pytest.approx(measured, rel=1e-3)  # an average would be wrong


@pytest.mark.parametrize("round_to", [1, 8])
def test_compress_reaches_the_target_with_subset_members(round_to: int) -> None:
    torch.manual_seed(0)
    model = SplitHeavy().eval()
    result = gp.compress(model, example_inputs=(X,), flops_target=0.5, round_to=round_to)
    assert _ratio(model, result.model, X) <= 0.5 + TOLERANCE


def test_macs_outside_modules_count_toward_the_dense_total() -> None:
    torch.manual_seed(0)
    model = OpaqueLinear().eval()
    report = gp.count_macs(model, (X,))
    assert sum(report.per_layer.values()) == report.macs
    assert report.per_layer[UNATTRIBUTED] == 4096 * 32 * 16  # the functional linear, by hand
    result = gp.compress(model, example_inputs=(X,), flops_target=0.6, round_to=1)
    assert _ratio(model, result.model, X) <= 0.6 + TOLERANCE
    assert result.report.macs_ratio == pytest.approx(_ratio(model, result.model, X))


def test_unreachable_target_names_the_floor_and_what_blocks() -> None:
    torch.manual_seed(0)
    with pytest.raises(PlanError) as err:
        gp.compress(OpaqueLinear().eval(), example_inputs=(X,), flops_target=0.2)
    msg = str(err.value)
    floor = float(re.search(r"(\d\.\d+) of the dense MACs remain", msg).group(1))
    assert 0.2 < floor < 1
    assert "outside any prunable conv/linear" in msg


def test_blocked_layers_are_named_with_their_reason() -> None:
    torch.manual_seed(0)
    x = torch.randn(ZOO_INPUT_SHAPE)
    with pytest.raises(PlanError) as err:
        gp.compress(UnknownOp().eval(), example_inputs=(x,), flops_target=0.05)
    assert "cumsum" in str(err.value) and "of the MACs sit in layers" in str(err.value)


def test_check_reached_refuses_a_shortfall_and_states_the_ratio() -> None:
    torch.manual_seed(0)
    gm = gp.trace(SplitHeavy(), (X,))
    graph = build_channel_graph(gm)
    dense = MacsReport(macs=1000, params=0, per_layer={"heavy": 1000})
    assert check_reached(0.5, dense, MacsReport(510, 0, {}), graph) == 0.51
    with pytest.raises(PlanError, match="keeps 0.520 of the dense MACs"):
        check_reached(0.5, dense, MacsReport(520, 0, {}), graph)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_every_zoo_model_reaches_half_or_refuses(name: str) -> None:
    torch.manual_seed(0)
    model = ZOO[name]().eval()
    x = torch.randn(ZOO_INPUT_SHAPE)
    try:
        result = gp.compress(model, example_inputs=(x,), flops_target=0.5)
    except PlanError as exc:
        assert "What limits pruning" in str(exc) or "no prunable channel group" in str(exc)
        return
    except gp.TraceError:
        assert name == "untraceable"
        return
    assert _ratio(model, result.model, x) <= 0.5 + TOLERANCE
    assert np.isclose(result.report.macs_ratio, _ratio(model, result.model, x))


def test_a_trained_methods_shortfall_is_an_error_that_keeps_the_trained_model() -> None:
    torch.manual_seed(0)
    gm = gp.trace(SplitHeavy(), (X,))
    graph = build_channel_graph(gm)
    dense = MacsReport(macs=1000, params=0, per_layer={"heavy": 1000})
    kept = object()
    with pytest.raises(TargetMissedError, match="keeps 0.700 .* train longer") as info:
        check_reached(0.5, dense, MacsReport(700, 0, {}), graph, trained=True, result=kept)
    assert info.value.result is kept
    assert isinstance(info.value, PlanError)  # callers catching PlanError still catch it
    assert check_reached(0.5, dense, MacsReport(505, 0, {}), graph, trained=True) == 0.505


def test_compress_raises_a_resrep_shortfall_with_the_trained_model_attached() -> None:
    """ResRep trained too briefly for its masked rows to decay (a schedule that masks at the
    last iteration): compress raises, and the error holds a working pruned model and a report
    stating the reached ratio."""
    from torch.utils.data import DataLoader, TensorDataset

    from graphprune.methods.resrep import ResRepConfig, ResRepSchedule

    torch.manual_seed(0)
    model = ZOO["resnet_basic"]()
    x = torch.randn(ZOO_INPUT_SHAPE)
    data = TensorDataset(torch.randn(32, *ZOO_INPUT_SHAPE[1:]), torch.randint(0, 10, (32,)))
    late = ResRepSchedule(  # masks at iteration 3 of 4: rows have one step to decay
        warmup_iters=3,
        mask_interval=1,
        channels_per_update=10_000,
        penalty=1e-4,
        masked_penalty=1e-4,
        compactor_momentum=0.9,
        mask_until=4,
    )
    with pytest.warns(UserWarning, match="still above fold_threshold"):
        with pytest.raises(TargetMissedError) as info:
            gp.compress(
                model,
                ResRepConfig(flops_target=0.5, schedule=late),
                example_inputs=(x,),
                train_loader=DataLoader(data, batch_size=8),
                epochs=1,
                progress=False,
            )
    result = info.value.result
    assert result.report.macs_ratio > 0.5 + TOLERANCE
    assert result.model(x).shape == model(x).shape
