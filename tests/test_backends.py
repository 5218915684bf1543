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

from graphprune.backends import (
    backend_for_path,
    backend_names,
    cleanup_onnx,
    export,
    export_onnx,
    get_backend,
    measure,
)
from graphprune.backends import tensorrt as trt_backend
from graphprune.backends.ort import OrtRunner, parity
from graphprune.backends.torch import TorchRunner
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
    with pytest.raises(ValueError, match="known backends: onnx, tensorrt") as info:
        export(_model("conv_bn_relu"), torch.randn(1, *INPUT), tmp_path / "m", backend="tvm")
    assert "torch" in str(info.value)
    assert not (tmp_path / "m").exists()
    assert {"onnx", "tensorrt", "torch"} <= set(backend_names())
    with pytest.raises(ValueError, match=r"\.onnx \(onnx\)"):
        backend_for_path(tmp_path / "m.tflite")


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
    runner = get_backend("tensorrt").runner(engine)
    assert [p[1] for p in runner.profiles] == [1, 4]  # one profile per timed batch, opt = it
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
    x = torch.randn(4, *INPUT, device="cuda")
    (unaligned,) = runner.run(x[1:])  # a view 1 image past an aligned start: copied, not refused
    with torch.no_grad():
        torch.testing.assert_close(unaligned, cuda_model(x[1:]), atol=5e-3, rtol=5e-3)
    stats = measure([runner], (1, 4), warmup=2, rounds=5).stats
    assert stats[4][0].median_ms > 0 and stats[4][0].runs == 5


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
    sidecar = {
        "onnx": "m.onnx",
        "min_batch": 1,
        "opt_batch": 1,
        "max_batch": 16,
        "precision": "fp32",
    }  # fmt: skip  (an older side-car: one opt_batch)
    (tmp_path / "m.engine.json").write_text(json.dumps(sidecar))
    meta = trt_backend.read_sidecar(engine)
    trt_backend.check_batch(engine, 16, meta)
    with pytest.raises(ValueError, match=r"allowed 1\.\.16"):
        trt_backend.check_batch(engine, 32, meta)
    with pytest.raises(BackendUnavailableError, match="trtexec"):  # the runner needs TensorRT
        get_backend("tensorrt").runner(engine)


# --- latency runners ------------------------------------------------------------------------


def test_ort_runner_times_dense_and_other_model_interleaved(
    exported: Callable[[str], Path],
) -> None:
    runners = [get_backend("onnx").runner(exported(n), threads=1) for n in ("concat", "residual")]
    timing = measure(runners, (1, 4), warmup=1, rounds=5)
    assert sorted(timing.stats) == [1, 4]
    for batch, stats in timing.stats.items():
        for s in stats:
            assert s.batch_size == batch and s.runs == 5 and s.threads == 1
            assert 0 < s.min_ms <= s.median_ms <= s.p90_ms
            assert s.backend == "onnxruntime"
    # The runner's step really runs the graph at that batch: same outputs as ORT given inputs.
    x = np.random.default_rng(0).standard_normal((3, *INPUT)).astype(np.float32)
    with torch.no_grad():
        expected = _model("residual")(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(runners[1].run(x)[0], expected, atol=1e-4)


def test_torch_runner_cpu_matches_model_and_does_not_mutate(tmp_path: Path) -> None:
    model = _model("flatten_linear").train()
    backend = get_backend("torch")
    runner = backend.runner(model, example_inputs=torch.randn(1, *INPUT))
    stats = measure([runner], (1, 2), warmup=1, rounds=4).stats
    assert all(s[0].runs == 4 and 0 < s[0].median_ms <= s[0].p90_ms for s in stats.values())
    assert stats[2][0].threads == torch.get_num_threads()
    assert model.training and next(model.parameters()).device.type == "cpu"
    x = torch.randn(3, *INPUT)
    with torch.no_grad():
        expected = copy.deepcopy(model).eval()(x)
    torch.testing.assert_close(runner.run(x)[0], expected)
    # Its artifact is a model file; loading it back runs the same model.
    path = backend.export(model, torch.randn(1, *INPUT), tmp_path / "m.pt")
    assert backend_for_path(path) is backend
    torch.testing.assert_close(backend.runner(path).run(x)[0], expected)
    with pytest.raises(ValueError, match="fp16"):
        backend.export(model, torch.randn(1, *INPUT), tmp_path / "h.pt", fp16=True)


@pytest.mark.parametrize("option", ["fp16", "channels_last", "cuda_graphs"])
def test_torch_runner_cuda_only_options_refused_on_cpu(option: str) -> None:
    with pytest.raises(ValueError, match=option):
        TorchRunner(_model("conv_bn_relu"), example_inputs=torch.randn(1, *INPUT), **{option: True})


def test_runner_of_a_module_for_a_file_backend_says_export_first() -> None:
    with pytest.raises(TypeError, match="export"):
        get_backend("onnx").runner(_model("conv_bn_relu"))


def test_parity_restores_each_submodules_mode(exported: Callable[[str], Path]) -> None:
    model = _model("conv_bn_relu").train()
    model.body[1].eval()  # a frozen BatchNorm in a training model, as fine-tuning recipes do
    assert parity(model, torch.randn(2, *INPUT), exported("conv_bn_relu")) <= 1e-4
    assert model.training and model.body[0].training and model.head.training
    assert not model.body[1].training
