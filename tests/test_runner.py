"""The pass runner: recompile/shapes after each pass, requirements, and output verification."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from torch import fx, nn

import graphprune as gp
from graphprune.errors import GraphInvariantError
from graphprune.frontend import meta
from graphprune.passes import cleanup, fold_compactors, fuse_bn, insert_compactors, prune_channels
from graphprune.passes.compactor import Compactor
from graphprune.passes.runner import PassResult, graph_pass, run_passes
from graphprune.testing.exactness import randomize_
from graphprune.testing.zoo import ZOO, ZOO_INPUT_SHAPE


@graph_pass(preserves_outputs=True)
def scale_first_conv(gm: fx.GraphModule, *, factor: float = 1.5) -> PassResult:
    """Deliberately broken: claims to preserve outputs but scales the first conv's weight."""
    conv = next(m for m in gm.modules() if isinstance(m, nn.Conv2d))
    with torch.no_grad():
        conv.weight.mul_(factor)
    return PassResult(gm, True, {})


@graph_pass(preserves_outputs=False)
def double_output(gm: fx.GraphModule) -> PassResult:
    """Not output-preserving, and honest about it: y -> 2y."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    (y,) = out.args
    with gm.graph.inserting_before(out):
        doubled = gm.graph.call_function(torch.mul, (y, 2.0))
    out.args = (doubled,)
    return PassResult(gm, True, {})


def _traced(name: str = "resnet_basic"):
    torch.manual_seed(0)
    model = randomize_(ZOO[name]()).eval()
    x = torch.randn(ZOO_INPUT_SHAPE)
    return model, gp.trace(model, (x,)), x


def test_broken_output_preserving_pass_is_named_with_the_difference() -> None:
    _, gm, _ = _traced()
    with pytest.raises(GraphInvariantError) as info:
        run_passes(gm, [fuse_bn, cleanup, partial(scale_first_conv, factor=1.5)], verify=True)
    msg = str(info.value)
    assert "pass scale_first_conv" in msg
    assert "passes run before it: fuse_bn, cleanup" in msg
    assert "max |difference|" in msg and "declared output-preserving" in msg


def test_without_verify_the_broken_pass_goes_unnoticed_and_honest_passes_are_not_compared() -> None:
    _, gm, x = _traced()
    run_passes(gm, [partial(scale_first_conv, factor=1.5)])
    _, gm, x = _traced()
    with torch.no_grad():
        before = gm(x)
    out = run_passes(gm, [double_output, fuse_bn], verify=True).gm
    with torch.no_grad():
        torch.testing.assert_close(out(x), 2 * before, atol=1e-5, rtol=1e-5)


def test_a_tiny_change_within_float32_tolerance_passes_and_one_just_above_fails() -> None:
    _, gm, _ = _traced()
    run_passes(gm, [partial(scale_first_conv, factor=1 + 1e-7)], verify=True)
    with pytest.raises(GraphInvariantError, match="scale_first_conv"):
        run_passes(gm, [partial(scale_first_conv, factor=1.01)], verify=True)


def test_runner_recompiles_and_rerecords_shapes_after_a_pass() -> None:
    _, gm, x = _traced()
    graph = gp.analyze(gm)
    g = next(g for g in graph if g.prunable and g.channels >= 4)
    prune_channels(gm, plan={g.id: [0, 1]}, round_to=1)
    conv = gm.get_submodule(g.producers[0])
    node = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == g.producers[0])
    assert conv.out_channels == 2 and meta.shape(node)[1] == 2
    with torch.no_grad():
        assert gm(x).shape == (ZOO_INPUT_SHAPE[0], 10)


def test_requirement_failure_names_the_pass_and_the_node() -> None:
    model, gm, _ = _traced()
    insert_compactors(gm)
    with pytest.raises(GraphInvariantError) as info:
        run_passes(gm, [cleanup, fold_compactors])  # BN still sits between conv and compactor
    msg = str(info.value)
    assert "pass fold_compactors" in msg and "compactors_follow_dense_convs" in msg
    assert "_compactor" in msg and "run fuse_bn first" in msg


def test_options_are_checked_by_name() -> None:
    _, gm, _ = _traced()
    with pytest.raises(TypeError, match="threshold"):
        run_passes(gm, [partial(fuse_bn, threshold=0.1)])
    with pytest.raises(TypeError, match="by keyword"):
        run_passes(gm, [partial(fold_compactors, 0.1)])
    with pytest.raises(TypeError, match="not a pass"):
        run_passes(gm, [lambda gm: PassResult(gm, False)])


@pytest.mark.parametrize("name", sorted(ZOO))
def test_resrep_finalize_pipeline_verifies_on_the_zoo(name: str) -> None:
    """Every pass in insert -> fuse -> fold -> dead-channel prune -> cleanup preserves outputs;
    verify=True checks each against the one before (compactors randomized so it is not vacuous)."""
    model, gm, x = _traced(name)
    run_passes(gm, [insert_compactors], verify=True)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in gm.modules():
            if isinstance(m, Compactor):
                m.weight.add_(0.1 * torch.randn(m.weight.shape, generator=g))
                m.weight[0].zero_()  # one dead row: prune_channels must remove it exactly
        expected = gm(x)
    result = run_passes(gm, [fuse_bn, fold_compactors, prune_channels, cleanup], verify=True)
    with torch.no_grad():
        scale = float(expected.abs().max())
        assert float((result.gm(x) - expected).abs().max()) <= 1e-4 * scale + 1e-6
