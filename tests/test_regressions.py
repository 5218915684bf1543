"""Bugs found in review, each pinned by a test that failed before its fix."""

from __future__ import annotations

import copy

import torch
from torch import nn

import graphprune as gp
from graphprune.methods.resrep import ResRepSchedule
from graphprune.passes import cleanup, fuse_bn, prune_channels
from graphprune.testing.exactness import randomize_

X = torch.randn(2, 3, 8, 8)


class SharedConv(nn.Module):
    """One conv called twice, each call with its own BatchNorm (a weight-shared head)."""

    def __init__(self) -> None:
        super().__init__()
        self.c, self.b1, self.b2 = (
            nn.Conv2d(3, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.BatchNorm2d(4),
        )

    def forward(self, x):
        return self.b1(self.c(x)) + self.b2(self.c(x))


def test_fuse_bn_leaves_a_shared_conv_alone() -> None:
    model = randomize_(SharedConv()).eval()
    gm = gp.trace(model, X)
    fuse_bn(gm)
    with torch.no_grad():
        torch.testing.assert_close(gm(X), model(X))


class InPlace(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        y = self.c(x)
        y.relu_()
        return y


def test_cleanup_keeps_in_place_ops_whose_result_is_unused() -> None:
    model = InPlace().eval()
    gm = gp.trace(model, X)
    cleanup(gm)
    with torch.no_grad():
        torch.testing.assert_close(gm(X), model(X))


class ShiftedChain(nn.Module):
    """conv -> non-affine BN -> conv: a zero channel comes out of the BN as -mean/std."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8, affine=False)
        self.b = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        return self.b(self.bn(self.a(x)))


def test_dead_channel_pruning_leaves_inexact_groups_whole() -> None:
    model = randomize_(ShiftedChain()).eval()
    with torch.no_grad():
        model.a.weight[0] = 0.0
    gm = gp.trace(model, X)
    result = prune_channels(gm, round_to=1)
    assert not result.modified
    with torch.no_grad():
        torch.testing.assert_close(gm(X), model(X))


def test_groups_smaller_than_round_to_still_reach_the_target() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(),
        nn.Conv2d(6, 4, 3, padding=1),
    )  # fmt: skip
    result = gp.compress(model, "magnitude", example_inputs=(X[:1],), flops_target=0.5)
    assert result.report.macs_ratio <= 0.5


class Reciprocal(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.b(1.0 / self.a(x))


def test_dividing_by_channels_makes_them_inexact() -> None:
    groups = gp.analyze(gp.trace(Reciprocal(), X))
    (a,) = [g for g in groups if g.producers == ("a",)]
    assert a.prunable and not a.exact


class Unflattened(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.un, self.c = (
            nn.Linear(8, 16),
            nn.Unflatten(1, (16, 1, 1)),
            nn.Conv2d(16, 4, 1),
        )

    def forward(self, x):
        return self.c(self.un(self.fc(x)))


def test_unflatten_channels_are_not_pruned_into_a_broken_model() -> None:
    model = Unflattened().eval()
    x = torch.randn(1, 8)
    groups = gp.analyze(gp.trace(model, x))
    (fc,) = [g for g in groups if g.producers == ("fc",)]
    assert not fc.prunable and any("un" in r for r in fc.reasons)


def test_paper_schedule_builds() -> None:
    s = ResRepSchedule.paper(iters_per_epoch=100)
    assert (s.warmup_iters, s.mask_interval, s.channels_per_update) == (500, 200, 4)
    assert s.penalty == s.masked_penalty == 1e-4 and s.compactor_momentum == 0.99


def test_compress_accepts_a_lone_example_tensor() -> None:
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 4, 1))
    result = gp.compress(model, "magnitude", example_inputs=X, flops_target=0.6, round_to=1)
    assert result.report.macs_ratio <= 0.6


def test_measuring_macs_keeps_each_submodules_mode() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).train()
    model[1].eval()  # a user's frozen BatchNorm
    before = [m.training for m in model.modules()]
    gp.count_macs(model, (X,))
    assert [m.training for m in model.modules()] == before


def test_fold_bias_follows_the_weight_dtype() -> None:
    """Folding a compactor into a bias-free conv builds the new bias like the weight."""
    from graphprune.passes import fold_compactors
    from graphprune.passes.compactor import Compactor

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c = nn.Conv2d(3, 4, 3, padding=1, bias=False).double()
            self.q = Compactor(4).double()

        def forward(self, x):
            return self.q(self.c(x))

    model = Net().eval()
    gm = gp.trace(copy.deepcopy(model), X.double())
    fold_compactors(gm)
    assert gm.c.bias.dtype == torch.float64
    with torch.no_grad():
        torch.testing.assert_close(gm(X.double()), model(X.double()))
