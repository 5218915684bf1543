"""TensorRT code paths without TensorRT: a recording fake ``tensorrt`` module stands in for it.

TensorRT (and a GPU) cannot be installed on the CI machine, yet the engine builder and the
runner's binding logic are where silent errors hide: an ignored ``False`` from
``set_input_shape``/``set_tensor_address`` runs the engine on a stale buffer. The fake records
every call and answers like TensorRT does (an address not 256-byte aligned is refused), or
answers ``False`` where a test wants a failure. Versions 10 (``BuilderFlag.FP16``, weak typing)
and 11 (strongly typed only) differ exactly as the real ones do in the attributes we use.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import Any

import onnx
import pytest
import torch
from torch import nn

from graphprune.backends import export_onnx
from graphprune.backends.tensorrt import build_engine, trtexec_command
from graphprune.backends.tensorrt_runner import aligned, bind_inputs, bind_outputs, choose_profile

SHAPE = (3, 8, 8)


class _Tensor:
    def __init__(self, name: str, shape: tuple[int, ...]) -> None:
        self.name, self.shape, self.dtype = name, shape, "FLOAT"


class _Network:
    def __init__(self, flags: int) -> None:
        self.flags, self.inputs, self.outputs = flags, [], []

    num_inputs = property(lambda self: len(self.inputs))
    num_outputs = property(lambda self: len(self.outputs))

    def get_input(self, i: int) -> _Tensor:
        return self.inputs[i]

    def get_output(self, i: int) -> _Tensor:
        return self.outputs[i]


def fake_tensorrt(version: str, *, profile_index: int | None = None) -> types.ModuleType:
    """A ``tensorrt`` stand-in recording into ``trt.calls``; ``profile_index`` forces what
    add_optimization_profile returns (-1 is TensorRT's refusal)."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.calls = []  # type: ignore[attr-defined]
    record = trt.calls.append  # type: ignore[attr-defined]

    class BuilderFlag:
        pass

    if version.startswith("10."):
        BuilderFlag.FP16 = "FP16"  # type: ignore[attr-defined]  # gone in 11: strongly typed only

    class Logger:
        WARNING = 2

        def __init__(self, level: int) -> None:
            pass

    class Profile:
        def set_shape(self, name: str, lo: tuple, opt: tuple, hi: tuple) -> None:
            record(("set_shape", name, lo, opt, hi))

    class TimingCache:
        def serialize(self) -> bytes:
            return b"cache"

    class Config:
        def __init__(self) -> None:
            self.profiles = 0

        def set_memory_pool_limit(self, pool: Any, size: int) -> None:
            pass

        def set_flag(self, flag: str) -> None:
            record(("set_flag", flag))

        def add_optimization_profile(self, profile: Profile) -> int:
            record(("add_profile",))
            self.profiles += 1
            return self.profiles - 1 if profile_index is None else profile_index

        def create_timing_cache(self, data: bytes) -> TimingCache:
            return TimingCache()

        def set_timing_cache(self, cache: TimingCache, ignore_mismatch: bool) -> bool:
            return True

        def get_timing_cache(self) -> TimingCache:
            return TimingCache()

    class Builder:
        def __init__(self, logger: Logger) -> None:
            pass

        def create_network(self, flags: int) -> _Network:
            record(("create_network", flags))
            return _Network(flags)

        def create_builder_config(self) -> Config:
            return Config()

        def create_optimization_profile(self) -> Profile:
            return Profile()

        def build_serialized_network(self, network: _Network, config: Config) -> bytes:
            return b"serialized engine"

    class OnnxParser:
        num_errors = 0

        def __init__(self, network: _Network, logger: Logger) -> None:
            self.network = network

        def parse_from_file(self, path: str) -> bool:
            graph = onnx.load(path).graph
            for v in graph.input:
                dims = tuple(d.dim_value or -1 for d in v.type.tensor_type.shape.dim)
                self.network.inputs.append(_Tensor(v.name, dims))
            self.network.outputs = [_Tensor(v.name, ()) for v in graph.output]
            return True

    trt.BuilderFlag = BuilderFlag  # type: ignore[attr-defined]
    trt.Logger = Logger  # type: ignore[attr-defined]
    trt.Builder = Builder  # type: ignore[attr-defined]
    trt.OnnxParser = OnnxParser  # type: ignore[attr-defined]
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=1)  # type: ignore[attr-defined]
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE=0)  # type: ignore[attr-defined]
    return trt


