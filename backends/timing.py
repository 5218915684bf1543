"""The one timing routine of every backend, and the latency record it returns.

:func:`measure` times any :class:`~.base.Runner` (ONNX Runtime, TensorRT, torch, a third-party
backend): warm-up, then the models take turns one forward pass at a time in rounds (the order
rotates each round), so load from other processes and clock drift hit dense and pruned alike and
their speedup comes from the same rounds. The median is the headline number because a single
slow run (a page fault, a GC pause, a clock change) must not move it; p90 shows the tail. Every
record states its device and, on CPU, its intra-op thread count.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .base import Runner


@dataclass(frozen=True, slots=True)
class LatencyStats:
    """Per-batch latency of one model on one backend, in milliseconds per forward pass.

    ``threads`` is the intra-op thread count on CPU (``None`` on a GPU, where it does not
    apply); ``device`` names the hardware so a number is never quoted without its machine.
    """

    median_ms: float
    p90_ms: float
    mean_ms: float
    min_ms: float
    runs: int
    batch_size: int
    device: str
    threads: int | None = None
    backend: str = ""

    @property
    def images_per_s(self) -> float:
        """Throughput at the median latency (batch_size images per forward pass)."""
        return self.batch_size * 1000.0 / self.median_ms if self.median_ms > 0 else float("inf")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON benchmark files."""
        return asdict(self)


def stats_from_times(
    times_ms: Sequence[float],
    *,
    batch_size: int,
    device: str,
    threads: int | None = None,
    backend: str = "",
) -> LatencyStats:
    """Summarize per-run wall times (ms) into a :class:`LatencyStats`.

    Raises ValueError on an empty list: a latency without runs would be a made-up number.
    """
    if len(times_ms) == 0:
        raise ValueError("stats_from_times needs at least one timed run; got none")
    t = np.asarray(times_ms, dtype=np.float64)
    median = float(np.median(t))
    return LatencyStats(
        median_ms=median,
        # max() guards against float rounding putting the interpolated p90 a hair below the median.
        p90_ms=max(float(np.percentile(t, 90)), median),
        mean_ms=float(t.mean()),
        min_ms=float(t.min()),
        runs=int(t.size),
        batch_size=int(batch_size),
        device=device,
        threads=threads,
        backend=backend,
    )


def available_cpus() -> int:
    """CPUs this process may run on (respects taskset/cgroup affinity, unlike os.cpu_count)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def cpu_name() -> str:
    """A short CPU description for reports; platform.processor() is often empty on Linux."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return f"cpu ({platform.processor() or platform.machine()})"


def host_clock(step: Callable[[], object]) -> float:
    """Wall time of one call (ms): right for CPU runtimes, whose calls return when done."""
    start = time.perf_counter()
    step()
    return (time.perf_counter() - start) * 1e3


class CudaClock:
    """Device time of one call (ms) from CUDA events recorded on ``stream`` around it.

    The end event is waited for before returning, so the next model's turn never overlaps this
    one's kernels. ``stream=None`` means the current stream at call time.
    """

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream

    def __call__(self, step: Callable[[], object]) -> float:
        import torch

        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record(self.stream)
        step()
        end.record(self.stream)
        end.synchronize()
        return float(start.elapsed_time(end))


# A pass shorter than this gets an untimed pass right before its timed one when several models
# take turns: switching models evicts caches and parks thread pools, and that cost belongs to
# the switch, not to the model (measured: ~30 ms per ResNet-50 batch-1 pass on 2 cores).
SETTLE_BELOW_S = 0.2


@dataclass(frozen=True, slots=True)
class Timing:
    """What :func:`measure` saw: per batch size, per runner (in the order given), raw times and
    their stats. Ratios compare runner ``i`` with runner ``ref`` (default the first, "dense")."""

    times_ms: dict[int, tuple[tuple[float, ...], ...]]
    stats: dict[int, tuple[LatencyStats, ...]]

    def speedup(self, batch: int, i: int, ref: int = 0) -> float:
        """Median of ``ref`` / median of ``i``: > 1 when ``i`` is faster."""
        return self.stats[batch][ref].median_ms / self.stats[batch][i].median_ms

    def paired_speedup(self, batch: int, i: int, ref: int = 0) -> float:
        """Median over rounds of the same-round ratio: robust to load that changes between
        rounds, since both passes of a round saw the same load."""
        a, b = (np.asarray(self.times_ms[batch][k]) for k in (ref, i))
        return float(np.median(a / b))

    def drift(self, batch: int, i: int = 0) -> float:
        """Median of the second half of the rounds / the first half, minus 1 (0 = steady)."""
        t = np.asarray(self.times_ms[batch][i])
        half = len(t) // 2
        return float(np.median(t[half:]) / np.median(t[:half]) - 1) if half else 0.0


def measure(
    runners: Sequence[Runner],
    batch_sizes: Iterable[int] = (1, 16),
    *,
    warmup: int = 10,
    rounds: int = 50,
    seconds: float | None = None,
    min_rounds: int = 10,
) -> Timing:
    """Time ``runners`` interleaved: per batch size, ``warmup`` untimed passes each, then up to
    ``rounds`` rounds of one timed pass each (rotating order), stopping early once ``seconds``
    have passed and at least ``min_rounds`` rounds are done.

    Each runner binds its inputs for a batch once (``runner.step(b)``) and is timed by its own
    clock. Raises ValueError on bad counts; a latency without runs would be a made-up number.
    """
    runners = list(runners)
    batch_sizes = list(batch_sizes)
    if not runners:
        raise ValueError("measure() needs at least one runner")
    if rounds < 1 or warmup < 0 or min_rounds < 1:
        raise ValueError(
            f"need rounds >= 1, min_rounds >= 1 and warmup >= 0; got rounds={rounds}, "
            f"min_rounds={min_rounds}, warmup={warmup}"
        )
    if not batch_sizes or min(batch_sizes) < 1:
        raise ValueError(f"batch sizes must be >= 1, got {batch_sizes}")
    times: dict[int, tuple[tuple[float, ...], ...]] = {}
    stats: dict[int, tuple[LatencyStats, ...]] = {}
    for batch in batch_sizes:
        per = _interleave(runners, batch, warmup, rounds, seconds, min(min_rounds, rounds))
        times[batch] = tuple(tuple(t) for t in per)
        stats[batch] = tuple(
            stats_from_times(
                t, batch_size=batch, device=r.device, threads=r.threads, backend=r.backend
            )
            for r, t in zip(runners, per, strict=True)
        )
    return Timing(times, stats)


def _interleave(
    runners: list[Runner],
    batch: int,
    warmup: int,
    rounds: int,
    seconds: float | None,
    min_rounds: int,
) -> list[list[float]]:
    steps = [r.step(batch) for r in runners]
    settle = []
    for r, step in zip(runners, steps, strict=True):
        last = 0.0
        for _ in range(warmup):
            last = r.clock(step)
        settle.append(len(runners) > 1 and last < SETTLE_BELOW_S * 1e3)
    times: list[list[float]] = [[] for _ in runners]
    start = time.perf_counter()
    n = len(runners)
    for k in range(rounds):
        if seconds is not None and k >= min_rounds and time.perf_counter() - start > seconds:
            break
        for i in ((k + j) % n for j in range(n)):
            if settle[i]:
                steps[i]()
            times[i].append(runners[i].clock(steps[i]))
    return times
