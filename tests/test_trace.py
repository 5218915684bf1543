"""trace(): shapes in node.meta, the user's model left alone, errors that say what to do."""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from graphprune import trace
from graphprune.analysis import analyze, build_channel_graph
from graphprune.errors import TraceError
from graphprune.frontend import meta
from graphprune.frontend.specialize import SHAPE_SPECIALIZED
from graphprune.passes import prune_channels
from graphprune.testing.exactness import random_plan
from graphprune.testing.zoo import ZOO, ZOO_INPUT_SHAPE, Untraceable


class Gate(nn.Module):
    """Data-dependent control flow: fx cannot trace through it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return x * 2
        return x - 1


class Gated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.gate = Gate()
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(self.gate(self.conv(x)))
        return self.fc(torch.flatten(self.pool(y), 1))


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("name", sorted(ZOO))
def test_trace_records_shapes_matching_eager_modules(name: str) -> None:
    torch.manual_seed(0)
    model = ZOO[name]().eval()
    x = torch.randn(2, *ZOO_INPUT_SHAPE[1:])
    # Ground truth from eager execution: every leaf module's output shape via hooks.
    eager: dict[str, tuple[int, ...]] = {}
    hooks = [
        m.register_forward_hook(lambda mod, inp, out, n=n: eager.__setitem__(n, tuple(out.shape)))
        for n, m in model.named_modules()
        if not list(m.children())
    ]
    with torch.no_grad():
        y = model(x)
    for h in hooks:
        h.remove()

    gm = trace(model, (x,))
    assert isinstance(gm, fx.GraphModule)
    nodes = list(gm.graph.nodes)
    placeholder = next(n for n in nodes if n.op == "placeholder")
    assert meta.shape(placeholder) == tuple(x.shape)
    assert placeholder.meta[meta.SHAPE] == tuple(x.shape)
    modules = [n for n in nodes if n.op == "call_module"]
    assert modules
    for n in modules:
        assert meta.shape(n) == eager[n.target], n.name
    out_node = next(n for n in nodes if n.op == "output")
    assert meta.shape(out_node.args[0]) == tuple(y.shape)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), y)


def test_trace_does_not_mutate_the_model_even_after_pruning_the_copy() -> None:
    torch.manual_seed(0)
    model = ZOO["resnet_basic"]()  # train mode: a shape run must not touch BN statistics
    before = _state(model)
    x = torch.randn(ZOO_INPUT_SHAPE)
    gm = trace(model, (x,))
    assert model.training
    _assert_same_state(before, _state(model))
    own = {id(p) for p in model.parameters()} | {id(b) for b in model.buffers()}
    assert not own & ({id(p) for p in gm.parameters()} | {id(b) for b in gm.buffers()})

    graph = build_channel_graph(gm)
    plan = random_plan(graph, np.random.default_rng(0))
    assert plan
    result = prune_channels(gm, plan=plan, round_to=1)
    assert result.modified
    assert sum(p.numel() for p in gm.parameters()) < sum(p.numel() for p in model.parameters())
    _assert_same_state(before, _state(model))
    with torch.no_grad():
        model.eval()(x)  # still runs with its original widths


class OptionalMask(nn.Module):
    """timm's Hiera: ``forward(x, mask=None)``; masking code and no head when a mask is given."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x, mask=None, pool: str = "avg"):
        x = self.conv(x)
        if mask is not None:
            x = x * mask.view(x.shape[0], 1, 8, 8)
        if mask is None:
            x = x.mean((2, 3)) if pool == "avg" else x.amax((2, 3))
            x = self.head(x)
        return x


def test_parameters_left_out_of_the_example_inputs_keep_their_defaults() -> None:
    """The graph is ``model(x)``: mask is None and pool is "avg" there, not proxies (a proxy
    mask is "not None", and the trace would take the masking branch and drop the head)."""
    torch.manual_seed(0)
    model = OptionalMask().eval()
    x = torch.randn(2, 3, 8, 8)
    gm = trace(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x))
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["conv", "head"]
    (group,) = [g for g in build_channel_graph(gm).groups if g.producers == ("conv",)]
    assert group.prunable


