"""The fast paths of compile-time bookkeeping agree with the slow, obvious computations:
MACs recorded during shape propagation vs a fresh FlopCounterMode pass, shapes from the
shape pass (with its shape-preserving shortcut) vs a real forward pass, and the vectorized
union-find vs a naive one."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import fx, nn

import graphprune as gp
from graphprune.analysis import build_channel_graph
from graphprune.analysis.atoms import UnionFind
from graphprune.frontend import meta
from graphprune.frontend.trace import propagate_shapes, recorded_flops
from graphprune.passes import prune_channels
from graphprune.planning.macs import count_macs
from graphprune.testing.exactness import random_plan
from graphprune.testing.zoo import ZOO, ZOO_INPUT_SHAPE

NAMES = sorted(ZOO)


def _traced(name: str):
    torch.manual_seed(0)
    model = ZOO[name]().eval()
    x = torch.randn(ZOO_INPUT_SHAPE)
    return model, gp.trace(model, (x,)), x


@pytest.mark.parametrize("name", NAMES)
def test_recorded_macs_equal_a_fresh_count_before_and_after_pruning(name: str) -> None:
    model, gm, x = _traced(name)
    inputs = gm.meta["graphprune.example_inputs"]
    assert recorded_flops(gm, inputs) is not None
    fresh = count_macs(model, (x,))  # the user's module: FlopCounterMode scopes
    assert count_macs(gm, inputs) == fresh
    plan = random_plan(build_channel_graph(gm), np.random.default_rng(0))
    if plan:
        prune_channels(gm, plan=plan, round_to=1)
    recorded = count_macs(gm, inputs)
    gm.meta.pop("graphprune.flops_for")  # force the slow path on the same module
    assert count_macs(gm, inputs) == recorded
    if plan:
        assert recorded.macs < fresh.macs


@pytest.mark.parametrize("edit", ["stride", "weight"])
def test_recorded_macs_are_not_used_after_an_edit_the_runner_never_saw(edit: str) -> None:
    _, gm, _ = _traced("resnet_basic")
    inputs = gm.meta["graphprune.example_inputs"]
    before = count_macs(gm, inputs).macs
    conv = next(m for m in gm.modules() if isinstance(m, nn.Conv2d))
    if edit == "stride":  # no parameter changes shape, yet the MACs drop by 4x downstream
        conv.stride = (2, 2)
    else:  # same number of output channels, a 1x1 kernel instead of a 3x3
        conv.weight = nn.Parameter(conv.weight[:, :, 1:2, 1:2].clone())
        conv.kernel_size, conv.padding = (1, 1), (0, 0)
    assert recorded_flops(gm, inputs) is None
    after = count_macs(gm, inputs)
    assert after.macs < before
    propagate_shapes(gm)  # what the runner does after a pass: recorded counts hold again
    assert recorded_flops(gm, inputs) is not None and count_macs(gm, inputs) == after


@pytest.mark.parametrize("name", NAMES)
def test_shape_pass_records_the_shapes_of_a_real_forward(name: str) -> None:
    _, gm, x = _traced(name)
    real: dict[str, object] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            value = super().run_node(n)
            real[n.name] = meta._shape_of(value)
            return value

    with torch.no_grad():
        Recorder(gm).run(*gm.meta["graphprune.example_inputs"])
    assert {n.name: meta.output_shapes(n) for n in gm.graph.nodes} == real


def _naive_roots(n: int, pairs: list[tuple[int, int]]) -> list[int]:
    parent = list(range(n))

    def find(a: int) -> int:
        while parent[a] != a:
            a = parent[a]
        return a

    for a, b in pairs:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return [find(a) for a in range(n)]


@pytest.mark.parametrize("seed", range(20))
def test_union_find_roots_match_a_naive_union_find(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 300))
    uf = UnionFind()
    uf.new(n)
    pairs: list[tuple[int, int]] = []
    for _ in range(int(rng.integers(0, 2 * n))):
        kind = rng.integers(3)
        if kind == 0:  # long chains are the slow case for label propagation
            start = int(rng.integers(n))
            chain = np.arange(start, min(n, start + 40))[::-1]
            uf.tie(chain)
            pairs += [(int(chain[0]), int(c)) for c in chain[1:]]
        elif kind == 1:
            a, b = rng.integers(n, size=(2, int(rng.integers(1, 5))))
            uf.union_arrays(a, b)
            pairs += list(zip(a.tolist(), b.tolist(), strict=True))
        else:
            rows = rng.integers(n, size=(int(rng.integers(1, 4)), int(rng.integers(1, 4))))
            uf.tie_rows(rows)
            pairs += [(int(r[0]), int(c)) for r in rows for c in r[1:]]
    assert uf.roots().tolist() == _naive_roots(n, pairs)
