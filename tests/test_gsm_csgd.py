"""GSM and C-SGD: the gradient edits against hand computations, the saliency against a finite
difference, both methods through compress() to the MACs target with a final model equal to the
masked (GSM) model, and a resume mid-schedule that lands in the same state."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import graphprune
from graphprune.analysis import build_channel_graph
from graphprune.frontend.params import get_tensor
from graphprune.frontend.trace import trace
from graphprune.methods.gsm import GSM
from graphprune.planning.macs import count_macs
from graphprune.testing.exactness import randomize_
from graphprune.testing.method_runs import random_loader
from graphprune.testing.zoo import ZOO, ZOO_INPUT_SHAPE


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


_loader = random_loader


class OneGroup(nn.Module):
    """conv(3->8)+BN+ReLU -> pool -> linear: one prunable group whose MACs scale with its width
    (conv and linear both linear in it), so keeping k of 8 channels keeps exactly k/8."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=True)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


# --- GSM ------------------------------------------------------------------------------------
def test_gsm_keeps_the_task_gradient_only_for_the_most_salient_channels():
    torch.manual_seed(0)
    model = randomize_(OneGroup(), 0)
    x = torch.randn(8, 3, 8, 8)
    y = torch.randint(0, 10, (8,))
    gm = trace(model, (x[:1],))
    m = GSM(gm, flops_target=0.5, round_to=1, min_keep_fraction=0.0, decay=0.3,
            saliency_momentum=0.0, reselect_every=1, cost_aware=False, total_iters=10)  # fmt: skip
    assert len(m.masks.groups) == 1
    m.model.train()
    nn.functional.cross_entropy(m.model(x), y).backward()
    task = {n: p.grad.clone() for n, p in m.model.named_parameters()}
    params = dict(m.model.named_parameters())
    # by hand: Σ w·dL/dw over the channel's conv row, conv bias, BN scale and BN shift
    producers = [n for n in params if n.startswith(("conv.", "bn."))]
    assert len(producers) == 4
    saliency = np.zeros(8)
    for n in producers:
        w, grad = params[n].detach(), task[n]
        for c in range(8):
            saliency[c] += float((w[c] * grad[c]).sum())
    saliency = np.abs(saliency)
    top = set(np.argsort(-saliency)[:4].tolist())  # k/8 MACs: the target keeps exactly 4
    m.after_backward()
    for n in producers:
        w = params[n].detach()
        for c in range(8):
            expected = task[n][c] if c in top else 0.3 * w[c]
            torch.testing.assert_close(params[n].grad[c], expected, rtol=0, atol=0)
    for n in params:  # consumers (the linear's input columns) keep their task gradient
        if n not in producers:
            torch.testing.assert_close(params[n].grad, task[n], rtol=0, atol=0)


@torch.no_grad()
def _scaled_loss(gm, x, y, entries, factor):
    """Loss with the producer entries of one channel scaled by ``factor`` (float64)."""
    saved = []
    for path, axis, idx in entries:
        t = get_tensor(gm, path)
        saved.append(t.index_select(axis, idx).clone())
        t.index_copy_(axis, idx, t.index_select(axis, idx) * factor)
    loss = nn.functional.cross_entropy(gm(x), y).item()
    for (path, axis, idx), old in zip(entries, saved, strict=True):
        get_tensor(gm, path).index_copy_(axis, idx, old)
    return loss


