"""Temporarily switching a model to eval mode without losing per-module train/eval flags."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode inside the block; afterwards every submodule gets its own flag back.

    ``model.train(was_training)`` would reset all submodules to the root's flag and undo a
    user's frozen (eval-mode) BatchNorms.
    """
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in flags:
            m.training = training
