"""The ``torch`` backend: eager / compiled PyTorch, the baseline every artifact is compared with.

Its artifact is a model file written by :func:`graphprune.io.save_model` (what ``compress
--out`` writes). CPU runs are timed on the host clock and report torch's intra-op thread count;
CUDA runs are timed with CUDA events on the stream, because host timers measure kernel launches,
not kernel execution. The user's model is deep-copied: casting to half, channels_last and
``.to(device)`` all mutate a module in place.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from graphprune.errors import BackendUnavailableError
from graphprune.frontend.trace import as_inputs

from .base import Backend, register_backend
from .timing import CudaClock, cpu_name, host_clock

__all__ = ["TorchBackend", "TorchRunner"]


@register_backend
class TorchBackend(Backend):
    """A saved graphprune model file, run by PyTorch (eager, torch.compile or CUDA graphs)."""

    name = "torch"
    suffix = ".pt"
    description = "a graphprune model file, run by PyTorch (eager, compile, CUDA graphs)"

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
        """Save ``model`` with its example inputs (:func:`graphprune.io.save_model`); eager
        PyTorch runs any batch size, so ``batch_sizes`` needs nothing here."""
        from graphprune.io import save_model

        if fp16 or options:
            given = ["fp16"] * fp16 + sorted(options)
            raise ValueError(
                f"the torch backend saves the model as it is and takes no export options "
                f"({', '.join(given)}); fp16 and channels_last are runner(...) options on CUDA"
            )
        return save_model(path, model, as_inputs(example_inputs))

    def runner(self, artifact: str | Path | nn.Module, **options: Any) -> TorchRunner:
        """A :class:`TorchRunner` of a model file, or of a module (pass ``example_inputs=``)."""
        if isinstance(artifact, nn.Module):
            return TorchRunner(artifact, **options)
        from graphprune.io import load_model

        model, inputs = load_model(self.artifact_path(artifact))
        return TorchRunner(model, **{"example_inputs": inputs, **options})


class TorchRunner:
    """``model`` in eval mode under ``torch.no_grad`` on ``device``, ready to run and time.

    Timed inputs for a batch size are random tensors shaped like ``example_inputs`` (batch axis
    replaced). ``fp16``, ``channels_last`` and ``cuda_graphs`` are CUDA-only: on CPU they are
    slow paths or unsupported, and a number measured that way would mislead, so they raise
    ValueError. ``compile`` with ``cuda_graphs`` uses torch.compile's "reduce-overhead" mode,
    which captures CUDA graphs itself. ``threads`` (CPU) sets torch's intra-op thread count,
    which is one setting for the whole process: torch has a single pool.
    """

    backend = "torch"

    def __init__(
        self,
        model: nn.Module,
        *,
        example_inputs: torch.Tensor | Sequence[torch.Tensor],
        device: str | torch.device = "cpu",
        fp16: bool = False,
        channels_last: bool = False,
        cuda_graphs: bool = False,
        compile: bool = False,
        threads: int | None = None,
    ) -> None:
        dev = torch.device(device)
        cuda_only = [
            n
            for n, on in (
                ("fp16", fp16),
                ("channels_last", channels_last),
                ("cuda_graphs", cuda_graphs),
            )
            if on
        ]
        if dev.type != "cuda" and cuda_only:
            raise ValueError(f"{', '.join(cuda_only)} only apply on CUDA; got device={dev}")
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise BackendUnavailableError(f"device={dev} requested but torch sees no CUDA device")
        self.examples = as_inputs(example_inputs)
        self.dev, self.fp16, self.channels_last = dev, fp16, channels_last
        self.cuda_graphs, self.compiled = cuda_graphs, compile
        work = copy.deepcopy(model).eval().to(dev)
        if fp16:
            work = work.half()
        if channels_last:
            work = work.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.forward: Callable[..., object] = work
        if compile:
            self.forward = torch.compile(work, mode="reduce-overhead" if cuda_graphs else None)
        if dev.type == "cuda":
            self.device = f"cuda ({torch.cuda.get_device_name(dev)})"
            self.threads: int | None = None
            self.clock: Any = CudaClock()
        else:
            if threads is not None:
                if threads < 1:
                    raise ValueError(f"threads must be >= 1, got {threads}")
                torch.set_num_threads(threads)
            self.device, self.threads, self.clock = cpu_name(), torch.get_num_threads(), host_clock

    def run(self, *inputs: torch.Tensor) -> list[Any]:
        """One forward pass on ``inputs`` (moved to the device); the outputs as a list."""
        from .onnx import flatten_outputs

        with torch.no_grad():
            out = self.forward(*(t.to(self.dev) for t in inputs))
        return list(flatten_outputs(out))

    def step(self, batch_size: int) -> Callable[[], object]:
        """One forward pass on random inputs of ``batch_size`` (a CUDA graph replay if asked)."""
        inputs = [
            _like(t, batch_size, self.dev, self.fp16, self.channels_last) for t in self.examples
        ]
        if self.cuda_graphs and not self.compiled:
            with torch.no_grad():
                return _graphed(self.forward, inputs)
        call = functools.partial(self.forward, *inputs)

        def step() -> object:
            with torch.no_grad():
                return call()

        return step


def _like(
    example: torch.Tensor, batch: int, dev: torch.device, fp16: bool, channels_last: bool
) -> torch.Tensor:
    """A random tensor like ``example`` with batch ``batch`` (integer inputs are repeated)."""
    shape = (batch, *example.shape[1:])
    if example.is_floating_point():
        t = torch.randn(shape, device=dev, dtype=torch.float16 if fp16 else example.dtype)
    else:
        t = example[:1].to(dev).expand(shape).clone()
    if channels_last and t.dim() == 4:
        t = t.contiguous(memory_format=torch.channels_last)
    return t


def _graphed(forward: Callable[..., object], inputs: list[torch.Tensor]) -> Callable[[], object]:
    """Capture one forward pass in a CUDA graph; replays reuse the same input buffers."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up off the capture, as CUDA graphs require
        for _ in range(3):
            forward(*inputs)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        forward(*inputs)
    return graph.replay
