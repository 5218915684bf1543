"""Running and timing TensorRT engines: the ``tensorrt`` backend's runner.

Every answer TensorRT gives while binding is checked: ``set_input_shape`` refuses a shape
outside the active optimization profile and ``set_tensor_address`` an address that is not
256-byte aligned, and ignoring either silently runs the engine on the previous buffer. Inputs
that are views into larger tensors are copied into aligned buffers first.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from graphprune.errors import BackendUnavailableError, ExportError

from .base import Clock
from .tensorrt import check_batch, command_from_sidecar, import_tensorrt, read_sidecar
from .timing import CudaClock

__all__ = ["TrtRunner", "aligned", "bind_inputs", "bind_outputs", "choose_profile"]

# TensorRT requires every I/O address to be 256-byte aligned (set_tensor_address fails otherwise).
ALIGNMENT = 256


class TrtRunner:
    """Runs an engine with execute_async_v3 on torch CUDA tensors, on its own CUDA stream.

    A private stream because enqueueing on the legacy default stream makes TensorRT add
    synchronizations (and a warning) to every call. One execution context per optimization
    profile, each bound to its profile once, so timing batch 1 and batch 16 in turn never
    switches profiles; a batch runs on the profile tuned for it (see :func:`choose_profile`).
    """

    backend: str = "tensorrt"
    threads: int | None = None  # GPU work: no CPU thread count applies

    def __init__(self, engine_path: str | Path) -> None:
        self.engine_path = Path(engine_path)
        self.meta = read_sidecar(self.engine_path)
        trt = import_tensorrt(command_from_sidecar(self.engine_path, self.meta))
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
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.input_names = [n for n in names if is_input[n]]
        self.output_names = [n for n in names if not is_input[n]]
        first = self.input_names[0]
        self.profiles: list[tuple[int, int, int]] = []
        for k in range(self.engine.num_optimization_profiles):
            lo, opt, hi = self.engine.get_tensor_profile_shape(first, k)
            self.profiles.append((int(lo[0]), int(opt[0]), int(hi[0])))
        self.stream = torch.cuda.Stream()
        self.clock: Clock = CudaClock(self.stream)
        self.device = f"cuda ({torch.cuda.get_device_name()})"
        self._contexts: dict[int, Any] = {}
        self._buffers: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}

    def dtype(self, name: str) -> torch.dtype:
        """The torch dtype of an engine I/O tensor."""
        return torch_dtype(self._trt, self.engine.get_tensor_dtype(name), name)

    def run(self, *inputs: torch.Tensor) -> list[torch.Tensor]:
        """One forward pass; inputs are moved to CUDA and cast to the engine's dtypes."""
        k = self._bind(inputs)
        self._enqueue(k)
        torch.cuda.current_stream().wait_stream(self.stream)
        return self._buffers[k][1]

    def step(self, batch_size: int) -> Callable[[], object]:
        """Bind random inputs of ``batch_size`` once; the call enqueues one forward pass."""
        shapes = [tuple(self.engine.get_tensor_shape(n))[1:] for n in self.input_names]
        inputs = [
            torch.randn(batch_size, *s, device="cuda").to(self.dtype(n))
            for n, s in zip(self.input_names, shapes, strict=True)
        ]
        k = self._bind(inputs)
        return lambda: self._enqueue(k)

    def _context(self, k: int) -> Any:
        if k not in self._contexts:
            context = self.engine.create_execution_context()
            if not context.set_optimization_profile_async(k, self.stream.cuda_stream):
                raise RuntimeError(f"TensorRT could not select profile {k} of {self.engine_path}")
            self._contexts[k] = context
        return self._contexts[k]

    def _bind(self, inputs: Sequence[torch.Tensor]) -> int:
        if len(inputs) != len(self.input_names):
            raise ValueError(
                f"engine takes {len(self.input_names)} inputs "
                f"({', '.join(self.input_names)}), got {len(inputs)}"
            )
        batch = int(inputs[0].shape[0])
        check_batch(self.engine_path, batch, self.meta)
        k = choose_profile(self.profiles, batch, self.engine_path)
        context = self._context(k)
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            cast = [
                t.to("cuda", self.dtype(n)) for n, t in zip(self.input_names, inputs, strict=True)
            ]
            bound = bind_inputs(context, self.input_names, cast, self.engine_path)
            outputs = bind_outputs(
                context, self.output_names, self.dtype, self.engine_path, device="cuda"
            )
        for t in outputs:
            t.record_stream(torch.cuda.current_stream())
        self._buffers[k] = (bound, outputs)  # kept: they must outlive the asynchronous runs
        return k

    def _enqueue(self, k: int) -> None:
        if not self._contexts[k].execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError(f"TensorRT execution of {self.engine_path} failed; see its log")


