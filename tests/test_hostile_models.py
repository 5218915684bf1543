"""Hostile models: code that traces into a graph that computes something else, or that
pruning would break. Each case is handled exactly (a random plan prunes with outputs equal to
the zeroed model's, gradients equal the original's) or refused with a message naming the
problem and the fix. The ``watch`` fixture checks the user's model is never mutated.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphprune as gp
from graphprune.analysis.rules import (
    EQUIVALENT,
    register,
    register_equivalent,
    treated_as,
)
from graphprune.analysis.rules.tensor_ops import _elementwise
from graphprune.errors import TraceError
from graphprune.passes import fuse_bn
from graphprune.passes.compactor import Compactor
from graphprune.testing.exactness import check_random_plan_exact, randomize_

X = torch.randn(2, 3, 8, 8)


def _group(gm, producer: str):
    (g,) = [g for g in gp.analyze(gm) if producer in g.producers]
    return g


# --- 3. subclassed layers match their exact class only -------------------------------------
class WSConv(nn.Conv2d):
    """Weight-standardised conv: pruning it as a plain Conv2d changes every channel's scale."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class DeclaredConv(nn.Conv2d):
    graphprune_equivalent = nn.Conv2d


class RegisteredConv(nn.Conv2d):
    pass


register_equivalent(RegisteredConv, nn.Conv2d)


class Chain(nn.Module):
    def __init__(self, conv: type[nn.Conv2d]) -> None:
        super().__init__()
        self.stem, self.a = nn.Conv2d(3, 16, 3, padding=1), conv(16, 16, 3, padding=1)
        self.bn, self.b = nn.BatchNorm2d(16), nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.b(torch.relu(self.bn(self.a(torch.relu(self.stem(x))))))


def test_an_undeclared_conv_subclass_is_not_pruned_as_a_conv(watch) -> None:
    model = watch(Chain(WSConv).eval())
    gm = gp.trace(model, (X,), leaf_modules=[WSConv])
    groups = gp.analyze(gm)
    assert not any(g.prunable and "a" in g.producers for g in groups)
    reason = " ".join(_group(gm, "stem").reasons)  # the channels it reads are left whole
    assert "WSConv subclasses Conv2d but is not declared equivalent" in reason
    assert "register_equivalent(WSConv, Conv2d)" in reason and "graphprune_equivalent" in reason


def test_fuse_bn_leaves_an_undeclared_conv_subclass_alone(watch) -> None:
    model = watch(randomize_(Chain(WSConv)).eval())
    gm = gp.trace(model, (X,), leaf_modules=[WSConv])
    assert not fuse_bn(gm).modified
    with torch.no_grad():
        torch.testing.assert_close(gm(X), model(X))


@pytest.mark.parametrize("conv", [DeclaredConv, RegisteredConv])
def test_declared_conv_subclasses_prune_exactly(watch, conv) -> None:
    model = watch(randomize_(Chain(conv)).eval())
    gm = gp.trace(model, (X,), leaf_modules=[conv])
    assert _group(gm, "a").prunable
    assert check_random_plan_exact(gm, (X,))


def test_the_declaration_is_not_inherited() -> None:
    class Child(DeclaredConv):
        def forward(self, x):
            return super().forward(x) * 2

    assert treated_as(DeclaredConv(3, 4, 1)) is nn.Conv2d
    assert treated_as(Child(3, 4, 1)) is None
    with pytest.raises(TypeError, match="must subclass"):
        register_equivalent(nn.Linear, nn.Conv2d)


def test_torchs_own_equivalent_subclasses_keep_their_rules() -> None:
    for m in (nn.BatchNorm2d(4), nn.SyncBatchNorm(4), nn.InstanceNorm2d(4), Compactor(4)):
        assert treated_as(m) is not None, type(m).__name__
    assert treated_as(nn.LazyConv2d(4, 1)) is None  # until materialized into a Conv2d
    assert torch.ao.nn.qat.Conv2d not in EQUIVALENT  # fake-quantized weight: not a Conv2d


# --- 4. custom autograd Functions keep their backward ---------------------------------------
class GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -grad


class ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * 3


class DomainAdversarial(nn.Module):
    def __init__(self, function) -> None:
        super().__init__()
        self.function = function
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.b(self.function.apply(torch.relu(self.a(x))))


def test_a_custom_autograd_function_keeps_its_backward(watch) -> None:
    model = watch(DomainAdversarial(GradReverse))
    gm = gp.trace(model, (X,))
    grads = []
    for m in (model, gm):
        x = X.clone().requires_grad_()
        (g,) = torch.autograd.grad(m(x).square().sum(), x)
        grads.append(g)
    torch.testing.assert_close(grads[1], grads[0])
    g = _group(gm, "a")
    assert not g.prunable
    assert "custom autograd.Function GradReverse" in " ".join(g.reasons)
    assert "register(GradReverse)" in " ".join(g.reasons)


