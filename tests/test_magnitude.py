"""Magnitude: the group norms by hand, one-shot, prune-then-fine-tune and iterative, each
ending exactly at the MACs target; a resume mid-schedule gives the same masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import graphprune
from graphprune.analysis import build_channel_graph
from graphprune.planning.selection import norm_scores
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


# --- magnitude ----------------------------------------------------------------------------------
@pytest.mark.parametrize("p", [1, 2])
@torch.no_grad()
def test_norm_scores_by_hand(p: int) -> None:
    gm, _ = small_net()
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
    m, x = make_method("magnitude", "resnet_basic", 0.3, iterative=4)
    assert m.step_iterations() == [0, 2, 4, 6]
    fractions, data = [], batches()
    for k in range(4):
        fractions.append(m.masks.macs_fraction(m.layer_macs))
        train(m, data[2 * k : 2 * k + 2])
    assert m.mask_steps == 4
    # each step lands within 0.01 under target ** (k / 4): the same share of what remains
    for k, f in enumerate(fractions, start=1):
        assert 0.3 ** (k / 4) - 0.01 <= f <= 0.3 ** (k / 4) + 1e-9, (k, f)


def test_iterative_masked_channels_go_first() -> None:
    m, _ = make_method("magnitude", "resnet_basic", 0.3, iterative=2)
    before = {g: k.copy() for g, k in m.masks.keep.items()}
    train(m, batches())
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
        train_loader=loader(),
        epochs=1,
        progress=False,
    )
    assert plain.report.stats_dict()["mask_steps"] == 0
    assert tuned.report.stats_dict()["mask_steps"] == 1
    assert 0.49 <= tuned.report.macs_ratio <= 0.5 + 1e-9


def test_magnitude_prunes_before_it_fine_tunes() -> None:
    m, _ = make_method("magnitude", "resnet_basic", 0.5)
    assert m.masked_once  # masked at construction, before the first step
    assert 0.49 <= m.masks.macs_fraction(m.layer_macs) <= 0.5 + 1e-9
    before = {k: v.clone() for k, v in m.model.state_dict().items()}
    keep_before = {g: k.copy() for g, k in m.masks.keep.items()}
    train(m, batches())
    assert all(np.array_equal(m.masks.keep[g], k) for g, k in keep_before.items())
    moved = [k for k, v in m.model.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.endswith("weight") for k in moved)  # the kept channels fine-tuned


@pytest.mark.parametrize("model", ["resnet_basic", "vgg"])
def test_iterative_magnitude_through_compress(model) -> None:
    check_compress("magnitude", model, 0.5, iterative=2)
