"""Whole attention heads on real transformers (``prune_heads=True``): a head of timm's ViT is
one channel (its q, k, v rows and its output-projection columns), pruning a random set of
heads is exact, and compress lands on the target with fewer heads.

Swin's relative position bias, a parameter table indexed per head, is added to the scores;
no rule follows it yet, so Swin's heads stay whole (blocked, with the reason) and the model
still reaches the target through its MLPs and head dims elsewhere.
"""

from __future__ import annotations

import gc

import pytest
import torch

import graphprune as gp
from graphprune.analysis import build_channel_graph
from graphprune.frontend.fallback import trace_with_fallback
from graphprune.testing.exactness import check_random_plan_exact
from graphprune.testing.real_zoos import zoo_specs

SPECS = {f"{s.source}/{s.name}": s for s in zoo_specs()}


def _spec(key: str):
    if key not in SPECS:
        pytest.skip(f"{key} is not installed or not listed")
    return SPECS[key]


def _qkv_groups(graph):
    return [g for g in graph.groups if any(p.endswith("attn.qkv") for p in g.producers)]


def _heads_traced(key: str):
    """The model, an input, and its trace analyzed for whole heads."""
    spec = _spec(key)
    torch.manual_seed(0)
    model = spec.build().eval()
    x = torch.randn(spec.input_shape)
    return model, x, gp.prune_whole_heads(trace_with_fallback(model, (x,)))


def test_vit_heads_are_channels_and_prune_exactly() -> None:
    _, x, gm = _heads_traced("timm/vit_tiny_patch16_224")
    groups = _qkv_groups(build_channel_graph(gm))
    assert len(groups) == 12  # one per block
    assert all(g.channels == 3 and g.prunable and g.exact for g in groups)  # 3 heads of 64
    plan = check_random_plan_exact(gm, (x,), atol=1e-4)
    assert any(len(plan[g.id]) < 3 for g in groups)
    gc.collect()


def test_compress_prunes_whole_heads_of_a_vit() -> None:
    spec = _spec("timm/vit_tiny_patch16_224")
    torch.manual_seed(0)
    model = spec.build().eval()
    x = torch.randn(spec.input_shape)
    result = gp.compress(
        model, "magnitude", example_inputs=(x,), flops_target=0.5, prune_heads=True
    )
    assert abs(result.report.macs_ratio - 0.5) <= 0.01
    pruned = result.model  # a GraphModule: blocks are submodules by path
    widths = [pruned.get_submodule(f"blocks.{i}.attn.qkv").out_features for i in range(12)]
    assert all(w % (3 * 64) == 0 for w in widths)  # whole heads of 64 dims
    assert min(widths) < 3 * 192
    with torch.no_grad():
        assert result.model(x).shape == model(x).shape
    gc.collect()


def test_swin_heads_say_why_they_stay() -> None:
    _, _, gm = _heads_traced("timm/swin_tiny_patch4_window7_224")
    groups = _qkv_groups(build_channel_graph(gm))
    assert groups and all(not g.prunable for g in groups)
    assert all(any("other content" in r for r in g.reasons) for g in groups)
    gc.collect()
