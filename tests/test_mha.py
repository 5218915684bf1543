"""nn.MultiheadAttention is traced as q/k/v/out Linear layers (frontend/attention.py), so its
head dims prune like any attention: exactly, with q and k positions together and v's with the
output projection's inputs; with ``prune_heads`` whole heads go, q/k/v and output columns."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import graphprune as gp
from graphprune.analysis import build_channel_graph
from graphprune.frontend.fallback import frozen_submodules, trace_with_fallback
from graphprune.testing.exactness import check_random_plan_exact, randomize_

X = torch.randn(2, 3, 16, 16)


class TinyViT(nn.Module):
    """Patch embedding, one pre-norm block with torch's MultiheadAttention, mean-pool head."""

    def __init__(self, *, batch_first: bool = True, need_weights: bool = False, mask=None):
        super().__init__()
        self.proj = nn.Conv2d(3, 32, 4, 4)
        self.ln = nn.LayerNorm(32)
        self.attn = nn.MultiheadAttention(32, 4, batch_first=batch_first)
        self.fc1, self.fc2 = nn.Linear(32, 64), nn.Linear(64, 32)
        self.head = nn.Linear(32, 10)
        self.batch_first, self.need_weights, self.mask = batch_first, need_weights, mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x).flatten(2).transpose(1, 2)  # (batch, 16 tokens, 32)
        if not self.batch_first:
            x = x.transpose(0, 1)
        y = self.ln(x)
        a, w = self.attn(y, y, y, need_weights=self.need_weights, attn_mask=self.mask)
        x = x + a
        x = x + self.fc2(torch.relu(self.fc1(x)))
        if self.need_weights:
            x = x + w.sum()  # the weights are used, so they must be the module's
        return self.head(x.mean(1 if self.batch_first else 0))


def _group(graph, producer: str):
    (group,) = [g for g in graph.groups if producer in g.producers]
    return group


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights", [False, True])
def test_head_dims_of_multihead_attention_prune_exactly(batch_first, need_weights) -> None:
    torch.manual_seed(0)
    model = randomize_(TinyViT(batch_first=batch_first, need_weights=need_weights)).eval()
    gm = gp.trace(model, (X,))
    assert isinstance(gm.get_submodule("attn.q_proj"), nn.Linear)
    with torch.no_grad():
        torch.testing.assert_close(gm(X), model(X), atol=1e-5, rtol=1e-5)
    graph = build_channel_graph(gm)
    qk, v = _group(graph, "attn.q_proj"), _group(graph, "attn.v_proj")
    assert qk.producers == ("attn.k_proj", "attn.q_proj") and qk.prunable and qk.exact
    assert qk.channels == 8  # head_dim: position j of all 4 heads is one channel
    assert v.prunable and v.exact and v.channels == 8
    assert {m.name: m.size for m in v.members}["attn.out_proj.weight[1]"] == 32
    plan = check_random_plan_exact(gm, (X,))  # pruned outputs == outputs with them zeroed
    assert qk.id in plan and v.id in plan
    assert gm.get_submodule("attn.q_proj").out_features == 4 * len(plan[qk.id])
    assert gm.get_submodule("attn.out_proj").in_features == 4 * len(plan[v.id])


@pytest.mark.parametrize("batch_first", [True, False])
def test_whole_heads_of_multihead_attention_prune_exactly(batch_first) -> None:
    """prune_whole_heads: head h of q_proj, k_proj and v_proj (8 rows each) and its 8 input
    columns of out_proj are one channel of one group of 4."""
    torch.manual_seed(0)
    model = randomize_(TinyViT(batch_first=batch_first)).eval()
    gm = gp.prune_whole_heads(gp.trace(model, (X,)))
    graph = build_channel_graph(gm)
    heads = _group(graph, "attn.q_proj")
    assert heads.producers == ("attn.k_proj", "attn.q_proj", "attn.v_proj")
    assert heads.prunable and heads.exact and heads.channels == 4
    assert {m.name: m.size for m in heads.members}["attn.out_proj.weight[1]"] == 32
    plan = check_random_plan_exact(gm, (X,))  # pruned outputs == outputs with them zeroed
    kept = len(plan[heads.id])
    assert 0 < kept < 4
    for name in ("attn.q_proj", "attn.k_proj", "attn.v_proj"):
        assert gm.get_submodule(name).out_features == 8 * kept
    assert gm.get_submodule("attn.out_proj").in_features == 8 * kept