def test_saliency_is_the_derivative_of_scaling_a_coupled_channel():
    """Σ w·dL/dw over all producers of a residual group's channel = d/dα L(α·those entries)
    at α = 1: checked by a central difference in float64 (independent of the summation)."""
    torch.manual_seed(0)
    model = randomize_(ZOO["resnet_basic"](), 0).double().eval()
    x = torch.randn(4, *ZOO_INPUT_SHAPE[1:], dtype=torch.float64)
    y = torch.randint(0, 10, (4,))
    gm = trace(model, (x[:1],))
    m = GSM(gm, total_iters=10)
    gm.eval()
    nn.functional.cross_entropy(gm(x), y).backward()
    dots = m.masks.producer_dots()
    graph = m.graph
    coupled = max(m.masks.groups, key=lambda g: len(graph.groups[g].producers))
    assert len(graph.groups[coupled].producers) >= 3  # stem + two residual branches
    h = 1e-5
    for c in (0, 3):
        entries = []
        for s in graph.sites:
            gids, pos = graph.positions(s.atoms.reshape(-1))
            hit = np.nonzero((gids == coupled) & (pos == c))[0]
            if s.role == "out" and len(hit):
                entries.append((s.path, s.axis, torch.from_numpy(hit)))
        up = _scaled_loss(gm, x, y, entries, 1 + h)
        down = _scaled_loss(gm, x, y, entries, 1 - h)
        assert dots[coupled][c] == pytest.approx((up - down) / (2 * h), rel=1e-5, abs=1e-9)


def _train(m, loader, steps, x):
    opt = torch.optim.SGD(m.param_groups(0.05), lr=0.05, momentum=0.9)
    batches = list(loader)
    for i in range(steps):
        xb, yb = batches[i % len(batches)]
        loss = nn.functional.cross_entropy(m.model(xb), yb)
        opt.zero_grad()
        loss.backward()
        m.after_backward()
        opt.step()
        m.step()
    return opt


@pytest.mark.parametrize("name", ["resnet_basic", "mobilenet_v2_block", "densenet", "fpn"])
def test_gsm_through_compress_reaches_the_target_and_equals_the_masked_model(name, monkeypatch):
    torch.manual_seed(0)
    model = ZOO[name]()
    x = torch.randn(ZOO_INPUT_SHAPE)
    seen = {}
    finalize = GSM.finalize

    def spy(self, **kw):  # the masked model's outputs, just before the exact removal
        self.model.eval()
        with torch.no_grad():
            seen["masked"] = self.model(x)
        seen["masked_channels"] = self.masks.masked()
        return finalize(self, **kw)

    monkeypatch.setattr(GSM, "finalize", spy)
    result = graphprune.compress(model, "gsm", example_inputs=(x,), flops_target=0.5,
                                 train_loader=_loader(), epochs=3, progress=False)  # fmt: skip
    assert 0.49 <= result.report.macs_ratio <= 0.5 + 1e-9
    dense = count_macs(trace(model, (x,)), (x,)).macs
    assert count_macs(result.model, (x,)).macs / dense == pytest.approx(result.report.macs_ratio)
    assert seen["masked_channels"] > 0
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), seen["masked"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("method", "opts"),
    [
        ("gsm", dict(flops_target=0.5, total_iters=10, freeze_at=0.7, reselect_every=2)),
        ("csgd", dict(flops_target=0.5, total_iters=10)),
    ],
)
def test_resume_mid_schedule_gives_the_same_state(method, opts):
    cls = graphprune.methods.get_method(method)
    torch.manual_seed(0)
    x = torch.randn(ZOO_INPUT_SHAPE)
    base = ZOO["resnet_basic"]()
    loader = _loader()

    whole = cls(trace(copy.deepcopy(base), (x,)), **opts)
    _train(whole, loader, 10, x)

    first = cls(trace(copy.deepcopy(base), (x,)), **opts)
    opt = _train(first, loader, 5, x)  # stop mid-schedule (before GSM's freeze at 7)
    state = {"model": copy.deepcopy(first.model.state_dict()), "opt": opt.state_dict(),
             "method": copy.deepcopy(first.state_dict())}  # fmt: skip
    torch.manual_seed(1)  # a resumed run does not depend on the RNG for its schedule
    other = ZOO["resnet_basic"]()
    resumed = cls(trace(other, (x,)), **opts)
    resumed.model.load_state_dict(state["model"])
    resumed.load_state_dict(state["method"])
    opt2 = torch.optim.SGD(resumed.param_groups(0.05), lr=0.05, momentum=0.9)
    opt2.load_state_dict(state["opt"])
    batches = list(loader)
    for i in range(5, 10):
        xb, yb = batches[i % len(batches)]
        loss = nn.functional.cross_entropy(resumed.model(xb), yb)
        opt2.zero_grad()
        loss.backward()
        resumed.after_backward()
        opt2.step()
        resumed.step()
    for (n, a), b in zip(whole.model.state_dict().items(), resumed.model.state_dict().values(),
                         strict=True):  # fmt: skip
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=n)
    a, b = whole.state_dict(), resumed.state_dict()
    assert a["iteration"] == b["iteration"] == 10
    if method == "gsm":
        assert whole.masked_once and whole.schedule.freeze_iter == 7
        assert resumed.selections == whole.selections
        for g in whole.masks.groups:
            assert np.array_equal(whole.masks.keep[g], resumed.masks.keep[g])
            np.testing.assert_array_equal(whole.saliency[g], resumed.saliency[g])
    else:
        assert whole.labels.keys() == resumed.labels.keys() and whole.labels
        for g in whole.labels:
            np.testing.assert_array_equal(whole.labels[g], resumed.labels[g])
    with torch.no_grad():
        whole.model.eval()
        resumed.model.eval()
        torch.testing.assert_close(whole.finalize()(x), resumed.finalize()(x), rtol=0, atol=0)


