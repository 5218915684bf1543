"""Model files and atomic writes. Nothing read from a file is ever executed.

A model file (``save_model``, ``graphprune compress --out``) is written with ``torch.save`` and
read with ``torch.load(weights_only=True)``, whose unpickler accepts only tensors and plain
containers: a file that names any other callable is refused before anything runs. It holds

    {"format": "graphprune.model", "version": 2,
     "structure": JSON text (graphprune.serialize: module tree + fx graph from allow-lists),
     "tensors": {name: tensor}, "example_inputs": [tensor, ...], "report": JSON text or None}

so a pruned fx.GraphModule (whose widths and forward differ from the original class) comes
back as the same module tree with the same graph, traceable and trainable again. Files from
graphprune 0.1 held a pickled module; loading them would run code in the file, so they get an
error that says how to convert one you trust: ``graphprune convert --trust OLD.pt --out NEW.pt``.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import nn

from graphprune.errors import ModelFileError

FORMAT, VERSION = "graphprune.model", 2


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
    """torch.save to a temporary file in the same folder, fsync it, rename it over ``path``,
    fsync the folder: after a crash or power loss ``path`` is the old file or the new one,
    never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # what open() would have given, not mkstemp's 0600
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # a platform without directory handles (Windows): rename is what it has
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def safe_load(path: str | Path, *, what: str = "file") -> object:
    """torch.load with ``weights_only=True``: tensors and plain containers only. A pickle that
    names anything else (a module class, a function) is refused with ModelFileError."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if found is None:
            raise ModelFileError(
                f"{path}: not a readable {what} (damaged or not torch.save)"
            ) from exc
        raise ModelFileError(
            f"{path}: refused to load this {what}: it holds pickled Python objects (it names "
            f"{found.group(1)}), and loading them would run code from the file. If it is a model "
            "file written by graphprune 0.1 and you trust its origin, convert it once with "
            f"`graphprune convert --trust {path} --out NEW.pt`"
        ) from exc
    except FileNotFoundError:
        raise
    except Exception as exc:
        raise ModelFileError(
            f"{path}: not a readable {what} ({type(exc).__name__}: {exc})"
        ) from exc


def save_model(
    path: str | Path,
    model: nn.Module,
    example_inputs: Sequence[torch.Tensor],
    report: dict | None = None,
    *,
    extra_modules: Iterable[type[nn.Module]] = (),
) -> Path:
    """Write ``model`` as data: an fx.GraphModule such as compress() returns, or torch.nn
    layers, as they are; any other model is traced first (graphprune.trace), so what is stored
    is its graph, which computes the same. Your own classes kept as leaf modules must be listed
    in ``extra_modules`` here and when loading; anything else that is code (hooks, callables)
    is refused with the module named."""
    from torch import fx

    from graphprune.serialize import UnlistedClassError, describe

    try:
        structure, tensors = describe(model, extra_modules=extra_modules)
    except UnlistedClassError:
        if isinstance(model, fx.GraphModule):
            raise  # a leaf module of the user's own class: only extra_modules can say it is safe
        from graphprune.frontend.trace import trace

        gm = trace(model, tuple(example_inputs))
        structure, tensors = describe(gm, extra_modules=extra_modules)
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "structure": json.dumps(structure),
        "tensors": tensors,
        "example_inputs": [t.detach() for t in example_inputs],
        "report": None if report is None else json.dumps(report, default=str),
    }
    return atomic_save(payload, path)


def load_model(
    path: str | Path, *, extra_modules: Iterable[type[nn.Module]] = ()
) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Load a file written by save_model (or ``graphprune compress --out``) without running
    anything from it: (model, example inputs)."""
    from graphprune.serialize import build

    obj = safe_load(path, what="graphprune model file")
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise ModelFileError(
            f"{path}: not a graphprune model file (no format tag; a state_dict? load it into "
            "your model with model.load_state_dict(torch.load(path)))"
        )
    if obj.get("version") != VERSION:
        raise ModelFileError(
            f"{path}: graphprune model file version {obj.get('version')}; this graphprune "
            f"reads version {VERSION}: use the graphprune that wrote it"
        )
    try:
        structure = json.loads(obj["structure"])
        tensors = dict(obj["tensors"])
        inputs = tuple(obj["example_inputs"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelFileError(f"{path}: damaged graphprune model file ({exc!r})") from exc
    model = build(structure, tensors, extra_modules=extra_modules)
    return model, inputs


def load_report(path: str | Path) -> dict | None:
    """The compression report stored beside the model, if any."""
    obj = safe_load(path, what="graphprune model file")
    text = obj.get("report") if isinstance(obj, dict) else None
    return None if text is None else json.loads(text)


def convert_legacy(
    src: str | Path,
    dst: str | Path,
    *,
    trust: bool = False,
    extra_modules: Iterable[type[nn.Module]] = (),
) -> Path:
    """Rewrite a graphprune 0.1 model file (a pickled module) in the current format. Loading
    it unpickles, which runs code from the file: only with ``trust=True``, for files whose
    origin you trust."""
    if not trust:
        raise ModelFileError(
            f"{src}: converting unpickles the file, which runs any code in it; pass "
            "trust=True (--trust) only for a file whose origin you trust"
        )
    try:
        obj = torch.load(src, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ModelFileError(f"{src}: not a readable model file ({exc})") from exc
    if not isinstance(obj, dict) or not isinstance(obj.get("model"), nn.Module):
        raise ModelFileError(f"{src}: not a graphprune 0.1 model file (no 'model' module in it)")
    return save_model(
        dst,
        obj["model"],
        tuple(obj.get("example_inputs", ())),
        obj.get("report"),
        extra_modules=extra_modules,
    )
