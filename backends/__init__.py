"""Deployable artifacts and their runners: ONNX (+ ONNX Runtime), TensorRT, eager torch.

``export()`` is the one call for the common case; the modules below stay usable on their own:

- :mod:`.onnx`      export_onnx, cleanup_onnx
- :mod:`.ort`       OrtRunner, parity, latency (ONNX Runtime, CPU)
- :mod:`.tensorrt`  available, build_engine, TrtRunner, latency (optional ``tensorrt``)
- :mod:`.torch`     torch_latency (eager / torch.compile / CUDA graphs)
- :mod:`.timing`    LatencyStats, the one record every runner returns
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .onnx import cleanup_onnx, export_onnx
from .timing import LatencyStats, stats_from_times

__all__ = ["BACKENDS", "LatencyStats", "cleanup_onnx", "export", "export_onnx", "stats_from_times"]

BACKENDS = ("onnx", "tensorrt")

# Options of export_onnx; everything else given with backend="tensorrt" goes to build_engine.
_ONNX_OPTIONS = ("dynamic_batch", "legacy", "opset")


def export(
    model: nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    path: str | Path,
    *,
    backend: str = "onnx",
    fp16: bool = False,
    **options: Any,
) -> Path:
    """Export ``model`` for ``backend`` and return the artifact's path.

    ``onnx``: ``path`` is the .onnx file; options go to :func:`export_onnx`.
    ``tensorrt``: ``path`` is the engine; the ONNX is written next to it (same stem, .onnx) and
    kept, so that when TensorRT is missing the error's trtexec command can be run on it.
    With ``fp16=True`` the ONNX graph itself is fp16, which TensorRT 11 requires and 10 accepts.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; known backends: {', '.join(BACKENDS)}")
    if backend == "onnx":
        return export_onnx(model, example_inputs, path, fp16=fp16, **options)

    from .tensorrt import build_engine

    engine_path = Path(path)
    if engine_path.suffix == ".onnx":
        raise ValueError(
            f"{engine_path} is the engine path and would clash with its ONNX file; "
            "use an .engine suffix"
        )
    onnx_options = {k: options.pop(k) for k in _ONNX_OPTIONS if k in options}
    onnx_path = export_onnx(
        model, example_inputs, engine_path.with_suffix(".onnx"), fp16=fp16, **onnx_options
    )
    return build_engine(onnx_path, engine_path, fp16=fp16, **options)
