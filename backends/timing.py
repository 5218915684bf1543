"""One latency record shared by every runner (ONNX Runtime, TensorRT, torch).

All runners report the same value so benchmarks can put dense and pruned models, and different
backends, side by side without per-backend glue. The median is the headline number because a
single slow run (a page fault, a GC pause, a clock change) must not move it; p90 shows the tail.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


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
