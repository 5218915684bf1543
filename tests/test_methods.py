"""The Method interface: configs, the registry, compress() options, and a plugin method (the
"add a method" recipe, examples/plugin_method.py) through compress() and the command line.

The plugin keeps each group's first (or last) channels, so what the pruned model must hold is
known without running the code under test: every tensor is the dense tensor's leading (or
trailing) block of the pruned shape.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import subprocess
import sys
from dataclasses import FrozenInstanceError, dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

import graphprune
from graphprune.apps.cli import main
from graphprune.apps.models import get_model
from graphprune.errors import PlanError
from graphprune.io import load_model
from graphprune.methods import (
    Method,
    MethodConfig,
    get_method,
    method_names,
    register_method,
    unregister_method,
)
from graphprune.methods.magnitude import MagnitudeConfig
from graphprune.methods.resrep import ResRepConfig

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture
def plugin(monkeypatch: pytest.MonkeyPatch):
    """examples/plugin_method.py imported (so registered), and gone again afterwards."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    module = importlib.import_module("plugin_method")
    yield module
    unregister_method("keep-first")
    sys.modules.pop("plugin_method", None)


def _run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def assert_blocks_of(pruned: nn.Module, dense: nn.Module, *, last: bool) -> int:
    """Every pruned tensor is the leading (trailing) block of its dense tensor; returns how
    many tensors were narrowed, so a no-op cannot pass."""
    dense_state = dense.state_dict()
    narrowed = 0
    for key, p in pruned.state_dict().items():
        d = dense_state[key]
        if p.dim() == 0:
            continue
        block = tuple(
            slice(n - k, n) if last else slice(0, k) for n, k in zip(d.shape, p.shape, strict=True)
        )
        torch.testing.assert_close(p, d[block], atol=0, rtol=0, msg=key)
        narrowed += p.shape != d.shape
    return narrowed


# --- the plugin through compress() ----------------------------------------------------------
@pytest.mark.parametrize("last", [False, True])
def test_plugin_method_through_compress(plugin, last: bool) -> None:
    model, inputs = get_model("resnet20")
    result = graphprune.compress(
        model, "keep-first", example_inputs=inputs, flops_target=0.5, round_to=1, last=last
    )
    assert result.report.method == "keep-first" and result.report.config["last"] is last
    dense_macs = graphprune.count_macs(model, inputs).macs
    assert graphprune.count_macs(result.model, inputs).macs <= 0.5 * dense_macs
    assert result.report.pruned_macs == graphprune.count_macs(result.model, inputs).macs
    assert assert_blocks_of(result.model, model, last=last) > 10


def test_plugin_config_is_validated(plugin) -> None:
    model, inputs = get_model("resnet20")
    with pytest.raises(TypeError, match="last='yes' must be a bool"):
        graphprune.compress(model, "keep-first", example_inputs=inputs, last="yes")
    with pytest.raises(TypeError) as err:
        graphprune.compress(model, "keep-first", example_inputs=inputs, lats=True)
    for valid in ("lats", "flops_target", "round_to", "last", "train_loader", "epochs"):
        assert valid in str(err.value)
    with pytest.raises(TypeError, match="keep-first does not train, so epochs"):
        graphprune.compress(model, "keep-first", example_inputs=inputs, epochs=3)


# --- the plugin through the command line ------------------------------------------------------
def test_plugin_listed_by_methods_command(plugin) -> None:
    code, out, err = _run(["--plugin", "plugin_method", "methods"])
    assert code == 0, err
    section = out[out.index("keep-first") :]
    assert "Keep each group's first channels" in section
    assert "--last / --no-last" in section and "keep each group's last channels" in section
    code, out, _ = _run(["--plugin", "plugin_method", "methods", "--json"])
    rows = {r["name"]: r for r in json.loads(out)}
    assert set(rows) == set(method_names())
    options = {o["name"]: o for o in rows["keep-first"]["options"]}
    assert options["last"]["default"] is False and options["flops_target"]["default"] == 0.5
    assert rows["resrep"]["trains"] and not rows["keep-first"]["trains"]
    assert rows["magnitude"]["can_train"] and not rows["magnitude"]["trains"]
    assert not rows["keep-first"]["can_train"]
    code, out, _ = _run(["methods"])
    assert "magnitude  (one-shot; trains, e.g. fine-tunes, when given --data" in out


