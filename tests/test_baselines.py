"""The classic baselines on the masking base: each criterion against a hand-computed or
brute-force value on small inputs; every method trained through its hooks (or compress())
reaches the MACs target within 0.01 with a final model equal to the masked one; a resume
mid-schedule ends with the same masks as an uninterrupted run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import graphprune
from graphprune.methods import get_method
from graphprune.testing.method_runs import (
    batches,
    check_compress,
    check_resume_gives_the_same_masks,
    check_trains_to_target_exactly,
    loader,
    make_method,
    small_net,
    train,
)
from graphprune.testing.zoo import ZOO, ZOO_INPUT_SHAPE

torch.set_num_threads(1)


# --- the criteria against hand-computed values --------------------------------------------------
def _on_small_net(name: str, **options):
    """A method on conv(3→4)-BN-ReLU-conv(4→2): one maskable group, the 4 channels."""
    gm, x = small_net()
    m = get_method(name)(gm, flops_target=0.5, round_to=1, total_iters=4, **options)
    (gid,) = m.masks.groups
    return m, x, gid


def _grads_after_backward(m, x) -> dict[str, torch.Tensor]:
    m.model.train()
    m.model.zero_grad()
    m.model(x).sum().backward()
    before = {n: p.grad.clone() for n, p in m.model.named_parameters()}
    m.after_backward()
    return {n: p.grad - before[n] for n, p in m.model.named_parameters()}


def test_slimming_adds_the_l1_subgradient_to_norm_scales() -> None:
    m, x, _ = _on_small_net("slimming", sparsity=1e-3)
    with torch.no_grad():
        m.model.get_submodule("1").weight.copy_(torch.tensor([0.5, -2.0, 0.0, 3.0]))
    added = _grads_after_backward(m, x)
    torch.testing.assert_close(added["1.weight"], torch.tensor([1e-3, -1e-3, 0.0, 1e-3]))
    assert all(added[n].abs().sum() == 0 for n in added if n != "1.weight")
    m.cut()  # after the cut the regularizer stops
    assert all(v.abs().sum() == 0 for v in _grads_after_backward(m, x).values())


def test_the_default_strength_gives_the_same_total_pull_in_any_budget() -> None:
    m, x, _ = _on_small_net("slimming")  # no lr known: the paper's strength
    assert m.strength_used == 1e-4
    for name in ("slimming", "polarization"):
        gm, x = small_net()
        m = get_method(name)(gm, flops_target=0.5, round_to=1, total_iters=100, lr=0.05, pull=0.2)
        assert m.cut_iteration() == 40  # sparsity_fraction 0.4 of 100 steps
        assert m.strength_used == pytest.approx(0.2 / (40 * 0.05))  # pull / (steps x lr)
    with torch.no_grad():
        m.model.get_submodule("1").weight.copy_(torch.tensor([0.5, -2.0, 0.1, 3.0]))
    added = _grads_after_backward(m, x)["1.weight"]
    by_hand = 1.4 * torch.tensor([1.0, -1.0, 1.0, 1.0]) - torch.tensor([1.0, -1.0, -1.0, 1.0])
    torch.testing.assert_close(added, 0.1 * by_hand)
    gm, _ = small_net()
    given = get_method("slimming")(gm, total_iters=100, lr=0.05, sparsity=3e-4)
    assert given.strength_used == 3e-4


def test_polarization_gradient_matches_autograd_and_is_added() -> None:
    from graphprune.methods.baselines.slimming import polarization_grad

    g = torch.Generator().manual_seed(0)
    for t in (1.0, 1.4):
        v = torch.randn(7, generator=g, dtype=torch.float64).requires_grad_()
        reg = t * v.abs().sum() - (v - v.mean()).abs().sum()
        (auto,) = torch.autograd.grad(reg, v)
        torch.testing.assert_close(polarization_grad(v.detach(), t), auto)
    m, x, _ = _on_small_net("polarization", strength=1e-3, t=1.2)
    gamma = torch.tensor([0.5, -2.0, 0.1, 3.0])
    with torch.no_grad():
        m.model.get_submodule("1").weight.copy_(gamma)
    mean = gamma.mean()  # 0.4: signs of (gamma - mean) are +, -, -, +
    by_hand = 1.2 * torch.sign(gamma) - torch.tensor([1.0, -1.0, -1.0, 1.0]) + 0.0
    added = _grads_after_backward(m, x)
    assert mean == pytest.approx(0.4)
    torch.testing.assert_close(added["1.weight"], 1e-3 * by_hand)


def test_slimming_scores_are_abs_gamma_averaged_over_norm_layers() -> None:
    m, _ = make_method("slimming", "resnet_basic", 0.5)
    scores = m.scores()
    for g in m.masks.groups:
        gammas = [r for r in m.rows if r.gid == g]
        if not gammas:
            continue
        total = np.zeros(len(m.masks.keep[g]))
        count = np.zeros(len(m.masks.keep[g]))
        for r in gammas:  # by hand: every norm layer's |gamma| of the group, averaged
            w = m.model.get_parameter(r.path).detach()
            for i, p in zip(r.index.tolist(), r.pos.tolist(), strict=True):
                total[p] += abs(float(w[i]))
                count[p] += 1
        np.testing.assert_allclose(scores[g], total / np.maximum(count, 1), rtol=1e-6)
    assert any(len({r.module for r in m.rows if r.gid == g}) > 1 for g in m.masks.groups)


def test_fpgm_distances_are_the_explicit_pairwise_sums() -> None:
    from graphprune.methods.baselines.fpgm import distance_sums

    g = torch.Generator().manual_seed(0)
    filters = torch.randn(5, 3, 2, 2, generator=g)
    explicit = [
        sum(float(torch.sqrt(((filters[j] - filters[k]) ** 2).sum())) for k in range(5))
        for j in range(5)
    ]
    np.testing.assert_allclose(distance_sums(filters).numpy(), explicit, rtol=1e-6)
    m, _, gid = _on_small_net("fpgm")
    w = m.model.get_submodule("0").weight.detach()  # the group's one filter producer
    d = np.array(
        [sum(float((w[j] - w[k]).norm()) for k in range(4)) for j in range(4)], dtype=np.float64
    )
    np.testing.assert_allclose(m.scores()[gid], d / d.mean(), rtol=1e-6)


def test_fpgm_soft_masks_train_and_are_rechosen_each_epoch() -> None:
    m, _ = make_method("fpgm", "resnet_basic", 0.5, soft_fraction=1.0)  # soft to the end
    data = batches()
    train(m, data[:4])  # one epoch: the first choice at its end
    assert m.remasks == 1 and m.masks.masked() > 0
    train(m, data[4:5])  # soft: a masked filter trains on (its gradient is not zero)
    rows = [r for r in m.rows if not m.masks.keep[r.gid].all()]
    moved = 0.0
    for r in rows:
        w = m.model.get_parameter(r.path).detach().index_select(r.axis, r.index)
        masked = torch.from_numpy(~m.masks.keep[r.gid][r.pos])
        moved += float(w.movedim(r.axis, 0)[masked].abs().sum())
    assert moved > 0
    train(m, data[5:])
    assert m.remasks == 2 and m.last_mask == 8  # at the end: the last choice, made hard


def test_fpgm_clips_masked_filter_gradients_to_the_kept_ones() -> None:
    m, x = make_method("fpgm", "resnet_basic", 0.5, soft_fraction=1.0)
    m.remask()
    m.model.train()
    xb, yb = batches(1)[0]
    m.model.zero_grad()
    nn.functional.cross_entropy(m.model(xb), yb).backward()
    raw = {r.path: m.model.get_parameter(r.path).grad.clone() for r in m.rows}
    m.after_backward()
    clipped = 0
    for r in m.rows:
        keep = m.masks.keep[r.gid][r.pos]
        if keep.all():
            continue
        after = m.model.get_parameter(r.path).grad.index_select(r.axis, r.index).movedim(r.axis, 0)
        before = raw[r.path].index_select(r.axis, r.index).movedim(r.axis, 0)
        norms = before.reshape(len(keep), -1).norm(dim=1)
        cap = float(norms[torch.from_numpy(keep)].mean())
        for j, kept in enumerate(keep):
            if kept:
                torch.testing.assert_close(after[j], before[j], rtol=0, atol=0)
            else:
                expected = before[j] * min(1.0, cap / max(float(norms[j]), 1e-30))
                torch.testing.assert_close(after[j], expected)
                clipped += float(norms[j]) > cap
    assert clipped > 0  # a zeroed filter's gradient is blown up by its zero-variance norm


def test_fpgm_ends_its_soft_phase_with_hard_masks_and_fine_tunes() -> None:
    m, _ = make_method("fpgm", "resnet_basic", 0.5, soft_fraction=0.5)
    assert m.soft_end() == 4
    train(m, batches())
    assert m.hardened and m.remasks == 1 and m.last_mask == 4
    for r in m.masks._sites:  # hard: every producer entry of a masked channel is zero
        if r.role != "out":
            continue
        dropped = np.zeros(len(r.gids), dtype=bool)
        for g, k in m.masks.keep.items():
            dropped |= (r.gids == g) & ~k[np.minimum(r.pos, len(k) - 1)]
        t = m.model.get_parameter(r.path) if "running" not in r.path else None
        if t is not None and dropped.any():
            idx = torch.from_numpy(np.nonzero(dropped)[0])
            assert t.detach().index_select(r.axis, idx).abs().sum() == 0


def test_hrank_ranks_are_the_per_map_matrix_ranks() -> None:
    m, x, gid = _on_small_net("hrank", rank_inputs=4)
    conv = m.model.get_submodule("0")
    with torch.no_grad():
        conv.weight[1] = 0.0  # its maps are the constant bias: rank 1
        conv.bias[1] = 0.7
    m.model.train()
    batches = [torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(i)) for i in (1, 2)]
    for xb in batches:
        m.model(xb)
    expected = np.zeros(4)
    for xb in batches:
        out = conv(xb).detach()
        for b in range(out.shape[0]):
            for c in range(4):
                expected[c] += int(torch.linalg.matrix_rank(out[b, c]))
    expected /= 4
    np.testing.assert_allclose(m.average_ranks()["0"], expected)
    assert expected[1] == 1 and expected.argmin() == 1
    np.testing.assert_allclose(m.scores()[gid], expected / expected.mean(), atol=1e-5)
    m.model(batches[0])  # enough inputs seen: nothing more recorded
    np.testing.assert_allclose(m.average_ranks()["0"], expected)


def test_taylor_scores_are_the_gate_gradient_products() -> None:
    m, x, gid = _on_small_net("taylor")
    outputs = []
    bn = m.model.get_submodule("1")

    def keep(module, args, y) -> None:
        y.retain_grad()
        outputs.append(y)

    handle = bn.register_forward_hook(keep)
    m.model.train()
    expected = np.zeros(4)
    for seed in (1, 2):
        xb = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(seed))
        m.model.zero_grad()
        (m.model(xb) ** 2).sum().backward()
        y = outputs[-1]  # the BN output: the gate sits on it
        expected += (y * y.grad).sum(dim=(0, 2, 3)).abs().detach().double().numpy()
        m.after_backward()
    handle.remove()
    np.testing.assert_allclose(m.scores()[gid], expected, rtol=1e-5)
    assert m.batches == 2


# --- every method to the target, exactly; resume --------------------------------------------------
RUNS = [
    ("slimming", "resnet_basic", 0.5, {}),
    ("slimming", "mobilenet_v2_block", 0.5, {}),
    ("slimming", "densenet", 0.5, {"sparsity": 1e-3}),
    ("polarization", "resnet_basic", 0.3, {}),
    ("polarization", "resnet_bottleneck", 0.5, {}),
    ("polarization", "vgg", 0.5, {}),
    ("fpgm", "resnet_basic", 0.5, {}),
    ("fpgm", "densenet", 0.4, {}),
    ("fpgm", "mobilenet_v2_block", 0.5, {}),
    ("hrank", "resnet_basic", 0.5, {"rank_inputs": 16}),
    ("hrank", "vgg", 0.5, {"rank_inputs": 16}),
    ("hrank", "se", 0.5, {"rank_inputs": 16}),
    ("taylor", "resnet_basic", 0.5, {}),
    ("taylor", "resnet_bottleneck", 0.4, {}),
    ("taylor", "densenet", 0.5, {}),
    ("taylor", "fpn", 0.5, {}),
]


@pytest.mark.parametrize(("name", "model", "target", "options"), RUNS)
def test_method_trains_to_the_target_exactly(name, model, target, options) -> None:
    check_trains_to_target_exactly(name, model, target, **options)


@pytest.mark.parametrize(
    ("name", "stop", "options"),
    [
        ("slimming", 2, {}),
        ("polarization", 4, {}),
        ("fpgm", 5, {"soft_fraction": 1.0}),
        ("fpgm", 6, {}),
        ("hrank", 1, {"rank_inputs": 16}),
        ("taylor", 2, {"score_fraction": 0.5}),
    ],
)
def test_resume_mid_schedule_gives_the_same_masks(name, stop, options) -> None:
    check_resume_gives_the_same_masks(name, "resnet_basic", stop, **options)


@pytest.mark.parametrize(
    ("name", "model"),
    [
        ("slimming", "vgg"),
        ("polarization", "densenet"),
        ("fpgm", "resnet_basic"),
        ("hrank", "resnet_basic"),
        ("taylor", "mobilenet_v2_block"),
    ],
)
def test_baseline_through_compress(name, model) -> None:
    check_compress(name, model, 0.5)


class _Interrupted(Exception):
    pass


@pytest.mark.parametrize(
    ("name", "options"), [("hrank", {"rank_inputs": 40}), ("taylor", {"score_fraction": 0.75})]
)
def test_compress_resumed_from_a_mid_scoring_checkpoint_ends_the_same(
    name, options, tmp_path
) -> None:
    """The built-in trainer's checkpoints carry the scoring state: a run stopped at iteration
    5 (checkpoint at 3, before the cut) and resumed ends like the uninterrupted run."""
    torch.manual_seed(0)
    net = ZOO["resnet_basic"]()
    x = torch.randn(ZOO_INPUT_SHAPE)
    kw = dict(example_inputs=(x,), flops_target=0.5, train_loader=loader(), epochs=2)
    kw |= dict(progress=False, checkpoint_every=3, **options)
    whole = graphprune.compress(net, name, **kw)
    calls = []

    def stop_at_five(out, y):
        calls.append(1)
        if len(calls) == 5:
            raise _Interrupted
        return nn.functional.cross_entropy(out, y)

    with pytest.raises(_Interrupted):
        graphprune.compress(net, name, checkpoint_dir=tmp_path, loss_fn=stop_at_five, **kw)
    resumed = graphprune.compress(net, name, checkpoint_dir=tmp_path, resume=True, **kw)
    assert resumed.report.widths == whole.report.widths
    with torch.no_grad():
        torch.testing.assert_close(resumed.model.eval()(x), whole.model.eval()(x))
