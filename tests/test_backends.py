"""Backends: ONNX export + cleanup checked against torch with ONNX Runtime, TensorRT, runners."""

from __future__ import annotations

import copy
import importlib.util
import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import helper
from torch import nn

from graphprune.backends import BACKENDS, cleanup_onnx, export, export_onnx
from graphprune.backends import tensorrt as trt_backend
from graphprune.backends.ort import OrtRunner, latency, parity
from graphprune.backends.torch import torch_latency
from graphprune.errors import BackendUnavailableError, ExportError

INPUT = (3, 16, 16)


def _bn(c: int) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(c)
    # Non-trivial running stats, so BN folding in the exporter is actually exercised.
    bn.running_mean.uniform_(-0.5, 0.5)
    bn.running_var.uniform_(0.5, 2.0)
    nn.init.uniform_(bn.weight, 0.5, 1.5)
    nn.init.uniform_(bn.bias, -0.2, 0.2)
    return bn


class ConvBnRelu(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), _bn(8), nn.ReLU())
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), _bn(8), nn.ReLU())
        self.conv2 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), _bn(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return torch.relu(self.conv2(self.conv1(x)) + x)


class Concat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), _bn(6), nn.ReLU())
        self.fuse = nn.Conv2d(10, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(torch.cat([self.a(x), self.b(x)], dim=1))


class Depthwise(nn.Module):
    """MobileNetV2 inverted residual: expand 1x1, depthwise 3x3, project 1x1, skip add."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = nn.Sequential(
            nn.Conv2d(8, 16, 1, bias=False), _bn(16), nn.ReLU6(),
            nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), _bn(16), nn.ReLU6(),
            nn.Conv2d(16, 8, 1, bias=False), _bn(8),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return x + self.block(x)


class FlattenLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.dropout = nn.Dropout(0.5)
        self.fc = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(torch.flatten(self.features(x), 1)))


ZOO: dict[str, Callable[[], nn.Module]] = {
    "conv_bn_relu": ConvBnRelu,
    "residual": Residual,
    "concat": Concat,
    "depthwise": Depthwise,
    "flatten_linear": FlattenLinear,
}


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return ZOO[name]().eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Export each zoo model once per module (the dynamo exporter takes ~2 s per model)."""
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            folder = tmp_path_factory.mktemp(name)
            cache[name] = export_onnx(_model(name), torch.randn(1, *INPUT), folder / "model.onnx")
        return cache[name]

    return get


def _ort_outputs(proto: onnx.ModelProto, path: Path, x: np.ndarray) -> list[np.ndarray]:
    onnx.save(proto, str(path))
    return OrtRunner(path, threads=1).run(x)


# --- ONNX export and parity ---------------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("name", sorted(ZOO))
def test_onnx_matches_torch(name: str, batch: int, exported: Callable[[str], Path]) -> None:
    # Exported at batch 1; batch 3 proves the batch axis is really dynamic.
    path = exported(name)
    torch.manual_seed(batch)
    assert parity(_model(name), torch.randn(batch, *INPUT), path) <= 1e-4


@pytest.mark.parametrize("name", sorted(ZOO))
def test_export_has_dynamic_batch_and_no_noops(name: str, exported: Callable[[str], Path]) -> None:
    proto = onnx.load(str(exported(name)))
    for value in [*proto.graph.input, *proto.graph.output]:
        dim0 = value.type.tensor_type.shape.dim[0]
        assert dim0.dim_param and not dim0.HasField("dim_value"), value.name
    ops = {n.op_type for n in proto.graph.node}
    assert not ops & {"Identity", "Dropout", "BatchNormalization"}, ops


def test_legacy_exporter_matches_torch(tmp_path: Path) -> None:
    model = _model("residual")
    path = export_onnx(model, torch.randn(2, *INPUT), tmp_path / "legacy.onnx", legacy=True)
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert props["graphprune.exporter"] == "torchscript"
    assert parity(model, torch.randn(5, *INPUT), path) <= 1e-4


def test_export_is_one_file_and_leaves_model_untouched(tmp_path: Path) -> None:
    model = _model("concat").train()
    before = copy.deepcopy(model.state_dict())
    path = export_onnx(model, torch.randn(1, *INPUT), tmp_path / "out" / "model.onnx")
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.onnx"]
    proto = onnx.load(str(path), load_external_data=False)
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    assert model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_fp16_export_bakes_half_precision_into_graph(tmp_path: Path) -> None:
    model = _model("depthwise")
    path = export_onnx(model, torch.randn(1, *INPUT), tmp_path / "half.onnx", fp16=True)
    proto = onnx.load(str(path))
    float_types = {t.data_type for t in proto.graph.initializer} - {onnx.TensorProto.INT64}
    assert float_types == {onnx.TensorProto.FLOAT16}
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert proto.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert next(model.parameters()).dtype == torch.float32  # the copy was halved, not the model
    assert parity(model, torch.randn(2, *INPUT), path) <= 2e-2


# --- cleanup --------------------------------------------------------------------------------


def _with_noops(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Insert an Identity and a Dropout mid-graph and an Identity that produces the graph output."""
    noisy = copy.deepcopy(proto)
    graph = noisy.graph
    nodes = list(graph.node)
    for node, op in ((nodes[0], "Identity"), (nodes[1], "Dropout")):
        name = node.output[0]
        node.output[0] = f"{name}_pre_{op}"
        graph.node.insert(list(graph.node).index(node) + 1,
                          helper.make_node(op, [node.output[0]], [name]))  # fmt: skip
    out = graph.output[0].name
    producer = next(n for n in graph.node if out in n.output)
    producer.output[list(producer.output).index(out)] = f"{out}_pre_Identity"
    graph.node.append(helper.make_node("Identity", [f"{out}_pre_Identity"], [out]))
    onnx.checker.check_model(noisy)
    return noisy


@pytest.mark.parametrize("name", ["residual", "flatten_linear"])
def test_cleanup_removes_noops_without_changing_outputs(
    name: str, exported: Callable[[str], Path], tmp_path: Path
) -> None:
    noisy = _with_noops(onnx.load(str(exported(name))))
    assert sum(n.op_type == "Identity" for n in noisy.graph.node) == 2
    cleaned = cleanup_onnx(noisy)
    ops = [n.op_type for n in cleaned.graph.node]
    assert "Identity" not in ops and "Dropout" not in ops
    assert len(ops) == len(noisy.graph.node) - 3
    assert [o.name for o in cleaned.graph.output] == [o.name for o in noisy.graph.output]
    onnx.checker.check_model(cleaned)
    x = np.random.default_rng(0).standard_normal((3, *INPUT)).astype(np.float32)
    before = _ort_outputs(noisy, tmp_path / "noisy.onnx", x)
    after = _ort_outputs(cleaned, tmp_path / "clean.onnx", x)
    np.testing.assert_array_equal(after[0], before[0])


def test_cleanup_keeps_identity_that_passes_a_graph_input_through() -> None:
    inp = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 4])
    out = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 4])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [inp], [out])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    cleaned = cleanup_onnx(model)
    onnx.checker.check_model(cleaned)
    assert [n.op_type for n in cleaned.graph.node] == ["Identity"]  # an output needs a producer


# --- errors ---------------------------------------------------------------------------------


def test_unwritable_path_raises_export_error_naming_it(tmp_path: Path) -> None:
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where a folder should be")
    target = blocker / "model.onnx"
    with pytest.raises(ExportError, match="not_a_dir"):
        export_onnx(_model("conv_bn_relu"), torch.randn(1, *INPUT), target)


class Eigvals(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.eigvals(self.conv(x)[..., :3, :3]).real


def test_export_failure_names_the_op_and_what_to_try(tmp_path: Path) -> None:
    with pytest.raises(ExportError) as info:
        export_onnx(Eigvals(), torch.randn(2, *INPUT), tmp_path / "eig.onnx", legacy=True)
    message = str(info.value)
    assert "linalg_eigvals" in message and "Eigvals" in message
    assert "opset" in message
    assert not (tmp_path / "eig.onnx").exists()


def test_unknown_backend_lists_known_ones(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="onnx, tensorrt"):
        export(_model("conv_bn_relu"), torch.randn(1, *INPUT), tmp_path / "m", backend="tvm")
    assert BACKENDS == ("onnx", "tensorrt")


# --- TensorRT -------------------------------------------------------------------------------

_HAS_TRT = importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.tensorrt
@pytest.mark.skipif(not _HAS_TRT, reason="needs the tensorrt package and a CUDA device")
def test_tensorrt_engine_matches_torch(tmp_path: Path) -> None:
    model = _model("residual")
    engine = export(model, torch.randn(1, *INPUT), tmp_path / "m.engine", backend="tensorrt",
                    max_batch=4, timing_cache=tmp_path / "timing.cache")  # fmt: skip
    meta = json.loads((tmp_path / "m.engine.json").read_text())
    assert (meta["min_batch"], meta["max_batch"], meta["precision"]) == (1, 4, "fp32")
    assert (tmp_path / "timing.cache").stat().st_size > 0
    runner = trt_backend.TrtRunner(engine)
    cuda_model = copy.deepcopy(model).cuda()
    for batch in (1, 3):
        x = torch.randn(batch, *INPUT, device="cuda")
        with torch.no_grad():
            expected = cuda_model(x)
        (actual,) = runner.run(x)
        # TensorRT uses TF32 for fp32 convolutions by default: ~1e-3 relative error.
        torch.testing.assert_close(actual, expected, atol=5e-3, rtol=5e-3)
    with pytest.raises(ValueError, match="1..4"):
        runner.run(torch.randn(5, *INPUT))
    stats = trt_backend.latency(engine, (1, 4), warmup=2, runs=5)
    assert stats[4].median_ms > 0 and stats[4].runs == 5


def test_missing_tensorrt_says_what_to_install_and_the_trtexec_command(
    exported: Callable[[str], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` fail
    assert not trt_backend.available()
    onnx_path = exported("conv_bn_relu")
    with pytest.raises(BackendUnavailableError) as info:
        trt_backend.build_engine(onnx_path, tmp_path / "m.engine", max_batch=8)
    message = str(info.value)
    assert "tensorrt" in message and "trtexec --onnx=" in message
    assert "--minShapes=input:1x3x16x16" in message and "--maxShapes=input:8x3x16x16" in message
    # export() writes the ONNX next to the engine before failing, so the command can be run.
    with pytest.raises(BackendUnavailableError, match="trtexec --onnx="):
        export(_model("conv_bn_relu"), torch.randn(1, *INPUT), tmp_path / "e" / "m.engine",
               backend="tensorrt", legacy=True)  # fmt: skip
    assert (tmp_path / "e" / "m.onnx").is_file()


def test_engine_batch_outside_profile_is_refused_before_tensorrt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"not an engine")
    sidecar = {"onnx": "m.onnx", "min_batch": 1, "opt_batch": 1, "max_batch": 16,
               "precision": "fp32"}  # fmt: skip
    (tmp_path / "m.engine.json").write_text(json.dumps(sidecar))
    with pytest.raises(ValueError, match=r"allowed 1\.\.16"):
        trt_backend.latency(engine, batch_sizes=(1, 32))
    with pytest.raises(BackendUnavailableError):  # an allowed batch gets as far as TensorRT
        trt_backend.latency(engine, batch_sizes=(16,))


# --- latency runners ------------------------------------------------------------------------


def test_ort_latency_returns_sane_stats(exported: Callable[[str], Path]) -> None:
    stats = latency(exported("conv_bn_relu"), batch_sizes=(1, 4), warmup=1, runs=5, threads=1)
    assert sorted(stats) == [1, 4]
    for batch, s in stats.items():
        assert s.batch_size == batch and s.runs == 5 and s.threads == 1
        assert 0 < s.min_ms <= s.median_ms <= s.p90_ms
        assert s.backend == "onnxruntime"


def test_torch_latency_cpu_is_sane_and_does_not_mutate() -> None:
    model = _model("flatten_linear").train()
    stats = torch_latency(model, torch.randn(1, *INPUT), batch_sizes=(1, 2), warmup=1, runs=4)
    assert sorted(stats) == [1, 2]
    assert all(s.runs == 4 and 0 < s.median_ms <= s.p90_ms for s in stats.values())
    assert stats[2].threads == torch.get_num_threads()
    assert model.training and next(model.parameters()).device.type == "cpu"


@pytest.mark.parametrize("option", ["fp16", "channels_last", "cuda_graphs"])
def test_torch_latency_cuda_only_options_refused_on_cpu(option: str) -> None:
    with pytest.raises(ValueError, match=option):
        torch_latency(_model("conv_bn_relu"), torch.randn(1, *INPUT), **{option: True})
