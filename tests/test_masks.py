"""ChannelMasks and MaskingMethod: masked models equal their pruned models, masked channels
come back with exactly their saved values, masks survive checkpoints, and a toy masking
method trains through compress() to the MACs target."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

import graphprune
from graphprune.analysis import build_channel_graph
from graphprune.frontend.params import get_tensor
from graphprune.frontend.trace import trace
from graphprune.methods import register_method, unregister_method
from graphprune.methods.masking import MaskingConfig, MaskingMethod
from graphprune.methods.masks import ChannelMasks
from graphprune.passes import prune_channels
from graphprune.planning.macs import count_macs
from graphprune.testing.exactness import randomize_
from graphprune.testing.method_runs import random_loader
from graphprune.testing.zoo import ZOO, ZOO_INPUT_SHAPE

MODELS = ["resnet_basic", "densenet", "mobilenet_v2_block", "shufflenet", "se", "fpn"]


def _traced(name: str, seed: int = 0):
    torch.manual_seed(seed)
    model = randomize_(ZOO[name]().eval(), seed)
    x = torch.randn(ZOO_INPUT_SHAPE)
    gm = trace(model, (x,))
    return gm, x, build_channel_graph(gm)


def _random_keep(masks: ChannelMasks, rng: np.random.Generator) -> dict[int, np.ndarray]:
    keep = {}
    for g in masks.groups:
        n = len(masks.keep[g])
        k = np.zeros(n, dtype=bool)
        k[rng.choice(n, size=max(1, n // 2), replace=False)] = True
        keep[g] = k
    return keep


@pytest.mark.parametrize("name", MODELS)
@torch.no_grad()
def test_masked_model_equals_pruned_model(name):
    gm, x, graph = _traced(name)
    dense = gm(x)
    masks = ChannelMasks(gm, graph)
    masks.set_keep(_random_keep(masks, np.random.default_rng(0)))
    masked = gm(x)
    assert not torch.allclose(masked, dense, atol=1e-3)  # the masks did something
    before = sum(p.numel() for p in gm.parameters())
    prune_channels(gm, plan=masks.plan(), round_to=1)
    assert sum(p.numel() for p in gm.parameters()) < before
    torch.testing.assert_close(gm(x), masked, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_regrown_channels_get_exactly_their_saved_values():
    gm, x, graph = _traced("resnet_basic")
    masks = ChannelMasks(gm, graph)
    g = masks.groups[0]
    n = len(masks.keep[g])
    keep = np.ones(n, dtype=bool)
    keep[[1, 3]] = False
    # what the masked channels hold at the moment they are masked, at every site
    sites = [s for s in graph.sites if g in graph.positions(s.atoms.reshape(-1))[0]]
    assert {s.role for s in sites} >= {"out", "in"}

    def entries(channels):
        out = {}
        for s in sites:
            gids, pos = graph.positions(s.atoms.reshape(-1))
            idx = np.nonzero((gids == g) & np.isin(pos, channels))[0]
            t = get_tensor(gm, s.path)
            out[(s.path, s.axis)] = t.index_select(s.axis, torch.from_numpy(idx)).clone()
        return out

    at_mask = entries([1, 3])
    masks.set_keep({g: keep})
    for s in sites:  # producer entries are zero now
        if s.role == "out":
            gids, pos = graph.positions(s.atoms.reshape(-1))
            idx = torch.from_numpy(np.nonzero((gids == g) & np.isin(pos, [1, 3]))[0])
            assert get_tensor(gm, s.path).index_select(s.axis, idx).abs().sum() == 0
    for p in gm.parameters():  # "training" moves everything
        p.add_(torch.randn_like(p))
    masks.apply()
    keep[1] = True  # regrow channel 1 only
    assert masks.set_keep({g: keep}, restore=True) == (0, 1)
    back = entries([1])
    for key, t in back.items():
        path, axis = key
        s = next(s for s in sites if (s.path, s.axis) == key)
        gids, pos = graph.positions(s.atoms.reshape(-1))
        sel = pos[(gids == g) & np.isin(pos, [1, 3])] == 1  # channel 1 among the saved pair
        expected = at_mask[key].index_select(axis, torch.from_numpy(np.nonzero(sel)[0]))
        if s.role in ("out", "stat"):  # a producer row is the channel's alone: exactly back
            torch.testing.assert_close(t, expected, atol=0, rtol=0)
        else:  # a consumer column: the rows of other kept channels trained on; the column
            # was restored as saved (apply() then re-zeroes rows of masked channels only)
            assert t.shape == expected.shape
    still = entries([3])
    for (path, axis), t in still.items():
        s = next(s for s in sites if (s.path, s.axis) == (path, axis))
        if s.role == "out":
            assert t.abs().sum() == 0


def test_state_dict_round_trip_restores_masks_and_saved_values():
    gm, x, graph = _traced("densenet")
    masks = ChannelMasks(gm, graph)
    masks.set_keep(_random_keep(masks, np.random.default_rng(1)))
    state = masks.state_dict()
    gm2, _, graph2 = _traced("densenet")
    other = ChannelMasks(gm2, graph2)
    other.load_state_dict(state)
    assert all(np.array_equal(other.keep[g], masks.keep[g]) for g in masks.groups)
    assert other.plan().keys() == masks.plan().keys()
    gm3, _, graph3 = _traced("resnet_basic")
    with pytest.raises(ValueError, match="other groups or widths"):
        ChannelMasks(gm3, graph3).load_state_dict(state)


def test_bad_masks_are_refused_with_the_reason():
    gm, x, graph = _traced("resnet_basic")
    masks = ChannelMasks(gm, graph)
    g = masks.groups[0]
    with pytest.raises(ValueError, match="at least one"):
        masks.set_keep({g: np.zeros(len(masks.keep[g]), dtype=bool)})
    with pytest.raises(ValueError, match="entries"):
        masks.set_keep({g: np.ones(3, dtype=bool)})
    blocked = [grp.id for grp in graph.groups if not grp.prunable]
    assert blocked  # the input channels
    with pytest.raises(ValueError, match="cannot be masked"):
        ChannelMasks(gm, graph, groups=blocked[:1])


# --- a toy masking method through compress() ----------------------------------------------
@dataclass(frozen=True, slots=True, kw_only=True)
class ToyMaskConfig(MaskingConfig):
    """Common options only."""


class ToyMask(MaskingMethod):
    """Masks by weight norm once, a third into training; keeps training the rest."""

    name = "toy-mask"
    config_class = ToyMaskConfig

    def scores(self):
        from graphprune.planning.selection import l2_scores

        return l2_scores(self.model, self.graph)

    def on_step(self):
        if self.iteration == max(1, self.total_iters // 3):
            self.mask_to(self.scores())


@pytest.fixture
def toy_method():
    register_method(ToyMask)
    yield ToyMask
    unregister_method("toy-mask")


_loader = random_loader


@pytest.mark.parametrize("target", [0.5, 0.25])
def test_a_masking_method_trains_to_the_target_and_ends_exact(toy_method, target):
    torch.manual_seed(0)
    model = ZOO["resnet_basic"]()
    x = torch.randn(ZOO_INPUT_SHAPE)
    m = toy_method(trace(model, (x,)), flops_target=target, total_iters=8)
    opt = torch.optim.SGD(m.param_groups(0.05), lr=0.05, momentum=0.9)
    for xb, yb in list(_loader()) * 2:
        loss = torch.nn.functional.cross_entropy(m.model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        m.step()
        if m.masked_once:  # hard masks: every masked producer entry is zero after the step
            for s in m.masks._sites:
                if s.role == "out":
                    dropped = np.zeros(len(s.gids), dtype=bool)
                    for g, k in m.masks.keep.items():
                        dropped |= (s.gids == g) & ~k[np.minimum(s.pos, len(k) - 1)]
                    t = get_tensor(m.model, s.path)
                    idx = torch.from_numpy(np.nonzero(dropped)[0])
                    assert t.detach().index_select(s.axis, idx).abs().sum() == 0
    assert m.masked_once and m.iteration == 8
    m.model.eval()
    with torch.no_grad():
        masked_out = m.model(x)
    dense = count_macs(m.model, (x,)).macs
    pruned = m.finalize()
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), masked_out, atol=1e-5, rtol=1e-5)
    ratio = count_macs(pruned, (x,)).macs / dense
    assert target - 0.01 <= ratio <= target + 1e-9


def test_compress_runs_a_registered_masking_method(toy_method):
    torch.manual_seed(0)
    model = ZOO["resnet_basic"]()
    x = torch.randn(ZOO_INPUT_SHAPE)
    result = graphprune.compress(
        model,
        "toy-mask",
        example_inputs=(x,),
        flops_target=0.5,
        train_loader=_loader(),
        epochs=2,
        progress=False,
    )
    assert 0.49 <= result.report.macs_ratio <= 0.5 + 1e-9
    assert result.model(x).shape == model(x).shape


@torch.no_grad()
def test_last_values_are_what_a_full_restore_gives_back():
    gm, x, graph = _traced("resnet_basic")
    masks = ChannelMasks(gm, graph)
    masks.set_keep(_random_keep(masks, np.random.default_rng(2)))
    for t in gm.state_dict().values():  # training moves everything; masked rows re-zeroed
        if t.is_floating_point():
            t.add_(torch.randn_like(t))
    masks.apply()
    paths = sorted({s.path for s in graph.sites})
    last = {p: masks.last_values(p) for p in paths}
    now = {p: get_tensor(gm, p).clone() for p in paths}
    assert any(not torch.equal(last[p], now[p]) for p in paths)  # saved values differ
    masks.set_keep({g: np.ones(len(k), dtype=bool) for g, k in masks.keep.items()}, restore=True)
    for p in paths:
        torch.testing.assert_close(last[p], get_tensor(gm, p), rtol=0, atol=0)


@torch.no_grad()
def test_filters_only_masks_zero_the_filters_and_keep_the_norm_layers():
    gm, x, graph = _traced("resnet_basic")
    masks = ChannelMasks(gm, graph)
    g = masks.groups[0]
    keep = np.ones(len(masks.keep[g]), dtype=bool)
    keep[[0, 2]] = False
    masks.set_keep({g: keep}, filters_only=True)
    out = [s for s in graph.sites if s.role == "out" and g in graph.positions(s.atoms)[0]]
    dims = set()
    for s in out:
        gids, pos = graph.positions(s.atoms)
        idx = torch.from_numpy(np.nonzero((gids == g) & np.isin(pos, [0, 2]))[0])
        t = get_tensor(gm, s.path).index_select(s.axis, idx)
        dims.add(t.dim())
        assert (t.abs().sum() == 0) == (t.dim() >= 2), s.path  # filters zero, norms kept
    assert dims >= {1, 4}
    masks.apply()  # the full mask zeroes every producer entry
    for s in out:
        gids, pos = graph.positions(s.atoms)
        idx = torch.from_numpy(np.nonzero((gids == g) & np.isin(pos, [0, 2]))[0])
        assert get_tensor(gm, s.path).index_select(s.axis, idx).abs().sum() == 0
