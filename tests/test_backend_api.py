"""The Backend interface: the registry, the one timing routine, and the "add a backend" recipe
(examples/custom_backend.py) driven through export, the runner lookup, measure and the CLI.

The timing routine is checked with scripted clocks, never with real time: the order of turns,
warm-up and settle passes are counted, and medians/p90s compared with hand-computed values.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from graphprune.apps.cli import main
from graphprune.backends import (
    Backend,
    backend_for_path,
    backend_names,
    export,
    get_backend,
    measure,
    register_backend,
    runner,
    unregister_backend,
)
from graphprune.errors import BackendUnavailableError
from graphprune.testing.zoo import ZOO, ZOO_INPUT_SHAPE

ROOT = Path(__file__).resolve().parent.parent


# --- measure() with scripted clocks -------------------------------------------------------------


class ScriptedRunner:
    """Records every pass in ``log``; its clock returns the next scripted time (ms)."""

    device, threads = "scripted cpu", 3

    def __init__(self, name: str, times: list[float], log: list[tuple[str, int, str]]) -> None:
        self.backend, self.times, self.log = name, list(times), log

    def run(self, *inputs: object) -> list[object]:
        return []

    def step(self, batch_size: int) -> Callable[[], object]:
        return lambda: self.log.append((self.backend, batch_size, "pass"))

    def clock(self, step: Callable[[], object]) -> float:
        step()
        self.log[-1] = (*self.log[-1][:2], "timed")
        return self.times.pop(0)


def test_measure_interleaves_rotating_turns_and_summarizes_by_hand_values() -> None:
    log: list[tuple[str, int, str]] = []
    # Two warm-up passes each (1 ms: short, so each timed turn is preceded by a settle pass),
    # then 4 rounds; times listed in the order each runner's turns come.
    a = ScriptedRunner("a", [1, 1, 10, 30, 20, 40], log)
    b = ScriptedRunner("b", [1, 1, 5, 5, 10, 20], log)
    timing = measure([a, b], (4,), warmup=2, rounds=4)
    turns = [r for r, _, kind in log if kind == "timed"]
    assert turns == ["a", "a", "b", "b"] + ["a", "b", "b", "a", "a", "b", "b", "a"]
    passes = [(r, kind) for r, _, kind in log[4:]]
    assert passes[:2] == [("a", "pass"), ("a", "timed")]  # settle, then timed
    assert all(batch == 4 for _, batch, _ in log)
    sa, sb = timing.stats[4]
    assert timing.times_ms[4] == ((10, 30, 20, 40), (5, 5, 10, 20))
    # p90 at rank 0.9 * 3 = 2.7: a 10 20 30 40 -> 30 + 0.7 * 10 = 37; b 5 5 10 20 -> 17
    assert (sa.median_ms, sa.p90_ms, sa.mean_ms, sa.min_ms, sa.runs) == (25, 37, 25, 10, 4)
    assert (sb.median_ms, sb.p90_ms, sb.runs) == (7.5, 17, 4)
    assert (sa.backend, sa.threads, sa.device, sa.batch_size) == ("a", 3, "scripted cpu", 4)
    assert timing.speedup(4, 1) == pytest.approx(25 / 7.5)
    # same-round ratios 10/5, 30/5, 20/10, 40/20 -> 2, 6, 2, 2 -> median 2
    assert timing.paired_speedup(4, 1) == pytest.approx(2.0)
    # a's rounds 10 30 | 20 40: medians 20 and 30 -> +50 %
    assert timing.drift(4) == pytest.approx(0.5)


def test_a_slow_pass_gets_no_settle_pass_and_one_runner_never_does() -> None:
    log: list[tuple[str, int, str]] = []
    slow = ScriptedRunner("slow", [500, 500, 500], log)
    fast = ScriptedRunner("fast", [1, 1, 1], log)
    measure([slow, fast], (1,), warmup=1, rounds=2)
    kinds = [(r, k) for r, _, k in log[2:]]
    assert kinds == [("slow", "timed"), ("fast", "pass"), ("fast", "timed"),
                     ("fast", "pass"), ("fast", "timed"), ("slow", "timed")]  # fmt: skip
    alone: list[tuple[str, int, str]] = []
    measure([ScriptedRunner("x", [1, 1, 1], alone)], (1,), warmup=1, rounds=2)
    assert [k for _, _, k in alone] == ["timed"] * 3


def test_measure_stops_at_the_time_budget_after_min_rounds() -> None:
    runner_ = ScriptedRunner("x", [1.0] * 50, [])
    timing = measure([runner_], (1, 2), warmup=0, rounds=40, seconds=0.0, min_rounds=3)
    assert [len(timing.times_ms[b][0]) for b in (1, 2)] == [3, 3]


@pytest.mark.parametrize(
    "kwargs", [dict(rounds=0), dict(warmup=-1), dict(min_rounds=0), dict(batch_sizes=(0,))]
)
def test_measure_refuses_bad_counts(kwargs: dict) -> None:
    batch_sizes = kwargs.pop("batch_sizes", (1,))
    with pytest.raises(ValueError, match="must be >= 1|need"):
        measure([ScriptedRunner("x", [1.0] * 9, [])], batch_sizes, **kwargs)
    with pytest.raises(ValueError, match="at least one runner"):
        measure([], (1,))


# --- the registry -------------------------------------------------------------------------------


def test_registry_refuses_a_taken_name_or_suffix_and_malformed_backends() -> None:
    class Again(Backend):
        name, suffix = "onnx", ".onnx2"

    class SameSuffix(Backend):
        name, suffix = "onnx2", ".onnx"

    class NoDot(Backend):
        name, suffix = "nodot", "bin"

    with pytest.raises(ValueError, match="already registered"):
        register_backend(Again)
    with pytest.raises(ValueError, match=r"\.onnx already belongs to backend onnx"):
        register_backend(SameSuffix)
    with pytest.raises(ValueError, match="start with '.'"):
        register_backend(NoDot)
    assert "onnx2" not in backend_names() and "nodot" not in backend_names()


def test_unavailable_backend_says_why_and_what_to_install() -> None:
    class Missing(Backend):
        name, suffix, install = "missing", ".missing", "pip install missing-runtime"

        def unavailable_reason(self) -> str | None:
            return "the `missing_runtime` package is not installed"

    register_backend(Missing)
    try:
        backend = get_backend("missing")
        assert not backend.available()
        with pytest.raises(BackendUnavailableError, match="not installed; pip install missing-r"):
            backend.require()
        with pytest.raises(ValueError, match=r"missing \(unavailable here: pip install missing"):
            get_backend("nope")
    finally:
        unregister_backend("missing")


def test_importing_graphprune_needs_no_optional_backend() -> None:
    code = (
        "import sys; sys.modules['tensorrt'] = None; import graphprune, graphprune.backends as b;"
        " assert 'tensorrt' in b.backend_names() and not b.get_backend('tensorrt').available()"
    )
    import subprocess

    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_bench_refuses_unreadable_artifacts_before_exporting_anything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from graphprune.apps.bench import bench

    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` fail
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"an engine")
    with pytest.raises(BackendUnavailableError, match=r"tensorrt.*pip install 'graphprune\["):
        bench(["resnet20", str(engine)])
    with pytest.raises(ValueError, match=r"no backend reads \.tflite .*\.onnx \(onnx\)"):
        bench(["resnet20", str(tmp_path / "m.tflite")])
    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        bench(["resnet20", str(tmp_path / "missing.onnx")])
    with pytest.raises(ValueError, match="unknown backend 'tvm'"):
        bench(["resnet20"], backend="tvm")


# --- the recipe: a toy backend through export, runner lookup, measure and the CLI ---------------


@pytest.fixture
def examples_on_path(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """examples/ importable (as a plugin would be); the toy backend gone again afterwards."""
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    try:
        yield
    finally:
        unregister_backend("torch_export")
        sys.modules.pop("custom_backend", None)  # a later import registers it afresh


@pytest.fixture
def torch_export_backend(examples_on_path: None) -> Backend:
    importlib.import_module("custom_backend")  # importing the module registers the backend
    return get_backend("torch_export")


def test_a_registered_toy_backend_exports_runs_and_times(
    torch_export_backend: Backend, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    model = ZOO["resnet_basic"]().eval()
    x = torch.randn(ZOO_INPUT_SHAPE)
    path = export(model, x, tmp_path / "m.pt2", backend="torch_export")
    assert backend_for_path(path) is torch_export_backend
    loaded = runner(path)
    batch = torch.randn(3, *ZOO_INPUT_SHAPE[1:])  # another batch: the axis is dynamic
    with torch.no_grad():
        torch.testing.assert_close(loaded.run(batch)[0], model(batch))
    stats = measure([loaded], (1, 2), warmup=1, rounds=3).stats
    assert stats[2][0].backend == "torch.export" and stats[2][0].runs == 3


def test_the_cli_offers_a_plugin_backend_and_forgets_an_unregistered_one(
    examples_on_path: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "m.pt2"
    argv = ["export", "resnet_basic", "--out", str(out), "--backend", "torch_export"]
    with pytest.raises(SystemExit):  # not imported yet: not a choice
        main(argv)
    assert "invalid choice: 'torch_export'" in capsys.readouterr().err
    assert main(["--plugin", "custom_backend", *argv]) == 0
    assert out.is_file()
    argv = ["bench", "resnet_basic", str(out), "--batch-sizes", "2", "--runs", "2"]
    assert main([*argv, "--backend", "torch_export"]) == 0
    text = capsys.readouterr().out
    assert "torch.export" in text and str(out) in text
    unregister_backend("torch_export")
    with pytest.raises(SystemExit):
        main(["export", "resnet_basic", "--out", str(out), "--backend", "torch_export"])
    assert "invalid choice: 'torch_export'" in capsys.readouterr().err
