"""Eager / compiled PyTorch latency: the baseline every exported artifact is compared against.

CPU runs are timed with ``time.perf_counter`` and report torch's intra-op thread count; CUDA
runs are timed with CUDA events on the stream, because host timers measure kernel launches,
not kernel execution. The user's model is deep-copied: casting to half, channels_last and
``.to(device)`` all mutate a module in place.
"""

from __future__ import annotations

import copy
import functools
import time
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from graphprune.errors import BackendUnavailableError

from .timing import LatencyStats, cpu_name, stats_from_times

__all__ = ["torch_latency"]


def torch_latency(
    model: nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    *,
    device: str | torch.device = "cpu",
    batch_sizes: Iterable[int] = (1, 16),
    fp16: bool = False,
    channels_last: bool = False,
    cuda_graphs: bool = False,
    compile: bool = False,
    warmup: int = 10,
    runs: int = 50,
) -> dict[int, LatencyStats]:
    """Per-batch latency of ``model`` in eval mode under ``torch.no_grad``.

    Inputs for each batch size are random tensors shaped like ``example_inputs`` (batch axis
    replaced). ``fp16``, ``channels_last`` and ``cuda_graphs`` are CUDA-only: on CPU they are
    slow paths or unsupported, and a number measured that way would mislead, so they raise
    ValueError. ``compile`` with ``cuda_graphs`` uses torch.compile's "reduce-overhead" mode,
    which captures CUDA graphs itself.
    """
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
    if runs < 1 or warmup < 0:
        raise ValueError(f"need runs >= 1 and warmup >= 0, got runs={runs}, warmup={warmup}")
    examples = (
        (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    )

    work = copy.deepcopy(model).eval().to(dev)
    if fp16:
        work = work.half()
    if channels_last:
        work = work.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    forward: Callable[..., object] = work
    if compile:
        forward = torch.compile(work, mode="reduce-overhead" if cuda_graphs else None)

    results: dict[int, LatencyStats] = {}
    for batch in batch_sizes:
        inputs = [_like(t, batch, dev, fp16, channels_last) for t in examples]
        with torch.no_grad():
            if dev.type == "cuda":
                step = _graphed(forward, inputs) if cuda_graphs and not compile else None
                times = _time_cuda(step or functools.partial(forward, *inputs), warmup, runs)
                name = f"cuda ({torch.cuda.get_device_name(dev)})"
                results[batch] = stats_from_times(
                    times, batch_size=batch, device=name, backend="torch"
                )
            else:
                times = _time_cpu(functools.partial(forward, *inputs), warmup, runs)
                results[batch] = stats_from_times(
                    times,
                    batch_size=batch,
                    device=cpu_name(),
                    threads=torch.get_num_threads(),
                    backend="torch",
                )
    return results


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


def _time_cpu(step: Callable[[], object], warmup: int, runs: int) -> list[float]:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def _time_cuda(step: Callable[[], object], warmup: int, runs: int) -> list[float]:
    for _ in range(warmup):
        step()
    events = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        for _ in range(runs)
    ]
    for start, end in events:
        start.record()
        step()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) for start, end in events]


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
