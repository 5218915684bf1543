"""Hostile and careless inputs to the entry points: each gets a clear error that names the
problem and the fix (asserted on its key words) or is handled correctly, and the user's model
is never mutated (the ``watch`` fixture checks every model a test hands over).

Models that trace or prune wrongly (subclassed layers, autograd Functions, mode-dependent
code, indexed parameters, tied weights) are in test_hostile_models.py.
"""

from __future__ import annotations

import sys
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import graphprune as gp
from graphprune.apps.models import get_model
from graphprune.errors import InputError, PlanError, TraceError, TrainingError
from graphprune.methods.magnitude import Magnitude
from graphprune.testing.zoo import UnknownOp

X = torch.randn(2, 3, 8, 8)


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 4, 1)
    )


def _msg(info: pytest.ExceptionInfo) -> str:
    return str(info.value).lower()


# --- the model and its example inputs ------------------------------------------------------
def test_a_function_is_not_a_model() -> None:
    with pytest.raises(TypeError, match="nn.Module"):
        gp.trace(lambda x: x, (X,))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "bad",
    [None, (), [], "x", {"x": X}, (np.zeros((1, 3, 8, 8), dtype=np.float32),), [1, 2]],
    ids=["none", "empty-tuple", "empty-list", "str", "dict", "numpy", "ints"],
)
def test_example_inputs_that_are_not_tensors(watch, bad) -> None:
    with pytest.raises(TypeError, match=r"tuple of tensors, e\.g\. \(x,\)"):
        gp.trace(watch(net()), bad)


def test_too_many_example_inputs(watch) -> None:
    with pytest.raises(TypeError) as info:
        gp.compress(watch(net()), example_inputs=(X, X))
    assert "cannot take 2 example input" in str(info.value)
    assert "one tensor per forward argument" in str(info.value)


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 4, 1)

    def forward(self, x, y):
        return self.c(x) + self.c(y)


def test_too_few_example_inputs(watch) -> None:
    with pytest.raises(TypeError, match=r"forward\(x, y\) cannot take 1 example input"):
        gp.trace(watch(TwoInputs()), (X,))


def test_an_empty_batch(watch) -> None:
    with pytest.raises(InputError) as info:
        gp.trace(watch(net()), (X[:0],))
    assert "empty batch" in _msg(info) and "at least one sample" in _msg(info)


def test_a_model_on_the_meta_device() -> None:
    model = net().to("meta")
    with pytest.raises(InputError) as info:
        gp.compress(model, example_inputs=(X,))
    assert "meta device" in _msg(info) and "to_empty" in _msg(info)


def test_meta_example_inputs(watch) -> None:
    with pytest.raises(InputError, match="meta device"):
        gp.trace(watch(net()), (X.to("meta"),))


