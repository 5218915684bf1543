"""Saving and loading models and atomic file writes.

A saved model is a dict {"model", "example_inputs", "report"}: the pruned GraphModule pickles
with its generated code, and the example inputs let later commands (export, bench) run it.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn


def check_writable(path: str | Path) -> Path:
    """Fail early (before training or a slow export) when ``path`` cannot be written."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory; give a file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".graphprune-probe-"):
        pass
    return path


def atomic_save(obj: object, path: str | Path) -> Path:
    """torch.save to a temporary file in the same folder, then rename: never a torn file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def save_model(
    path: str | Path,
    model: nn.Module,
    example_inputs: Sequence[torch.Tensor],
    report: dict | None = None,
) -> Path:
    return atomic_save(
        {"model": model, "example_inputs": tuple(example_inputs), "report": report}, path
    )


def load_model(path: str | Path) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Load a file written by save_model (or ``graphprune compress --out``)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ValueError(f"{path}: not a readable graphprune model file ({exc})") from exc
    if not isinstance(obj, dict) or "model" not in obj or "example_inputs" not in obj:
        raise ValueError(f"{path}: not a graphprune model file (save it with save_model)")
    return obj["model"], tuple(obj["example_inputs"])
