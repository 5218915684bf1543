"""Checks on what a user hands to trace(): the model and its example inputs.

Each check turns a mistake that would otherwise surface as a raw error deep inside torch.fx
or a kernel (or, worse, as a silently wrong shape record) into a message that names the
problem and the fix. None of them touches the model.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Sequence

import torch
from torch import nn

from graphprune.errors import InputError


def check_example_inputs(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
    """The example inputs (see ``trace.as_inputs``) fit ``model``'s forward and hold data."""
    _check_signature(model, inputs)
    for i, t in enumerate(inputs):
        if t.dim() >= 1 and t.shape[0] == 0:
            raise InputError(
                f"example input {i} has an empty batch (shape {tuple(t.shape)}); shapes are "
                "recorded by running it, so give at least one sample"
            )


def check_model_matches_inputs(model: nn.Module, inputs: Sequence[torch.Tensor]) -> None:
    """Meta-device models, and inputs whose device or float dtype differs from the model's."""
    tensors = [*model.parameters(), *model.buffers()]
    meta = [n for n, t in _named_tensors(model) if t.is_meta]
    if meta or any(t.is_meta for t in inputs):
        where = f"parameters {meta[:3]}" if meta else "the example inputs"
        raise InputError(
            f"{where} are on the meta device (no values): graphprune needs real weights to rank "
            "and prune channels; materialize the model first, e.g. "
            "model.to_empty(device='cpu') then load_state_dict(...)"
        )
    devices = {t.device for t in tensors}
    if len(devices) == 1:
        (device,) = devices
        for i, t in enumerate(inputs):
            if t.device != device:
                raise InputError(
                    f"example input {i} is on {t.device} but the model is on {device}; "
                    f"move one of them, e.g. x.to({str(device)!r})"
                )
    dtypes = {t.dtype for t in model.parameters() if t.is_floating_point()}
    if len(dtypes) == 1:
        (dtype,) = dtypes
        for i, t in enumerate(inputs):
            if t.is_floating_point() and t.dtype != dtype:
                raise InputError(
                    f"example input {i} is {t.dtype} but the model's parameters are {dtype}; "
                    f"convert one of them, e.g. x.to({dtype}) or model.to({t.dtype})"
                )


def warn_nonfinite(model: nn.Module) -> list[str]:
    """Warn about parameters and buffers holding NaN or Inf; returns their names.

    Their channels cannot be ranked by norm: the planners keep them (never drop a channel
    because of a NaN comparison) and the warning says so.
    """
    with torch.no_grad():
        # One reduction per tensor (NaN and Inf survive a sum); the full check only confirms.
        bad = [
            n
            for n, t in _named_tensors(model)
            if t.is_floating_point()
            and not t.is_meta
            and not bool(torch.isfinite(t.sum()))
            and not bool(torch.isfinite(t).all())
        ]
    if bad:
        warnings.warn(
            f"{len(bad)} parameter(s)/buffer(s) hold NaN or Inf values ({', '.join(bad[:3])}"
            f"{', ...' if len(bad) > 3 else ''}): channels whose scores are not finite are kept "
            "out of the rankings (never pruned by score); check the checkpoint you loaded",
            RuntimeWarning,
            stacklevel=3,
        )
    return bad


def _named_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [*model.named_parameters(), *model.named_buffers()]


def _check_signature(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError):  # builtins and C extensions: nothing to check against
        return
    try:
        sig.bind(*inputs)
    except TypeError as exc:
        params = [
            p.name
            for p in sig.parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        raise TypeError(
            f"{type(model).__name__}.forward({', '.join(params)}) cannot take "
            f"{len(inputs)} example input(s): {exc}; pass one tensor per forward argument"
        ) from exc
