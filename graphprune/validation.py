"""Checks of the options an entry point takes, before any tracing or training starts.

An hour into training is the wrong time to learn that ``checkpoint_dir`` is a file or that
the loader yields dicts. Each check names the option, what was wrong and what to pass
instead; numbers that are unambiguous (a numpy float, a 0-d tensor) are accepted and
returned as Python numbers.
"""

from __future__ import annotations

import numbers
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch

from graphprune.errors import InputError
from graphprune.planning.plan import check_flops_target


def check_round_to(round_to: object) -> int:
    """``round_to`` is a positive integer (1 turns rounding off)."""
    value = _as_number(round_to)
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise InputError(
            f"round_to={round_to!r}: must be a positive integer, the multiple kept widths are "
            "rounded up to (8 suits tensor cores; 1 turns rounding off)"
        )
    return int(value)


def check_epochs(epochs: object) -> int:
    value = _as_number(epochs)
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise InputError(f"epochs={epochs!r}: must be a whole number of epochs, at least 1")
    return int(value)


def check_compress_options(options: Mapping[str, object]) -> dict[str, object]:
    """compress()'s options with numbers as Python numbers (numpy scalars and 0-d tensors
    accepted), checked before anything runs: the target, ``round_to``, ``epochs``, the
    loaders and ``checkpoint_dir``. Options it does not know pass through unchanged."""
    out = dict(options)
    for name in ("flops_target", "lr"):
        if name in out:
            out[name] = _as_number(out[name])
    if "flops_target" in out:
        check_flops_target(out["flops_target"])
        out["flops_target"] = float(out["flops_target"])  # type: ignore[arg-type]
    if "round_to" in out:
        out["round_to"] = check_round_to(out["round_to"])
    if "epochs" in out:
        out["epochs"] = check_epochs(out["epochs"])
    train_step = options.get("train_step")
    if options.get("train_loader") is not None:
        check_loader("train_loader", options["train_loader"], train_step)
    if options.get("val_loader") is not None:
        check_loader("val_loader", options["val_loader"], None)
    if options.get("checkpoint_dir") is not None:
        check_checkpoint_dir(options["checkpoint_dir"])
    return out


def check_loader(name: str, loader: object, train_step: object) -> None:
    """A sized iterable whose batches the built-in loop can use: ``(inputs, targets)`` pairs,
    unless a ``train_step`` consumes the batches itself."""
    try:
        n = len(loader)  # type: ignore[arg-type]
    except TypeError:
        raise InputError(
            f"{name} ({type(loader).__name__}) has no len(): the built-in loop sizes its "
            "learning-rate and pruning schedules by batches per epoch; pass a sized loader "
            "(e.g. a DataLoader over a map-style Dataset)"
        ) from None
    if n == 0 or train_step is not None:
        return  # an empty loader is reported by the loop; a train_step reads any batch
    try:
        batch = next(iter(loader))  # type: ignore[call-overload]
    except StopIteration:
        return
    if (
        isinstance(batch, (tuple, list))
        and len(batch) == 2
        and all(isinstance(t, torch.Tensor) for t in batch)
    ):
        return
    what = (
        f"dicts with keys {sorted(batch)}"
        if isinstance(batch, Mapping)
        else "bare tensors"
        if isinstance(batch, torch.Tensor)
        else f"{type(batch).__name__}s of {len(batch)}"
        if isinstance(batch, (tuple, list))
        else f"{type(batch).__name__} objects"
    )
    fix = (
        "pass train_step=lambda model, batch: loss (e.g. "
        "F.cross_entropy(model(batch['image']), batch['label']))"
        if name == "train_loader"
        else "give a loader of (inputs, targets) pairs, or evaluate yourself"
    )
    raise InputError(
        f"{name} yields {what}; the built-in loss needs (inputs, targets) pairs of tensors: {fix}"
    )


def check_checkpoint_dir(path: object) -> Path:
    """A folder that exists or can be made, and can be written to."""
    if not isinstance(path, (str, Path)):
        raise InputError(f"checkpoint_dir={path!r}: give a folder path (str or pathlib.Path)")
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"checkpoint_dir={str(folder)!r} is a file; give a folder path")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".graphprune-probe-"):
            pass
    except OSError as exc:
        raise InputError(
            f"checkpoint_dir={str(folder)!r} cannot be written ({exc.strerror or exc}); "
            "give a folder you can write to"
        ) from exc
    return folder


def _as_number(value: object) -> object:
    """A numpy scalar or a 0-d tensor as the Python number it holds; anything else as is."""
    if isinstance(value, torch.Tensor) and value.dim() == 0:
        return value.item()
    if hasattr(value, "item") and getattr(value, "shape", None) == ():  # numpy scalar or 0-d
        return value.item()  # type: ignore[attr-defined]
    return value