def test_a_function_with_a_registered_rule_prunes_through_it(watch) -> None:
    register(ScaleGrad)(_elementwise)
    model = watch(DomainAdversarial(ScaleGrad).eval())
    gm = gp.trace(model, (X,))
    assert _group(gm, "a").prunable
    assert check_random_plan_exact(gm, (X,))
    x = X.clone().requires_grad_()
    (g,) = torch.autograd.grad(gm(x).sum(), x)
    x2 = X.clone().requires_grad_()
    (g2,) = torch.autograd.grad(model(x2).sum(), x2)
    assert g.shape == g2.shape  # pruned: still differentiable through the Function


# --- 5. code that depends on self.training --------------------------------------------------
class FunctionalDropout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.b(F.dropout(self.a(x), 0.5, self.training))


class Noisy(nn.Module):
    def forward(self, x):
        if self.training:
            return x + 0.1
        return x


class WithNoisy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.noise, self.b = nn.Conv2d(3, 8, 3, padding=1), Noisy(), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.b(self.noise(self.a(x)))


class OuterDropout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner, self.c = FunctionalDropout(), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return self.c(F.dropout(self.inner(x), 0.3, self.training))


def _same_in_both_modes(gm, model) -> None:
    """Seeded runs of the traced copy equal the original's in train mode and in eval mode."""
    flags = [(m, m.training) for m in model.modules()]
    with torch.no_grad():
        for mode in (True, False):
            gm.train(mode)
            model.train(mode)
            torch.manual_seed(1)
            ours = gm(X)
            torch.manual_seed(1)
            torch.testing.assert_close(ours, model(X))
    for m, training in flags:
        m.training = training


@pytest.mark.parametrize("mode", ["train", "eval", "frozen-inner"])
def test_functional_dropout_on_self_training_follows_the_mode(watch, mode) -> None:
    model = OuterDropout().train(mode != "eval")
    if mode == "frozen-inner":
        model.inner.eval()  # a per-module flag must be followed too
    model = watch(model)
    gm = gp.trace(model, (X,))
    _same_in_both_modes(gm, model)
    result = gp.compress(model, example_inputs=(X,), round_to=1, flops_target=0.6)
    pruned = result.model.train()
    assert not torch.equal(pruned(X), pruned(X))  # still dropout when training
    pruned.eval()
    assert torch.equal(pruned(X), pruned(X))


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_a_mode_branch_in_a_submodule_names_it_and_works_as_a_leaf(watch, mode) -> None:
    model = watch(WithNoisy().train(mode == "train"))
    with pytest.raises(TraceError, match=r"(?s)return x \+ 0\.1.*leaf_modules=\[Noisy\]"):
        gp.trace(model, (X,))
    gm = gp.trace(model, (X,), leaf_modules=[Noisy])
    with torch.no_grad():
        for m in (True, False):  # the copy behaves like the original in both modes
            gm.train(m)
            model_out = model.train(m)(X)
            torch.testing.assert_close(gm(X), model_out)
        model.train(mode == "train")


# --- 6. indexed parameters, .data, .mT -----------------------------------------------------
class IndexedScale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)
        self.scale = nn.Parameter(torch.rand(8) + 0.5)

    def forward(self, x):
        return self.b(self.a(x) * self.scale[:, None, None])


class EllipsisScale(IndexedScale):
    def forward(self, x):
        return self.b(self.a(x) * self.scale[..., None, None])


class IntIndexedScale(IndexedScale):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.rand(2, 8) + 0.5)

    def forward(self, x):
        return self.b(self.a(x) * self.scale[0][:, None, None])