def test_compress_prunes_whole_heads_when_asked() -> None:
    torch.manual_seed(0)
    model = TinyViT().eval()
    result = gp.compress(
        model, "magnitude", example_inputs=(X,), flops_target=0.5, round_to=1, prune_heads=True
    )
    assert abs(result.report.macs_ratio - 0.5) <= 0.01
    q = result.model.get_submodule("attn.q_proj").out_features
    assert q < 32 and q % 8 == 0  # whole heads of 8 went
    assert result.model.get_submodule("attn.out_proj").in_features == q
    with torch.no_grad():
        assert result.model(X).shape == model(X).shape


def test_compress_reaches_the_target_through_attention() -> None:
    torch.manual_seed(0)
    model = TinyViT().eval()
    result = gp.compress(model, "magnitude", example_inputs=(X,), flops_target=0.5, round_to=1)
    assert abs(result.report.macs_ratio - 0.5) <= 0.01
    assert result.model.get_submodule("attn.k_proj").out_features < 32
    assert type(model.attn) is nn.MultiheadAttention  # the user's model keeps its module


def test_a_masked_call_runs_torchs_function_and_is_not_guessed() -> None:
    """With a mask the module calls torch's functional form, which the trace records as one
    opaque call: its channels stay unprunable, the rest of the model is still pruned."""
    torch.manual_seed(0)
    mask = torch.triu(torch.ones(16, 16, dtype=torch.bool), diagonal=1)
    model = randomize_(TinyViT(mask=mask)).eval()
    gm = trace_with_fallback(model, (X,))
    with torch.no_grad():
        torch.testing.assert_close(gm(X), model(X), atol=1e-5, rtol=1e-5)
    graph = build_channel_graph(gm)
    assert _group(graph, "fc1").prunable  # the MLP is still pruned
    assert not _group(graph, "proj").prunable  # the embedding enters the opaque call
    assert not any("attn.q_proj" in g.producers for g in graph.groups)
    plan = check_random_plan_exact(gm, (X,))
    assert plan and not frozen_submodules(gm)


def test_leaf_multihead_attention_is_kept_as_torchs_module() -> None:
    gm = gp.trace(TinyViT().eval(), (X,), leaf_modules=[nn.MultiheadAttention])
    assert type(gm.get_submodule("attn")) is nn.MultiheadAttention


def test_attention_dropout_follows_the_mode_like_torchs_module() -> None:
    """Seeded, the traced copy drops the same attention weights as torch's module in train
    mode (and returns the dropped weights, as torch does), and none in eval mode."""
    torch.manual_seed(0)
    model = TinyViT(need_weights=True).train()
    model.attn.dropout = 0.3
    gm = gp.trace(model, (X,))
    with torch.no_grad():
        for mode in (True, False):
            gm.train(mode)
            model.train(mode)
            torch.manual_seed(1)
            ours = gm(X)
            torch.manual_seed(1)
            torch.testing.assert_close(ours, model(X))
    gm.train()
    with torch.no_grad():
        assert not torch.equal(gm(X), gm(X))  # still random when training


def tiny_vit_and_input():
    """A ``package.module:factory`` for the CLI: the model and its example inputs."""
    torch.manual_seed(0)
    return TinyViT().eval(), (X,)


@pytest.mark.parametrize("flag, channels", [([], 8), (["--prune-heads"], 4)])
def test_cli_inspect_groups_attention_by_head_dims_or_whole_heads(flag, channels, capsys):
    from graphprune.apps.cli import main

    assert main(["inspect", f"{__name__}:tiny_vit_and_input", "--json", *flag]) == 0
    groups = json.loads(capsys.readouterr().out)["groups"]
    (q,) = [g for g in groups if "attn.q_proj" in g["producers"]]
    assert q["channels"] == channels and q["prunable"] and q["exact"]
