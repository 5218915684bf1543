"""CHEX: the column-subset and regrowth math against brute force, the width re-allocation on a
hand-computed example, exact regrowth, the MACs target and exactness on zoo models, and a
resume mid-schedule that ends with the masks of an uninterrupted run."""

from __future__ import annotations

import functools
import itertools

import numpy as np
import pytest
import torch
from torch import nn

import graphprune
from graphprune.frontend.params import get_tensor
from graphprune.frontend.trace import trace
from graphprune.methods.chex import Chex, ChexConfig
from graphprune.methods.chex.css import (
    keep_order,
    leverage_scores,
    pivoted_qr_order,
    projection_residual,
    sample_softmax,
    softmax,
)
from graphprune.planning.macs import count_macs
from graphprune.testing.exactness import randomize_
from graphprune.testing.method_runs import random_loader
from graphprune.testing.zoo import ZOO, ZOO_INPUT_SHAPE

pytestmark = pytest.mark.usefixtures("one_thread")


# --- the math against brute force -----------------------------------------------------------
def _matrix(rows: int, cols: int, rank: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((rows, rank)) @ rng.standard_normal((rank, cols))


@pytest.mark.parametrize("rank, r", [(6, 3), (6, 6), (4, 6)])
def test_leverage_scores_equal_those_of_the_eigenvectors_of_xtx(rank, r):
    x = _matrix(20, 6, rank, seed=rank + r)
    x[:, 2] = 0.0  # a masked channel
    got = leverage_scores(x, r)
    # brute force: V_r are the top eigenvectors of XᵀX (eigenvalues = squared singular values)
    w, v = np.linalg.eigh(x.T @ x)
    rank = np.linalg.matrix_rank(x)  # the zero column took one away when rank was 6
    top = np.argsort(w)[::-1][: min(r, rank)]
    expected = np.sqrt((v[:, top] ** 2).sum(axis=1))
    np.testing.assert_allclose(got, expected, atol=1e-8)
    assert got[2] == pytest.approx(0.0, abs=1e-12)
    assert (got**2).sum() == pytest.approx(min(r, rank))


def test_pivoted_qr_order_matches_lapack():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    x = _matrix(12, 7, 7, seed=3)
    _, _, piv = scipy_linalg.qr(x, pivoting=True)
    np.testing.assert_array_equal(pivoted_qr_order(x), piv)


def test_wide_matrices_fall_back_to_the_l1_norm():
    x = _matrix(3, 6, 3, seed=4)  # 3 features, 6 channels
    order = keep_order(x, 2, "leverage")
    np.testing.assert_array_equal(order, np.argsort(-np.abs(x).sum(axis=0), kind="stable"))


def test_projection_residual_equals_a_least_squares_solve():
    rng = np.random.default_rng(5)
    basis = _matrix(15, 4, 3, seed=6)  # rank-deficient: the pseudo-inverse case
    cands = rng.standard_normal((15, 5))
    cands[:, 0] = basis @ rng.standard_normal(4)  # inside the span: residual 0
    coef, *_ = np.linalg.lstsq(basis, cands, rcond=None)
    expected = np.linalg.norm(cands - basis @ coef, axis=0)
    got = projection_residual(basis, cands)
    np.testing.assert_allclose(got, expected, atol=1e-9)
    assert got[0] == pytest.approx(0.0, abs=1e-9)


def test_regrowth_draws_follow_softmax_without_replacement():
    eps = np.array([0.2, 1.0, 1.7, 0.6])
    p = softmax(eps)
    rng = np.random.default_rng(0)
    n = 40_000
    pairs = np.array([sample_softmax(eps, 2, rng) for _ in range(n)])
    assert (pairs[:, 0] != pairs[:, 1]).all()
    first = np.bincount(pairs[:, 0], minlength=4) / n
    np.testing.assert_allclose(first, p, atol=0.01)
    # the second draw is renormalised over what is left: P(i then j) = p_i p_j / (1 - p_i)
    for i, j in itertools.permutations(range(4), 2):
        freq = np.mean((pairs[:, 0] == i) & (pairs[:, 1] == j))
        assert freq == pytest.approx(p[i] * p[j] / (1 - p[i]), abs=0.01)


# --- width re-allocation by hand ------------------------------------------------------------
class TwoConvs(nn.Module):
    """conv 3->8 (1x1), BN, conv 8->8 (1x1), BN, pool, linear 8->2, on 4x4 inputs:
    MACs = 16·(3a + a·b) + 2b for widths a, b (1424 dense)."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 1, bias=False), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.b2(self.c2(x)))
        return self.fc(x.mean((2, 3)))


def _two_convs(gamma1, gamma2, **options) -> Chex:
    torch.manual_seed(0)
    model = TwoConvs().eval()
    with torch.no_grad():
        model.b1.weight.copy_(torch.tensor(gamma1))
        model.b2.weight.copy_(torch.tensor(gamma2))
    cfg = {"round_to": 1, "min_keep_fraction": 0.0, **options}
    return Chex(trace(model, (torch.randn(1, 3, 4, 4),)), total_iters=10, **cfg)


def _group_of(m: Chex, module: str) -> int:
    (g,) = [g for g in m.masks.groups if m.graph.groups[g].producers == (module,)]
    return g


def test_widths_follow_the_global_gamma_ranking_to_the_macs_target():
    # ranking: A0 (0.01), B0 (-0.02: |γ| counts), A1 (0.03), then all the rest
    g1 = [0.01, 0.03, 1.0, 1.1, 1.2, 1.3, 1.4, 1.5]
    g2 = [-0.02, 0.9, 0.8, 0.7, 0.6, 0.65, 0.75, 0.85]
    m = _two_convs(g1, g2, flops_target=0.69)
    a, b = _group_of(m, "c1"), _group_of(m, "c2")
    scores = m.width_scores()
    np.testing.assert_allclose(scores[a], np.abs(g1), rtol=1e-6)
    np.testing.assert_allclose(scores[b], np.abs(g2), rtol=1e-6)
    # by hand: dropping A0, B0, A1 gives a=6, b=7: 16·(18 + 42) + 14 = 974 <= 0.69·1424 = 982.6;
    # giving one back (a=7: 1134, b=8: 1072) overshoots, so the walk stops there
    m.update(0.0)
    assert (m.masks.keep[a].sum(), m.masks.keep[b].sum()) == (6, 7)
    assert m.masks.macs_fraction(m.layer_macs) == pytest.approx(974 / 1424)
    # Regrow widths come from the eased target 0.69 + 0.5·0.31 = 0.845. The masked A0, A1, B0
    # now score 0 (γ is zeroed) and tie, group A first (a < b): dropping A0 (a=7: 1248 = 0.876)
    # and A1 (a=6, b=8: 1072 = 0.753) reaches it; a=7 again overshoots. So A stays at 6 and B
    # regrows to 8: its one candidate, B0, comes back.
    assert a < b
    m.update(0.5)
    assert (m.masks.keep[a].sum(), m.masks.keep[b].sum()) == (6, 8)
    assert m.masks.keep[b][0] and m.regrown == 1


def test_residual_groups_score_the_mean_over_their_norms():
    class Res(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.b1 = nn.Conv2d(4, 8, 1, bias=False), nn.BatchNorm2d(8)
            self.c2, self.b2 = nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8)
            self.fc = nn.Linear(8, 2)

        def forward(self, x):
            y = self.b1(self.c1(x))
            return self.fc((y + self.b2(self.c2(torch.relu(y)))).mean((2, 3)))

    model = randomize_(Res().eval(), 1)
    m = Chex(trace(model, (torch.randn(1, 4, 4, 4),)), total_iters=4, round_to=1)
    (g,) = [g for g in m.masks.groups if len(m.graph.groups[g].producers) == 2]
    expected = (model.b1.weight.detach().abs() + model.b2.weight.detach().abs()) / 2
    np.testing.assert_allclose(m.width_scores()[g], expected.numpy(), rtol=1e-6)


def test_channels_are_chosen_by_column_subset_selection():
    m = _two_convs([1.0] * 8, [1.0] * 8, flops_target=0.6)
    a = _group_of(m, "c1")
    sel = m.choose(m.width_scores())
    k = len(sel.kept[a])
    assert 1 <= k < 8
    x = m.filters(a)  # c1's weight: 3 features x 8 channels, wide: the L1 fallback
    np.testing.assert_array_equal(x, m.model.c1.weight.detach().double().reshape(8, 3).T)
    top = set(np.argsort(-np.abs(x).sum(0), kind="stable")[:k].tolist())
    assert set(sel.kept[a].tolist()) == top


# --- regrowth is exact ----------------------------------------------------------------------
@torch.no_grad()
def test_regrown_channels_carry_exactly_their_last_weights_and_statistics():
    torch.manual_seed(0)
    model = randomize_(ZOO["resnet_basic"]().eval(), 0)
    m = Chex(trace(model, (torch.randn(ZOO_INPUT_SHAPE),)), flops_target=0.4, total_iters=50)
    before = {k: v.clone() for k, v in m.model.state_dict().items()}
    m.update(0.0)
    masked = {g: ~k.copy() for g, k in m.masks.keep.items()}
    for t in m.model.state_dict().values():  # "training" moves every weight and statistic
        if t.is_floating_point():
            t.add_(torch.randn_like(t))
    m.masks.apply()
    m.iteration = 1
    m.update(0.9)
    regrown = {g: masked[g] & m.masks.keep[g] for g in masked}
    assert sum(int(r.sum()) for r in regrown.values()) > 0
    checked = set()
    for s in m.graph.sites:
        if s.role not in ("out", "stat") or s.atoms.ndim != 1:
            continue
        gids, pos = m.graph.positions(s.atoms)
        for g, r in regrown.items():
            idx = np.nonzero((gids == g) & r[np.minimum(pos, len(r) - 1)])[0]
            if not len(idx):
                continue
            i = torch.from_numpy(idx)
            now = get_tensor(m.model, s.path).index_select(s.axis, i)
            torch.testing.assert_close(now, before[s.path].index_select(s.axis, i), rtol=0, atol=0)
            checked.add(s.role)
    assert checked == {"out", "stat"}


# --- zoo models: target, exactness ----------------------------------------------------------
ZOO_MODELS = ["resnet_basic", "densenet", "mobilenet_v2_block", "fpn", "inception"]


_loader = functools.partial(random_loader, n=48)


@pytest.mark.parametrize("target", [0.5, 0.3])
@pytest.mark.parametrize("name", ZOO_MODELS)
def test_zoo_models_reach_the_target_and_end_exact(name, target):
    torch.manual_seed(0)
    x = torch.randn(ZOO_INPUT_SHAPE)
    model = randomize_(ZOO[name](), 0)
    m = Chex(trace(model, (x,)), flops_target=target, total_iters=6, round_to=1)
    opt = torch.optim.SGD(m.param_groups(0.05), lr=0.05, momentum=0.9)
    for xb, yb in list(_loader()) * 2:
        loss = torch.nn.functional.cross_entropy(m.model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        m.step()
    assert m.updates >= 2 and m.iteration == 6
    m.model.eval()
    with torch.no_grad():
        masked = m.model(x)
    dense = count_macs(m.model, (x,)).macs
    pruned = m.finalize()
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), masked, atol=1e-5, rtol=1e-5)
    ratio = count_macs(pruned, (x,)).macs / dense
    assert target - 0.01 <= ratio <= target + 1e-9


def test_compress_with_the_defaults_reaches_the_target():
    torch.manual_seed(0)
    x = torch.randn(ZOO_INPUT_SHAPE)
    model = randomize_(ZOO["vgg"](), 0)
    result = graphprune.compress(
        model,
        "chex",
        example_inputs=(x,),
        flops_target=0.5,
        train_loader=_loader(),
        epochs=2,
        progress=False,
    )
    assert 0.49 <= result.report.macs_ratio <= 0.5 + 1e-9
    stats = result.report.stats_dict()
    assert stats["updates"] >= 2 and stats["freeze_iter"] == 2  # round(0.3 x 6)


# --- resume mid-schedule --------------------------------------------------------------------
class Stop(Exception):
    pass


def _chex_run(ckpt, *, stop_at=None, resume=False):
    calls = 0

    def step(model, batch):
        nonlocal calls
        calls += 1
        if calls == stop_at:
            raise Stop
        xb, yb = batch
        return torch.nn.functional.cross_entropy(model(xb), yb)

    torch.manual_seed(0)
    model = randomize_(ZOO["resnet_basic"](), 0)
    return graphprune.compress(
        model,
        "chex",
        example_inputs=(torch.randn(ZOO_INPUT_SHAPE),),
        flops_target=0.4,
        train_loader=_loader(n=64),
        epochs=3,
        lr=0.05,
        round_to=1,
        delta_t=2,
        t_max=0.7,
        train_step=step,
        checkpoint_dir=ckpt,
        checkpoint_every=3,
        resume=resume,
        progress=False,
    )


def test_resume_mid_schedule_gives_the_masks_of_an_uninterrupted_run(tmp_path):
    whole = _chex_run(tmp_path / "whole")
    with pytest.raises(Stop):  # 12 iterations, freeze at 8, updates at 1, 3, 5, 7
        _chex_run(tmp_path / "cut", stop_at=5)  # the last checkpoint is after iteration 3
    resumed = _chex_run(tmp_path / "cut", resume=True)
    assert resumed.report.stats_dict() == whole.report.stats_dict()
    assert whole.report.stats_dict()["regrown"] > 0
    a, b = resumed.model.state_dict(), whole.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# --- options --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "options, message",
    [
        ({"t_max": 0.0}, "t_max=0.0"),
        ({"delta0": 1.0}, "delta0=1.0"),
        ({"delta_t": 0}, "delta_t=0"),
        ({"min_keep_fraction": 1.0}, "min_keep_fraction=1.0"),
    ],
)
def test_bad_options_name_the_field(options, message):
    with pytest.raises(ValueError, match=message):
        ChexConfig(**options)
    with pytest.raises(TypeError, match="selection"):
        ChexConfig(selection="random")
