"""The ``tensorrt`` backend: engines built from our ONNX files. Written for TensorRT 10.x and 11.x.

The runner lives in :mod:`.tensorrt_runner`.

``tensorrt`` is optional and imported inside functions, so ``import graphprune`` never needs it.
Version differences are detected by feature (hasattr), never by version string:

- 10.x has ``BuilderFlag.FP16`` (weak typing: TensorRT may pick fp16 kernels for an fp32 graph).
- 11.x is strongly typed only: precision comes from the ONNX tensor types, so an fp16 engine
  needs an ONNX exported with ``fp16=True``. Such a graph is built strongly typed on 10.x too.

Every engine gets a JSON side-car (``<engine>.json``) with its I/O, batch range, profiles,
precision and the equivalent trtexec command, so a wrong batch size is refused with a clear
message before TensorRT is involved.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx
import torch
from torch import nn

from graphprune.errors import BackendUnavailableError, ExportError

from .base import Backend, register_backend
from .onnx import export_onnx, graph_precision

if TYPE_CHECKING:
    from .tensorrt_runner import TrtRunner

__all__ = ["TensorRTBackend", "available", "build_engine", "trtexec_command"]

_INSTALL = (
    "pip install 'graphprune[tensorrt]' (the `tensorrt` package) on a machine with an NVIDIA "
    "GPU and driver"
)


@register_backend
class TensorRTBackend(Backend):
    """A serialized TensorRT engine built from our ONNX export, run on a CUDA GPU."""

    name = "tensorrt"
    suffix = ".engine"
    description = "a TensorRT engine (the ONNX file is kept beside it), run on a CUDA GPU"
    install = _INSTALL

    def unavailable_reason(self) -> str | None:
        try:
            import tensorrt  # noqa: F401
        except ImportError:
            return "the `tensorrt` package is not installed"
        return None if torch.cuda.is_available() else "torch sees no CUDA device"

    def export(
        self,
        model: nn.Module,
        example_inputs: torch.Tensor | Sequence[torch.Tensor],
        path: str | Path,
        *,
        fp16: bool = False,
        batch_sizes: Sequence[int] | None = None,
        **options: Any,
    ) -> Path:
        """Write ``<stem>.onnx`` next to the engine (kept, so that when TensorRT is missing the
        error's trtexec command can be run on it), then build the engine from it.

        Options of export_onnx (dynamic_batch, legacy, opset) go to it, the rest to
        :func:`build_engine`. With ``fp16=True`` the ONNX graph itself is fp16, which TensorRT
        11 requires and 10 accepts. ``batch_sizes`` (the batches it will be timed at) become
        one profile each, and the largest the top of the range unless ``max_batch`` is given.
        """
        engine_path = Path(path)
        if engine_path.suffix == ".onnx":
            raise ValueError(
                f"{engine_path} is the engine path and would clash with its ONNX file; "
                f"use an {self.suffix} suffix"
            )
        if batch_sizes:
            options.setdefault("opt_batches", tuple(batch_sizes))
            options.setdefault("max_batch", max(batch_sizes))
        onnx_options = {k: options.pop(k) for k in _ONNX_OPTIONS if k in options}
        onnx_path = export_onnx(
            model, example_inputs, engine_path.with_suffix(".onnx"), fp16=fp16, **onnx_options
        )
        return build_engine(onnx_path, engine_path, fp16=fp16, **options)

    def runner(
        self, artifact: str | Path | nn.Module, *, threads: int | None = None, **options: Any
    ) -> TrtRunner:
        """A :class:`~.tensorrt_runner.TrtRunner`; ``threads`` does not apply on the GPU."""
        from .tensorrt_runner import TrtRunner

        return TrtRunner(self.artifact_path(artifact), **options)


_ONNX_OPTIONS = ("dynamic_batch", "legacy", "opset")


def available() -> bool:
    """True when ``tensorrt`` imports and torch sees a CUDA device."""
    return TensorRTBackend().available()


def build_engine(
    onnx_path: str | Path,
    engine_path: str | Path,
    *,
    fp16: bool = False,
    min_batch: int = 1,
    max_batch: int = 16,
    opt_batches: Sequence[int] | None = None,
    workspace_gb: float = 2.0,
    timing_cache: str | Path | None = None,
) -> Path:
    """Build a serialized engine for batch sizes ``min_batch..max_batch`` and its side-car.

    One optimization profile per batch size in ``opt_batches`` (default: ``min_batch`` and
    ``max_batch``), each covering the whole range and tuned for that batch (opt = it), because
    kernels are chosen at the opt shape: a batch-1 latency from a profile tuned for 16 is not
    the engine's batch-1 latency. The runner picks the profile tuned for the batch it runs.

    ``fp16=True`` on an fp32 graph uses ``BuilderFlag.FP16`` where it exists (10.x); on 11.x it
    raises ValueError asking for an fp16 export. An fp16 graph is built strongly typed.
    ``timing_cache`` is loaded if the file exists and saved afterwards: it makes rebuilds of
    the same layers (dense vs pruned, repeated benchmarks) much faster.
    """
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    opts = sorted(set(opt_batches or (min_batch, max_batch)))
    if not 1 <= min_batch <= opts[0] <= opts[-1] <= max_batch:
        raise ValueError(
            f"need 1 <= min_batch <= every opt batch <= max_batch, got min_batch={min_batch}, "
            f"opt_batches={opts}, max_batch={max_batch}"
        )
    if not onnx_path.is_file():
        raise FileNotFoundError(f"no ONNX file at {onnx_path}; export it with export_onnx first")
    graph_fp16 = graph_precision(onnx.load(str(onnx_path), load_external_data=False)) == "fp16"
    shape = {"min_batch": min_batch, "opt_batches": opts, "max_batch": max_batch}

    def command(weak_typing: bool | None) -> str:
        return trtexec_command(
            onnx_path, engine_path, min_batch=min_batch, opt_batches=opts, max_batch=max_batch,
            fp16=fp16, weak_typing=weak_typing,
        )  # fmt: skip

    trt = import_tensorrt(command(None))
    weak = hasattr(trt.BuilderFlag, "FP16")  # 10.x; 11.x is strongly typed only
    cmd = command(weak)
    if not torch.cuda.is_available():
        raise BackendUnavailableError(
            f"TensorRT needs a CUDA device; torch sees none. On a GPU "
            f"machine the equivalent command is: {cmd}"
        )
    if fp16 and not graph_fp16 and not weak:
        raise ValueError(
            f"TensorRT {trt.__version__} is strongly typed (no BuilderFlag.FP16): export the "
            f"ONNX with fp16=True so precision comes from the graph, then build it (equivalent "
            f"command: {cmd})"
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
        config.set_flag(trt.BuilderFlag.FP16)
    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    _add_profiles(builder, config, inputs, onnx_path, min_batch, opts, max_batch)
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
        **shape,
        "precision": "fp16" if fp16 or graph_fp16 else "fp32",
        "strongly_typed": bool(flags) or not weak,
        "tensorrt": trt.__version__,
        "trtexec": cmd,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(),
    }
    _sidecar_path(engine_path).write_text(json.dumps(sidecar, indent=2))
    return engine_path


def _add_profiles(
    builder: Any,
    config: Any,
    inputs: Sequence[Any],
    onnx_path: Path,
    min_batch: int,
    opts: Sequence[int],
    max_batch: int,
) -> None:
    """One profile per opt batch, every input ranging min_batch..max_batch (profile k tuned
    for opts[k]); TensorRT's refusal of a profile is an error, not a silent default."""
    for opt in opts:
        profile = builder.create_optimization_profile()
        for tensor in inputs:
            shape = tuple(tensor.shape)
            if any(d < 0 for d in shape[1:]):
                raise ValueError(
                    f"input {tensor.name} has dynamic non-batch axes {shape}; "
                    "export with a fixed input size"
                )
            if shape[0] >= 0 and not min_batch == opt == max_batch == shape[0]:
                raise ValueError(
                    f"{onnx_path} has a fixed batch of {shape[0]}; re-export with "
                    f"dynamic_batch=True or build with min=opt=max batch {shape[0]}"
                )
            profile.set_shape(tensor.name, *((b, *shape[1:]) for b in (min_batch, opt, max_batch)))
        if config.add_optimization_profile(profile) < 0:
            raise ValueError(
                f"TensorRT rejected the optimization profile batch {min_batch}..{max_batch} "
                f"(opt {opt}) for {onnx_path}"
            )


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
    opt_batches: Sequence[int] = (1, 16),
    max_batch: int = 16,
    fp16: bool = False,
    weak_typing: bool | None = None,
) -> str:
    """The trtexec line equivalent to build_engine, from the ONNX file's input names/shapes.

    One ``--minShapes/--optShapes/--maxShapes`` set per profile (trtexec makes a profile of each
    set). Precision: an fp16 graph gets ``--stronglyTyped``; ``fp16`` on an fp32 graph gets
    ``--fp16`` unless ``weak_typing`` is False (TensorRT 11, strongly typed, has no such flag:
    there the graph must be exported in fp16). None means the version is unknown (TensorRT not
    installed): the 10.x line is printed.
    """
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

    cmd = f"trtexec --onnx={onnx_path} --saveEngine={engine_path}"
    for opt in opt_batches:
        cmd += (
            f" --minShapes={shapes(min_batch)} --optShapes={shapes(opt)}"
            f" --maxShapes={shapes(max_batch)}"
        )
    if graph_precision(model) == "fp16":
        return cmd + " --stronglyTyped"  # required on 10.x, the only mode on 11.x
    return cmd + " --fp16" if fp16 and weak_typing is not False else cmd


