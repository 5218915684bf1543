"""Built-in models and the pattern zoo: shapes, traceability, published parameter counts."""

from __future__ import annotations

import pytest
import torch
import torch.fx
from torch import nn

from graphprune.apps import models
from graphprune.apps.models import BUILTIN_MODELS, get_model
from graphprune.testing import zoo


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _user_factory() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    return zoo.VGG(num_classes=3).eval(), (torch.randn(2, 3, 32, 32),)


def _bare_factory() -> nn.Module:
    return zoo.VGG()


@pytest.mark.parametrize("name", sorted(zoo.ZOO))
def test_zoo_model_runs_and_traces_to_same_output(name: str) -> None:
    torch.manual_seed(0)
    model = zoo.ZOO[name]().eval()
    x = torch.randn(2, *zoo.ZOO_INPUT_SHAPE[1:])
    with torch.no_grad():
        y = model(x)
        gm = torch.fx.symbolic_trace(model)
        y_traced = gm(x)
    assert y.shape == (2, 10)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y_traced, y)
    # Each pattern is a real network: it must contain at least one conv.
    assert any(isinstance(m, nn.Conv2d) for m in gm.modules())


@pytest.mark.parametrize("name", sorted(BUILTIN_MODELS))
def test_builtin_model_forward_and_trace(name: str) -> None:
    model, inputs = BUILTIN_MODELS[name]()
    assert not model.training, "factories return eval-mode models"
    assert len(inputs) == 1 and inputs[0].shape[0] == 1
    num_classes = 1000 if inputs[0].shape[-1] == 224 else 10
    with torch.inference_mode():
        y = model(*inputs)
    assert y.shape == (1, num_classes)
    assert torch.isfinite(y).all()
    torch.fx.symbolic_trace(model)


def test_builtin_names_cover_zoo() -> None:
    expected = {"resnet20", "resnet56", "resnet50", "resnet101", "resnet152", "mobilenet_v2"}
    assert expected | set(zoo.ZOO) == set(BUILTIN_MODELS)


def test_factories_are_deterministic() -> None:
    (m1, (x1,)), (m2, (x2,)) = get_model("resnet20"), get_model("resnet20")
    torch.testing.assert_close(x1, x2)
    for (k1, v1), (k2, v2) in zip(m1.state_dict().items(), m2.state_dict().items(), strict=True):
        assert k1 == k2
        torch.testing.assert_close(v1, v2)


def test_resnet50_matches_published_param_count() -> None:
    assert _n_params(models.resnet50()) == 25_557_032


def test_mobilenet_v2_matches_published_param_count() -> None:
    assert _n_params(models.mobilenet_v2()) == 3_504_872


def test_mobilenet_v2_width_mult_shrinks() -> None:
    small = models.mobilenet_v2(num_classes=10, width_mult=0.5)
    assert _n_params(small) < 3_504_872 // 2
    assert small(torch.randn(1, 3, 64, 64)).shape == (1, 10)


@pytest.mark.parametrize(("depth", "blocks"), [(20, 9), (56, 27), (110, 54)])
def test_cifar_resnet_block_count(depth: int, blocks: int) -> None:
    model = models.cifar_resnet(depth)
    assert sum(isinstance(m, models.BasicBlock) for m in model.modules()) == blocks


def test_cifar_resnet56_projections_only_at_stage_starts() -> None:
    model = models.resnet56(num_classes=100, in_channels=1)
    blocks = [m for m in model.modules() if isinstance(m, models.BasicBlock)]
    projected = [i for i, b in enumerate(blocks) if not isinstance(b.shortcut, nn.Identity)]
    assert projected == [9, 18]
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 100)


def test_cifar_resnet_rejects_bad_depth() -> None:
    with pytest.raises(ValueError, match="6n\\+2"):
        models.cifar_resnet(21)


def test_get_model_unknown_name_lists_known_names() -> None:
    with pytest.raises(ValueError, match="resnet56") as info:
        get_model("no_such_model")
    assert "vgg" in str(info.value)


def test_get_model_imports_user_factory() -> None:
    model, inputs = get_model(f"{__name__}:_user_factory")
    assert isinstance(model, zoo.VGG)
    assert model(*inputs).shape == (2, 3)


def test_get_model_rejects_bare_module_factory() -> None:
    with pytest.raises(ValueError, match="example_inputs"):
        get_model(f"{__name__}:_bare_factory")


def test_get_model_bad_import_path() -> None:
    with pytest.raises(ValueError, match="cannot load"):
        get_model("graphprune.testing.zoo:no_such_factory")
    with pytest.raises(ValueError, match="cannot load"):
        get_model("no_such_package_xyz.mod:factory")


def test_untraceable_fails_to_trace() -> None:
    with pytest.raises(torch.fx.proxy.TraceError):
        torch.fx.symbolic_trace(zoo.Untraceable())


def test_unknown_op_traces_and_runs() -> None:
    gm = torch.fx.symbolic_trace(zoo.UnknownOp())
    assert any(n.target is torch.cumsum for n in gm.graph.nodes)
    assert gm(torch.randn(1, 3, 32, 32)).shape == (1, 10)
