"""nn.MultiheadAttention as layers the channel rules can see into.

torch's module is a leaf (its forward is one fused function with shape checks fx cannot
trace), so its channels, and the embedding channels around it, would stay unprunable. Before
tracing, ``split_multihead_attention`` replaces each plain one in the traced copy by
``SplitMultiheadAttention``: the same computation written as separate q/k/v Linear layers,
a view to heads, ``scaled_dot_product_attention`` (or the explicit softmax when attention
weights or attention dropout are asked for) and the output Linear. The head-dim rules
(``analysis/rules/attention.py``) then prune position j of every head in q and k alike (and
in v with the output projection's inputs), keeping the dense 1/sqrt(head_dim) scale.

Only modules of exactly this class with one embedding size for q, k and v, no bias_k/bias_v
and no add_zero_attn are replaced. A call with a mask runs torch's own functional form on the
split weights (exact for every mask form), which the trace records as one opaque call: its
channels stay unprunable instead of guessed.
The user's model is never touched: trace() replaces modules in its copy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class SplitMultiheadAttention(nn.Module):
    """What ``nn.MultiheadAttention`` computes, with its packed in-projection split into
    ``q_proj``/``k_proj``/``v_proj``. Outputs equal the module's up to float rounding."""

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        e, bias = mha.embed_dim, mha.in_proj_bias is not None
        self.num_heads, self.batch_first, self.dropout = mha.num_heads, mha.batch_first, mha.dropout
        self.scale = float(mha.head_dim) ** -0.5  # the dense scale, kept when head dims shrink
        self.training = mha.training
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(e, e, bias=bias) for _ in range(3))
        self.out_proj = nn.Linear(e, e, bias=mha.out_proj.bias is not None)
        with torch.no_grad():
            for i, proj in enumerate((self.q_proj, self.k_proj, self.v_proj)):
                proj.weight.copy_(mha.in_proj_weight[i * e : (i + 1) * e])
                if bias:
                    proj.bias.copy_(mha.in_proj_bias[i * e : (i + 1) * e])
            self.out_proj.weight.copy_(mha.out_proj.weight)
            if mha.out_proj.bias is not None:
                self.out_proj.bias.copy_(mha.out_proj.bias)
        for p in self.parameters():
            p.requires_grad_(mha.in_proj_weight.requires_grad)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        if key_padding_mask is not None or attn_mask is not None or is_causal:
            return self._masked(
                query, key, value, key_padding_mask, need_weights, attn_mask,
                average_attn_weights, is_causal,
            )  # fmt: skip
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        q, k = self._heads(self.q_proj(query)), self._heads(self.k_proj(key))
        v = self._heads(self.v_proj(value))
        weights = None
        if need_weights or self.dropout > 0.0:
            attn = torch.softmax((q * self.scale) @ k.transpose(-2, -1), dim=-1)
            attn = F.dropout(attn, self.dropout, self.training)  # torch returns them dropped
            weights = attn.mean(dim=1) if average_attn_weights else attn
            out = attn @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        out = self.out_proj(out.transpose(1, 2).flatten(2))
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, (weights if need_weights else None)

    def _heads(self, x: Tensor) -> Tensor:
        """(batch, length, embed) -> (batch, heads, length, head_dim)."""
        return x.reshape(x.shape[0], x.shape[1], self.num_heads, -1).transpose(1, 2)

    def _masked(self, query, key, value, key_padding_mask, need_weights, attn_mask, average,
                is_causal):  # fmt: skip
        """torch's own function on the split weights: exact for every mask form."""
        if self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        bias = None
        if self.q_proj.bias is not None:
            bias = torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias])
        out, weights = F.multi_head_attention_forward(
            query, key, value, self.q_proj.out_features, self.num_heads, None, bias, None, None,
            False, self.dropout, self.out_proj.weight, self.out_proj.bias,
            training=self.training, key_padding_mask=key_padding_mask,
            need_weights=need_weights, attn_mask=attn_mask, use_separate_proj_weight=True,
            q_proj_weight=self.q_proj.weight, k_proj_weight=self.k_proj.weight,
            v_proj_weight=self.v_proj.weight, average_attn_weights=average, is_causal=is_causal,
        )  # fmt: skip
        return (out.transpose(0, 1) if self.batch_first else out), weights


def split_multihead_attention(model: nn.Module, keep: tuple[type, ...] = ()) -> list[str]:
    """Replace every plain ``nn.MultiheadAttention`` in ``model`` (in place: call it on a
    copy) by ``SplitMultiheadAttention``; the paths replaced. ``keep``: the user's leaf types
    (a module the user asked to keep whole stays as it is)."""
    if nn.MultiheadAttention in keep:
        return []
    done = []
    for path, m in list(model.named_modules()):
        if type(m) is not nn.MultiheadAttention or not path or not _plain(m):
            continue
        parent, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent), name, SplitMultiheadAttention(m))
        done.append(path)
    return done


def _plain(m: nn.MultiheadAttention) -> bool:
    return (
        m._qkv_same_embed_dim
        and m.in_proj_weight is not None
        and m.bias_k is None
        and m.bias_v is None
        and not m.add_zero_attn
    )