def test_plugin_compress_from_the_command_line(plugin, tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    argv = ["--plugin", "plugin_method", "compress", "resnet20", "--method", "keep-first"]
    code, out, err = _run([*argv, "--last", "--flops-target", "0.4", "--out", str(path)])
    assert code == 0, err
    assert "method keep-first, target 0.400" in out
    pruned, _ = load_model(path)
    dense, inputs = get_model("resnet20")
    assert (
        graphprune.count_macs(pruned, inputs).macs
        <= 0.4 * graphprune.count_macs(dense, inputs).macs
    )
    assert assert_blocks_of(pruned, dense, last=True) > 10


def test_plugins_from_the_environment_in_a_real_process() -> None:
    env = {**os.environ, "GRAPHPRUNE_PLUGINS": "plugin_method", "PYTHONPATH": str(EXAMPLES)}
    cmd = [sys.executable, "-m", "graphprune.apps.cli", "methods"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "keep-first" in proc.stdout and "--last" in proc.stdout
    env["GRAPHPRUNE_PLUGINS"] = "no_such_plugin_module"
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2 and "cannot import plugin 'no_such_plugin_module'" in proc.stderr


def test_unknown_method_flag_and_training_flags_are_refused(plugin, capsys) -> None:
    with pytest.raises(SystemExit):  # --last belongs to a method that is not loaded
        main(["compress", "resnet20", "--method", "magnitude", "--last"])
    assert "unrecognized arguments: --last" in capsys.readouterr().err
    argv = ["--plugin", "plugin_method", "compress", "resnet20", "--method", "keep-first"]
    assert main([*argv, "--epochs", "3"]) == 2
    assert "--epochs: only for methods that train; keep-first does not" in capsys.readouterr().err


# --- the registry and configs -------------------------------------------------------------------
def test_registry_names_what_it_knows_and_checks_what_it_gets() -> None:
    with pytest.raises(
        ValueError, match="unknown method 'nope'; known methods: .*magnitude.*resrep"
    ):
        get_method("nope")
    assert get_method(ResRepConfig()) is get_method("resrep")

    class NoConfig(Method):
        name = "no-config"

    with pytest.raises(TypeError, match="config_class must be a MethodConfig subclass"):
        register_method(NoConfig)

    @dataclass(frozen=True, slots=True, kw_only=True)
    class OtherConfig(MethodConfig):
        pass

    class Impostor(Method):
        name = "magnitude"
        config_class = OtherConfig

    with pytest.raises(ValueError, match="'magnitude' is taken by graphprune.methods.magnitude"):
        register_method(Impostor)
    assert "no-config" not in method_names() and get_method("magnitude").__name__ == "Magnitude"

    @dataclass(frozen=True, slots=True, kw_only=True)
    class NoDefault(MethodConfig):
        width: int

    class NeedsDefault(Method):
        name = "needs-default"
        config_class = NoDefault

    with pytest.raises(TypeError, match="width needs a default"):
        register_method(NeedsDefault)


def test_configs_check_types_and_ranges() -> None:
    with pytest.raises(TypeError, match="schedule='fast' must be a ResRepSchedule or one of"):
        ResRepConfig(schedule="fast")
    with pytest.raises(TypeError, match="internal_only=1 must be a bool"):
        ResRepConfig(internal_only=1)
    with pytest.raises(ValueError, match="round_to=0: must be >= 1"):
        MagnitudeConfig(round_to=0)
    with pytest.raises(PlanError, match=r"must be in \(0, 1\)"):
        MagnitudeConfig(flops_target=1.5)
    with pytest.raises(ValueError, match="fold_threshold=-1"):
        ResRepConfig(fold_threshold=-1.0)
    assert ResRepConfig(fold_threshold=0).fold_threshold == 0  # an int is a float
    with pytest.raises(FrozenInstanceError):
        MagnitudeConfig().flops_target = 0.3  # type: ignore[misc]


def test_compress_takes_a_config_instance_like_its_fields() -> None:
    model, inputs = get_model("resnet_basic")
    by_name = graphprune.compress(model, "magnitude", example_inputs=inputs, flops_target=0.4)
    by_config = graphprune.compress(model, MagnitudeConfig(flops_target=0.4), example_inputs=inputs)
    a, b = by_name.model.state_dict(), by_config.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert by_name.report.widths == by_config.report.widths
    with pytest.raises(TypeError, match="resrep takes a ResRepConfig, got MagnitudeConfig"):
        get_method("resrep")(graphprune.trace(model, inputs), MagnitudeConfig(), total_iters=10)


def test_trained_method_needs_its_training_options() -> None:
    model, inputs = get_model("resnet_basic")
    with pytest.raises(TypeError, match="resrep trains: compress\\(\\) needs train_loader= and"):
        graphprune.compress(model, "resrep", example_inputs=inputs)
    with pytest.raises(TypeError, match="resrep trains: pass total_iters="):
        get_method("resrep")(graphprune.trace(model, inputs))
    # a method that can train: one-shot without data, trains when given it or when the
    # config demands it (iterative magnitude)
    magnitude = get_method("magnitude")
    assert magnitude.can_train and not magnitude.trains
    assert not magnitude.needs_training(MagnitudeConfig(), has_loader=False)
    assert magnitude.needs_training(MagnitudeConfig(), has_loader=True)
    assert magnitude.needs_training(MagnitudeConfig(iterative=3), has_loader=False)
    with pytest.raises(TypeError, match="magnitude trains: compress\\(\\) needs train_loader="):
        graphprune.compress(model, "magnitude", example_inputs=inputs, iterative=3)
    with pytest.raises(TypeError, match="magnitude trains: pass total_iters="):
        magnitude(graphprune.trace(model, inputs), iterative=2)
    with pytest.raises(TypeError, match="magnitude trains only when given train_loader="):
        graphprune.compress(model, "magnitude", example_inputs=inputs, epochs=2)