@pytest.mark.parametrize(("total", "lr"), [(300, 0.05), (1000, 0.05), (3000, 0.1), (40, 0.05)])
def test_gsm_adaptive_decay_takes_an_unselected_weight_to_a_percent_by_the_freeze(total, lr):
    """The schedule's promise, checked by running the optimizer compress uses (SGD, momentum
    0.9, cosine lr) on a weight whose gradient is only GSM's decay term: 1% by the freeze
    where the budget allows it; on a short one the decay is at critical damping (the weight
    shrinks without ever crossing zero)."""
    from graphprune.methods.gsm import GSMConfig, GSMSchedule
    from graphprune.training.loop import cosine_lr

    s = GSMSchedule.adaptive(GSMConfig(), total, lr)
    w = nn.Parameter(torch.ones(1, dtype=torch.float64))
    opt = torch.optim.SGD([w], lr=lr, momentum=0.9)
    trace_w = []
    for t in range(s.freeze_iter):
        opt.param_groups[0]["lr"] = cosine_lr(lr, t, total)
        w.grad = s.decay * w.detach().clone()
        opt.step()
        trace_w.append(w.item())
    assert all(b < a for a, b in zip([1.0, *trace_w], trace_w, strict=False))  # no oscillation
    assert min(trace_w) > 0
    if total >= 300:
        assert trace_w[-1] <= 0.0101
    else:
        assert s.decay * lr == pytest.approx((1 - 0.9**0.5) ** 2)


# --- C-SGD ----------------------------------------------------------------------------------
MERGE_MODELS = ["resnet_basic", "mobilenet_v2_block", "densenet", "se", "fpn", "inception",
                "efficientnet", "regnet", "vgg", "convnext", "yolo", "shufflenet"]  # fmt: skip


def _make_identical(gm, graph, clusters):
    """Copy each cluster's first member's producer and statistic entries onto the others."""
    with torch.no_grad():
        for s in graph.sites:
            if s.role not in ("out", "stat"):
                continue
            gids, pos = graph.positions(s.atoms.reshape(-1))
            t = get_tensor(gm, s.path)
            for g, cl in clusters.items():
                for members in cl:
                    src = torch.from_numpy(np.nonzero((gids == g) & (pos == members[0]))[0])
                    for c in members[1:]:
                        dst = torch.from_numpy(np.nonzero((gids == g) & (pos == c))[0])
                        t.index_copy_(s.axis, dst, t.index_select(s.axis, src))