def test_example_inputs_of_another_float_dtype(watch) -> None:
    with pytest.raises(InputError) as info:
        gp.compress(watch(net()), example_inputs=(X.double(),))
    assert "torch.float64" in str(info.value) and "torch.float32" in str(info.value)
    assert "x.to(" in str(info.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device (CUDA)")
def test_example_inputs_on_another_device(watch) -> None:
    with pytest.raises(InputError, match="is on cuda"):
        gp.trace(watch(net()), (X.cuda(),))


@pytest.mark.parametrize("x", [X.long(), torch.randn(2, 5, 8, 8)], ids=["int", "channels"])
def test_example_inputs_the_model_cannot_run(watch, x) -> None:
    with pytest.raises(TraceError) as info:
        gp.trace(watch(net()), (x,))
    assert "example inputs" in _msg(info) and "shape, dtype and device" in _msg(info)


def test_a_list_of_example_inputs_is_accepted(watch) -> None:
    model = watch(net().eval())
    gm = gp.trace(model, [X])
    with torch.no_grad():
        torch.testing.assert_close(gm(X), model(X))


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_weights_warn_and_are_kept_out_of_the_ranking(watch, value) -> None:
    model = net().eval()
    with torch.no_grad():
        model[0].weight[5, 0, 0, 0] = value  # channel 5 of the first conv's group
    watch(model)
    with pytest.warns(RuntimeWarning, match="NaN or Inf") as record:
        gm = gp.trace(model, (X,))
    assert "0.weight" in str(record[0].message)
    graph = gp.build_channel_graph(gm)
    (gid,) = [g.id for g in graph.groups if g.producers == ("0",)]
    method = Magnitude(gm, flops_target=0.3, round_to=1, graph=graph)
    plan = method.plan(method.scores())
    assert len(plan[gid]) < 16  # the group was pruned ...
    assert 5 in plan[gid].tolist()  # ... but not by a comparison with a non-finite score


# --- targets and options ---------------------------------------------------------------------
@pytest.mark.parametrize("round_to", [0, -8, 2.5, "8", True, None])
def test_round_to_that_is_not_a_positive_integer(watch, round_to) -> None:
    with pytest.raises(InputError) as info:
        gp.compress(watch(net()), example_inputs=(X,), round_to=round_to)
    assert f"round_to={round_to!r}" in str(info.value) and "positive integer" in _msg(info)


@pytest.mark.parametrize(
    "target", [np.float32(0.5), np.float64(0.5), torch.tensor(0.5), np.array(0.5)]
)
def test_numpy_and_0d_tensor_targets_are_accepted(watch, target) -> None:
    result = gp.compress(watch(net()), example_inputs=(X,), flops_target=target, round_to=1)
    assert isinstance(result.report.flops_target, float)
    assert result.report.macs_ratio <= 0.5


def test_an_integral_numpy_round_to_is_accepted(watch) -> None:
    result = gp.compress(watch(net()), example_inputs=(X,), round_to=np.int64(4))
    assert result.report.macs_ratio <= 0.5


@pytest.mark.parametrize("target", [0, 1, 1.5, -0.1, "0.5", float("nan"), torch.tensor([0.5])])
def test_targets_outside_zero_one(watch, target) -> None:
    with pytest.raises(PlanError, match=r"must be in \(0, 1\)"):
        gp.compress(watch(net()), example_inputs=(X,), flops_target=target)


def test_an_unreachable_target_names_the_floor(watch) -> None:
    with pytest.raises(PlanError) as info:
        gp.compress(watch(net()), example_inputs=(X,), flops_target=0.001, round_to=8)
    assert "out of reach" in _msg(info) and "ask for at least" in _msg(info)


def test_an_unknown_method(watch) -> None:
    with pytest.raises(ValueError, match="unknown method"):
        gp.compress(watch(net()), "lottery", example_inputs=(X,))


def test_options_a_method_does_not_take(watch) -> None:
    with pytest.raises(TypeError, match="magnitude trains only when given train_loader="):
        gp.compress(watch(net()), "magnitude", example_inputs=(X,), epochs=3)
    with pytest.raises(TypeError, match=r"unknown option\(s\) widht"):
        gp.compress(watch(net()), "magnitude", example_inputs=(X,), widht=3)


def test_a_model_with_nothing_to_prune(watch) -> None:
    model = watch(nn.Sequential(nn.Conv2d(3, 4, 1)))
    with pytest.raises(PlanError, match="no prunable channel group"):
        gp.compress(model, example_inputs=(X,))


def test_strict_names_the_op_without_a_rule(watch) -> None:
    with pytest.raises(gp.UnsupportedOpError) as info:
        gp.compress(watch(UnknownOp()), example_inputs=(torch.randn(1, 3, 32, 32),), strict=True)
    assert "register a channel rule" in _msg(info)


def test_an_untraceable_model_names_the_line(watch) -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c = nn.Conv2d(3, 4, 1)

        def forward(self, x):
            return self.c(x) if x.mean() > 0 else -self.c(x)

    with pytest.raises(TraceError) as info:
        gp.trace(watch(Branchy()), (X,))
    assert "x.mean() > 0" in str(info.value) and "leaf_modules=" in str(info.value)


# --- training options ----------------------------------------------------------------------
def _resrep(model, **options):
    options.setdefault("epochs", 1)
    options.setdefault("train_loader", [(X, torch.tensor([0, 1]))])
    return gp.compress(model, "resrep", example_inputs=(X,), progress=False, **options)


@pytest.mark.parametrize("epochs", [2.5, "3", 0, -1, True, None])
def test_epochs_that_are_not_a_whole_number(watch, epochs) -> None:
    with pytest.raises(InputError, match=r"epochs=.*whole number"):
        _resrep(watch(net()), epochs=epochs)


def test_an_integral_numpy_epochs_is_accepted() -> None:
    from graphprune.validation import check_epochs

    assert check_epochs(np.int32(3)) == 3 and check_epochs(torch.tensor(2)) == 2


@pytest.mark.parametrize(
    "batch, words",
    [
        ((X,), "tuples of 1"),
        ({"image": X, "label": torch.tensor([0, 1])}, "dicts with keys ['image', 'label']"),
        (X, "bare tensors"),
        ((X, torch.tensor([0, 1]), X), "tuples of 3"),
    ],
    ids=["one-tuple", "dict", "tensor", "triple"],
)
def test_train_batches_the_built_in_loss_cannot_use(watch, batch, words) -> None:
    with pytest.raises(InputError) as info:
        _resrep(watch(net()), train_loader=[batch])
    assert words in str(info.value) and "train_step=" in str(info.value)


def test_a_train_step_accepts_any_batch() -> None:
    from graphprune.validation import check_loader

    check_loader("train_loader", [{"image": X}], train_step=lambda m, b: m(b["image"]).sum())


def test_val_batches_that_are_not_pairs(watch) -> None:
    with pytest.raises(InputError, match="val_loader yields dicts"):
        _resrep(watch(net()), val_loader=[{"image": X}])


def test_a_loader_without_len(watch) -> None:
    batches = ((X, torch.tensor([0, 1])) for _ in range(2))
    with pytest.raises(InputError) as info:
        _resrep(watch(net()), train_loader=batches)
    assert "has no len()" in str(info.value) and "map-style dataset" in _msg(info)


def test_an_empty_loader(watch) -> None:
    with pytest.raises(TrainingError, match="empty"):
        _resrep(watch(net()), train_loader=[])


def test_a_checkpoint_dir_that_is_a_file(watch, tmp_path) -> None:
    file = tmp_path / "ckpt"
    file.write_text("not a folder")
    with pytest.raises(InputError, match="is a file; give a folder"):
        _resrep(watch(net()), checkpoint_dir=file)


def test_a_checkpoint_dir_that_cannot_be_written(watch, tmp_path) -> None:
    file = tmp_path / "blocker"
    file.write_text("")
    with pytest.raises(InputError, match="cannot be written"):
        _resrep(watch(net()), checkpoint_dir=file / "sub")  # a folder inside a file


def test_a_checkpoint_dir_that_is_not_a_path(watch) -> None:
    with pytest.raises(InputError, match="give a folder path"):
        _resrep(watch(net()), checkpoint_dir=3)


# --- model specs on the command line -------------------------------------------------------
@pytest.fixture
def factories(tmp_path, monkeypatch):
    inputs = "(torch.randn(1, 3, 8, 8),)"
    (tmp_path / "hostile_factories.py").write_text(
        "import torch\nfrom torch import nn\n"
        f"def needs_args(width, depth):\n    return nn.Conv2d(3, width, 1), {inputs}\n"
        f"def defaults(width=4):\n    return nn.Conv2d(3, width, 1), {inputs}\n"
        "def bare():\n    return nn.Conv2d(3, 4, 1)\n"
        "NOT_CALLABLE = 3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "hostile_factories"
    sys.modules.pop("hostile_factories", None)


def test_a_factory_that_needs_arguments(factories) -> None:
    with pytest.raises(ValueError) as info:
        get_model(f"{factories}:needs_args")
    assert "needs arguments (width, depth)" in str(info.value) and "defaults" in str(info.value)


def test_a_factory_with_defaults_is_called(factories) -> None:
    model, inputs = get_model(f"{factories}:defaults")
    assert isinstance(model, nn.Conv2d) and inputs[0].shape == (1, 3, 8, 8)


@pytest.mark.parametrize(
    "spec, words",
    [
        (":bare", "bare nn.Module"),
        (":NOT_CALLABLE", "not a callable"),
        (":missing", "cannot load model factory"),
    ],
)
def test_factory_specs_that_cannot_work(factories, spec, words) -> None:
    with pytest.raises(ValueError, match=words):
        get_model(factories + spec)


def test_an_unknown_model_name() -> None:
    with pytest.raises(ValueError, match="package.module:factory"):
        get_model("resnet9000")


def test_warnings_do_not_leak_for_clean_models(watch) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        gp.trace(watch(net()), (X,))
