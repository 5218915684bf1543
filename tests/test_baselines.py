"""The classic baselines on the masking base: each criterion against a hand-computed or
brute-force value on small inputs; every method trained through its hooks (or compress())
reaches the MACs target within 0.01 with a final model equal to the masked one; a resume
mid-schedule ends with the same masks as an uninterrupted run."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import fx, nn
from torch.utils.data import DataLoader, TensorDataset

import graphprune
from graphprune.analysis import build_channel_graph
from graphprune.frontend.trace import trace
from graphprune.methods import get_method
from graphprune.planning.macs import count_macs
from graphprune.planning.selection import norm_scores
from graphprune.testing.exactness import randomize_
from graphprune.testing.zoo import ZOO, ZOO_INPUT_SHAPE

torch.set_num_threads(1)

ITERS = 8  # optimizer steps in the hook-level runs (two epochs of four batches)


def _batches(n: int = ITERS, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(8, *ZOO_INPUT_SHAPE[1:], generator=g), torch.randint(0, 10, (8,), generator=g))
        for _ in range(n)
    ]


def _loader(n: int = 32, seed: int = 0) -> DataLoader:
    xs, ys = zip(*_batches(n // 8, seed), strict=True)
    return DataLoader(TensorDataset(torch.cat(xs), torch.cat(ys)), batch_size=8)


def _method(name: str, model: str, target: float, seed: int = 0, **options):
    torch.manual_seed(seed)
    net = randomize_(ZOO[model]().train(), seed)
    x = torch.randn(ZOO_INPUT_SHAPE)
    m = get_method(name)(
        trace(net, (x,)),
        flops_target=target,
        total_iters=ITERS,
        iters_per_epoch=ITERS // 2,
        lr=0.02,
        **options,
    )
    return m, x


def _train(m, batches) -> None:
    """Plain SGD without momentum (no optimizer state), so a resumed run is bit-identical."""
    opt = torch.optim.SGD(m.param_groups(0.02, momentum=0.0), lr=0.02, momentum=0.0)
    m.model.train()
    for xb, yb in batches:
        loss = nn.functional.cross_entropy(m.model(xb), yb)
        opt.zero_grad()
        loss.backward()
        m.after_backward()
        opt.step()
        m.step()


def check_trains_to_target_exactly(name: str, model: str, target: float, **options) -> None:
    """Train through the hooks, then: the masked model's outputs are the pruned model's, and
    the pruned MACs are within 0.01 under the target."""
    m, x = _method(name, model, target, **options)
    dense = count_macs(m.model, (x,)).macs
    _train(m, _batches())
    assert m.masked_once and m.masks.masked() > 0
    m.model.eval()
    with torch.no_grad():
        if not m.hard_masks:
            m.masks.apply()  # soft masks: the finalize re-zeroes what trained since the mask
        masked = m.model(x)
    pruned = m.finalize()
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), masked, atol=1e-5, rtol=1e-5)
    ratio = count_macs(pruned, (x,)).macs / dense
    assert target - 0.01 <= ratio <= target + 1e-9, ratio


def check_resume_gives_the_same_masks(name: str, model: str, stop: int, **options) -> None:
    """Run ``stop`` steps, save the model and method state, continue in a fresh method from
    them: the masks at the end equal an uninterrupted run's."""
    batches = _batches()
    whole, _ = _method(name, model, 0.5, **options)
    _train(whole, batches)
    first, _ = _method(name, model, 0.5, **options)
    _train(first, batches[:stop])
    model_state = copy.deepcopy(first.model.state_dict())
    method_state = copy.deepcopy(first.state_dict())
    resumed, _ = _method(name, model, 0.5, seed=1, **options)  # other weights: all from state
    resumed.model.load_state_dict(model_state)
    resumed.load_state_dict(method_state)
    _train(resumed, batches[stop:])
    assert resumed.masks.masked() > 0
    for g in whole.masks.groups:
        np.testing.assert_array_equal(resumed.masks.keep[g], whole.masks.keep[g])


def check_compress(name: str, model: str, target: float, **options) -> None:
    torch.manual_seed(0)
    net = ZOO[model]()
    x = torch.randn(ZOO_INPUT_SHAPE)
    result = graphprune.compress(
        net,
        name,
        example_inputs=(x,),
        flops_target=target,
        train_loader=_loader(),
        epochs=2,
        progress=False,
        **options,
    )
    assert target - 0.01 <= result.report.macs_ratio <= target + 1e-9
    assert result.report.method == name


# --- magnitude ----------------------------------------------------------------------------------
def _small_net() -> tuple[fx.GraphModule, torch.Tensor]:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 2, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )
    randomize_(net, 0)
    x = torch.randn(2, 3, 6, 6)
    return trace(net.eval(), (x,)), x