def _random_clusters(graph, groups, rng):
    out = {}
    for g in groups:
        n = graph.groups[g].channels
        order = rng.permutation(n)
        k = max(1, n // 3)
        out[g] = [np.sort(part) for part in np.array_split(order, k)]
    return out


@pytest.mark.parametrize("name", MERGE_MODELS)
def test_merging_identical_channels_is_exact(name):
    from graphprune.passes import merge_channels, mergeable_groups, prune_channels
    from graphprune.passes.runner import PlanError

    torch.manual_seed(0)
    model = randomize_(ZOO[name]().eval(), 0)
    x = torch.randn(2, *ZOO_INPUT_SHAPE[1:])
    gm = trace(model, (x[:1],))
    graph = build_channel_graph(gm)
    ok = [g for g, why in mergeable_groups(gm, graph).items()
          if why is None and graph.groups[g].channels > 1]  # fmt: skip
    assert ok, mergeable_groups(gm, graph)
    clusters = _random_clusters(graph, ok, np.random.default_rng(0))
    with pytest.raises(PlanError, match="not identical"):  # random weights: members differ
        merge_channels(gm, clusters=clusters)
    _make_identical(gm, graph, clusters)
    with torch.no_grad():
        before = gm(x)
    params = sum(p.numel() for p in gm.parameters())
    merge_channels(gm, clusters=clusters)
    plan = {g: np.array([c[0] for c in cl]) for g, cl in clusters.items()}
    prune_channels(gm, plan=plan, round_to=1)
    assert sum(p.numel() for p in gm.parameters()) < params
    with torch.no_grad():
        after = gm(x)
    torch.testing.assert_close(after, before, atol=1e-4 * float(before.abs().max()), rtol=1e-4)


class ChannelSum(nn.Module):
    """conv -> relu, then both a conv and a sum over the channels read it: the sum counts
    every copy, so merging copies would change it."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 4, 3, padding=1)
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        h = torch.relu(self.a(x))
        y = self.b(h) + h.sum(1, keepdim=True)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))


def test_groups_whose_channels_are_mixed_are_not_merged():
    from graphprune.passes import merge_channels, mergeable_groups
    from graphprune.passes.runner import PlanError

    x = torch.randn(1, 3, 8, 8)
    gm = trace(ChannelSum(), (x,))
    graph = build_channel_graph(gm)
    why = mergeable_groups(gm, graph)
    mixed = next(g for g in why if graph.groups[g].channels == 8)
    assert graph.groups[mixed].prunable and graph.groups[mixed].exact
    assert "sum" in why[mixed]
    with pytest.raises(PlanError, match="cannot be merged exactly"):
        merge_channels(gm, clusters={mixed: [[0, 1]]})


def test_centripetal_gradient_matches_the_hand_formula():
    from graphprune.methods.csgd import CSGD

    torch.manual_seed(0)
    model = randomize_(OneGroup(), 0)
    x = torch.randn(8, 3, 8, 8)
    y = torch.randint(0, 10, (8,))
    m = CSGD(trace(model, (x[:1],)), flops_target=0.5, round_to=1, min_keep_fraction=0.0,
             centripetal=0.2, total_iters=10)  # fmt: skip
    (g,) = m.masks.groups
    labels = np.array([0, 1, 0, 2, 2, 3, 1, 2])  # clusters {0,2}, {1,6}, {3,4,7}, {5}
    m.set_clusters({g: labels})
    m.model.train()
    nn.functional.cross_entropy(m.model(x), y).backward()
    params = dict(m.model.named_parameters())
    task = {n: p.grad.clone() for n, p in params.items()}
    m.after_backward()
    for n in ("conv.weight", "conv.bias", "bn.weight", "bn.bias"):
        w = params[n].detach()
        for c in range(8):
            members = np.nonzero(labels == labels[c])[0]
            mean_grad = sum(task[n][j] for j in members) / len(members)
            mean_w = sum(w[j] for j in members) / len(members)
            expected = mean_grad + 0.2 * (w[c] - mean_w)
            torch.testing.assert_close(params[n].grad[c], expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(params["fc.weight"].grad, task["fc.weight"], rtol=0, atol=0)


def test_kmeans_finds_separated_clusters_and_uses_every_label():
    from graphprune.methods.csgd import cluster_channels

    rng = np.random.default_rng(0)
    centers = np.array([[5.0, 0.0], [0.0, 5.0], [-5.0, -5.0]])
    truth = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 2])
    vectors = centers[truth] + 0.1 * rng.standard_normal((10, 2))
    labels = cluster_channels(vectors, 3)
    for c in range(3):  # the same partition, whatever the label names
        assert len(set(labels[truth == c].tolist())) == 1
    assert len(set(labels.tolist())) == 3
    same = np.zeros((6, 2))  # identical points: k-means alone would leave clusters empty
    assert sorted(set(cluster_channels(same, 4).tolist())) == [0, 1, 2, 3]
    even = cluster_channels(np.arange(6.0)[:, None], 3, "even")
    assert even.tolist() == [2, 2, 1, 1, 0, 0]  # by norm, largest first


@pytest.mark.parametrize("name", ["resnet_basic", "mobilenet_v2_block", "densenet", "fpn"])
def test_csgd_through_compress_reaches_the_target_and_equals_the_averaged_model(name, monkeypatch):
    from graphprune.methods.csgd import CSGD

    torch.manual_seed(0)
    model = ZOO[name]()
    x = torch.randn(ZOO_INPUT_SHAPE)
    seen = {}
    average = CSGD.average_clusters

    def spy(self):  # the averaged (identical clusters) model, before merging
        residual = average(self)
        with torch.no_grad():
            seen["averaged"] = self.model(x)
        seen["training"] = self.model.training
        return residual

    monkeypatch.setattr(CSGD, "average_clusters", spy)
    result = graphprune.compress(model, "csgd", example_inputs=(x,), flops_target=0.5,
                                 train_loader=_loader(), epochs=3, progress=False)  # fmt: skip
    assert 0.49 <= result.report.macs_ratio <= 0.5 + 1e-9
    dense = count_macs(trace(model, (x,)), (x,)).macs
    assert count_macs(result.model, (x,)).macs / dense == pytest.approx(result.report.macs_ratio)
    assert seen["training"] is False and result.report.stats.merged_channels > 0
    with torch.no_grad():
        out = result.model(x)
    torch.testing.assert_close(out, seen["averaged"], atol=1e-5 * float(out.abs().max()), rtol=1e-4)


def test_csgd_keeps_groups_it_cannot_merge_whole():
    """yolo's C2f split sends one group down two paths: select never narrows it (its floor
    is its width) and it gets no clusters."""
    from graphprune.methods.csgd import CSGD

    torch.manual_seed(0)
    x = torch.randn(ZOO_INPUT_SHAPE)
    m = CSGD(trace(ZOO["yolo"](), (x,)), flops_target=0.6, total_iters=10)
    assert m.unmergeable and all("different paths" in why for why in m.unmergeable.values())
    kept = m.select(m.scores()).kept
    for g in m.unmergeable:
        assert g not in m.labels
        assert len(kept[g]) == m.graph.groups[g].channels == m.floors[g]
    assert m.labels  # the others are clustered


@pytest.mark.parametrize(
    ("model", "target"), [("resnet_bottleneck", 0.4), ("efficientnet", 0.4), ("vgg", 0.5)]
)
def test_gsm_passes_the_checks_every_masking_method_passes(model, target):
    from graphprune.testing.method_runs import check_trains_to_target_exactly

    check_trains_to_target_exactly("gsm", model, target)


def test_gsm_resume_through_the_shared_check():
    from graphprune.testing.method_runs import check_resume_gives_the_same_masks

    check_resume_gives_the_same_masks("gsm", "resnet_basic", 4, freeze_at=0.75)
