"""TensorRT engines from our ONNX files: build, run, time. Written for TensorRT 10.x and 11.x.

``tensorrt`` is optional and imported inside functions, so ``import graphprune`` never needs it.
Version differences are detected by feature (hasattr), never by version string:

- 10.x has ``BuilderFlag.FP16`` (weak typing: TensorRT may pick fp16 kernels for an fp32 graph).
- 11.x is strongly typed only: precision comes from the ONNX tensor types, so an fp16 engine
  needs an ONNX exported with ``fp16=True``. Such a graph is built strongly typed on 10.x too.

Every engine gets a JSON side-car (``<engine>.json``) with its I/O, batch range and precision,
so a wrong batch size is refused with a clear message before TensorRT is involved.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import onnx
import torch

from graphprune.errors import BackendUnavailableError, ExportError

from .onnx import graph_precision
from .timing import LatencyStats, stats_from_times

__all__ = ["TrtRunner", "available", "build_engine", "latency", "trtexec_command"]

_INSTALL = (
    "pip install 'graphprune[tensorrt]' (the `tensorrt` package) on a machine with an NVIDIA "
    "GPU and driver"
)


def available() -> bool:
    """True when ``tensorrt`` imports and torch sees a CUDA device."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def build_engine(
    onnx_path: str | Path,
    engine_path: str | Path,
    *,
    fp16: bool = False,
    min_batch: int = 1,
    opt_batch: int = 1,
    max_batch: int = 16,
    workspace_gb: float = 2.0,
    timing_cache: str | Path | None = None,
) -> Path:
    """Build a serialized engine for batch sizes ``min_batch..max_batch`` and its side-car.

    ``fp16=True`` on an fp32 graph uses ``BuilderFlag.FP16`` where it exists (10.x); on 11.x it
    raises ValueError asking for an fp16 export. An fp16 graph is built strongly typed.
    ``timing_cache`` is loaded if the file exists and saved afterwards: it makes rebuilds of
    the same layers (dense vs pruned, repeated benchmarks) much faster.
    """
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise ValueError(
            f"need 1 <= min_batch <= opt_batch <= max_batch, got "
            f"{min_batch}, {opt_batch}, {max_batch}"
        )
    if not onnx_path.is_file():
        raise FileNotFoundError(f"no ONNX file at {onnx_path}; export it with export_onnx first")
    graph_fp16 = graph_precision(onnx.load(str(onnx_path), load_external_data=False)) == "fp16"
    cmd = trtexec_command(
        onnx_path,
        engine_path,
        min_batch=min_batch,
        opt_batch=opt_batch,
        max_batch=max_batch,
        fp16=fp16,
    )
    trt = _import_tensorrt(cmd)
    if not torch.cuda.is_available():
        raise BackendUnavailableError(
            f"TensorRT needs a CUDA device; torch sees none. On a GPU "
            f"machine the equivalent command is: {cmd}"
        )

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if graph_fp16 and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "\n".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(
            f"TensorRT's ONNX parser rejected {onnx_path}:\n{errors}\n"
            "Try export_onnx(..., legacy=True) or another opset."
        )

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if fp16 and not graph_fp16:
        if not hasattr(trt.BuilderFlag, "FP16"):
            raise ValueError(
                "this TensorRT is strongly typed (no BuilderFlag.FP16): export the "
                "ONNX with fp16=True so precision comes from the graph"
            )
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    for tensor in inputs:
        shape = tuple(tensor.shape)
        if any(d < 0 for d in shape[1:]):
            raise ValueError(
                f"input {tensor.name} has dynamic non-batch axes {shape}; "
                "export with a fixed input size"
            )
        if shape[0] >= 0 and not min_batch == max_batch == shape[0]:
            raise ValueError(
                f"{onnx_path} has a fixed batch of {shape[0]}; re-export with "
                f"dynamic_batch=True or build with min=opt=max batch {shape[0]}"
            )
        profile.set_shape(
            tensor.name, *((b, *shape[1:]) for b in (min_batch, opt_batch, max_batch))
        )
    config.add_optimization_profile(profile)
    cache_file = Path(timing_cache) if timing_cache else None
    cache_bytes = cache_file.read_bytes() if cache_file and cache_file.is_file() else b""
    config.set_timing_cache(config.create_timing_cache(cache_bytes), ignore_mismatch=False)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(
            f"TensorRT failed to build an engine from {onnx_path}; see its log "
            f"above. Equivalent command to reproduce: {cmd}"
        )
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    engine_path.write_bytes(bytes(memoryview(serialized)))
    if cache_file:
        cache_file.write_bytes(bytes(memoryview(config.get_timing_cache().serialize())))
    outputs = [network.get_output(i) for i in range(network.num_outputs)]
    sidecar = {
        "onnx": str(onnx_path),
        "inputs": [_io(t) for t in inputs],
        "outputs": [_io(t) for t in outputs],
        "min_batch": min_batch,
        "opt_batch": opt_batch,
        "max_batch": max_batch,
        "precision": "fp16" if fp16 or graph_fp16 else "fp32",
        "strongly_typed": bool(flags) or not hasattr(trt.BuilderFlag, "FP16"),
        "tensorrt": trt.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    _sidecar_path(engine_path).write_text(json.dumps(sidecar, indent=2))
    return engine_path


class TrtRunner:
    """Runs an engine with execute_async_v3 on torch CUDA tensors, on its own CUDA stream.

    A private stream because enqueueing on the legacy default stream makes TensorRT add
    synchronizations (and a warning) to every call.
    """

    def __init__(self, engine_path: str | Path) -> None:
        self.engine_path = Path(engine_path)
        self.meta = read_sidecar(self.engine_path)
        trt = _import_tensorrt(_command_from_sidecar(self.engine_path, self.meta))
        if not torch.cuda.is_available():
            raise BackendUnavailableError("TensorRT engines need a CUDA device; torch sees none")
        self._trt = trt
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
        if self.engine is None:
            built = self.meta.get("tensorrt") if self.meta else "unknown"
            raise ExportError(
                f"cannot load {self.engine_path} (built with TensorRT {built}, this "
                f"is {trt.__version__}, or another GPU); rebuild it with build_engine"
            )
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.input_names = [n for n in names if is_input[n]]
        self.output_names = [n for n in names if not is_input[n]]
        self.stream = torch.cuda.Stream()

    def dtype(self, name: str) -> torch.dtype:
        """The torch dtype of an engine I/O tensor."""
        trt_dtype = self.engine.get_tensor_dtype(name)
        for trt_name, torch_dtype in _DTYPES:
            if trt_dtype == getattr(self._trt.DataType, trt_name, None):
                return torch_dtype
        raise TypeError(f"engine tensor {name} has unsupported dtype {trt_dtype}")

    def run(self, *inputs: torch.Tensor) -> list[torch.Tensor]:
        """One forward pass; inputs are moved to CUDA and cast to the engine's dtypes."""
        outputs = self._bind(inputs)
        self._enqueue()
        torch.cuda.current_stream().wait_stream(self.stream)
        return outputs

    def time(self, batch_size: int, *, warmup: int = 10, runs: int = 50) -> LatencyStats:
        """Latency of ``runs`` forward passes on random inputs, each timed with CUDA events."""
        shapes = [tuple(self.engine.get_tensor_shape(n))[1:] for n in self.input_names]
        inputs = [
            torch.randn(batch_size, *s, device="cuda").to(self.dtype(n))
            for n, s in zip(self.input_names, shapes, strict=True)
        ]
        self._bind(inputs)
        for _ in range(warmup):
            self._enqueue()
        events = [
            (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            for _ in range(runs)
        ]
        for start, end in events:
            start.record(self.stream)
            self._enqueue()
            end.record(self.stream)
        self.stream.synchronize()
        return stats_from_times(
            [s.elapsed_time(e) for s, e in events],
            batch_size=batch_size,
            device=f"cuda ({torch.cuda.get_device_name()})",
            backend="tensorrt",
        )

    def _bind(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if len(inputs) != len(self.input_names):
            raise ValueError(
                f"engine takes {len(self.input_names)} inputs "
                f"({', '.join(self.input_names)}), got {len(inputs)}"
            )
        check_batch(self.engine_path, int(inputs[0].shape[0]), self.meta)
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            # Kept on self so the buffers outlive the asynchronous execution.
            self._inputs = [
                t.to("cuda", self.dtype(n)).contiguous()
                for n, t in zip(self.input_names, inputs, strict=True)
            ]
            for name, t in zip(self.input_names, self._inputs, strict=True):
                self.context.set_input_shape(name, tuple(t.shape))
                self.context.set_tensor_address(name, t.data_ptr())
            self._outputs = [
                torch.empty(
                    tuple(self.context.get_tensor_shape(n)), dtype=self.dtype(n), device="cuda"
                )
                for n in self.output_names
            ]
        for name, t in zip(self.output_names, self._outputs, strict=True):
            self.context.set_tensor_address(name, t.data_ptr())
            t.record_stream(torch.cuda.current_stream())
        return self._outputs

    def _enqueue(self) -> None:
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError(f"TensorRT execution of {self.engine_path} failed; see its log")


def latency(
    engine_path: str | Path,
    batch_sizes: Iterable[int] = (1, 16),
    *,
    warmup: int = 10,
    runs: int = 50,
) -> dict[int, LatencyStats]:
    """Per-batch engine latency; every batch size is checked against the profile first."""
    batch_sizes = list(batch_sizes)
    meta = read_sidecar(engine_path)
    for b in batch_sizes:
        check_batch(engine_path, b, meta)
    runner = TrtRunner(engine_path)
    return {b: runner.time(b, warmup=warmup, runs=runs) for b in batch_sizes}


def read_sidecar(engine_path: str | Path) -> dict[str, Any] | None:
    """The engine's JSON side-car, or None for an engine built elsewhere (e.g. by trtexec)."""
    path = _sidecar_path(Path(engine_path))
    return json.loads(path.read_text()) if path.is_file() else None


def check_batch(engine_path: str | Path, batch: int, meta: dict[str, Any] | None) -> None:
    """Raise ValueError naming the allowed range if ``batch`` is outside the engine's profile."""
    if meta is None:
        return  # no side-car: TensorRT itself will reject the shape in set_input_shape
    lo, hi = meta["min_batch"], meta["max_batch"]
    if not lo <= batch <= hi:
        raise ValueError(
            f"batch size {batch} is outside the profile of {engine_path}: allowed "
            f"{lo}..{hi}; rebuild with build_engine(..., max_batch={batch})"
        )


def trtexec_command(
    onnx_path: str | Path,
    engine_path: str | Path,
    *,
    min_batch: int = 1,
    opt_batch: int = 1,
    max_batch: int = 16,
    fp16: bool = False,
) -> str:
    """The trtexec line equivalent to build_engine, from the ONNX file's input names/shapes."""
    model = onnx.load(str(onnx_path), load_external_data=False)
    initializers = {t.name for t in model.graph.initializer}
    specs = []
    for inp in model.graph.input:
        if inp.name in initializers:
            continue
        dims = [
            d.dim_value if d.HasField("dim_value") else -1 for d in inp.type.tensor_type.shape.dim
        ]
        specs.append((inp.name, dims[1:]))

    def shapes(batch: int) -> str:
        return ",".join(f"{n}:" + "x".join(str(d) for d in (batch, *rest)) for n, rest in specs)

    cmd = (
        f"trtexec --onnx={onnx_path} --saveEngine={engine_path} --minShapes={shapes(min_batch)}"
        f" --optShapes={shapes(opt_batch)} --maxShapes={shapes(max_batch)}"
    )
    if graph_precision(model) == "fp16":
        return cmd + " --stronglyTyped"  # required on 10.x, a no-op on 11.x
    return cmd + " --fp16" if fp16 else cmd


_DTYPES = (
    ("FLOAT", torch.float32),
    ("HALF", torch.float16),
    ("BF16", torch.bfloat16),
    ("INT32", torch.int32),
    ("INT64", torch.int64),
    ("INT8", torch.int8),
    ("UINT8", torch.uint8),
    ("BOOL", torch.bool),
)


def _import_tensorrt(equivalent_command: str) -> Any:
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise BackendUnavailableError(
            f"the TensorRT backend needs the `tensorrt` package: {_INSTALL}. "
            f"Equivalent command where TensorRT is installed: {equivalent_command}"
        ) from exc
    return trt


def _command_from_sidecar(engine_path: Path, meta: dict[str, Any] | None) -> str:
    if meta and Path(meta["onnx"]).is_file():
        return trtexec_command(
            meta["onnx"],
            engine_path,
            min_batch=meta["min_batch"],
            opt_batch=meta["opt_batch"],
            max_batch=meta["max_batch"],
            fp16=meta["precision"] == "fp16",
        )
    return f"trtexec --onnx=<model.onnx> --saveEngine={engine_path} (then --loadEngine to time it)"


def _io(tensor: Any) -> dict[str, Any]:
    return {"name": tensor.name, "shape": list(tensor.shape), "dtype": str(tensor.dtype)}


def _sidecar_path(engine_path: Path) -> Path:
    return engine_path.with_name(engine_path.name + ".json")