@pytest.fixture(scope="module")
def onnx_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    folder = tmp_path_factory.mktemp("trt")
    x = torch.randn(1, *SHAPE)
    return {
        "fp32": export_onnx(model, x, folder / "fp32.onnx", legacy=True),
        "fp16": export_onnx(model, x, folder / "fp16.onnx", legacy=True, fp16=True),
    }


def _install(monkeypatch: pytest.MonkeyPatch, trt: types.ModuleType) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "fake GPU")


def _shapes(batch: int) -> tuple[int, ...]:
    return (batch, *SHAPE)


@pytest.mark.parametrize("version", ["10.9.0", "11.0.0"])
def test_one_profile_per_timed_batch_with_opt_at_that_batch(
    version: str, onnx_files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trt = fake_tensorrt(version)
    _install(monkeypatch, trt)
    engine = build_engine(
        onnx_files["fp32"], tmp_path / "m.engine", max_batch=16, opt_batches=(8, 1, 8)
    )  # fmt: skip  (unsorted, repeated)
    assert engine.read_bytes() == b"serialized engine"
    shapes = [c[1:] for c in trt.calls if c[0] == "set_shape"]
    assert shapes == [
        ("input", _shapes(1), _shapes(1), _shapes(16)),
        ("input", _shapes(1), _shapes(8), _shapes(16)),
    ]
    assert sum(c[0] == "add_profile" for c in trt.calls) == 2
    meta = json.loads((tmp_path / "m.engine.json").read_text())
    assert (meta["min_batch"], meta["opt_batches"], meta["max_batch"]) == (1, [1, 8], 16)
    assert meta["tensorrt"] == version and meta["precision"] == "fp32"
    cmd = meta["trtexec"]  # the equivalent command: one shape set per profile
    assert cmd.count("--optShapes=") == 2
    assert "--optShapes=input:1x3x8x8" in cmd and "--optShapes=input:8x3x8x8" in cmd
    assert "--fp16" not in cmd and "--stronglyTyped" not in cmd
    assert meta["strongly_typed"] == version.startswith("11.")


def test_fp16_on_tensorrt_10_sets_the_builder_flag_and_prints_fp16(
    onnx_files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trt = fake_tensorrt("10.9.0")
    _install(monkeypatch, trt)
    build_engine(onnx_files["fp32"], tmp_path / "m.engine", fp16=True)
    assert ("set_flag", "FP16") in trt.calls
    meta = json.loads((tmp_path / "m.engine.json").read_text())
    assert meta["trtexec"].endswith(" --fp16") and meta["precision"] == "fp16"


def test_fp16_of_an_fp32_graph_on_tensorrt_11_asks_for_an_fp16_export_without_fp16_flag(
    onnx_files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trt = fake_tensorrt("11.0.0")
    _install(monkeypatch, trt)
    with pytest.raises(ValueError, match="fp16=True") as info:
        build_engine(onnx_files["fp32"], tmp_path / "m.engine", fp16=True)
    assert "trtexec --onnx=" in str(info.value) and "--fp16" not in str(info.value)
    assert not (tmp_path / "m.engine").exists()
    assert not any(c[0] == "set_flag" for c in trt.calls)


@pytest.mark.parametrize("version", ["10.9.0", "11.0.0"])
def test_fp16_graph_is_built_strongly_typed_on_both_versions(
    version: str, onnx_files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trt = fake_tensorrt(version)
    _install(monkeypatch, trt)
    build_engine(onnx_files["fp16"], tmp_path / "m.engine", fp16=True)
    assert ("create_network", 1 << 1) in trt.calls  # 1 << STRONGLY_TYPED
    assert not any(c[0] == "set_flag" for c in trt.calls)
    meta = json.loads((tmp_path / "m.engine.json").read_text())
    assert meta["trtexec"].endswith(" --stronglyTyped") and "--fp16" not in meta["trtexec"]
    assert meta["strongly_typed"] and meta["precision"] == "fp16"


def test_trtexec_command_drops_fp16_only_where_tensorrt_is_strongly_typed(
    onnx_files: dict[str, Path],
) -> None:
    path = onnx_files["fp32"]
    v10 = trtexec_command(path, "m.engine", fp16=True, weak_typing=True)
    v11 = trtexec_command(path, "m.engine", fp16=True, weak_typing=False)
    unknown = trtexec_command(path, "m.engine", fp16=True)  # TensorRT not installed
    assert v10.endswith(" --fp16") and unknown.endswith(" --fp16")
    assert "--fp16" not in v11 and v11 == v10.removesuffix(" --fp16")


def test_a_refused_profile_is_an_error(
    onnx_files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _install(monkeypatch, fake_tensorrt("10.9.0", profile_index=-1))
    with pytest.raises(ValueError, match=r"rejected the optimization profile batch 1\.\.16"):
        build_engine(onnx_files["fp32"], tmp_path / "m.engine")
    assert not (tmp_path / "m.engine").exists()


def test_opt_batches_outside_the_range_are_refused(onnx_files: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="opt_batches=.*32"):
        build_engine(onnx_files["fp32"], "m.engine", max_batch=16, opt_batches=(1, 32))


# --- the runner's binding -------------------------------------------------------------------


class FakeContext:
    """An execution context that answers like TensorRT: addresses must be 256-byte aligned;
    ``shape_ok``/``address_ok`` False make it refuse everything of that kind."""

    def __init__(self, *, shape_ok: bool = True, address_ok: bool = True) -> None:
        self.shape_ok, self.address_ok = shape_ok, address_ok
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        if self.shape_ok:
            self.shapes[name] = shape
        return self.shape_ok

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        ok = self.address_ok and ptr % 256 == 0
        if ok:
            self.addresses[name] = ptr
        return ok

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return (self.shapes["input"][0], 4, 6, 6)


def _unaligned_input() -> tuple[torch.Tensor, torch.Tensor]:
    """A (2, 3, 8, 8) view starting 4 bytes into a buffer, plus a copy of its values."""
    base = torch.randn(2 * 3 * 8 * 8 + 64)
    view = base[1 : 1 + 2 * 3 * 8 * 8].view(2, *SHAPE)
    assert view.data_ptr() % 256 != 0
    return view, view.clone()


def test_unaligned_input_is_copied_to_an_aligned_buffer_and_bound() -> None:
    view, values = _unaligned_input()
    context = FakeContext()
    (bound,) = bind_inputs(context, ["input"], [view], "m.engine")
    assert context.shapes == {"input": (2, *SHAPE)}
    assert context.addresses["input"] == bound.data_ptr() and bound.data_ptr() % 256 == 0
    assert bound.data_ptr() != view.data_ptr() and torch.equal(bound, values)
    (out,) = bind_outputs(context, ["output"], lambda n: torch.float32, "m.engine", device="cpu")
    assert out.shape == (2, 4, 6, 6) and context.addresses["output"] == out.data_ptr()
    already = aligned(bound)
    assert already is bound  # an aligned contiguous tensor is bound as is, not copied


def test_refused_input_shape_raises_instead_of_binding_a_stale_buffer() -> None:
    x = torch.randn(32, *SHAPE)
    context = FakeContext(shape_ok=False)
    with pytest.raises(ValueError, match=r"refused shape \(32, 3, 8, 8\).*profile"):
        bind_inputs(context, ["input"], [x], "m.engine")
    assert not context.addresses


def test_refused_tensor_address_raises_naming_the_alignment() -> None:
    context = FakeContext(address_ok=False)
    with pytest.raises(RuntimeError, match="256-byte aligned") as info:
        bind_inputs(context, ["input"], [torch.randn(2, *SHAPE)], "m.engine")
    assert "input" in str(info.value) and "m.engine" in str(info.value)
    context = FakeContext(address_ok=False)
    context.shapes["input"] = (2, *SHAPE)
    with pytest.raises(RuntimeError, match="output"):
        bind_outputs(context, ["output"], lambda n: torch.float32, "m.engine", device="cpu")


def test_each_batch_runs_on_the_profile_tuned_for_it() -> None:
    profiles = [(1, 1, 16), (1, 8, 16), (4, 32, 64)]
    assert [choose_profile(profiles, b, "m") for b in (1, 8, 5, 4, 32, 40)] == [0, 1, 1, 0, 2, 2]
    with pytest.raises(ValueError, match=r"batch size 65 .*1\.\.16, 1\.\.16, 4\.\.64"):
        choose_profile(profiles, 65, "m.engine")


def test_export_for_timed_batches_builds_a_profile_for_each(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from graphprune.backends import get_backend

    trt = fake_tensorrt("10.9.0")
    _install(monkeypatch, trt)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    path = get_backend("tensorrt").export(
        model, torch.randn(1, *SHAPE), tmp_path / "m.engine", batch_sizes=[32, 2], legacy=True
    )
    assert (tmp_path / "m.onnx").is_file()  # kept next to the engine
    shapes = [c[1:] for c in trt.calls if c[0] == "set_shape"]
    assert shapes == [
        ("input", _shapes(1), _shapes(2), _shapes(32)),
        ("input", _shapes(1), _shapes(32), _shapes(32)),
    ]
    meta = json.loads(path.with_name("m.engine.json").read_text())
    assert (meta["opt_batches"], meta["max_batch"]) == ([2, 32], 32)
