"""Drive a pruning method through its training hooks on a zoo model, the way the method tests
do: a fixed batch list, plain SGD (no optimizer state, so a resumed run is bit-identical), and
the checks every masking method must pass (the final model equals the masked one and lands
within 0.01 under the MACs target, or as close as channel steps allow; a resume mid-schedule
ends with the same masks)."""

from __future__ import annotations

import copy
from collections.abc import Mapping

import numpy as np
import torch
from torch import fx, nn
from torch.utils.data import DataLoader, TensorDataset

import graphprune
from graphprune.frontend.trace import trace
from graphprune.methods import get_method
from graphprune.planning.macs import count_macs
from graphprune.planning.selection import MacsModel
from graphprune.testing.exactness import randomize_
from graphprune.testing.zoo import ZOO, ZOO_INPUT_SHAPE

ITERS = 8  # optimizer steps in the hook-level runs (two epochs of four batches)


def batches(n: int = ITERS, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(8, *ZOO_INPUT_SHAPE[1:], generator=g), torch.randint(0, 10, (8,), generator=g))
        for _ in range(n)
    ]


def loader(n: int = 32, seed: int = 0) -> DataLoader:
    xs, ys = zip(*batches(n // 8, seed), strict=True)
    return DataLoader(TensorDataset(torch.cat(xs), torch.cat(ys)), batch_size=8)


def random_loader(
    n: int = 64, seed: int = 0, *, shape=ZOO_INPUT_SHAPE, batch: int = 16, classes: int = 10
) -> DataLoader:
    """``n`` random images of ``shape`` (batch axis ignored) with random labels, in order."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape[1:], generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch)


def make_method(name: str, model: str, target: float, seed: int = 0, **options):
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


def train(m, data) -> None:
    """Plain SGD without momentum (no optimizer state), so a resumed run is bit-identical."""
    opt = torch.optim.SGD(m.param_groups(0.02, momentum=0.0), lr=0.02, momentum=0.0)
    m.model.train()
    for xb, yb in data:
        loss = nn.functional.cross_entropy(m.model(xb), yb)
        opt.zero_grad()
        loss.backward()
        m.after_backward()
        opt.step()
        m.step()


def assert_lands(
    graph,
    layer_macs: Mapping[str, int],
    kept: Mapping[int, np.ndarray],
    ratio: float,
    target: float,
    tolerance: float = 0.01,
) -> None:
    """``ratio`` (measured MACs kept) is at most ``target`` and within ``tolerance`` under it,
    or no single channel of any group in ``kept`` (kept indices per group) fits back under
    the target (a model whose channels are coarse steps of its MACs cannot land closer)."""
    assert ratio <= target + 1e-9, f"{ratio:.4f} of the MACs kept, above the target {target}"
    if target - ratio <= tolerance:
        return
    model = MacsModel(graph, layer_macs)
    for g, k in kept.items():
        model.set_kept(g, np.asarray(k))
    limit = target * model.dense * (1 + 1e-9)
    for g, k in kept.items():
        for c in np.setdiff1d(np.arange(graph.groups[g].channels), k):
            model.set_kept(g, np.union1d(k, [c]))
            fits = model.macs <= limit
            model.set_kept(g, np.asarray(k))
            assert not fits, (
                f"{ratio:.4f} of the MACs kept, {target - ratio:.4f} under the target {target}, "
                f"and channel {c} of group {g} fits back"
            )


def check_trains_to_target_exactly(name: str, model: str, target: float, **options) -> None:
    """Train through the hooks, then: the masked model's outputs are the pruned model's, and
    the pruned MACs land under the target (``assert_lands``)."""
    m, x = make_method(name, model, target, **options)
    dense = count_macs(m.model, (x,)).macs
    train(m, batches())
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
    kept = {g: np.nonzero(k)[0] for g, k in m.masks.keep.items()}
    assert_lands(m.graph, m.layer_macs, kept, ratio, target)


def check_resume_gives_the_same_masks(name: str, model: str, stop: int, **options) -> None:
    """Run ``stop`` steps, save the model and method state, continue in a fresh method from
    them: the masks at the end equal an uninterrupted run's."""
    data = batches()
    whole, _ = make_method(name, model, 0.5, **options)
    train(whole, data)
    first, _ = make_method(name, model, 0.5, **options)
    train(first, data[:stop])
    model_state = copy.deepcopy(first.model.state_dict())
    method_state = copy.deepcopy(first.state_dict())
    resumed, _ = make_method(name, model, 0.5, seed=1, **options)  # other weights: all from state
    resumed.model.load_state_dict(model_state)
    resumed.load_state_dict(method_state)
    train(resumed, data[stop:])
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
        train_loader=loader(),
        epochs=2,
        progress=False,
        **options,
    )
    assert target - 0.01 <= result.report.macs_ratio <= target + 1e-9
    assert result.report.method == name


def small_net() -> tuple[fx.GraphModule, torch.Tensor]:
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
