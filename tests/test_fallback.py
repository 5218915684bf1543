"""The tracing fallback: a submodule fx cannot trace is frozen, the rest is still pruned."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphprune as gp
from graphprune.analysis import build_channel_graph
from graphprune.errors import TraceError
from graphprune.frontend.fallback import frozen_submodules, trace_with_fallback
from graphprune.testing.zoo import Untraceable


class ClampOutliers(nn.Module):
    """Python control flow on tensor values (a data-dependent guard): fx sees a Proxy where
    the code needs a bool, and no example input can fix it (control flow on shapes alone is
    fixed for the example inputs instead). Holds a conv, so freezing it must keep its
    weights."""

    def __init__(self, channels: int, limit: float = 1.0) -> None:
        super().__init__()
        self.limit = limit
        self.mix = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.abs().amax() > self.limit:
            x = x.clamp(-self.limit, self.limit)
        return self.mix(x)


class Net(nn.Module):
    """Prunable convs before and after a block fx cannot trace."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(32, 64, 3, padding=1), nn.ReLU())
        self.neck = nn.Conv2d(64, 16, 1)
        self.guard = ClampOutliers(16)
        self.tail = nn.Sequential(nn.Conv2d(16, 64, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.guard(self.neck(self.body(self.stem(x))))
        return self.fc(self.tail(x).mean((2, 3)))


X = torch.randn(2, 3, 20, 20) * 10  # large values: the clamping branch runs


def test_plain_trace_fails_and_names_the_submodule() -> None:
    with pytest.raises(TraceError) as err:
        gp.trace(Net(), (X,))
    assert err.value.module_path == "guard"


def test_fallback_freezes_only_the_failing_submodule_and_keeps_outputs() -> None:
    torch.manual_seed(0)
    model = Net().eval()
    gm = trace_with_fallback(model, (X,))
    frozen = frozen_submodules(gm)
    assert list(frozen) == ["guard"]
    assert "control flow" in frozen["guard"]
    call = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == "guard"]
    assert len(call) == 1  # one opaque call; the clamping branch is not in the graph
    with torch.no_grad():
        torch.testing.assert_close(gm(X), model(X))
    groups = build_channel_graph(gm).groups
    by_producer = {g.producers: g for g in groups}
    assert by_producer[("neck",)].prunable is False  # read by the frozen block
    assert by_producer[("stem.0",)].prunable and by_producer[("body.0",)].prunable
    assert by_producer[("tail.0",)].prunable


def test_compress_prunes_around_a_frozen_submodule_and_reports_it() -> None:
    torch.manual_seed(0)
    model = Net().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = gp.compress(model, "magnitude", example_inputs=(X,), flops_target=0.6, round_to=1)
    dense = gp.count_macs(model, (X,)).macs
    assert gp.count_macs(result.model, (X,)).macs / dense <= 0.61
    assert list(result.report.frozen_submodules) == ["guard"]
    assert "frozen (not traced, not pruned): guard" in result.report.format()
    pruned = result.model
    assert pruned.get_submodule("guard.mix").weight.shape == (16, 16, 1, 1)  # frozen: untouched
    assert pruned.get_submodule("body.0").weight.shape[0] < 64  # the rest is pruned
    with torch.no_grad():
        assert pruned(X).shape == model(X).shape
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_failure_in_the_models_own_forward_still_raises() -> None:
    with pytest.raises(TraceError, match="could not trace Untraceable"):
        trace_with_fallback(Untraceable(), (torch.randn(1, 3, 32, 32),))


class _Outer(nn.Module):
    """A parent that branches on its (frozen) child's output values: both get frozen."""

    def __init__(self) -> None:
        super().__init__()
        self.guard = ClampOutliers(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.guard(x)
        return y * 2 if y.mean() > 0 else y


class _Wrap(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = _Outer()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.inner(x))


def test_freezing_repeats_up_the_module_tree() -> None:
    gm = trace_with_fallback(_Wrap(), (X,))
    assert list(frozen_submodules(gm)) == ["inner.guard", "inner"]
    with pytest.raises(TraceError, match="after freezing inner.guard"):
        trace_with_fallback(_Wrap(), (X,), max_frozen=1)


class VarArgs(nn.Module):
    """A forward that takes ``*args, **kwargs`` (ultralytics' models do): fx would iterate a
    Proxy for them. C2f-style ``list(x.chunk(2, 1))`` inside: the chunk count is static."""

    def __init__(self) -> None:
        super().__init__()
        self.cv1 = nn.Conv2d(3, 32, 3, padding=1)
        self.m = nn.ModuleList(nn.Conv2d(16, 16, 3, padding=1) for _ in range(2))
        self.cv2 = nn.Conv2d(64, 8, 1)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if kwargs.get("augment"):
            x = x.flip(-1)
        y = list(self.cv1(x).chunk(2, 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


def test_varargs_forward_is_traced_through_a_wrapper_that_leaves_no_trace() -> None:
    torch.manual_seed(0)
    model = VarArgs().eval()
    gm = trace_with_fallback(model, (X,))
    assert frozen_submodules(gm) == {}
    targets = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    assert targets == {"cv1", "m.0", "m.1", "cv2"}  # the model's own names, no wrapper prefix
    with torch.no_grad():
        torch.testing.assert_close(gm(X), model(X))
    result = gp.compress(model, example_inputs=(X,), flops_target=0.5, round_to=1)
    assert gp.count_macs(result.model, (X,)).macs / gp.count_macs(model, (X,)).macs <= 0.51
    assert result.model.get_submodule("cv1").weight.shape[0] < 32


def test_list_of_a_static_chunk_traces_plainly() -> None:
    class Block(VarArgs):
        def forward(self, x: torch.Tensor) -> torch.Tensor:  # no *args: plain trace
            return super().forward(x)

    gm = gp.trace(Block().eval(), (X,))
    assert sum(n.target == "chunk" for n in gm.graph.nodes) == 1


# --- mode-dependent submodules and tensor constants (issue 8: levit, efficientformer, swin) ---
class CachedBias(nn.Module):
    """A bias cached in eval mode only, as timm's LeViT/EfficientFormer attention does: the
    same values in both modes, but the eval-mode trace records the cache bookkeeping."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.randn(channels))
        self.mix = nn.Conv2d(channels, channels, 1)
        self.cache: dict[str, torch.Tensor] = {}

    def biases(self, device: torch.device) -> torch.Tensor:
        if self.training:
            return self.bias[:, None, None]
        key = str(device)
        if key not in self.cache:
            self.cache[key] = self.bias[:, None, None]
        return self.cache[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mix(x) + self.biases(x.device)


class WithCachedBias(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU())
        self.attn = CachedBias(32)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.attn(self.b(self.a(x))).mean((2, 3)))


def test_a_mode_dependent_submodule_is_frozen_and_the_rest_pruned() -> None:
    torch.manual_seed(0)
    model = WithCachedBias().eval()
    with pytest.raises(TraceError) as err:
        gp.trace(model, (X,))
    assert err.value.module_path == "attn"
    gm = trace_with_fallback(model, (X,))
    assert list(frozen_submodules(gm)) == ["attn"]
    assert "train and eval mode" in frozen_submodules(gm)["attn"]
    with torch.no_grad():
        for mode in (True, False):  # the frozen leaf runs its own forward in either mode
            torch.testing.assert_close(gm.train(mode)(X), model.train(mode)(X))
    model.eval()
    result = gp.compress(model, "magnitude", example_inputs=(X,), flops_target=0.7, round_to=1)
    assert result.model.attn.mix.weight.shape == model.attn.mix.weight.shape  # frozen
    assert result.model.get_submodule("a.0").out_channels < 16  # the rest still pruned
    assert result.report.macs_ratio <= 0.71


class FlagBatchNorm(nn.BatchNorm2d):
    """timm's BatchNormAct2d passes its training flag to F.batch_norm: only that argument
    differs between the modes, which the traced graph can follow."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, self.training,
            0.1, self.eps,
        )  # fmt: skip


class FlagNormThenCachedBias(WithCachedBias):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), FlagBatchNorm(16), nn.ReLU())


def test_a_mode_flag_argument_before_mode_dependent_code_is_not_blamed() -> None:
    # The first difference between the modes is F.batch_norm's flag; the code that really
    # depends on the mode (the bias cache) comes later. Only its module may be frozen, not
    # every norm (timm's EfficientFormerV2 froze all 30 BatchNormAct2d that way).
    torch.manual_seed(0)
    model = FlagNormThenCachedBias().eval()
    gm = trace_with_fallback(model, (X,))
    assert list(frozen_submodules(gm)) == ["attn"]
    assert any(n.target is F.batch_norm for n in gm.graph.nodes)
    with torch.no_grad():
        for mode in (False, True):
            torch.testing.assert_close(gm.train(mode)(X), model.train(mode)(X))
    model.eval()
    result = gp.compress(model, "magnitude", example_inputs=(X,), flops_target=0.7, round_to=1)
    assert result.model.get_submodule("a.0").out_channels < 16
    assert result.report.macs_ratio <= 0.71


class TableScale(nn.Module):
    """A plain tensor attribute (not a buffer) and a tensor made in forward: fx stores both as
    ``_tensor_constantN`` attributes of the root, numbered on by every further trace."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)
        self.table = torch.rand(8) + 0.5
        self.drop = nn.Dropout(0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.drop(self.a(x)) * self.table[:, None, None]
        return self.b(y + torch.tensor([0.25]))


class ModeConstant(TableScale):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # a constant that differs by mode
        return self.b(self.a(x) + torch.tensor([0.5 if self.training else 0.25]))


def test_tensor_constants_renumbered_by_a_retrace_are_the_same_graph() -> None:
    torch.manual_seed(0)
    model = TableScale().eval()
    gm = gp.trace(model, (X,))
    with torch.no_grad():
        torch.testing.assert_close(gm(X), model(X))
    with pytest.raises(TraceError, match="train and eval mode"):
        gp.trace(ModeConstant(), (X,))  # equal names are not enough: the values must match


def _drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    if p == 0.0 or not training:  # timm's drop_path: a branch on the flag, not an argument
        return x
    keep = x.new_empty(x.shape[0], 1, 1, 1).bernoulli_(1 - p)
    return x * keep / (1 - p)


class DropPath(nn.Module):
    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _drop_path(x, self.p, self.training)


class DropBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.inner = nn.Sequential(nn.Conv2d(c, 2 * c, 1), nn.ReLU(), nn.Conv2d(2 * c, c, 1))
        self.drop = DropPath(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop(self.inner(x))


class WithDropPath(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.b1, self.b2 = DropBlock(16), DropBlock(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.b2(self.b1(self.stem(x))).mean((2, 3)))


def test_every_module_of_a_mode_dependent_class_is_frozen_not_its_callers() -> None:
    """The op only train mode runs sits in DropPath (through a function), the op only eval
    mode runs (the residual add) in the block: DropPath is frozen, both instances at once,
    and the blocks' hidden channels stay prunable."""
    torch.manual_seed(0)
    model = WithDropPath().eval()
    gm = trace_with_fallback(model, (X,))
    assert list(frozen_submodules(gm)) == ["b1.drop"]
    assert "every DropPath kept as a leaf (2 modules)" in frozen_submodules(gm)["b1.drop"]
    assert {n.target for n in gm.graph.nodes if n.op == "call_module"} >= {"b1.drop", "b2.drop"}
    with torch.no_grad():
        torch.testing.assert_close(gm(X), model(X))
    result = gp.compress(model, "magnitude", example_inputs=(X,), flops_target=0.6, round_to=1)
    assert result.model.get_submodule("b1.inner.0").out_channels < 32
    assert result.model.get_submodule("stem").out_channels == 16  # read by the frozen leaves
    assert result.report.macs_ratio <= 0.61


# --- a model whose own forward runs code in train mode only (GoogLeNet, Inception v3) -------
class AuxNet(nn.Module):
    """An auxiliary classifier on an inner feature map, run in train mode only, from the
    model's own forward (``if self.training and self.aux_logits``, as torchvision's GoogLeNet
    and Inception v3): no submodule to freeze."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.aux = nn.Linear(16, 10)
        self.fc = nn.Linear(32, 10)
        self.aux_logits = True

    def forward(self, x: torch.Tensor):
        x = self.a(x)
        aux = self.aux(x.mean((2, 3))) if self.training and self.aux_logits else None
        out = self.fc(self.b(x).mean((2, 3)))
        return (out, aux) if self.training and self.aux_logits else out


def test_a_models_own_train_mode_only_code_is_traced_in_eval_mode_and_reported() -> None:
    torch.manual_seed(0)
    model = AuxNet().eval()
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(TraceError, match="train and eval mode"):
        gp.trace(model, (x,))  # the strict trace still refuses
    gm = trace_with_fallback(model, (x,))
    assert "train mode only" in gm.meta["graphprune.eval_mode_only"]
    assert "aux" not in dict(gm.named_modules())  # the train-mode-only head is not in it
    with torch.no_grad():
        torch.testing.assert_close(gm.eval()(x), model(x))
    result = gp.compress(model, "magnitude", example_inputs=(x,), flops_target=0.5)
    report = result.report
    assert report.eval_mode_only and "traced in eval mode only" in report.eval_mode_only
    assert "eval mode only" in report.format()
    assert report.macs_ratio <= 0.5 + 1e-9
    assert result.model.eval()(x).shape == model(x).shape
    assert model.training is False and isinstance(model.aux, nn.Linear)  # the user's model