def import_tensorrt(equivalent_command: str) -> Any:
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise BackendUnavailableError(
            f"the TensorRT backend needs the `tensorrt` package: {_INSTALL}. "
            f"Equivalent command where TensorRT is installed: {equivalent_command}"
        ) from exc
    return trt


def command_from_sidecar(engine_path: Path, meta: dict[str, Any] | None) -> str:
    """The trtexec line that built ``engine_path``, for errors where TensorRT is missing."""
    if meta and meta.get("trtexec"):
        return str(meta["trtexec"])
    if meta and Path(meta["onnx"]).is_file():
        return trtexec_command(
            meta["onnx"],
            engine_path,
            min_batch=meta["min_batch"],
            opt_batches=meta.get("opt_batches") or [meta.get("opt_batch", meta["min_batch"])],
            max_batch=meta["max_batch"],
            fp16=meta["precision"] == "fp16",
        )
    return f"trtexec --onnx=<model.onnx> --saveEngine={engine_path} (then --loadEngine to time it)"


def _io(tensor: Any) -> dict[str, Any]:
    return {"name": tensor.name, "shape": list(tensor.shape), "dtype": str(tensor.dtype)}


def _sidecar_path(engine_path: Path) -> Path:
    return engine_path.with_name(engine_path.name + ".json")
