"""Deployable artifacts, their runners and the one timing routine.

Every backend is a :class:`~.base.Backend` registered by name (``backend_names()``): ``onnx``
(.onnx, run with ONNX Runtime on CPU), ``tensorrt`` (.engine, optional ``tensorrt`` package and
a GPU) and ``torch`` (.pt model files, eager / compiled PyTorch). Importing this package
registers them; their optional dependencies are imported only when used.

- :func:`export`            write an artifact with the named backend
- :func:`runner`            load an artifact (the backend is chosen by its file suffix)
- :func:`.timing.measure`   time runners interleaved: median, p90, threads, device
- :mod:`.onnx`              export_onnx, cleanup_onnx;  :mod:`.ort` OrtRunner, parity
- :mod:`.tensorrt`          build_engine, trtexec_command;  :mod:`.tensorrt_runner` TrtRunner
- :mod:`.torch`             TorchRunner
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

# Importing a backend's module registers it. (No top-level `import torch` here: the submodule
# graphprune.backends.torch becomes this package's attribute `torch` once imported.)
from .base import (
    Backend,
    Runner,
    backend_for_path,
    backend_names,
    get_backend,
    register_backend,
    unregister_backend,
)
from .onnx import OnnxBackend, cleanup_onnx, export_onnx
from .tensorrt import TensorRTBackend
from .timing import LatencyStats, Timing, measure, stats_from_times
from .torch import TorchBackend

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = [
    "DEFAULT_BACKEND",
    "Backend",
    "LatencyStats",
    "OnnxBackend",
    "TensorRTBackend",
    "TorchBackend",
    "Runner",
    "Timing",
    "backend_for_path",
    "backend_names",
    "cleanup_onnx",
    "export",
    "export_onnx",
    "get_backend",
    "measure",
    "register_backend",
    "runner",
    "stats_from_times",
    "unregister_backend",
]

# What export and bench use when no backend is named: it runs on every machine.
DEFAULT_BACKEND = "onnx"


def export(
    model: nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    path: str | Path,
    *,
    backend: str = DEFAULT_BACKEND,
    fp16: bool = False,
    **options: Any,
) -> Path:
    """Export ``model`` with ``backend`` and return the artifact's path.

    Unknown names raise ValueError listing the registered backends; an unusable one raises
    BackendUnavailableError saying what to install (tensorrt first writes the ONNX file and
    names the equivalent trtexec command). ``options`` go to the backend's export.
    """
    return get_backend(backend).export(model, example_inputs, path, fp16=fp16, **options)


def runner(artifact: str | Path, **options: Any) -> Runner:
    """Load ``artifact`` with the backend that owns its suffix (``options`` go to its runner)."""
    return backend_for_path(artifact).runner(artifact, **options)