def choose_profile(profiles: Sequence[tuple[int, int, int]], batch: int, where: object) -> int:
    """Index of the (min, opt, max) batch profile to run ``batch`` on: among those containing
    it, the one whose opt is nearest (lowest index on ties). ValueError naming the ranges."""
    fits = [k for k, (lo, _, hi) in enumerate(profiles) if lo <= batch <= hi]
    if not fits:
        ranges = ", ".join(f"{lo}..{hi}" for lo, _, hi in profiles)
        raise ValueError(
            f"batch size {batch} is outside every optimization profile of {where} ({ranges}); "
            f"rebuild with build_engine(..., max_batch={batch})"
        )
    return min(fits, key=lambda k: abs(profiles[k][1] - batch))


def aligned(t: torch.Tensor, alignment: int = ALIGNMENT) -> torch.Tensor:
    """``t`` if contiguous and its address is a multiple of ``alignment``, else a copy that is.

    A view into a larger tensor (``x[1:]``) starts mid-allocation; TensorRT refuses such an
    address, and before we checked it silently kept running the previous buffer.
    """
    t = t.contiguous()
    if t.data_ptr() % alignment == 0:
        return t
    nbytes = t.numel() * t.element_size()
    raw = torch.empty(nbytes + alignment, dtype=torch.uint8, device=t.device)
    offset = -raw.data_ptr() % alignment
    out = raw[offset : offset + nbytes].view(t.dtype).view(t.shape)
    out.copy_(t)
    return out


def bind_inputs(
    context: Any, names: Sequence[str], tensors: Sequence[torch.Tensor], where: object
) -> list[torch.Tensor]:
    """Set each input's shape and address, checking TensorRT's answers; returns the bound
    tensors (unaligned ones copied), which the caller must keep alive while the engine runs."""
    bound = []
    for name, tensor in zip(names, tensors, strict=True):
        t = aligned(tensor)
        if not context.set_input_shape(name, tuple(t.shape)):
            raise ValueError(
                f"TensorRT refused shape {tuple(t.shape)} for input {name} of {where}: outside "
                "the engine's optimization profile (or a wrong non-batch size); rebuild with "
                f"build_engine(..., max_batch={t.shape[0]}) or feed the exported input size"
            )
        _set_address(context, name, t, where)
        bound.append(t)
    return bound


def bind_outputs(
    context: Any,
    names: Sequence[str],
    dtype: Callable[[str], torch.dtype],
    where: object,
    *,
    device: str | torch.device,
) -> list[torch.Tensor]:
    """Allocate each output at the shape the bound inputs imply and set its address."""
    outputs = []
    for name in names:
        shape = tuple(context.get_tensor_shape(name))
        if any(d < 0 for d in shape):
            raise RuntimeError(f"TensorRT cannot infer the shape of output {name} of {where}")
        t = aligned(torch.empty(shape, dtype=dtype(name), device=device))
        _set_address(context, name, t, where)
        outputs.append(t)
    return outputs


def _set_address(context: Any, name: str, t: torch.Tensor, where: object) -> None:
    if not context.set_tensor_address(name, t.data_ptr()):
        raise RuntimeError(
            f"TensorRT refused the address {t.data_ptr():#x} of {name} for {where} "
            f"({t.data_ptr() % ALIGNMENT} bytes past a {ALIGNMENT}-byte boundary, on "
            f"{t.device}): I/O tensors must be {ALIGNMENT}-byte aligned CUDA memory"
        )


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


def torch_dtype(trt: Any, trt_dtype: Any, name: str) -> torch.dtype:
    """The torch dtype of a TensorRT DataType (names looked up, as 10.x and 11.x differ)."""
    for trt_name, dtype in _DTYPES:
        if trt_dtype == getattr(trt.DataType, trt_name, None):
            return dtype
    raise TypeError(f"engine tensor {name} has unsupported dtype {trt_dtype}")