class ShapeBranches(nn.Module):
    """CrossViT's ``if H != img_size: resize`` and Nest's ``int(math.sqrt(T))``: control flow
    on shapes, after a BatchNorm whose statistics must not move while the trace computes it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.head = nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8, 4)

    def forward(self, x):
        x = self.bn(self.conv1(x))
        if x.shape[-1] != 8:
            x = F.interpolate(x, size=(8, 8))
        side = int(math.sqrt(x.shape[2] * x.shape[3]))
        tokens = x.flatten(2)
        x = tokens.reshape(tokens.shape[0], tokens.shape[1], side, side)
        return self.head(self.conv2(x).mean((2, 3)))


def test_control_flow_on_shapes_is_fixed_for_the_example_inputs_and_recorded() -> None:
    torch.manual_seed(0)
    model = ShapeBranches().train()
    x = torch.randn(2, 3, 8, 8)
    stats = model.bn.running_mean.clone()
    with pytest.warns(UserWarning, match="control flow on input shapes was fixed"):
        gm = trace(model, (x,))
    fixed = gm.meta[SHAPE_SPECIALIZED]
    assert len(fixed) == 2
    assert "if x.shape[-1] != 8:" in fixed[0] and "int(math.sqrt(" in fixed[1]
    assert not any(n.target is F.interpolate for n in gm.graph.nodes)  # the branch not taken
    torch.testing.assert_close(model.bn.running_mean, stats)  # nothing ran in train mode
    torch.testing.assert_close(gm.get_buffer("bn.running_mean"), stats)
    model.eval(), gm.eval()
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x))
    (group,) = [g for g in build_channel_graph(gm).groups if "conv1" in g.producers]
    assert group.prunable and group.exact


def test_control_flow_on_tensor_values_is_never_fixed() -> None:
    class Gate(nn.Module):
        def forward(self, x):
            return x * 2 if x.shape[1] == 3 and x.mean() > 0 else x

    with pytest.raises(TraceError, match="x.mean\\(\\) > 0"):
        trace(Gate(), (torch.randn(1, 3, 4, 4),))


def test_untraceable_error_names_the_line_and_suggests_leaf_modules() -> None:
    lines, start = inspect.getsourcelines(Untraceable.forward)
    offset = next(i for i, line in enumerate(lines) if "if x.sum() > 0" in line)
    with pytest.raises(TraceError) as info:
        trace(Untraceable(), (torch.randn(ZOO_INPUT_SHAPE),))
    msg = str(info.value)
    assert "if x.sum() > 0" in msg
    assert f":{start + offset}" in msg
    assert "leaf_modules=" in msg


def test_leaf_modules_make_a_submodule_opaque_and_its_channels_unprunable() -> None:
    torch.manual_seed(0)
    model = Gated().eval()
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(TraceError, match="leaf_modules="):
        trace(model, (x,))

    gm = trace(model, (x,), leaf_modules=[Gate])
    calls = [(n.op, n.target) for n in gm.graph.nodes]
    assert ("call_module", "gate") in calls
    # Opaque, so both branches of the data-dependent code still run eagerly.
    with torch.no_grad():
        for sign in (1.0, -1.0):
            probe = sign * torch.rand(2, 3, 8, 8)
            torch.testing.assert_close(gm(probe), model(probe))

    groups = analyze(gm)
    conv = next(g for g in groups if g.producers == ("conv",))
    assert not conv.prunable
    assert any("gate" in r for r in conv.reasons), conv.reasons
    # conv2 reads the gate's opaque output but creates its own channels: still prunable.
    conv2 = next(g for g in groups if g.producers == ("conv2",))
    assert conv2.prunable


def test_untraceable_hint_names_the_submodule_class() -> None:
    with pytest.raises(TraceError) as info:
        trace(Gated(), (torch.randn(1, 3, 8, 8),))
    assert "leaf_modules=[Gate]" in str(info.value)


@pytest.mark.parametrize(
    "bad",
    [(), [], [1, 2], ("x",), (np.zeros((1, 3, 32, 32), dtype=np.float32),), None],
    ids=["empty-tuple", "empty-list", "ints", "str", "numpy", "none"],
)
def test_bad_example_inputs_raise_type_error(bad: object) -> None:
    with pytest.raises(TypeError):
        trace(ZOO["vgg"](), bad)  # type: ignore[arg-type]


def test_non_module_raises_type_error() -> None:
    with pytest.raises(TypeError, match="nn.Module"):
        trace(lambda x: x, (torch.randn(1, 3, 8, 8),))  # type: ignore[arg-type]


def test_bare_tensor_example_input_is_one_input() -> None:
    """A lone tensor means one input (not a batch to unbind along dim 0)."""
    model = ZOO["vgg"]().eval()
    x = torch.randn(ZOO_INPUT_SHAPE)
    gm = trace(model, x)  # type: ignore[arg-type]
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x))


@pytest.mark.parametrize("bad", [(), [torch.randn(1)] * 0, (torch.randn(1), 3), 3.0, None])
def test_example_inputs_other_than_tensors_say_what_to_pass(bad, tmp_path) -> None:
    """One normalization (frontend.trace.as_inputs) serves trace, export, parity and runners."""
    from graphprune.backends.onnx import export_onnx

    model = ZOO["vgg"]().eval()
    for call in (lambda: trace(model, bad), lambda: export_onnx(model, bad, tmp_path / "x.onnx")):
        with pytest.raises(TypeError, match=r"non-empty tuple of tensors, e.g. \(x,\)"):
            call()


class _CachingHead(nn.Module):
    """Caches a tensor made from its input and the shape it is for, as ultralytics' Detect
    head caches its anchors: a later call with the same shape reuses it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.shape = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.shape != x.shape:
            self.grid = torch.arange(x.shape[-1], dtype=x.dtype, device=x.device)
            self.shape = x.shape
        return self.conv(x) + self.grid


def test_shape_runs_on_meta_leave_no_cached_meta_tensor_behind() -> None:
    from graphprune.frontend.trace import on_meta
    from graphprune.planning.macs import count_macs

    head = _CachingHead()
    x = torch.randn(1, 3, 5, 5)
    out = on_meta(head, (x,))
    assert out.device.type == "meta"
    assert head.shape is None and "grid" not in vars(head)
    count_macs(head, (x,))  # runs on meta too
    torch.testing.assert_close(head(x), head.conv(x) + torch.arange(5.0))
    # A cache made by a real call survives a MACs count unchanged.
    grid = head.grid
    assert count_macs(head, (x,)).macs == 3 * 4 * 25
    assert head.grid is grid and head.grid.device.type == "cpu"