@pytest.mark.parametrize("p", [1, 2])
def test_norm_scores_by_hand(p: int) -> None:
    gm, _ = _small_net()
    graph = build_channel_graph(gm)
    (group,) = [g for g in graph.groups if g.prunable and g.channels == 4]
    conv1, bn, conv2 = gm.get_submodule("0"), gm.get_submodule("1"), gm.get_submodule("3")

    def norm(t: torch.Tensor) -> float:
        return float(t.detach().abs().pow(p).sum() ** (1 / p))

    expected = [
        norm(conv1.weight[j])
        + abs(float(conv1.bias[j]))
        + abs(float(bn.weight[j]))
        + abs(float(bn.bias[j]))
        + norm(conv2.weight[:, j])
        for j in range(4)
    ]
    got = norm_scores(gm, graph, p=p)[group.id]
    np.testing.assert_allclose(got, expected, rtol=1e-5)


MAGNITUDE_RUNS = [
    ("resnet_basic", 0.5, {}),
    ("densenet", 0.4, {"iterative": 3}),
    ("mobilenet_v2_block", 0.5, {"norm": "l1"}),
    ("se", 0.5, {"iterative": 2, "norm": "l1"}),
]


@pytest.mark.parametrize(("model", "target", "options"), MAGNITUDE_RUNS)
def test_magnitude_trains_to_the_target_exactly(model, target, options) -> None:
    check_trains_to_target_exactly("magnitude", model, target, **options)


def test_iterative_magnitude_masks_in_steps_toward_the_target() -> None:
    m, x = _method("magnitude", "resnet_basic", 0.3, iterative=4)
    assert m.step_iterations() == [0, 2, 4, 6]
    fractions, batches = [], _batches()
    for k in range(4):
        fractions.append(m.masks.macs_fraction(m.layer_macs))
        _train(m, batches[2 * k : 2 * k + 2])
    assert m.mask_steps == 4
    # each step lands within 0.01 under target ** (k / 4): the same share of what remains
    for k, f in enumerate(fractions, start=1):
        assert 0.3 ** (k / 4) - 0.01 <= f <= 0.3 ** (k / 4) + 1e-9, (k, f)


def test_iterative_masked_channels_go_first() -> None:
    m, _ = _method("magnitude", "resnet_basic", 0.3, iterative=2)
    before = {g: k.copy() for g, k in m.masks.keep.items()}
    _train(m, _batches())
    back = sum(int((k & ~before[g]).sum()) for g, k in m.masks.keep.items())
    newly = sum(int((~k & before[g]).sum()) for g, k in m.masks.keep.items())
    assert newly > 0 and back <= newly // 4  # mostly more of the kept ones go
    for g, k in m.masks.keep.items():  # a group shrinks only by dropping kept channels
        if k.sum() < before[g].sum():
            assert not (k & ~before[g]).any()


def test_magnitude_resume_gives_the_same_masks() -> None:
    check_resume_gives_the_same_masks("magnitude", "resnet_basic", 3, iterative=3)


def test_magnitude_one_shot_fine_tunes_when_given_data() -> None:
    torch.manual_seed(0)
    net = ZOO["resnet_basic"]()
    x = torch.randn(ZOO_INPUT_SHAPE)
    plain = graphprune.compress(net, "magnitude", example_inputs=(x,), flops_target=0.5)
    tuned = graphprune.compress(
        net,
        "magnitude",
        example_inputs=(x,),
        flops_target=0.5,
        train_loader=_loader(),
        epochs=1,
        progress=False,
    )
    assert plain.report.stats_dict()["mask_steps"] == 0
    assert tuned.report.stats_dict()["mask_steps"] == 1
    assert 0.49 <= tuned.report.macs_ratio <= 0.5 + 1e-9


def test_magnitude_prunes_before_it_fine_tunes() -> None:
    m, _ = _method("magnitude", "resnet_basic", 0.5)
    assert m.masked_once  # masked at construction, before the first step
    assert 0.49 <= m.masks.macs_fraction(m.layer_macs) <= 0.5 + 1e-9
    before = {k: v.clone() for k, v in m.model.state_dict().items()}
    keep_before = {g: k.copy() for g, k in m.masks.keep.items()}
    _train(m, _batches())
    assert all(np.array_equal(m.masks.keep[g], k) for g, k in keep_before.items())
    moved = [k for k, v in m.model.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.endswith("weight") for k in moved)  # the kept channels fine-tuned


@pytest.mark.parametrize("model", ["resnet_basic", "vgg"])
def test_iterative_magnitude_through_compress(model) -> None:
    check_compress("magnitude", model, 0.5, iterative=2)