class Data(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.b(torch.relu(self.a(x).data))  # old-style code reads .data


class ChannelsLast(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv1d(3, 8, 1), nn.Linear(8, 4)

    def forward(self, x):
        return self.b(self.a(x).mT)


SEQ = torch.randn(2, 3, 5)


@pytest.mark.parametrize(
    "model_cls, x",
    [(IndexedScale, X), (EllipsisScale, X), (Data, X), (ChannelsLast, SEQ)],
    ids=["none-index", "ellipsis-index", "data", "mT"],
)
def test_views_of_channels_prune_exactly(watch, model_cls, x) -> None:
    torch.manual_seed(0)
    model = watch(model_cls().eval())
    gm = gp.trace(model, (x,))
    assert _group(gm, "a").prunable
    assert check_random_plan_exact(gm, (x,))


def test_an_int_indexed_parameter_leaves_its_channels_whole(watch) -> None:
    model = watch(IntIndexedScale().eval())
    gm = gp.trace(model, (X,))
    g = _group(gm, "a")
    assert not g.prunable and any(r.startswith("mul") for r in g.reasons)
    assert check_random_plan_exact(gm, (X,)) == {}


def test_a_failed_rule_leaves_no_phantom_group(watch) -> None:
    class Sideways(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(6, 8)

        def forward(self, x):
            return self.a(x)

    gm = gp.trace(watch(Sideways()), (torch.randn(2, 5, 6),))  # channels on dim 1 meet Linear
    assert not any(g.prunable for g in gp.analyze(gm) if g.producers == ("a",) and not g.members)


# --- 7. tied weights ------------------------------------------------------------------------
class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 3, padding=1)
        self.b.weight = self.a.weight
        self.bn, self.c, self.d = nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.c(torch.relu(self.bn(self.a(x)))) + self.d(self.b(2 * x))


def test_tied_weights_are_pruned_together_and_stay_tied(watch) -> None:
    model = watch(randomize_(Tied()).eval())
    gm = gp.trace(model, (X,))
    g = _group(gm, "a")
    assert g.producers == ("a", "b") and g.prunable
    plan = check_random_plan_exact(gm, (X,))
    assert plan and gm.a.weight is gm.b.weight
    assert gm.a.weight.shape[0] == gm.b.bias.shape[0] == len(plan[g.id])


def test_tied_weights_compress_end_to_end(watch) -> None:
    model = watch(randomize_(Tied()).eval())
    result = gp.compress(model, "magnitude", example_inputs=(X,), flops_target=0.7, round_to=2)
    assert result.report.macs_ratio <= 0.7
    assert result.model.a.weight is result.model.b.weight
    with torch.no_grad():
        out = result.model(X)
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()


class SizeFromAnotherTensor(nn.Module):
    """``B, C, H, W = x.shape`` then ``y.reshape(B, C, H * W)``: the size comes from x's
    channel dim (prunable) while y's channels are blocked (a cumsum over them), as in timm's
    EdgeNeXt (XCA) and LambdaNet. Pruning x must not resize y's reshape."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(3, 16, 1)
        self.c = nn.Conv2d(16, 16, 1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        h = torch.relu(self.c(torch.relu(self.a(x))))
        B, C, H, W = h.shape
        y = torch.cumsum(self.b(x), dim=1).reshape(B, C, H * W)
        return self.fc(y.mean(-1)) + h.mean((2, 3)).sum(1, keepdim=True)


class SizeArithmetic(SizeFromAnotherTensor):
    """The same with arithmetic on the size (``C // heads``, as timm's VOLO)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        h = torch.relu(self.c(torch.relu(self.a(x))))
        B, C, H, W = h.shape
        y = torch.cumsum(self.b(x), dim=1).reshape(B, 2, C // 2, H * W).sum(1)
        return self.fc(y.mean(-1)) + h.mean((2, 3)).sum(1, keepdim=True)


@pytest.mark.parametrize("net", [SizeFromAnotherTensor, SizeArithmetic])
def test_a_size_read_from_a_pruned_dim_does_not_resize_another_tensor(net) -> None:
    torch.manual_seed(0)
    model = net().eval()
    gm = gp.trace(model, (X,))
    plan = check_random_plan_exact(gm, (X,), seed=1)
    assert plan  # a group of h was pruned, y's reshape kept its 16
    result = gp.compress(model, "magnitude", example_inputs=(X,), flops_target=0.8, round_to=1)
    assert result.report.macs_ratio <= 0.8 + 1e-9
    assert result.model(X).shape == model(X).shape


class SizesAsOneValue(nn.Module):
    """``h.view(h.shape[:2] + (-1,))``: the sizes are one traced value, not a list of them
    (timm's MaxViT builds its window shapes this way)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.fc = nn.Conv2d(3, 16, 3, padding=1), nn.Linear(16, 4)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.fc(h.view(h.shape[:2] + (-1,)).mean(-1))


def test_view_sizes_given_as_one_value_follow_the_pruned_channels() -> None:
    torch.manual_seed(0)
    model = SizesAsOneValue().eval()
    gm = gp.trace(model, (X,))
    assert check_random_plan_exact(gm, (X,), seed=2)
    result = gp.compress(model, "magnitude", example_inputs=(X,), flops_target=0.6, round_to=1)
    assert result.model(X).shape == model(X).shape
